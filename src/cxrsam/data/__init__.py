"""Chest X-ray data: reading images and masks (:mod:`cxrsam.data.io`, DICOM in :mod:`cxrsam.data.dicom`), dataset
layouts (:mod:`cxrsam.data.layouts`), splits (:mod:`cxrsam.data.split`), training pairs
(:mod:`cxrsam.data.dataset`), imitated other sites (:mod:`cxrsam.data.shift`) and synthetic phantoms
(:mod:`cxrsam.data.synthetic`). Nothing is imported here, so reading an image costs neither PyTorch (the dataset)
nor pandas (the splits)."""

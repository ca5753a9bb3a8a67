"""A lung mask as a DICOM Segmentation (``--format dicom-seg``), with highdicom.

One binary segment per lung, coded with SNOMED CT: the image-left lung is the patient's **right** lung
(SCT 3341006) and the image-right lung the patient's **left** lung (SCT 44029006), assuming the usual PA/AP view
(as :data:`cxrsam.pipeline.outputs.SIDES`); category SCT 123037004 "Anatomical structure". A mask whose lungs are
not separable (fewer than two components of at least 0.5 % of the image) gets one segment, "Lung" (SCT 39607008).
Pixels outside the kept lung components (specks under 0.5 % of the image) are not in any segment. The SEG
references the source image's Study, Series and SOP Instance UIDs (it joins the source's study), copies the patient
and study attributes, and carries the source's pixel spacing (``PixelSpacing``, else ``ImagerPixelSpacing``) in
its shared Pixel Measures. Slice Thickness is copied when the source has one; a projection radiograph has none and
the standard requires it only with a Frame of Reference (PS3.3 C.7.6.16.2.1), but highdicom's own reader
(``segread``, 0.28) insists on it, so read such a SEG with pydicom (or any DICOM toolkit).
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from cxrsam.errors import CxrsamError
from cxrsam.prompts.components import lung_components

ANATOMICAL_STRUCTURE = ("123037004", "SCT", "Anatomical structure")
RIGHT_LUNG = ("3341006", "SCT", "Right lung")
LEFT_LUNG = ("44029006", "SCT", "Left lung")
LUNG = ("39607008", "SCT", "Lung")
SEG_SERIES_NUMBER = 9901
"""Series number of the SEG (a new series in the source's study)."""
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
"""Source attributes the SEG must reference."""


def lung_segments(mask: np.ndarray, min_area_frac: float) -> list[tuple[tuple[str, str, str], np.ndarray]]:
    """(coded term, bool (H, W)) per segment of a lung mask: right then left lung (image-left, image-right), or one
    "Lung" segment when the lungs are not separable; no segment for an empty mask."""
    components, _ = lung_components(mask, min_area_frac)
    if len(components) == 2:
        return [(RIGHT_LUNG, components[0]), (LEFT_LUNG, components[1])]
    return [(LUNG, components[0])] if components else []


def _source(header: Any, path: Path) -> Any:
    """The source header with the attributes highdicom needs (a copy; the patient/study type-2 ones empty if
    missing); raises when a UID the SEG must reference is missing."""
    missing = [name for name in REQUIRED if not header.get(name)]
    if missing:
        raise CxrsamError(f"DICOM lacks {', '.join(missing)}: a DICOM-SEG cannot reference it", path=path)
    source = header.copy()
    for name in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "AccessionNumber"):
        if name not in source:
            setattr(source, name, None)
    return source


def dicom_seg_bytes(mask: np.ndarray, header: Any, path: Path, spacing_mm: tuple[float, float] | None,
                    software: str, min_area_frac: float, algorithm: Sequence[str] = ("cxrsam", "SAM")) -> bytes:
    """A DICOM Segmentation (binary, explicit VR little endian) of a bool lung mask (H, W) of the DICOM image with
    ``header`` (pydicom ``Dataset``, pixel data not needed) read from ``path``; ``spacing_mm`` (row, col) is the
    source's pixel spacing. See the module docstring for the segments and references."""
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    mask = np.asarray(mask, dtype=bool)
    if (int(header.get("Rows", 0)), int(header.get("Columns", 0))) != mask.shape:
        raise CxrsamError(f"DICOM image is {header.get('Rows')}x{header.get('Columns')} (rows x columns), the mask "
                          f"{mask.shape[0]}x{mask.shape[1]}", path=path)
    segments = lung_segments(mask, min_area_frac)
    if not segments:
        raise CxrsamError("empty lung mask: no DICOM-SEG written", path=path)
    source = _source(header, path)
    name, family = algorithm
    identification = hd.AlgorithmIdentificationSequence(name=name, version=software,
                                                        family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=term[2],
        segmented_property_category=CodedConcept(*ANATOMICAL_STRUCTURE),
        segmented_property_type=CodedConcept(*term),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification)
        for number, (term, _) in enumerate(segments, start=1)]
    pixels = np.stack([segment for _, segment in segments], axis=-1)[None].astype(np.uint8)  # (1, H, W, S)
    measures = None if spacing_mm is None else hd.PixelMeasuresSequence(
        pixel_spacing=[float(v) for v in spacing_mm],
        slice_thickness=float(header.SliceThickness) if header.get("SliceThickness") else None)
    try:
        seg = hd.seg.Segmentation(
            source_images=[source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cxrsam",
            manufacturer_model_name=f"{name} {family}", software_versions=software, device_serial_number="none",
            series_description="Lung segmentation (cxrsam)", pixel_measures=measures, omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CxrsamError(f"DICOM-SEG not written ({first})", path=path) from None
    buffer = BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()

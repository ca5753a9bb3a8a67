"""Training: the generic accelerate loop (:mod:`cxrsam.train.loop`) and the CNN baseline trainer."""

"""Segmentation metrics (:mod:`cxrsam.evaluation.metrics`), statistics (:mod:`cxrsam.evaluation.stats`) and directory
evaluation (:mod:`cxrsam.evaluation.evaluate`). Importing the package imports none of them (a predict run needs only
the metrics, without SciPy's statistics or pandas); import from the submodules."""

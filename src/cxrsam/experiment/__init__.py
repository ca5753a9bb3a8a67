"""One-command experiments: the paper's comparison as cached, resumable stages."""

from cxrsam.experiment.config import ExperimentConfig, load_config
from cxrsam.experiment.runner import ExperimentResult, run_experiment

__all__ = ["ExperimentConfig", "ExperimentResult", "load_config", "run_experiment"]

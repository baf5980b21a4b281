"""Few-label probes on frozen embeddings: train, calibrate, evaluate, save, and the data-efficiency curve."""

from .io import ProbeFileError, load_probe, load_probe_dir, load_probes, save_probe
from .metrics import auc_ci, choose_threshold, delong_test, sensitivity_specificity
from .probe import Probe, train_probe
from .trees import TreeEnsemble, TreeModelError, parse_lightgbm_model

__all__ = ["Probe", "train_probe", "save_probe", "load_probe", "load_probe_dir", "load_probes", "ProbeFileError",
           "TreeEnsemble", "TreeModelError", "parse_lightgbm_model", "auc_ci", "delong_test",
           "sensitivity_specificity", "choose_threshold"]

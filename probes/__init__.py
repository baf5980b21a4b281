"""Few-label probes on frozen embeddings: train, calibrate, evaluate, save, and the data-efficiency curve."""

from .io import load_probe, save_probe
from .metrics import auc_ci, choose_threshold, delong_test, sensitivity_specificity
from .probe import Probe, train_probe

__all__ = ["Probe", "train_probe", "save_probe", "load_probe", "auc_ci", "delong_test",
           "sensitivity_specificity", "choose_threshold"]

"""scripts/curve_tables.py, the tables of BENCHMARKS.md and MODEL_CARD.md, on curve outputs made here."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "curve_tables.py"

SUMMARY = ("model", "probe", "size", "n_train", "draws", "auc_mean", "auc_ci_low", "auc_ci_high", "n_test",
           "n_test_patients")
COMPARISON = ("model_a", "probe", "model_b", "probe_b", "size", "n_train", "draws", "auc_a", "auc_b", "difference",
              "diff_ci_low", "diff_ci_high", "p_one_sided", "p_holm")


def _write(path: Path, columns, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerows(rows)


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_each_difference_is_printed_beside_the_models_it_compares(tmp_path):
    """Three models: before, every row showed the first comparison's second model (B) beside A - C."""
    task = tmp_path / "task"
    task.mkdir()
    _write(task / "summary.csv", SUMMARY, [("A", "linear", "45", "45", "20", "0.800", "0.75", "0.85", "98", "98"),
                                          ("B", "linear", "45", "45", "20", "0.700", "0.65", "0.75", "98", "98"),
                                          ("C", "finetune", "45", "45", "5", "0.900", "0.85", "0.95", "98", "98")])
    _write(task / "comparison.csv", COMPARISON, [
        ("A", "linear", "B", "linear", "45", "45", "20", "0.800", "0.700", "0.100", "0.05", "0.15", "0.001", "0.002"),
        ("A", "linear", "C", "finetune", "45", "45", "5", "0.810", "0.900", "-0.090", "-0.14", "-0.04", "1", "1")])
    out = _run(tmp_path, "task")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| linear")]
    assert "| B (linear) | 0.700 (0.650-0.750) | **+0.100" in rows[0]
    # A's summary covers 20 draws, the difference 5: the shared draws' mean, said so; C's own AUC
    assert "| 0.810 (its 5 shared draws) | C (finetune) | 0.900 (0.850-0.950) | -0.090" in rows[1]

    at = _run(tmp_path, "task", "--at", "45")
    assert at.returncode != 0 and "--at shows one pair of models" in at.stderr
    missing = _run(tmp_path, "nothing")
    assert missing.returncode != 0 and "is not a curve output folder" in missing.stderr


def test_fit_table_takes_rows_without_a_target_or_a_number(tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    cols = ("model", "probe", "a", "a_ci_low", "a_ci_high", "c", "max_residual", "target_auc", "labels_needed",
            "labels_ci_low", "labels_ci_high", "p_reached", "status", "note")
    _write(task / "fit.csv", cols, [("A", "linear", "0.9", "0.8", "1.0", "0.5", "0.01", "", "", "", "", "", "", ""),
                                    ("A", "linear", "0.8", "0.8", "0.8", "0.5", "0.05", "0.74", "", "", "", "0.9",
                                     "no trend", "the fit is flat")])
    out = _run(tmp_path, "--fit", "task")
    assert out.returncode == 0, out.stderr
    assert "| n/a (n/a-n/a) | n/a | no target |" in out.stdout
    assert "| 0.74 | n/a (n/a-n/a) | 0.90 | no trend | the fit is flat |" in out.stdout


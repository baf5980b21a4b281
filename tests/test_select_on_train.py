"""scripts/select_on_train.py: model choice on the tasks' train splits only."""

import csv
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("select_on_train", ROOT / "scripts" / "select_on_train.py")
select = importlib.util.module_from_spec(spec)
spec.loader.exec_module(select)


def test_selection_split_uses_train_rows_only_and_whole_patients(shared, tmp_path):
    task = shared / "tasks" / "covid_cohen.csv"  # patients with several images
    out = tmp_path / "sel.csv"
    n_train, n_test = select.split_train_rows(task, out)
    source = {r["image"]: r for r in csv.DictReader(open(task))}
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == n_train + n_test == sum(r["split"] == "train" for r in source.values())
    assert all(source[r["image"]]["split"] == "train" for r in rows)
    parts: dict[str, set] = {}
    for r in rows:
        parts.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in parts.values()), "a patient is on both sides"
    test_patients = sum(s == {"test"} for s in parts.values())
    assert abs(test_patients / len(parts) - select.SELECTION_TEST_FRACTION) < 0.05
    for part in ("train", "test"):
        assert {r["label"] for r in rows if r["split"] == part} == {"0", "1"}
    select.check_no_test_rows(task, out)  # passes
    leaked = tmp_path / "leak.csv"
    shutil.copy(out, leaked)
    test_row = next(r for r in source.values() if r["split"] == "test")
    with open(leaked, "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=list(test_row)).writerow(test_row)
    with pytest.raises(SystemExit, match="come from the test split"):
        select.check_no_test_rows(task, leaked)


def test_identical_candidates_differ_by_zero(shared, tb_store, tmp_path):
    out = tmp_path / "select"
    select.main(["--data", str(shared), "--tasks", "tb_shenzhen_mc", "--repeats", "3", "--bootstrap", "200",
                 "--out", str(out), "--no-progress",
                 "--candidate", "a=" + str(_linked(tb_store, tmp_path / "a")),
                 "--candidate", "b=" + str(_linked(tb_store, tmp_path / "b"))])
    rows = list(csv.DictReader(open(out / "selection.csv")))
    assert [r["candidate"] for r in rows] == ["a", "b"]
    assert float(rows[1]["difference"]) == 0.0
    assert float(rows[1]["diff_ci_low"]) == 0.0 == float(rows[1]["diff_ci_high"])
    assert 0.5 < float(rows[0]["auc"]) <= 1.0
    assert "mean over tasks" in (out / "selection.md").read_text()


def _linked(store: Path, folder: Path) -> str:
    folder.mkdir()
    shutil.copy(store, folder / "tb_shenzhen_mc.h5")
    return str(folder / "{task}.h5")

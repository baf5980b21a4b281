"""scripts/source_shortcut.py on the real pool: the sample, and the check end to end (ImageNet model)."""

import importlib.util
import json
import sys
from collections import Counter

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def shortcut():
    spec = importlib.util.spec_from_file_location("source_shortcut", ROOT / "scripts" / "source_shortcut.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["source_shortcut"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_even_split_gives_what_a_cell_lacks_to_the_others(shortcut):
    assert shortcut.even_split(30, {"a": 2, "b": 100}) == {"a": 2, "b": 28}
    assert shortcut.even_split(31, {"a": 50, "b": 50, "c": 50}) == {"a": 11, "b": 10, "c": 10}
    assert shortcut.even_split(10, {"a": 3, "b": 4}) == {"a": 3, "b": 4}


def test_the_sample_is_per_source_and_even_between_classes(shortcut, shared):
    sample = shortcut.draw_sample(shared, ROOT / "configs" / "finding-classes.yaml", 30, seed=0)
    assert Counter(sample.sources) == dict.fromkeys(
        ["covid19_radiography_db", "covid_cxnet", "hannover_mhh", "kermany_pediatric", "tb_tbx11k"], 30)
    cells = Counter(zip(sample.sources, sample.classes))
    assert cells[("kermany_pediatric", "normal")] == cells[("kermany_pediatric", "viral_pneumonia")] == 10
    assert cells[("covid19_radiography_db", "normal")] == cells[("covid19_radiography_db", "covid19")] == 15
    again = shortcut.draw_sample(shared, ROOT / "configs" / "finding-classes.yaml", 30, seed=0)
    assert again.images == sample.images
    kermany = [g for g, s in zip(sample.groups, sample.sources) if s == "kermany_pediatric"]
    assert not any(g.startswith("images/") for g in kermany)  # patient ids where the pool has them
    radiography = [(g, i) for g, s, i in zip(sample.groups, sample.sources, sample.images) if s == "covid19_radiography_db"]
    assert all(g == i for g, i in radiography)  # no ids: each image is its own group


def test_the_check_end_to_end(shortcut, shared, tmp_path, capsys):
    code = shortcut.main(["--model", "imagenet-effnet-lite0", "--per-source", "30", "--boot", "50",
                          "--data", str(shared), "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["checks"]) == ["all classes", "within covid19", "within normal"]
    within_normal = report["checks"]["within normal"][0]
    assert within_normal["sources"] == {"covid19_radiography_db": 15, "kermany_pediatric": 10}
    for rows in report["checks"].values():
        for r in rows:
            for metric in ("balanced_accuracy", "macro_auc"):
                est, lo, hi = r[metric]
                assert 0 <= lo <= est <= hi <= 1
    # five collections made in different ways: ImageNet features tell them apart far above chance (0.2)
    assert report["checks"]["all classes"][0]["balanced_accuracy"][1] > 0.4
    assert "| all classes |" in capsys.readouterr().out

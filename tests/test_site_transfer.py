"""scripts/site_transfer.py: sites from file names, the experiment's plan, and paired results on real stores."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_embed.errors import LabelError
from cxr_embed.labels import read_labels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site_transfer():
    spec = importlib.util.spec_from_file_location("site_transfer", ROOT / "scripts" / "site_transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["site_transfer"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sites_come_from_the_file_name(site_transfer):
    assert site_transfer.site_of("images/tb/CHNCXR_0004_0.jpg") == "Shenzhen"
    assert site_transfer.site_of("MCUCXR_0023_1.png") == "Montgomery"
    with pytest.raises(LabelError, match="00000061_015.jpg.*site is unknown"):
        site_transfer.site_of("images/nih/00000061_015.jpg")


def test_plan_and_balance_on_the_real_task(site_transfer, shared):
    table = read_labels(shared / "tasks" / "tb_shenzhen_mc.csv", require_split=True)
    by = {(b["site"], b["split"]): b for b in site_transfer.balance(table)}
    assert (by[("Shenzhen", "all")]["images"], by[("Shenzhen", "all")]["positive"]) == (290, 130)
    assert (by[("Montgomery", "all")]["images"], by[("Montgomery", "all")]["positive"]) == (36, 14)
    assert by[("Montgomery", "test")]["positive"] == 2 and all(b["label_differs_from_file_name"] == 0 for b in by.values())
    fits, evals = site_transfer.plan(table, draws=3)
    kinds = {e.name: e.kind for e in evals}
    assert kinds["Shenzhen -> Montgomery"] == "transfer" and kinds["Montgomery -> Shenzhen"] == "transfer"
    sites = {i: site_transfer.site_of(im) for i, im in enumerate(table.images)}
    for e in evals:
        assert {sites[i] for i in e.test} == {e.target}
        for draw in fits[e.fit]:
            assert not set(draw) & set(e.test)  # no test image is trained on
    assert len(fits["Shenzhen train, 36 labels"]) == 3  # the 36 labels Montgomery has, drawn from Shenzhen's train split
    assert all(abs(len(d) - 36) <= 2 and {sites[i] for i in d} == {"Shenzhen"} for d in fits["Shenzhen train, 36 labels"])
    assert not any(name.startswith("Montgomery train") for name in fits)  # 23 Montgomery train images < 290


def test_identical_stores_differ_by_exactly_zero(site_transfer, tb_store, shared, tmp_path):
    other = tmp_path / "copy.h5"
    other.write_bytes(tb_store.read_bytes())
    labels = shared / "tasks" / "tb_shenzhen_mc.csv"
    res = site_transfer.run_site_transfer([str(tb_store), str(other)], str(labels), ["linear"], B=200, draws=2)
    first, second = "imagenet-effnet-lite0 (tb.imagenet)", "imagenet-effnet-lite0 (copy)"
    for d in res.differences:  # the same embeddings, draws and replicates: every difference is exactly 0
        assert d["estimate"] == d["ci_low"] == d["ci_high"] == 0.0 and d["p_holm"] == 1.0
    aucs = {(a["evaluation"], a["model"]): a for a in res.aucs}
    assert {a["model"] for a in res.aucs} == {first, second}
    transfer = aucs[("Shenzhen -> Montgomery", first)]
    assert (transfer["n_train"], transfer["n_test"], transfer["test_positive"]) == (290, 36, 14)
    assert all(a["ci_low"] <= a["estimate"] <= a["ci_high"] for a in res.aucs)
    drops = [r for r in res.drops if r["model"] == first and r["within"] == "train split -> Shenzhen test"]
    assert len(drops) == 1 and drops[0]["estimate"] == pytest.approx(drops[0]["auc_within"] - drops[0]["auc_transfer"], abs=2e-4)
    assert res.models == [first, second]
    text = site_transfer.markdown(res)
    assert "| Montgomery | test | 13 | 2 |" in text and np.isfinite([a["estimate"] for a in res.aucs]).all()


def test_bad_counts_and_a_store_missing_images_are_refused(site_transfer, tb_store, shared, tmp_path, capsys):
    labels = shared / "tasks" / "tb_shenzhen_mc.csv"
    rows = open(labels).read().splitlines()
    extra = tmp_path / "tb_plus.csv"
    extra.write_text("\n".join(rows + [rows[1].replace(rows[1].split(",")[0], "CHN_not_embedded.png", 1)]) + "\n")
    args = ["--store", str(tb_store), "--store", str(tb_store), "--bootstrap", "50", "--draws", "1"]
    assert site_transfer.main([*args, "--labels", str(extra)]) == 2  # before: a bare KeyError
    assert "have no embedding in" in capsys.readouterr().err
    for bad in (["--draws", "0"], ["--bootstrap", "0"]):  # before: crashes after every fit
        with pytest.raises(SystemExit) as exc:
            site_transfer.main([*args, "--labels", str(labels), *bad])
        assert exc.value.code == 2 and "at least" in capsys.readouterr().err

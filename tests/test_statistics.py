"""The statistics behind the curve: clustered DeLong, logit intervals, the paired patient bootstrap,
Holm's adjustment, grouped internal CV, and the metadata-only baseline."""


import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr_embed.errors import LabelError
from cxr_embed.store import StoreWriter
from probes.bootstrap import (draw_resamples, mean_interval, patient_bootstrap, weighted_auc,
                              weighted_average_precision)
from probes.curve import run_curve
from probes.metrics import auc_ci, delong_test, holm
from probes.probe import _folds, train_probe
from conftest import write_rows


def _clustered_sample(rng, n_patients=60, delta=1.0, sd_patient=1.0, sd_image=0.5):
    """Patients with 1-6 images each, one label per patient, a shared patient effect in the score."""
    sizes = rng.integers(1, 7, n_patients)
    label = rng.integers(0, 2, n_patients)
    label[:2] = [0, 1]
    effect = rng.normal(0, sd_patient, n_patients)
    pid = np.repeat(np.arange(n_patients), sizes)
    score = delta * label[pid] + effect[pid] + rng.normal(0, sd_image, len(pid))
    return label[pid], score, pid


def test_clustered_delong_covers_the_true_auc():
    rng = np.random.default_rng(20261130)
    true_auc = stats.norm.cdf(1.0 / np.sqrt(2 * (1.0 + 0.25)))
    hits_clustered = hits_naive = 0
    runs = 400
    for _ in range(runs):
        y, s, pid = _clustered_sample(rng)
        c = auc_ci(y, s, groups=pid)
        n = auc_ci(y, s)
        hits_clustered += c.ci_low <= true_auc <= c.ci_high
        hits_naive += n.ci_low <= true_auc <= n.ci_high
    assert abs(hits_clustered / runs - 0.95) <= 0.03
    assert hits_naive / runs < 0.88  # treating images as independent under-covers here


def test_clustered_delong_with_one_image_per_patient_is_delong():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    s = y + rng.normal(size=400)
    plain, clustered = auc_ci(y, s), auc_ci(y, s, groups=np.arange(400))
    assert clustered.auc == plain.auc
    assert clustered.se == pytest.approx(plain.se, rel=0.01)
    assert clustered.n_clusters == 400 and "clustered by patient (400)" in clustered.method


def test_logit_interval_stays_inside_and_is_asymmetric_near_one():
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(30), np.ones(30)]
    s = y * 2.5 + rng.normal(size=60)
    a = auc_ci(y, s)
    assert 0.9 < a.auc < 1 and 0 < a.ci_low < a.auc < a.ci_high < 1
    assert a.ci_high - a.auc < a.auc - a.ci_low
    perfect = auc_ci(y, y * 10 + rng.normal(size=60))  # DeLong's variance is 0 here
    assert perfect.auc == pytest.approx(1.0) and perfect.ci_low == pytest.approx(0.025 ** (1 / 30)) and perfect.ci_high == 1.0


def test_fewer_than_two_of_a_class_is_a_label_error():
    y = np.r_[np.zeros(20), 1]
    s = np.arange(21.0)
    with pytest.raises(LabelError, match="1 positive and 20 negative"):
        auc_ci(y, s)
    with pytest.raises(LabelError, match="at least 2 of each class"):
        delong_test(1 - y, s, s[::-1])


def test_holm_known_values():
    got = holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    assert holm([0.01]).tolist() == [0.01]


def test_weighted_metrics_match_scikit_learn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 150)
    s = np.round(y + rng.normal(size=150), 1)  # ties on purpose
    w = rng.integers(0, 3, size=(4, 150)).astype(float)
    np.testing.assert_allclose(weighted_auc(y, s, w), [roc_auc_score(y, s, sample_weight=x) for x in w])
    np.testing.assert_allclose(weighted_average_precision(y, s, w),
                               [average_precision_score(y, s, sample_weight=x) for x in w])


def test_patient_bootstrap_moves_whole_patients():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    pid = ["a", "a", "b", "b", "c", "d", "e", ""]
    reps = patient_bootstrap(y, pid, 200, seed=4)
    w = reps.weights
    assert reps.n_patients == 6 and w.shape == (200, 8)
    np.testing.assert_array_equal(w[:, 0], w[:, 1])
    np.testing.assert_array_equal(w[:, 2], w[:, 3])
    assert (w[:, y == 1].sum(1) > 0).all() and (w[:, y == 0].sum(1) > 0).all()


def test_paired_bootstrap_identical_models_is_exactly_zero():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 120)
    draws = [y + rng.normal(size=120) for _ in range(5)]
    reps = patient_bootstrap(y, None, 500, seed=0)
    boot = np.stack([weighted_auc(y, d, reps.weights) for d in draws])
    per = np.array([roc_auc_score(y, d) for d in draws])
    iv = mean_interval(per - per, boot - boot, draw_resamples(5, 500, 0, 0))
    assert (iv.estimate, iv.low, iv.high, iv.p_greater) == (0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("clustered", [False, True])
def test_paired_bootstrap_matches_delong_for_one_draw(clustered):
    """One draw: the interval of the paired difference is the test-set bootstrap, whose spread must
    match the (clustered) DeLong variance of the difference."""
    rng = np.random.default_rng(6)
    y, s, pid = _clustered_sample(rng, n_patients=150)
    other = s + rng.normal(0, 1.0, len(s))
    groups = pid if clustered else None
    reps = patient_bootstrap(y, None if groups is None else [str(p) for p in pid], 2000, seed=1)
    diff_boot = weighted_auc(y, s, reps.weights) - weighted_auc(y, other, reps.weights)
    test = delong_test(y, s, other, groups=groups)
    se_delong = abs(test.difference) / stats.norm.isf(test.p_value / 2)
    assert np.std(diff_boot) == pytest.approx(se_delong, rel=0.15)
    iv = mean_interval(np.array([test.difference]), diff_boot[None], draw_resamples(1, 2000, 0, 0))
    assert iv.estimate == pytest.approx(test.difference) and iv.low < test.difference < iv.high
    assert iv.p_greater < 0.05  # the added noise costs AUC: model a is better
    assert iv.p_greater == pytest.approx(test.p_value / 2, abs=0.01)  # one-sided DeLong


def test_two_level_bootstrap_widens_with_draw_spread():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    reps = patient_bootstrap(y, None, 1000, seed=2)
    steady = [y + rng.normal(size=200) for _ in range(10)]
    shaky = [y * rng.uniform(0.2, 2.0) + rng.normal(size=200) for _ in range(10)]
    widths = []
    for draws in (steady, shaky):
        boot = np.stack([weighted_auc(y, d, reps.weights) for d in draws])
        per = np.array([roc_auc_score(y, d) for d in draws])
        iv = mean_interval(per, boot, draw_resamples(10, 1000, 0, 0))
        widths.append(iv.high - iv.low)
    assert widths[1] > widths[0] * 1.2


def test_internal_cv_keeps_patients_together():
    y = np.array([0, 1] * 30)
    groups = np.repeat(np.arange(20), 3)
    for tr, te in _folds(y, groups, 5, seed=0):
        assert not set(groups[tr]) & set(groups[te])
        assert len(set(y[te])) == 2
    rng = np.random.default_rng(8)
    X = rng.normal(size=(60, 8)) + y[:, None]
    for kind in ("linear", "gbm"):
        probe = train_probe(X, y, kind=kind, groups=groups)
        assert roc_auc_score(y, probe.predict_proba(X)[:, 1]) > 0.9
    with pytest.raises(LabelError, match="groups"):
        train_probe(X, y, groups=groups[:10])


def _synthetic_task(tmp_path, rng, n=240):
    """A store of pure-noise embeddings and labels that the `view` column predicts (AP: mostly 1)."""
    identity = {"model_name": "noise", "weights_hash": "0" * 16, "preprocess_version": "test", "dim": 16}
    writer = StoreWriter(tmp_path / "noise.h5", identity)
    rows = []
    for i in range(n):
        label = int(i % 2)
        view = ("AP" if label else "PA") if rng.random() < 0.85 else ("PA" if label else "AP")
        image = f"img{i}.png"
        writer.add(image, rng.normal(size=16), {})
        rows.append({"image": image, "label": label, "patient_id": f"p{i // 2}", "split": "test" if (i // 2) % 5 == 0 else "train",
                     "view": view})
    writer.commit()
    labels = write_rows(tmp_path / "labels.csv", rows)
    return tmp_path / "noise.h5", labels


def test_view_only_baseline_sees_the_shortcut(tmp_path):
    store, labels = _synthetic_task(tmp_path, np.random.default_rng(9))
    res = run_curve([store], labels, tmp_path / "out", sizes=[45, "full"], repeats=3, probes=["linear"],
                    progress=False, bootstrap=300, log=lambda *_: None)
    by = {(r["model"], r["size"]): r for r in res.summary}
    base = by[("metadata only (view)", "full")]
    noise = by[("noise", "full")]
    assert base["auc_mean"] > 0.75 and base["auc_ci_low"] > 0.6
    assert noise["auc_ci_low"] < 0.5 < noise["auc_ci_high"] + 0.05
    assert by[("metadata only (view)", "45")]["draws"] == 3
    assert not res.comparisons  # one store: nothing to compare; the baseline is not a comparison
    for name in ("curve.csv", "summary.csv", "curve.png"):
        assert (tmp_path / "out" / name).exists()


def test_calibration_never_reverses_the_ranking():
    """Out-of-fold scores below chance (cross-validation near the null) must not flip the probe: the
    NIH ImageNet draws that chose C=1e-4 scored test AUC 0.27-0.30 through a negative Platt slope."""
    from probes.probe import Probe

    rng = np.random.default_rng(10)
    y = np.array([0, 1] * 20)
    oof = (-0.5 * y + rng.normal(0, 0.3, 40))[:, None]  # anti-correlated with the labels
    probe = Probe()
    probe.classes_ = np.array([0, 1])
    probe._fit_calibration(oof, y)
    a, b = probe.calibration_["a"], probe.calibration_["b"]
    assert a > 0
    z = rng.normal(size=50)
    p = 1 / (1 + np.exp(-(a * z + b)))
    assert (np.argsort(p, kind="stable") == np.argsort(z, kind="stable")).all()
    assert p == pytest.approx(0.5, abs=0.01)  # about the base rate: the scores carried no signal


def test_fit_csv_follows_the_run(tmp_path):
    """Three sizes give fit.csv; a later run into the same folder with two sizes removes it rather than
    leaving the earlier run's fit beside its own outputs."""
    store, labels = _synthetic_task(tmp_path, np.random.default_rng(4))
    out = tmp_path / "out"
    notes = []
    res = run_curve([store], labels, out, sizes=[45, 85, "full"], repeats=2, probes=["linear"], progress=False,
                    bootstrap=200, log=notes.append, targets=[0.6, 0.7])
    assert [(r["model"], r["target_auc"]) for r in res.fits] == [("noise", 0.6), ("noise", 0.7)]
    assert (out / "fit.csv").exists()
    res = run_curve([store], labels, out, sizes=[45, "full"], repeats=2, probes=["linear"], progress=False,
                    bootstrap=200, log=notes.append)
    assert not res.fits and not (out / "fit.csv").exists()
    assert any("no learning-curve fit" in n for n in notes)


def test_without_matplotlib_the_curve_says_so_first_and_writes_its_tables(tmp_path, monkeypatch):
    """A slim install (no matplotlib) computed the whole curve, wrote its tables and then exited 2 on the
    plot (a newcomer's review): now it says at the start that there will be no plot, and succeeds."""
    import importlib.util

    store, labels = _synthetic_task(tmp_path, np.random.default_rng(5))
    out = tmp_path / "out"
    out.mkdir()
    (out / "curve.png").write_bytes(b"an earlier run's plot")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    notes = []
    run_curve([store], labels, out, sizes=[45, "full"], repeats=2, probes=["linear"], progress=False, bootstrap=200,
              log=notes.append)
    assert notes[0].startswith("warning: matplotlib is not installed, so no curve.png")
    assert (out / "summary.csv").exists() and not (out / "curve.png").exists()

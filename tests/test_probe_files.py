"""Probe files are untrusted input: a hostile corpus, generated here from real saved probes, is refused.

Every damaged file gives ProbeFileError naming the file (or ModelMismatch), never a crash, a hang,
a signal or a NaN prediction; good files round-trip exactly, and the numpy tree evaluator agrees
with LightGBM's own predict.
"""

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_embed.errors import CxrEmbedError, ModelMismatch
from probes import ProbeFileError, load_probe, load_probe_dir, load_probes, parse_lightgbm_model, save_probe, train_probe
from probes.io import MAX_BYTES

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = {"model_name": "test-model", "weights_hash": "0123456789abcdef", "preprocess_version": "v1/size=224", "dim": 16}
DELETE = object()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 16)).astype(np.float32)
    y2 = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(scale=0.7, size=240) > 0).astype(int)
    y3 = np.array(["a", "b", "c"])[np.digitize(X[:, 2] + 0.3 * rng.normal(size=240), [-0.4, 0.4])]
    return X, y2, y3


@pytest.fixture(scope="module")
def fitted(data):
    X, y2, y3 = data
    return {"linear": train_probe(X, y2, identity=IDENTITY), "linear3": train_probe(X, y3, identity=IDENTITY),
            "gbm": train_probe(X, y2, kind="gbm", identity=IDENTITY),
            "gbm3": train_probe(X, y3, kind="gbm", identity=IDENTITY)}


@pytest.fixture(scope="module")
def docs(fitted, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    return {k: json.loads(save_probe(p, folder / f"{k}.json").read_text()) for k, p in fitted.items()}


def _write(path: Path, content) -> Path:
    """A dict as JSON (NaN written as the non-JSON token NaN; '@raw:1e999' strings as bare tokens)."""
    if isinstance(content, dict):
        content = json.dumps(content).replace('"@raw:', "").replace('@"', "")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _edit(doc: dict, dotted: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return doc


# --- round trip and agreement with LightGBM -----------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "linear3", "gbm", "gbm3"])
def test_round_trip_is_exact(fitted, data, tmp_path, kind):
    X = data[0]
    probe = fitted[kind]
    back = load_probe(save_probe(probe, tmp_path / "p.json", description="d"), expected_identity=IDENTITY)
    np.testing.assert_array_equal(back.predict_proba(X), probe.predict_proba(X))
    np.testing.assert_array_equal(back.predict(X), probe.predict(X))
    assert back.name == "p" and back.description == "d" and back.identity == IDENTITY
    assert list(back.classes_) == list(probe.classes_)


@pytest.mark.parametrize("kind", ["gbm", "gbm3"])
def test_numpy_trees_agree_with_lightgbm(fitted, data, tmp_path, kind):
    import lightgbm as lgb

    X = np.concatenate([data[0], np.random.default_rng(1).normal(scale=3, size=(500, 16)).astype(np.float32)])
    X[:20, :4] = np.nan  # LightGBM reads NaN as 0.0 in splits whose missing type is None
    X[20:30, 5] = np.inf
    probe = fitted[kind]
    loaded = load_probe(save_probe(probe, tmp_path / "p.json"))
    expected = lgb.Booster(model_str=probe.gbm_model_).predict(X, raw_score=True).reshape(len(X), -1)
    ours = loaded.decision_function(X).reshape(len(X), -1)
    assert ours.shape == expected.shape and np.abs(ours - expected).max() <= 1e-9
    assert np.abs(loaded.trees_.raw_score(X, rows_per_chunk=7) - ours).max() == 0  # chunking changes nothing


def test_single_leaf_trees_and_nan_default_direction(data):
    import lightgbm as lgb

    X, y2, _ = data
    X = X.copy()
    X[::7, 0] = np.nan  # NaN in training: splits on feature 0 get missing type NaN, a learned direction
    params = {"objective": "binary", "num_leaves": 4, "min_data_in_leaf": 5, "verbosity": -1, "seed": 0}
    booster = lgb.train(params, lgb.Dataset(X, y2), 20)
    text = booster.model_to_string()
    assert any(int(t) & 8 for t in text.split("decision_type=")[1].split("\n")[0].split())
    trees = parse_lightgbm_model(text, 16, 2)
    np.testing.assert_allclose(trees.raw_score(X)[:, 0], booster.predict(X, raw_score=True), rtol=0, atol=1e-9)
    stump = lgb.train(dict(params, min_data_in_leaf=1000), lgb.Dataset(X, y2), 3)  # trees of one leaf
    text = stump.model_to_string()
    assert "num_leaves=1\n" in text
    np.testing.assert_allclose(parse_lightgbm_model(text, 16, 2).raw_score(X)[:, 0],
                               stump.predict(X, raw_score=True), rtol=0, atol=1e-9)


def test_extreme_but_allowed_weights_give_finite_probabilities(docs, tmp_path):
    doc = _edit(docs["linear"], "linear.coef", [[1e12 if i % 2 else -1e12 for i in range(16)]])
    probe = load_probe(_write(tmp_path / "p.json", _edit(doc, "calibration.a", 1e12)))
    X = np.full((2, 16), np.finfo(np.float32).max, np.float32)
    X[1] *= -1
    assert np.isfinite(probe.predict_proba(X)).all()


def test_save_refuses_what_load_would_refuse(fitted, tmp_path):
    probe = copy.deepcopy(fitted["linear"])
    probe.threshold_ = math.nan
    with pytest.raises(CxrEmbedError, match="cannot save.*threshold must be a finite number"):
        save_probe(probe, tmp_path / "p.json")
    with pytest.raises(CxrEmbedError, match="without commas"):
        save_probe(fitted["linear"], tmp_path / "a,b.json")
    assert not list(tmp_path.iterdir())


# --- the hostile corpus: documents ---------------------------------------------------------------

INF = "@raw:1e999@"  # a JSON number that parses to inf
NAN = math.nan  # json.dumps writes the token NaN, which is not JSON
DOC_CASES = [  # (base probe, field, new value, what the error must say)
    ("linear", "linear.coef.0.3", NAN, "NaN is not a JSON number"),
    ("linear", "linear.coef.0.3", INF, r"linear.coef\[0\]\[3\] must be a finite number"),
    ("linear", "linear.coef.0.3", 1e300, r"linear.coef\[0\]\[3\] must be a finite number in \[-1e\+12"),
    ("linear", "linear.coef.0.3", "0.1", r"linear.coef\[0\]\[3\] must be a number, not str"),
    ("linear", "linear.coef.0.3", True, "must be a number, not bool"),
    ("linear", "linear.coef.0", [0.1] * 15, r"linear.coef\[0\] must be a list of 16 numbers, got 15"),
    ("linear", "linear.coef", [[0.0] * 16] * 2, "must have 1 row"),
    ("linear", "linear.coef", {"0": [0.0] * 16}, "must have 1 row.*got dict"),
    ("linear3", "linear.coef", [[0.0] * 16] * 2, "must have 3 row"),
    ("linear", "linear.intercept.0", NAN, "NaN is not a JSON number"),
    ("linear", "linear.intercept.0", INF, r"linear.intercept\[0\] must be a finite"),
    ("linear", "linear.intercept", [0.0, 0.0], "linear.intercept must be a list of 1 numbers, got 2"),
    ("linear", "linear.C", -1.0, "linear.C must be"),
    ("linear", "calibration.a", INF, "calibration.a must be a finite"),
    ("linear", "calibration.b", NAN, "NaN is not a JSON number"),
    ("linear", "calibration", [1.0, 0.0], "calibration must be an object"),
    ("linear", "calibration", None, "calibration must be an object"),
    ("linear", "calibration.c", 1.0, "calibration: unknown field"),
    ("gbm", "threshold", NAN, "NaN is not a JSON number"),
    ("gbm", "threshold", INF, "threshold must be a finite"),
    ("linear", "threshold", 1.5, r"threshold must be a finite number in \[0, 1\], not 1.5"),
    ("linear", "threshold", -0.1, r"threshold must be a finite number in \[0, 1\]"),
    ("linear", "threshold", "0.5", "threshold must be a number, not str"),
    ("gbm3", "threshold", 0.5, "a probe of 3 classes has no calibration or threshold"),
    ("linear", "threshold_info", {}, "threshold_info must be an object with a string 'method'"),
    ("linear", "threshold_info.chosen_on", NAN, "NaN is not a JSON number"),
    ("linear", "classes", [0, 0], "classes are not unique"),
    ("linear", "classes", [1], "classes must be a list of 2 to"),
    ("linear", "classes", [0, "1"], "classes must all be strings"),
    ("linear", "classes", [0, [1]], "classes must all be strings"),
    ("linear", "classes", "01", "classes must be a list"),
    ("linear", "classes", [0, 1, 2], "a probe of 3 classes has no calibration"),
    ("linear", "classes", [0, 10 ** 30], r"classes\[1\] must be an integer"),
    ("linear3", "classes", ["a", "b"], "calibration must be an object"),
    ("linear", "n_features", 17, "params.identity.dim=16 but n_features=17"),
    ("linear", "n_features", "16", "n_features must be an integer"),
    ("linear", "n_features", True, "n_features must be an integer"),
    ("linear", "params", [], "params must be an object, not list"),
    ("linear", "params.kind", "svm", "params.kind must be one of linear, gbm"),
    ("linear", "params.kind", "gbm", "a gbm probe needs a 'gbm' section and no 'linear' section"),
    ("linear", "params.kind", DELETE, "params: missing kind"),
    ("linear", "params.evil", 1, "params: unknown field"),
    ("linear", "params.cv", 2.5, "params.cv must be an integer"),
    ("linear", "params.Cs", [0.1, NAN], "NaN is not a JSON number"),
    ("linear", "params.Cs", "0.1", "params.Cs must be null or a list"),
    ("linear", "params.identity", [], "params.identity must be an object"),
    ("linear", "params.identity.weights_hash", DELETE, "params.identity: missing weights_hash"),
    ("linear", "params.identity.dim", "16", "params.identity.dim must be an integer"),
    ("linear", "params.identity.model_name", 3, "params.identity.model_name must be a string"),
    ("linear", "params.identity.extra", "x", "params.identity: unknown field"),
    ("linear", "linear", DELETE, "a linear probe needs a 'linear' section"),
    ("linear", "gbm", {"model": "", "n_rounds": 1}, "a linear probe needs a 'linear' section and no 'gbm'"),
    ("linear", "linear", [], "linear must be an object, not list"),
    ("gbm", "gbm.model", {"trees": []}, "gbm.model must be a string"),
    ("gbm", "gbm.n_rounds", 0, "gbm.n_rounds must be an integer"),
    ("gbm", "gbm.model", "", "gbm.model: no 'end of trees' line"),
    ("linear", "format", "cxr-embed-probe/2", "format 'cxr-embed-probe/2' is newer than what this version reads"),
    ("linear", "format", "cxr-embed-probe/0", "is not what this version reads"),
    ("linear", "format", "cxr-embed-store/1", "not a cxr-embed probe file"),
    ("linear", "format", 1, "not a cxr-embed probe file"),
    ("linear", "format", DELETE, r"not a cxr-embed probe file \(no 'format' field\)"),
    ("linear", "name", "", "name '' must be"),
    ("linear", "name", "a,b", "without commas"),
    ("linear", "name", " a", "outer spaces"),
    ("linear", "name", ["a"], "name must be a string"),
    ("linear", "description", 5, "description must be a string"),
    ("linear", "surprise", 1, "the document: unknown field"),
    ("linear", "class_names", ["normal"], "class_names must be a list of 2 names"),
    ("linear", "class_names", ["normal", 1], "class_names must be a list of 2 names"),
    ("linear", "class_names", ["normal", ""], "class_names must be a list of 2 names"),
    ("linear", "class_names", ["normal", "T\x1b[31mB"], "class_names must be a list of 2 names"),
    ("linear", "class_names", ["normal", "x" * 201], "class_names must be a list of 2 names"),
    ("linear", "class_names", ["TB", "TB"], "class_names are the same"),
    ("linear", "class_names", "TB", "class_names must be a list of 2 names"),
    ("linear3", "class_names", ["a", "b"], "class_names is for binary probes"),
] + [("linear", key, DELETE, f"the document: missing {key}")
     for key in ("name", "params", "classes", "n_features", "calibration", "threshold", "threshold_info")]


@pytest.mark.parametrize("base,field,value,match", DOC_CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(DOC_CASES)])
def test_damaged_documents_are_refused(docs, tmp_path, base, field, value, match):
    path = _write(tmp_path / "hostile.json", _edit(docs[base], field, value))
    with pytest.raises(ProbeFileError, match=match) as info:
        load_probe(path)
    assert str(path) in str(info.value)


FILE_CASES = [  # (bytes, what the error must say)
    (b"", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
    ('{"format": "cxr-embed-probe/1", "name": "caf\xe9"}'.encode("latin-1"), "not UTF-8 text"),
    (b"\xef\xbb\xbf{}", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"format": "cxr-embed-probe/1", "format": "cxr-embed-probe/1"}', "'format' appears twice"),
    (b"[1, 2]", r"not a cxr-embed probe file \(a JSON list"),
    (b'"cxr-embed-probe/1"', "not a cxr-embed probe file"),
    (b"1" * 5000, "not valid JSON"),
    (b"Infinity", "Infinity is not a JSON number"),
]


@pytest.mark.parametrize("content,match", FILE_CASES, ids=[f"file-{i}" for i in range(len(FILE_CASES))])
def test_damaged_bytes_are_refused(tmp_path, content, match):
    path = _write(tmp_path / "hostile.json", content)
    with pytest.raises(ProbeFileError, match=match):
        load_probe(path)


def test_truncated_probe_is_refused_at_every_length(docs, tmp_path):
    text = json.dumps(docs["gbm"])
    for cut in range(0, len(text), max(1, len(text) // 300)):
        with pytest.raises(ProbeFileError, match="not valid JSON"):
            load_probe(_write(tmp_path / "cut.json", text[:cut]))


# --- the hostile corpus: LightGBM model text ---------------------------------------------------------


def _tree_line(text: str, tree: int, key: str, new: str) -> str:
    """Replace the `key=` line of tree `tree` (the first such line after 'Tree=tree')."""
    start = text.index(f"\nTree={tree}\n")
    at = text.index(f"\n{key}=", start) + 1
    end = text.index("\n", at)
    return text[:at] + (f"{key}={new}" if new is not None else "") + text[end:]


def _first_value(text: str, tree: int, key: str) -> str:
    start = text.index(f"\n{key}=", text.index(f"\nTree={tree}\n")) + len(key) + 2
    return text[start:text.index("\n", start)]


def _replace_token(text: str, tree: int, key: str, position: int, token: str) -> str:
    tokens = _first_value(text, tree, key).split(" ")
    tokens[position] = token
    return _tree_line(text, tree, key, " ".join(tokens))


def _custom_tree(text: str, tree: int, lines: dict[str, str]) -> str:
    for key, value in lines.items():
        text = _tree_line(text, tree, key, value)
    return text


def _chain(n_leaves: int) -> dict[str, str]:
    """A valid tree that is one long chain: node i sends left to leaf i and right to node i+1."""
    n = n_leaves - 1
    right = [str(i + 1) for i in range(n - 1)] + [str(~n)]
    return {"num_leaves": str(n_leaves), "split_feature": " ".join(["0"] * n), "threshold": " ".join(["0.5"] * n),
            "decision_type": " ".join(["2"] * n), "left_child": " ".join(str(~i) for i in range(n)),
            "right_child": " ".join(right), "leaf_value": " ".join(["0.1"] * n_leaves),
            **{k: " ".join(["1"] * n) for k in ("split_gain", "internal_value", "internal_weight", "internal_count")},
            **{k: " ".join(["1"] * n_leaves) for k in ("leaf_weight", "leaf_count")}}


def _cycle(_text) -> dict[str, str]:
    """Nodes 1 and 2 point at each other, out of reach of the root; every node has one parent."""
    return {"num_leaves": "4", "split_feature": "0 1 2", "threshold": "0 0 0", "decision_type": "2 2 2",
            "left_child": "-1 2 1", "right_child": "-2 -3 -4", "leaf_value": "0.1 0.2 0.3 0.4"}


def _n_leaves(text: str) -> int:
    return int(_first_value(text, 0, "num_leaves"))


GBM_CASES = [  # (base probe, damage to the model text, what the error must say)
    ("gbm", lambda t: t[: t.index("\nTree=2\n") + 40], "no 'end of trees' line"),
    ("gbm", lambda t: t[: t.index("end of trees")], "no 'end of trees' line"),
    ("gbm", lambda t: _replace_token(t, 0, "left_child", 0, "99"), "Tree=0: a child index is out of range"),
    ("gbm", lambda t: _replace_token(t, 0, "right_child", -1, "-99"), "Tree=0: a child index is out of range"),
    ("gbm", lambda t: _replace_token(t, 0, "left_child", 0, "0"), "Tree=0: child pointers do not form a tree"),
    ("gbm", lambda t: _replace_token(t, 0, "left_child", 0, _first_value(t, 0, "right_child").split()[0]),
     "Tree=0: child pointers do not form a tree"),
    ("gbm", lambda t: _custom_tree(t, 0, _cycle(t)), "Tree=0: child pointers form a cycle"),
    ("gbm", lambda t: _custom_tree(t, 0, _chain(300)), "Tree=0: depth 299 is over 256"),
    ("gbm", lambda t: _tree_line(t, 0, "num_leaves", str(_n_leaves(t) + 1)), "Tree=0 split_feature: expected"),
    ("gbm", lambda t: _tree_line(t, 0, "num_leaves", "0"), "Tree=0: num_leaves=0 is out of range"),
    ("gbm", lambda t: _tree_line(t, 0, "num_leaves", "x"), "Tree=0 num_leaves: expected 1 integer"),
    ("gbm", lambda t: _replace_token(t, 0, "threshold", 0, "abc"), "Tree=0 threshold: expected"),
    ("gbm", lambda t: _replace_token(t, 0, "threshold", 0, "nan"), "Tree=0 threshold: expected"),
    ("gbm", lambda t: _replace_token(t, 0, "threshold", 0, "1e999"), "Tree=0 threshold: values must be finite"),
    ("gbm", lambda t: _replace_token(t, 0, "threshold", 0, "0x1p3"), "Tree=0 threshold: expected"),
    ("gbm", lambda t: _replace_token(t, 1, "leaf_value", 0, "nan"), "Tree=1 leaf_value: expected"),
    ("gbm", lambda t: _replace_token(t, 1, "leaf_value", 0, "-inf"), "Tree=1 leaf_value: expected"),
    ("gbm", lambda t: _replace_token(t, 1, "leaf_value", 0, "1e999"), "Tree=1 leaf_value: values must be finite"),
    ("gbm", lambda t: _replace_token(t, 1, "leaf_value", 0, "1e300"), "Tree=1 leaf_value: values must be finite and under"),
    ("gbm", lambda t: _replace_token(t, 0, "split_feature", 0, "16"), "Tree=0: split_feature outside 0..15"),
    ("gbm", lambda t: _replace_token(t, 0, "split_feature", 0, "-1"), "Tree=0: split_feature outside"),
    ("gbm", lambda t: _replace_token(t, 0, "split_feature", 0, "99999999999999"), "Tree=0 split_feature: expected"),
    ("gbm", lambda t: _replace_token(t, 0, "decision_type", 0, "1"), "only numerical splits"),
    ("gbm", lambda t: _replace_token(t, 0, "decision_type", 0, "4"), "only numerical splits"),
    ("gbm", lambda t: _tree_line(t, 0, "num_cat", "1"), "categorical or linear trees are not supported"),
    ("gbm", lambda t: _tree_line(t, 0, "is_linear", "1"), "categorical or linear trees are not supported"),
    ("gbm", lambda t: _tree_line(t, 0, "shrinkage", "nan"), "Tree=0 shrinkage"),
    ("gbm", lambda t: _tree_line(t, 0, "leaf_value", None), "Tree=0: unexpected line ''|Tree=0: missing leaf_value"),
    ("gbm", lambda t: t.replace("\nTree=1\n", "\nTree=7\n", 1), "expected 'Tree=1', found 'Tree=7'"),
    ("gbm", lambda t: t.replace("\nis_linear=0\n", "\nis_linear=0\nxyzzy\n", 1), "Tree=0: unexpected line 'xyzzy'"),
    ("gbm", lambda t: t.replace("\nis_linear=0\n", "\nis_linear=0\nis_linear=0\n", 1), "Tree=0: is_linear given twice"),
    ("gbm", lambda t: t.replace("\nis_linear=0\n", "\nis_linear=0\n\x00\xff\ufffd=1\n", 1), "Tree=0: unexpected line"),
    ("gbm", lambda t: t.replace("max_feature_idx=15", "max_feature_idx=1279", 1), "max_feature_idx=1279, the probe has 16"),
    ("gbm", lambda t: t.replace("num_class=1", "num_class=3", 1), "does not fit a probe of 2 classes"),
    ("gbm", lambda t: t.replace("objective=binary", "objective=regression", 1), "objective 'regression'"),
    ("gbm", lambda t: t.replace("version=v4", "version=v3", 1), "version 'v3'"),
    ("gbm", lambda t: t.replace("tree\n", "booster\n", 1), "does not start with 'tree'"),
    ("gbm", lambda t: t.replace("\nobjective=", "\naverage_output\nobjective=", 1), "header: unexpected line 'average_output'"),
    ("gbm", lambda t: t.replace("\nmax_feature_idx=15\n", "\n", 1), "header: missing max_feature_idx"),
    ("gbm", lambda t: t[: t.index("\nTree=0\n")] + "\nend of trees\n", "0 trees is not a positive multiple"),
    ("gbm3", lambda t: t[: t.rindex("\nTree=")] + "\nend of trees\n", "is not a positive multiple of 3"),
    ("gbm3", lambda t: t.replace("num_class=3", "num_class=1", 1), "does not fit a probe of 3 classes"),
]


@pytest.mark.parametrize("base,damage,match", GBM_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(GBM_CASES)])
def test_damaged_lightgbm_text_is_refused_without_native_code(docs, tmp_path, base, damage, match):
    text = docs[base]["gbm"]["model"]
    damaged = damage(text)
    assert damaged != text
    path = _write(tmp_path / "hostile.json", _edit(docs[base], "gbm.model", damaged))
    with pytest.raises(ProbeFileError, match=match) as info:
        load_probe(path)
    assert str(path) in str(info.value) and "gbm.model: " in str(info.value)


def test_a_valid_deep_chain_is_walked_to_its_end_as_lightgbm_does(docs):
    import lightgbm as lgb

    text = docs["gbm"]["gbm"]["model"]
    one_tree = text[: text.index("\nTree=1\n")] + "\nend of trees\n"
    chain = dict(_chain(200), threshold=" ".join(str(i) for i in range(199)),
                 leaf_value=" ".join(str(i / 1000) for i in range(200)))
    one_tree = _custom_tree(one_tree, 0, chain)
    one_tree = one_tree.replace(one_tree[one_tree.index("tree_sizes="):one_tree.index("\n\nTree=0")], "")
    X = np.zeros((4, 16), np.float32)
    X[:, 0] = [-1, 57.5, 198, 1e6]  # leaf 0, leaf 58, leaf 198, leaf 199 at the end of the chain
    trees = parse_lightgbm_model(one_tree, 16, 2)
    assert trees.depth == 199
    np.testing.assert_array_equal(trees.raw_score(X)[:, 0], [0, 0.058, 0.198, 0.199])
    np.testing.assert_array_equal(trees.raw_score(X)[:, 0], lgb.Booster(model_str=one_tree).predict(X, raw_score=True))


def test_damaged_gbm_probe_no_longer_aborts_the_process(docs, tmp_path):
    # LightGBM's parser aborts the process (SIGABRT) on this text (num_leaves one too many); the
    # child must survive, refuse it with ProbeFileError, and never have imported LightGBM.
    text = docs["gbm"]["gbm"]["model"]
    path = _write(tmp_path / "abort.json", _edit(docs["gbm"], "gbm.model",
                                                  _tree_line(text, 0, "num_leaves", str(_n_leaves(text) + 1))))
    code = ("import sys\nfrom probes import ProbeFileError, load_probe\n"
            "try:\n    load_probe(sys.argv[1])\nexcept ProbeFileError as exc:\n"
            "    print('refused:', exc)\n    sys.exit(5 if 'lightgbm' in sys.modules else 0)\nsys.exit(3)\n")
    child = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, timeout=60, capture_output=True, text=True)
    assert child.returncode == 0, (child.returncode, child.stdout, child.stderr[-2000:])
    assert "refused:" in child.stdout and "Tree=0" in child.stdout


# --- files that are not probe files, and folders of probes ---------------------------------------


@contextlib.contextmanager
def _deadline(seconds: int):
    """Turn a hang (a FIFO opened for reading waits for a writer for ever) into a test failure."""
    def fail(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fifo_folder_device_and_huge_files_are_refused_unopened(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "folder.json").mkdir()
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:
        fh.truncate(MAX_BYTES + 1)  # sparse: refused from its size, before any byte is read
    cases = [(tmp_path / "fifo.json", "is a FIFO, not a regular file"), (tmp_path / "folder.json", "is a folder"),
             (Path("/dev/zero"), "is a character device"), (huge, f"{MAX_BYTES + 1} bytes, over the {MAX_BYTES}"),
             (tmp_path / "missing.json", "cannot read probe .*No such file")]
    _all_refused(cases)


def _all_refused(cases: list[tuple[Path, str]]) -> None:
    with _deadline(20):
        for path, match in cases:
            with pytest.raises(ProbeFileError, match=match):
                load_probe(path)


def test_symlinks_are_followed_to_regular_files_only(docs, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    target = _write(tmp_path / "elsewhere" / "real.json", docs["linear"])
    os.mkfifo(tmp_path / "fifo")
    links = {"good.json": target, "to-fifo.json": tmp_path / "fifo", "dangling.json": tmp_path / "gone",
             "loop.json": tmp_path / "loop.json"}
    for name, to in links.items():
        os.symlink(to, tmp_path / name)
    assert load_probe(tmp_path / "good.json").name == "linear"
    _all_refused([(tmp_path / "to-fifo.json", "to-fifo.json is a FIFO"),
                  (tmp_path / "dangling.json", "cannot read probe .*dangling.json"),
                  (tmp_path / "loop.json", "cannot read probe .*loop.json.*symbolic links")])


def test_folder_of_probes_by_name(fitted, tmp_path):
    save_probe(fitted["linear"], tmp_path / "a.json", name="tb-linear")
    save_probe(fitted["gbm3"], tmp_path / "b.json", name="three-class")
    (tmp_path / "README.txt").write_text("not a probe: ignored")
    os.mkfifo(tmp_path / "pipe")  # not *.json: never looked at
    probes = load_probe_dir(tmp_path, expected_identity=IDENTITY)
    assert sorted(probes) == ["tb-linear", "three-class"] and probes["three-class"].kind == "gbm"
    assert sorted(load_probes(tmp_path)) == sorted(probes)
    assert list(load_probes(tmp_path / "a.json")) == ["tb-linear"]
    with pytest.raises(ModelMismatch, match="weights_hash"):
        load_probe_dir(tmp_path, expected_identity=dict(IDENTITY, weights_hash="ffff"))
    with pytest.raises(ProbeFileError, match="is not a folder of probes"):
        load_probe_dir(tmp_path / "a.json")
    with pytest.raises(ProbeFileError, match="cannot read probe .*nowhere"):
        load_probes(tmp_path / "nowhere")


def test_folder_refuses_two_probes_of_one_name_and_bad_entries(fitted, tmp_path):
    save_probe(fitted["linear"], tmp_path / "a.json", name="same")
    save_probe(fitted["gbm"], tmp_path / "b.json", name="same")
    with pytest.raises(ProbeFileError, match=r"a\.json and .*b\.json are both named 'same'"):
        load_probe_dir(tmp_path)
    (tmp_path / "b.json").unlink()
    os.mkfifo(tmp_path / "c.json")
    with _deadline(20):
        with pytest.raises(ProbeFileError, match="c.json is a FIFO"):
            load_probe_dir(tmp_path)


def test_probe_without_identity_is_refused_where_one_is_expected(data, tmp_path):
    X, y2, _ = data
    path = save_probe(train_probe(X, y2), tmp_path / "anon.json")
    assert load_probe(path).identity is None
    with pytest.raises(ModelMismatch, match="does not record which embedding model"):
        load_probe(path, expected_identity=IDENTITY)


def test_files_written_at_f17ef0b_still_load_with_the_same_probabilities():
    data = ROOT / "tests" / "data"
    expected = json.loads((data / "probes_f17ef0b_expected.json").read_text())  # from that commit's predict_proba
    probes = load_probe_dir(data / "probes_f17ef0b", expected_identity=dict(IDENTITY, model_name="m", preprocess_version="v1", dim=8))
    assert sorted(probes) == ["gbm", "linear"]
    for name, probe in probes.items():
        np.testing.assert_allclose(probe.predict_proba(np.array(expected["X"], np.float32)), expected[name],
                                   rtol=0, atol=1e-12)

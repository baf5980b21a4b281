"""LightGBM's text model read in pure Python and evaluated with numpy: no native code sees the text.

A damaged model text makes LightGBM's own parser abort the whole process (SIGABRT), and some
damage (a child index out of range) it accepts and then reads out of bounds at predict time. Probe
files are untrusted, so we read only what a probe needs (numerical splits, leaf values) and check
all of it: numbers finite, indices in range, child pointers forming one tree. Anything else a
LightGBM model can hold (categorical or linear trees, averaged output) is refused: we never train it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from cxr_embed.errors import CxrEmbedError

_INT = re.compile(r"-?[0-9]{1,12}")
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,4})?")
# decision_type bits (LightGBM tree.h): 1 categorical, 2 default-left, 4|8 missing type
_CATEGORICAL, _DEFAULT_LEFT, _MISSING_ZERO, _MISSING_NAN = 1, 2, 4, 8
MAX_LEAF = 1e12  # |leaf value| bound: sums of many leaves stay far from overflow (inf - inf = NaN)
MAX_DEPTH = 256  # prediction walks one level per step; LightGBM probes here have depth <= 3
# Header fields: those that change predictions are checked; the others are descriptive.
_HEADER_CHECKED = {"version", "num_class", "num_tree_per_iteration", "max_feature_idx", "objective"}
_HEADER_IGNORED = {"label_index", "feature_names", "feature_infos", "tree_sizes", "monotone_constraints"}
_TREE_CHECKED = {"num_leaves", "num_cat", "split_feature", "threshold", "decision_type", "left_child",
                 "right_child", "leaf_value", "is_linear", "shrinkage"}
_TREE_IGNORED = {"split_gain", "leaf_weight", "leaf_count", "internal_value", "internal_weight", "internal_count"}


class TreeModelError(CxrEmbedError):
    """A LightGBM model text we cannot evaluate safely; the message says what is wrong and where."""

    code = "bad_tree_model"


@dataclass(frozen=True)
class TreeEnsemble:
    """Boosted trees as flat arrays. Child codes: >= 0 an internal node, < 0 the leaf ~code."""

    feature: np.ndarray  # (nodes,) int64
    threshold: np.ndarray  # (nodes,) float64: go left when x <= threshold
    nan_left: np.ndarray  # (nodes,) bool: where a NaN feature goes
    left: np.ndarray  # (nodes,) int64
    right: np.ndarray  # (nodes,) int64
    leaf_value: np.ndarray  # (leaves,) float64
    root: np.ndarray  # (trees,) int64, tree t scores class t % n_classes
    n_classes: int
    n_features: int
    depth: int

    def raw_score(self, X: np.ndarray, rows_per_chunk: int | None = None) -> np.ndarray:
        """Sum of the trees' leaf values, (n, n_classes): LightGBM's predict(raw_score=True)."""
        X = np.asarray(X)
        if X.dtype not in (np.float32, np.float64):  # float32 stays: widening only the gathered values is exact
            X = X.astype(np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected (n, {self.n_features}) features, got {X.shape}")
        chunk = rows_per_chunk or max(1, (1 << 20) // len(self.root))  # bounds the (rows, trees) arrays
        out = np.empty((len(X), self.n_classes))
        for start in range(0, len(X), chunk):
            out[start:start + chunk] = self._raw_score(X[start:start + chunk])
        return out

    def _raw_score(self, X: np.ndarray) -> np.ndarray:
        rows = np.arange(len(X))[:, None]
        node = np.broadcast_to(self.root, (len(X), len(self.root))).copy()
        for _ in range(self.depth):
            inner = node >= 0
            if not inner.any():
                break
            at = np.where(inner, node, 0)
            x = X[rows, self.feature[at]]
            go_left = np.where(np.isnan(x), self.nan_left[at], x <= self.threshold[at])
            node = np.where(inner, np.where(go_left, self.left[at], self.right[at]), node)
        values = self.leaf_value[~node].reshape(len(X), -1, self.n_classes)  # (rows, iterations, classes)
        return np.cumsum(values, axis=1)[:, -1]  # added in LightGBM's order (sum() may add pairwise)


def parse_lightgbm_model(text: str, n_features: int, n_classes: int) -> TreeEnsemble:
    """Read LightGBM's model text (numerical trees only) for a probe of `n_classes` on `n_features`."""
    if not isinstance(text, str):
        raise TreeModelError(f"the model must be text, not {type(text).__name__}")
    lines = text.split("\n")
    try:
        end = lines.index("end of trees")
    except ValueError:
        raise TreeModelError("no 'end of trees' line: the model text is truncated or not a LightGBM model") from None
    first = next((i for i, line in enumerate(lines[:end]) if line.startswith("Tree=")), end)
    header = _fields(lines[:first], "header", _HEADER_CHECKED | _HEADER_IGNORED, skip_first="tree")
    per_iteration = _check_header(header, n_features, n_classes)
    blocks = _tree_blocks(lines[first:end])
    if not blocks or len(blocks) % per_iteration:
        raise TreeModelError(f"{len(blocks)} trees is not a positive multiple of {per_iteration} trees per iteration")
    trees = [_parse_tree(block, i, n_features) for i, block in enumerate(blocks)]
    return _pack(trees, per_iteration, n_features)


def _fields(lines: list[str], where: str, known: set[str], skip_first: str | None = None) -> dict[str, str]:
    """key=value lines into a dict: every key known, none twice; blank lines allowed."""
    if skip_first is not None:
        if not lines or lines[0] != skip_first:
            raise TreeModelError(f"the model text does not start with {skip_first!r}")
        lines = lines[1:]
    out: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or key not in known:
            raise TreeModelError(f"{where}: unexpected line {line[:60]!r}")
        if key in out:
            raise TreeModelError(f"{where}: {key} given twice")
        out[key] = value
    return out


def _check_header(header: dict[str, str], n_features: int, n_classes: int) -> int:
    missing = sorted(_HEADER_CHECKED - set(header))
    if missing:
        raise TreeModelError(f"header: missing {', '.join(missing)}")
    if header["version"] != "v4":
        raise TreeModelError(f"header: model text version {header['version'][:20]!r}, expected 'v4'")
    num_class = _ints(header["num_class"], "header num_class", 1)[0]
    per_iteration = _ints(header["num_tree_per_iteration"], "header num_tree_per_iteration", 1)[0]
    max_feature = _ints(header["max_feature_idx"], "header max_feature_idx", 1)[0]
    objective = header["objective"].split(" ")[0]
    want = ("binary", 1) if n_classes == 2 else ("multiclass", n_classes)
    if (objective, num_class) != want or per_iteration != num_class:
        raise TreeModelError(f"header: objective {objective[:20]!r} with num_class={num_class} and "
                             f"{per_iteration} trees per iteration does not fit a probe of {n_classes} classes")
    if max_feature != n_features - 1:
        raise TreeModelError(f"header: max_feature_idx={max_feature}, the probe has {n_features} features")
    return per_iteration


def _tree_blocks(lines: list[str]) -> list[list[str]]:
    """Split the tree section at 'Tree=i' lines, checking that i counts 0, 1, 2..."""
    blocks: list[list[str]] = []
    for line in lines:
        if line.startswith("Tree="):
            if line != f"Tree={len(blocks)}":
                raise TreeModelError(f"expected 'Tree={len(blocks)}', found {line[:30]!r}")
            blocks.append([])
        else:
            blocks[-1].append(line)
    return blocks


def _ints(value: str, where: str, n: int) -> np.ndarray:
    tokens = value.split(" ") if value else []
    if len(tokens) != n or not all(_INT.fullmatch(t) for t in tokens):
        raise TreeModelError(f"{where}: expected {n} integer(s), got {value[:60]!r}")
    return np.array([int(t) for t in tokens], dtype=np.int64)


def _floats(value: str, where: str, n: int, bound: float = np.inf) -> np.ndarray:
    tokens = value.split(" ") if value else []
    if len(tokens) != n or not all(_FLOAT.fullmatch(t) for t in tokens):
        raise TreeModelError(f"{where}: expected {n} number(s), got {value[:60]!r}")
    out = np.array([float(t) for t in tokens], dtype=np.float64)
    if not (np.abs(out) < bound).all() or not np.isfinite(out).all():
        raise TreeModelError(f"{where}: values must be finite" + (f" and under {bound:g} in size" if bound < np.inf else ""))
    return out


def _parse_tree(block: list[str], index: int, n_features: int) -> dict:
    where = f"Tree={index}"
    f = _fields(block, where, _TREE_CHECKED | _TREE_IGNORED)
    missing = sorted(_TREE_CHECKED - set(f))
    if missing:
        raise TreeModelError(f"{where}: missing {', '.join(missing)}")
    n_leaves = int(_ints(f["num_leaves"], f"{where} num_leaves", 1)[0])
    if not 1 <= n_leaves <= 1 << 17:
        raise TreeModelError(f"{where}: num_leaves={n_leaves} is out of range")
    if f["num_cat"] != "0" or f["is_linear"] != "0":
        raise TreeModelError(f"{where}: categorical or linear trees are not supported")
    _floats(f["shrinkage"], f"{where} shrinkage", 1)  # already applied to leaf_value; checked, not used
    n = n_leaves - 1
    feature = _ints(f["split_feature"], f"{where} split_feature", n)
    if n and (feature.min() < 0 or feature.max() >= n_features):
        raise TreeModelError(f"{where}: split_feature outside 0..{n_features - 1}")
    threshold = _floats(f["threshold"], f"{where} threshold", n)
    decision = _ints(f["decision_type"], f"{where} decision_type", n)
    if (decision & ~(_DEFAULT_LEFT | _MISSING_NAN)).any():
        raise TreeModelError(f"{where}: only numerical splits with missing values as None or NaN are supported "
                             f"(decision_type {sorted(set(decision.tolist()))})")
    left = _ints(f["left_child"], f"{where} left_child", n)
    right = _ints(f["right_child"], f"{where} right_child", n)
    depth = _tree_depth(left, right, n_leaves, where)
    # LightGBM: a NaN goes the default way when the missing type is NaN, else it is read as 0.0
    nan_left = np.where(decision & _MISSING_NAN, (decision & _DEFAULT_LEFT) != 0, 0.0 <= threshold)
    return {"feature": feature, "threshold": threshold, "nan_left": nan_left.astype(bool), "left": left,
            "right": right, "leaf_value": _floats(f["leaf_value"], f"{where} leaf_value", n_leaves, MAX_LEAF), "depth": depth}


def _tree_depth(left: np.ndarray, right: np.ndarray, n_leaves: int, where: str) -> int:
    """Check that the child pointers form one tree rooted at node 0; return its depth."""
    n_inner = n_leaves - 1
    if n_inner == 0:  # a single leaf: nothing to point anywhere
        return 0
    children = np.concatenate([left, right])
    inner, leaves = children[children >= 0], ~children[children < 0]
    if (inner >= n_inner).any() or (leaves >= n_leaves).any():
        raise TreeModelError(f"{where}: a child index is out of range ({n_inner} nodes, {n_leaves} leaves)")
    if (np.bincount(inner, minlength=n_inner)[1:] != 1).any() or (inner == 0).any() \
            or (np.bincount(leaves, minlength=n_leaves) != 1).any():
        raise TreeModelError(f"{where}: child pointers do not form a tree (a node with no or several parents)")
    depth, frontier, reached = 0, [0], 0
    while frontier:  # every node has one parent and the root none: a walk from the root cannot loop
        depth, reached = depth + 1, reached + len(frontier)
        frontier = [int(c) for node in frontier for c in (left[node], right[node]) if c >= 0]
    if reached != n_inner:
        raise TreeModelError(f"{where}: child pointers form a cycle ({n_inner - reached} nodes unreachable)")
    if depth > MAX_DEPTH:
        raise TreeModelError(f"{where}: depth {depth} is over {MAX_DEPTH}")
    return depth


def _pack(trees: list[dict], n_classes: int, n_features: int) -> TreeEnsemble:
    """Concatenate the trees, turning each tree's child codes into codes into the flat arrays."""
    node_off = np.cumsum([0] + [len(t["feature"]) for t in trees])
    leaf_off = np.cumsum([0] + [len(t["leaf_value"]) for t in trees])

    def relocate(codes: np.ndarray, i: int) -> np.ndarray:
        return np.where(codes >= 0, codes + node_off[i], ~(~codes + leaf_off[i]))

    cat = np.concatenate
    return TreeEnsemble(
        feature=cat([t["feature"] for t in trees]),
        threshold=cat([t["threshold"] for t in trees]),
        nan_left=cat([t["nan_left"] for t in trees]),
        left=cat([relocate(t["left"], i) for i, t in enumerate(trees)]).astype(np.int64),
        right=cat([relocate(t["right"], i) for i, t in enumerate(trees)]).astype(np.int64),
        leaf_value=cat([t["leaf_value"] for t in trees]),
        root=np.array([node_off[i] if len(t["feature"]) else ~leaf_off[i] for i, t in enumerate(trees)], np.int64),
        n_classes=n_classes, n_features=n_features, depth=max(t["depth"] for t in trees),
    )

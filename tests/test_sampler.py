"""Class- and source-balanced batches, checked on the real pool CSV (seeded draws)."""

import hashlib
from collections import Counter

import numpy as np
import pytest
from scipy.stats import binomtest

from cxr_embed.pool import read_pool_rows, select_rows
from cxr_embed.pretrain import PretrainConfig
from cxr_embed.sampler import ClassBalancedBatches

from conftest import ROOT


@pytest.fixture(scope="module")
def pool(shared):
    """(class index, source) of every row of the real pool, classes from configs/finding-classes.yaml."""
    cfg = PretrainConfig.from_dict({"labels": str(shared / "pretrain.csv"), "label_columns": ["finding"],
                                    "label_map": str(ROOT / "configs" / "finding-classes.yaml")})
    rows = read_pool_rows(cfg)
    keep, keys = select_rows(rows, cfg, "pool")
    names = sorted(set(keys))
    return np.array([names.index(k) for k in keys]), np.array(rows.take(keep).columns["source"]), names, rows


def test_the_default_sampler_draws_the_shipped_recipes_batches(pool):
    """Without groups the sampler is the one the shipped model was trained with: the same batches
    (fingerprint taken from the sampler before balance_by existed) on the `abnormal` labels."""
    abnormal = np.array([int(v) for v in pool[3].columns["abnormal"]])
    s = ClassBalancedBatches(abnormal, 256, 0, seed=0)
    h = hashlib.sha256()
    for epoch in (0, 3):
        for batch in s.epoch(epoch):
            h.update(batch.astype(np.int64).tobytes())
    assert h.hexdigest() == "caf902413161065cbe669d88d1e45098ca3a35d22d6df236856802a8d1e3b66e"


def test_batches_are_balanced_by_class_and_by_source_within_a_class(pool):
    labels, source, names, _ = pool
    s = ClassBalancedBatches(labels, 256, 0, seed=0, groups=source)
    assert s.cpb == 5 and s.per_class == 51 and len(s) == 19376 // 255
    normal, covid = names.index("normal"), names.index("covid19")
    extra_to_kermany = 0
    for epoch in range(4):
        for batch in s.epoch(epoch):
            per_cell = Counter(zip(labels[batch].tolist(), source[batch].tolist()))
            assert all(sum(n for (c, _), n in per_cell.items() if c == k) == 51 for k in range(5))
            assert [per_cell[(covid, g)] for g in ("covid19_radiography_db", "covid_cxnet", "hannover_mhh")] == [17] * 3
            kids, adults = per_cell[(normal, "kermany_pediatric")], per_cell[(normal, "covid19_radiography_db")]
            assert {kids, adults} == {25, 26}
            extra_to_kermany += kids == 26
    # the 51st normal image goes to either source at random: about half of the 300 batches each
    assert binomtest(extra_to_kermany, 4 * len(s), 0.5).pvalue > 1e-3


def test_within_a_source_images_are_drawn_in_passes_without_replacement(pool):
    labels, source, names, _ = pool
    s = ClassBalancedBatches(labels, 256, 0, seed=0, groups=source)
    drawn = np.concatenate(s.epoch(0))
    normal = labels == names.index("normal")
    adults = Counter(drawn[np.isin(drawn, np.flatnonzero(normal & (source == "covid19_radiography_db")))].tolist())
    assert max(adults.values()) == 1  # 1,912 of 10,107: one pass, no image twice
    kids = np.flatnonzero(normal & (source == "kermany_pediatric"))
    counts = np.array([Counter(drawn.tolist())[i] for i in kids])
    assert counts.min() >= 5 and counts.max() - counts.min() <= 3  # 231 images drawn ~8 times each, evenly


def test_group_alpha_one_draws_sources_as_the_pool_has_them(pool):
    labels, source, names, _ = pool
    s = ClassBalancedBatches(labels, 256, 0, seed=0, groups=source, group_alpha=1.0)
    normal = names.index("normal")
    kids = sum(int(((labels[b] == normal) & (source[b] == "kermany_pediatric")).sum()) for e in range(4) for b in s.epoch(e))
    expected = 4 * len(s) * 51 * 231 / 10338  # 341.9: 1 or 2 per batch
    assert abs(kids - expected) < 30


def test_batches_depend_only_on_seed_epoch_and_rank(pool):
    labels, source, _, _ = pool
    make = lambda **kw: ClassBalancedBatches(labels, 64, 0, groups=source, **{"seed": 0, **kw})  # noqa: E731
    a, b = make(), make()
    assert all(np.array_equal(x, y) for x, y in zip(a.epoch(2), b.epoch(2)))
    assert all(np.array_equal(x, y) for x, y in zip(a.epoch(2), make().epoch(2)))  # after other epochs too
    assert not np.array_equal(a.epoch(2)[0], make(seed=1).epoch(2)[0])
    assert not np.array_equal(a.epoch(2)[0], make(rank=1).epoch(2)[0])
    assert not np.array_equal(a.epoch(2)[0], a.epoch(3)[0])

"""The pretraining pool: label maps, exclusions and packs, on the real pool CSV and real images."""

import json
from collections import Counter

import h5py
import numpy as np
import pytest

from cxr_embed.errors import CxrEmbedError, LabelError
from cxr_embed.pool import build_pack, load_pool_from_csv, load_pool_from_packs, read_pool_rows, select_rows
from cxr_embed.pretrain import PretrainConfig

from conftest import ROOT

FINDINGS = {"label_columns": ["finding"], "label_map": str(ROOT / "configs" / "finding-classes.yaml")}
POOL_CLASSES = {"normal": 10338, "covid19": 4001, "bacterial_pneumonia": 2752, "viral_pneumonia": 1485,
                "tuberculosis": 800}  # the data README's counts per source, summed by class


def _cfg(**kw) -> PretrainConfig:
    return PretrainConfig.from_dict(kw)


def _select(cfg):
    rows = read_pool_rows(cfg)
    keep, keys = select_rows(rows, cfg, "the pool")
    return rows.take(keep), keys


def test_the_finding_map_gives_five_classes_on_the_real_pool(shared):
    rows, keys = _select(_cfg(labels=str(shared / "pretrain.csv"), **FINDINGS))
    assert Counter(keys) == POOL_CLASSES
    by_source = Counter(zip(keys, rows.columns["source"]))
    assert by_source[("normal", "kermany_pediatric")] == 231 and by_source[("covid19", "hannover_mhh")] == 169


def test_values_no_pattern_maps_are_refused_and_listed(shared):
    no_tb = [["Normal$", "normal"], ["COVID", "covid19"], ["Pneumonia", "pneumonia"]]
    with pytest.raises(LabelError, match=r"no pattern for 11 label value\(s\): 'TB \(ActiveTuberculosis x1\)' \(344 rows\)"):
        _select(_cfg(labels=str(shared / "pretrain.csv"), label_columns=["finding"], label_map=no_tb))


def test_exclude_sources_and_classes(shared):
    base = {"labels": str(shared / "pretrain.csv"), **FINDINGS}
    rows, keys = _select(_cfg(**base, exclude={"source": ["kermany_pediatric"]}))
    assert len(keys) == 19376 - 4468 and "kermany_pediatric" not in rows.columns["source"]
    assert Counter(keys) == {"normal": 10107, "covid19": 4001, "tuberculosis": 800}
    rows, keys = _select(_cfg(**base, exclude={"class": ["tuberculosis", "viral_pneumonia"]}))
    assert len(keys) == 19376 - 800 - 1485 and set(keys) == {"normal", "covid19", "bacterial_pneumonia"}
    with pytest.raises(LabelError, match=r"exclude.source: no row has 'kermany'"):
        _select(_cfg(**base, exclude={"source": "kermany"}))  # a misspelt source would exclude nothing
    with pytest.raises(LabelError, match="no column.*hospital"):
        _select(_cfg(**base, exclude={"hospital": ["x"]}))
    with pytest.raises(LabelError, match="no column.*site"):
        _select(_cfg(**base, balance_by=["site"]))


def test_exclude_images_from_a_list_file(shared, tmp_path, monkeypatch):
    """The pool-task overlap list (scripts/pool_task_overlap.py) leaves those images out; a list naming
    an image the pool does not have is refused (a stale list would exclude nothing), except when only
    the first max_images rows are read."""
    pool = [line.split(",")[0] for line in (shared / "pretrain.csv").read_text().splitlines()[1:4]]
    listed = tmp_path / "overlap.txt"
    listed.write_text("\n".join(pool[:2]) + "\n\n")
    monkeypatch.chdir(tmp_path)  # the path is relative to where pretraining runs, as `labels`
    rows, keys = _select(_cfg(labels=str(shared / "pretrain.csv"), exclude={"image": "overlap.txt"}))
    assert len(keys) == 19376 - 2 and not set(pool[:2]) & set(rows.images) and pool[2] in rows.images
    listed.write_text(pool[0] + "\nimages/not/in/the/pool.jpg\n")
    with pytest.raises(LabelError, match=r"exclude.image: no row has 'images/not/in/the/pool.jpg'"):
        _select(_cfg(labels=str(shared / "pretrain.csv"), exclude={"image": "overlap.txt"}))
    rows, keys = _select(_cfg(labels=str(shared / "pretrain.csv"), exclude={"image": "overlap.txt"}, max_images=50))
    assert len(keys) == 49 and pool[0] not in rows.images
    with pytest.raises(CxrEmbedError, match="exclude.image names missing.txt, which cannot be read"):
        _cfg(labels=str(shared / "pretrain.csv"), exclude={"image": "missing.txt"})


def test_label_map_and_exclude_settings_are_checked(tmp_path):
    as_mapping = _cfg(label_map={"Normal$": "normal", "TB": "tb"})
    assert as_mapping.label_map == _cfg(label_map=[["Normal$", "normal"], ["TB", "tb"]]).label_map
    assert _cfg(exclude={"abnormal": 1}).exclude == {"abnormal": ["1"]}
    with pytest.raises(CxrEmbedError, match="not a regular expression"):
        _cfg(label_map={"TB (": "tb"})
    with pytest.raises(CxrEmbedError, match="quote numbers and yes/no"):
        _cfg(label_map={"Normal": True})
    with pytest.raises(CxrEmbedError, match="label_map file .*nowhere.yaml not found"):
        _cfg(label_map=str(tmp_path / "nowhere.yaml"))
    with pytest.raises(CxrEmbedError, match="exclude is a mapping"):
        _cfg(exclude=["kermany_pediatric"])
    (tmp_path / "c.yaml").write_text("label_map: {'^COVID': covid19, '^Normal': normal}\nbalance_by: source\n")
    cfg = PretrainConfig.from_file(tmp_path / "c.yaml")
    assert cfg.label_map == [["^COVID", "covid19"], ["^Normal", "normal"]] and cfg.balance_by == ["source"]


@pytest.fixture(scope="module")
def webp_pack(pool_by_source, shared, tmp_path_factory):
    """The 48-row pool packed with the default label settings, WebP, 64 px, in two parts."""
    out = tmp_path_factory.mktemp("pack") / "pool.h5"
    cfg = _cfg(labels=str(pool_by_source), image_root=str(shared), input_size=64)
    return build_pack(cfg, out, parts=2, quality=60, image_format="webp", progress=False)


def test_a_pack_gives_the_csv_pool_under_any_label_settings(webp_pack, pool_by_source, shared):
    """The pack was built for `abnormal`; training from it with finer labels, an exclusion and source
    balancing gives the rows, classes, columns and data hash that the CSV gives."""
    common = {"labels": str(pool_by_source), "image_root": str(shared), "input_size": 64}
    for settings in ({}, {**FINDINGS, "exclude": {"source": ["kermany_pediatric"]}, "balance_by": ["source"]}):
        from_csv = load_pool_from_csv(_cfg(**common, **settings), progress=False)
        from_pack = load_pool_from_packs(_cfg(**common, **settings, packs=[str(p) for p in webp_pack]), progress=False)
        assert from_pack.ids == from_csv.ids and from_pack.keys == from_csv.keys
        assert from_pack.data_hash == from_csv.data_hash and from_pack.columns == from_csv.columns
        diff = np.abs(from_pack.images.astype(float) - from_csv.images).mean()
        assert 0 < diff < 4  # WebP at quality 60 is lossy, by a few grey levels
    assert len(from_pack.ids) == 48 - 18 and set(from_pack.keys) == {"normal", "covid19", "tuberculosis"}


def test_pack_refusals(webp_pack, pool_by_source, shared):
    common = {"labels": str(pool_by_source), "image_root": str(shared), "packs": [str(p) for p in webp_pack]}
    with pytest.raises(CxrEmbedError, match="holds 64 px images, the config asks for input_size 224"):
        load_pool_from_packs(_cfg(**common), progress=False)
    with pytest.raises(CxrEmbedError, match="first all rows .* max_images=10"):
        load_pool_from_packs(_cfg(**common, input_size=64, max_images=10), progress=False)
    with pytest.raises(CxrEmbedError, match="different pools"):
        load_pool_from_packs(_cfg(**{**common, "packs": [str(webp_pack[0]), str(_other_pool_pack(webp_pack[1]))]},
                                  input_size=64), progress=False)


def _other_pool_pack(part):
    """A copy of a part that says it was built from another labels file."""
    other = part.with_name("other.part1.h5")
    other.write_bytes(part.read_bytes())
    with h5py.File(other, "a") as f:
        f.attrs["labels_sha256"] = "0" * 64
    return other


def test_format1_packs_serve_only_their_own_label_columns(tmp_path, pool_by_source, shared):
    """A pack of the first format (as `cxr-embed pack` wrote it before: class keys of its columns only)."""
    pool = load_pool_from_csv(_cfg(labels=str(pool_by_source), image_root=str(shared), input_size=64), progress=False)
    path = tmp_path / "v1.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "cxr-embed-pack/1", "data_hash": pool.data_hash, "size": 64, "quality": 90,
                        "label_columns": json.dumps(["abnormal"]), "n_failed": 0})
        jpeg = f.create_dataset("jpeg", (len(pool.ids),), dtype=h5py.vlen_dtype(np.uint8))
        for j in range(len(pool.ids)):
            jpeg[j] = np.frombuffer(_jpeg(pool.images[j]), np.uint8)
        f.create_dataset("ids", data=pool.ids, dtype=h5py.string_dtype())
        f.create_dataset("keys", data=pool.keys, dtype=h5py.string_dtype())
    loaded = load_pool_from_packs(_cfg(packs=[str(path)], input_size=64), progress=False)
    assert loaded.data_hash == pool.data_hash and sorted(loaded.ids) == loaded.ids
    for bad in ({"label_columns": ["finding"]}, {"balance_by": ["source"]}):
        with pytest.raises(CxrEmbedError, match="format 1.*rebuild the pack"):
            load_pool_from_packs(_cfg(packs=[str(path)], input_size=64, **bad), progress=False)


def _jpeg(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("config", ["cpu.yaml", "cpu-ablation.yaml", "gpu.yaml", "gpu-ablation.yaml"])
def test_every_shipped_config_leaves_out_the_task_copies(config, shared, monkeypatch):
    """configs/pool-task-overlap.txt (279 pool images that copy task images: MODEL_CARD.md) applies to
    every recipe, and names only images the pool has (a stale list is refused, not ignored)."""
    import yaml

    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the checkout, as the README runs them
    data = yaml.safe_load((ROOT / "configs" / config).read_text())
    assert data["exclude"] == {"image": "configs/pool-task-overlap.txt"}
    listed = (ROOT / "configs" / "pool-task-overlap.txt").read_text().split()
    rows, keys = _select(_cfg(**{**data, "labels": str(shared / "pretrain.csv")}))
    assert len(keys) == 19376 - len(listed) == 19376 - 279 and not set(listed) & set(rows.images)

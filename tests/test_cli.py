"""The command line as a newcomer meets it: --version, help on every option, errors that say what
to do, `export` and `preview`."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version

import numpy as np
import pytest
from PIL import Image

from cxr_embed import Store, load_image, preprocess
from cxr_embed.cli import build_parser, main
from cxr_embed.export import export_store, read_export
from cxr_embed.preview import preview_image


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"cxr-embed {version('cxr-embed')}"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_has_help():
    commands = _subcommands(build_parser())
    assert {"embed", "export", "preview", "probe", "predict", "evaluate", "serve", "curve"} <= set(commands)
    missing = [f"{name} {a.dest}" for name, p in commands.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
    for name, p in commands.items():  # every help text renders (a stray % would break `--help`)
        assert p.format_help() and name in build_parser().format_help()


def test_embed_csv_with_paths_not_under_the_root_says_what_to_do(samples, tmp_path, capsys):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,label\n" + "".join(f"{p.name},1\n" for p in sorted(samples.glob("*.jpg"))))
    code = main(["embed", "--images", str(csv_path), "--out", str(tmp_path / "s.h5"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "relative to --image-root (default: the CSV's folder)" in err
    assert not (tmp_path / "s.h5").exists()  # refused before the model loaded


def test_a_folder_of_dicoms_without_suffixes_is_embedded_and_other_files_are_named(dcm_dir, samples, tmp_path,
                                                                                      capsys):
    """PACS exports often name DICOM files IM0001 or by UID, with no .dcm: a folder of them was embedded
    as "no images found", and files left out were never mentioned (a newcomer's review)."""
    from cxr_embed.batch import list_inputs

    folder = tmp_path / "export"
    (folder / "series1").mkdir(parents=True)
    (folder / "series1" / "IM0001").write_bytes((dcm_dir / "RG1_UNCR.dcm").read_bytes())
    (folder / "1.2.840.5.6").write_bytes((dcm_dir / "RG1_UNCR.dcm").read_bytes())
    (folder / "chest.jpg").write_bytes(next(samples.glob("*.jpg")).read_bytes())
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # a media's index: no image
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0" * 200)
    notes = []
    items = list_inputs(folder, warn=notes.append)
    assert [it.image_id for it in items] == ["1.2.840.5.6", "chest.jpg", "series1/IM0001"]
    assert notes == [f"note: 2 file(s) in {folder} are not DICOM, PNG or JPEG and are left out (e.g. DICOMDIR, notes.txt)"]
    out = tmp_path / "s.h5"
    assert main(["embed", "--images", str(folder), "--out", str(out), "--model", "imagenet-effnet-lite0",
                 "--no-progress"]) == 0
    assert "2 file(s)" in capsys.readouterr().err and sorted(Store(out).ids) == [it.image_id for it in items]


@pytest.fixture(scope="module")
def small_store(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "nih.h5"
    assert main(["embed", "--images", str(samples / "samples.csv"), "--out", str(out), "--model",
                 "imagenet-effnet-lite0", "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("suffix", [".parquet", ".npz"])
def test_export_round_trip(small_store, tmp_path, suffix, capsys):
    out = tmp_path / f"x{suffix}"
    assert main(["export", "--store", str(small_store), "--out", str(out)]) == 0
    assert "6 embeddings" in capsys.readouterr().out
    store = Store(small_store)
    ids, embs, meta, identity = read_export(out)
    assert ids == store.ids and len(ids) == 6
    assert embs.dtype == np.float32 and np.array_equal(embs, store.embeddings())
    assert meta == [store.metadata(i) for i in ids] and meta[0]["label"] in ("0", "1") and "findings" in meta[0]
    assert identity == dict(store.identity)


def test_export_parquet_reads_in_plain_pyarrow(small_store, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(export_store(small_store, tmp_path / "x.parquet"))
    assert table.column_names == ["id", "embedding", "metadata"]
    first = np.array(table.column("embedding")[0].as_py(), dtype=np.float32)
    assert np.array_equal(first, Store(small_store).embeddings([0])[0])
    assert json.loads(table.schema.metadata[b"cxr_embed.identity"])["model_name"] == "imagenet-effnet-lite0"


def test_embed_into_a_store_of_another_model_is_refused_before_the_model_loads(small_store, samples, capsys):
    before = small_store.read_bytes()
    assert main(["embed", "--images", str(samples / "samples.csv"), "--out", str(small_store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds embeddings of model imagenet-effnet-lite0, not cxr-supcon-effnet-lite0" in err
    assert "loading" not in err and small_store.read_bytes() == before


def test_export_refuses_an_unknown_format(small_store, tmp_path, capsys):
    assert main(["export", "--store", str(small_store), "--out", str(tmp_path / "x.csv")]) == 2
    assert "*.parquet or *.npz" in capsys.readouterr().err


def test_preview_is_the_model_input_unnormalised(dcm_dir, samples):
    dcm = dcm_dir / "RG1_UNCR.dcm"  # a real CR chest, not square: letterboxed with black bars
    for source in (dcm, sorted(samples.glob("*.jpg"))[0]):
        img = preview_image(source)
        assert img.mode == "L" and img.size == (224, 224)
        tensor = preprocess(load_image(source))[0]
        back = (np.asarray(img, dtype=np.float32) / 255 - 0.5) / 0.5
        assert np.abs(back - tensor).max() <= 1 / 255 + 1e-6
    h, w = load_image(dcm).pixels.shape
    arr = np.asarray(preview_image(dcm))
    pad = (224 - round(224 * min(h, w) / max(h, w))) // 2
    band = arr[:, :pad] if h > w else arr[:pad]
    assert h != w and pad > 0 and (band == 0).all() and arr.max() > 200  # black letterbox bars, a bright image


def test_preview_command_writes_a_png(dcm_dir, tmp_path, capsys):
    out = tmp_path / "p.png"
    assert main(["preview", str(dcm_dir / "RG1_UNCR.dcm"), "--out", str(out)]) == 0
    assert Image.open(out).size == (224, 224) and "224x224" in capsys.readouterr().out
    assert main(["preview", str(tmp_path / "missing.dcm"), "--out", str(out)]) == 2

"""`cxr-embed explain`: Grad-CAM of the shipped linear probe checked against captum's LayerGradCam and
against the probe's own score, a masking test on real radiographs, occlusion of a GBM probe trained
here on a real store checked patch by patch, the PNG the command writes (its size, the preview under
it, nothing painted over the letterbox padding), and the typed errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_embed import Embedder
from cxr_embed.cli import main
from cxr_embed.errors import ConfigError, InputError, ModelMismatch, NotAnImage
from cxr_embed.ingest import load_image
from cxr_embed.preprocess import letterbox_box, preprocess
from cxr_embed.preview import preview_image
from cxr_embed.runtime import Runtime, RuntimeSettings
from probes import load_probe
from probes.examples import example_image_path, example_probe_path
from probes.explain import explain_image
from probes.io import ProbeFileError
from probes.overlay import SCALE, TITLE_PX, composite, png_size
from probes.saliency import class_scores, content_mask, grad_cam, linear_direction, occlusion_positions

ROOT = Path(__file__).resolve().parents[1]

WINDOW = 64  # masking test: side of the masked square, px of the 224 px input (two Grad-CAM cells)


@pytest.fixture(scope="module")
def runtime():
    rt = Runtime(RuntimeSettings(model="cxr-supcon-effnet-lite0", image_check="never"))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def dicom(dcm_dir):
    return dcm_dir / "RG1_UNCR.dcm"  # a real CR chest, 1955 x 1841: letterboxed with side bands


@pytest.fixture(scope="module")
def gbm_probe(tb_store, shared, tmp_path_factory):
    """A GBM probe trained on a real store (the TB task, ImageNet embeddings) by `cxr-embed probe`."""
    out = tmp_path_factory.mktemp("probes") / "tb-gbm.json"
    assert main(["probe", "--store", str(tb_store), "--labels", str(shared / "tasks" / "tb_shenzhen_mc.csv"),
                 "--kind", "gbm", "--out", str(out)]) == 0
    return out


def test_grad_cam_matches_captum_and_adds_up_to_the_probe_score(runtime):
    from captum.attr import LayerGradCam

    image = example_image_path()
    e = explain_image(image, runtime=runtime, progress=False)
    probe = load_probe(example_probe_path())
    x = torch.as_tensor(runtime.prepare(image).tensor)  # the runtime prepares numpy arrays
    w, b = linear_direction(probe, 1)
    cells, score = grad_cam(runtime.model, x, w, b)
    # captum: hooks on the layer (the backbone's bn2 output), our code splits forward_features / forward_head
    weight = torch.as_tensor(w, dtype=torch.float64)
    theirs = LayerGradCam(lambda t: runtime.model(t).double() @ weight + b, runtime.model.backbone.bn2)
    ref = theirs.attribute(x[None].contiguous(memory_format=torch.channels_last), relu_attributions=False)
    assert ref.shape == (1, 1, 7, 7)
    np.testing.assert_allclose(cells, ref[0, 0].detach().double().numpy(), rtol=1e-4, atol=1e-6)
    # the last feature map is average-pooled into the embedding: the cells add up to score - intercept,
    # and the score is the probe's own decision function on the embedding the runtime computes
    embedding = Embedder("cxr-supcon-effnet-lite0").embed([image])
    decision = float(probe.decision_function(embedding)[0])
    assert cells.sum() == pytest.approx(decision - b, abs=1e-3) and score == pytest.approx(decision, abs=1e-3)
    assert e.score == pytest.approx(decision, abs=1e-3) and e.method == "grad-cam" and e.target == "pneumonia"  # the probe file's class name for 1
    assert e.probability == pytest.approx(float(probe.predict_proba(embedding)[0, 1]), abs=1e-4) and e.passes == 2
    assert e.saliency.shape == (224, 224) and e.saliency.dtype == np.float32 and e.padding_share == 0.0
    # the negative class of a binary probe: the same map, sign reversed
    neg = explain_image(image, runtime=runtime, target="0", progress=False)
    np.testing.assert_allclose(neg.saliency, -e.saliency, atol=1e-5)


def _masked_drops(runtime, probe, image, saliency, lowest: bool, n_random: int = 40):
    """Score drop when the WINDOW x WINDOW square of the image holding the most (positive) saliency,
    or the most negative with `lowest`, is set to the image's mean grey; and the drops of n_random
    random squares of the same size inside the image."""
    prepared = runtime.prepare(image)
    x = torch.as_tensor(prepared.tensor)
    top, left, rows, cols = letterbox_box(*prepared.info.original_size, 224)
    fill = float(x[0][torch.from_numpy(content_mask((top, left, rows, cols), 224))].mean())
    m = -saliency if lowest else np.maximum(saliency, 0.0)
    sums = np.pad(m, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    corners = [(y, c) for y in range(top, top + rows - WINDOW + 1) for c in range(left, left + cols - WINDOW + 1)]
    mass = [sums[y + WINDOW, c + WINDOW] - sums[y, c + WINDOW] - sums[y + WINDOW, c] + sums[y, c] for y, c in corners]
    picks = [corners[int(np.argmax(mass))]] + \
        [corners[i] for i in np.random.default_rng(0).choice(len(corners), n_random, replace=False)]
    batch = x.repeat(len(picks), 1, 1, 1)
    for i, (y, c) in enumerate(picks):
        batch[i, :, y : y + WINDOW, c : c + WINDOW] = fill
    base = class_scores(probe, runtime.forward(x[None])[0], 1)[0]
    drops = base - class_scores(probe, runtime.forward(batch)[0], 1)
    return drops[0], drops[1:]


@pytest.mark.parametrize("which", ["nih", "dicom"])
def test_masking_the_most_salient_region_lowers_the_score_more_than_random_regions(runtime, dicom, which):
    image = example_image_path() if which == "nih" else dicom
    probe = load_probe(example_probe_path())
    e = explain_image(image, runtime=runtime, progress=False)
    top, random = _masked_drops(runtime, probe, image, e.saliency, lowest=False)
    assert top > 0 and top > random.mean() and np.mean(random < top) >= 0.75, (top, np.sort(random))
    # and the map is not just "anything lowers the score": its most negative square lowers it less than most
    low, random = _masked_drops(runtime, probe, image, e.saliency, lowest=True)
    assert low < np.median(random), (low, np.sort(random))


def test_occlusion_of_a_gbm_probe_is_the_score_drop_of_each_patch(gbm_probe, dicom, embedder):
    probe = load_probe(gbm_probe)
    assert probe.kind == "gbm"
    e = explain_image(dicom, gbm_probe, patch=32, stride=32, progress=False)  # stride = patch: one patch per pixel
    box = letterbox_box(1955, 1841, 224)
    corners = occlusion_positions(box, 224, 32, 32)
    assert e.method == "occlusion" and e.model == "imagenet-effnet-lite0" and len(corners) == 49
    assert e.passes == len(corners) + 1 and e.padding_share is None
    mask = content_mask(box, 224)
    assert not e.saliency[~mask].any() and np.abs(e.saliency[mask]).max() > 0
    # by hand, through the public Embedder: the model's input as a 224 px grey array (letterboxed as it
    # is) with one patch of the image greyed; the padding is left black
    grey = np.clip(preprocess(load_image(dicom))[0] * 0.5 + 0.5, 0.0, 1.0)
    fill = float(grey[mask].mean())
    base = float(class_scores(probe, embedder.embed([grey]), 1)[0])
    assert e.score == pytest.approx(base, abs=0.02)
    for y, c in [corners[0], corners[24], corners[-1]]:  # a corner (over padding in part), the centre, a corner
        inside = mask[y : y + 32, c : c + 32]
        patched = grey.copy()
        patched[y : y + 32, c : c + 32][inside] = fill
        drop = base - float(class_scores(probe, embedder.embed([patched]), 1)[0])
        np.testing.assert_allclose(e.saliency[y : y + 32, c : c + 32][inside], drop, atol=0.02, err_msg=str((y, c)))
    with pytest.raises(ConfigError, match="occlusion"):
        explain_image(dicom, gbm_probe, method="grad-cam", progress=False)


def _explain_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cxr_embed", "explain", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", ["linear", "gbm"])
def test_cli_writes_the_preview_with_the_map_and_nothing_over_the_padding(kind, dicom, gbm_probe, tmp_path):
    png, raw = tmp_path / "map.png", tmp_path / "map.npy"
    probe = example_probe_path() if kind == "linear" else gbm_probe
    run = _explain_cli(dicom, "--probe", probe, "--out", png, "--raw", raw, "--stride", 32, "--no-progress")
    assert run.returncode == 0, run.stderr
    assert ("grad-cam" if kind == "linear" else "occlusion, 50 forward pass") in run.stdout
    picture = Image.open(png)
    assert picture.format == "PNG" and picture.size == png_size(224) == (224 * SCALE + 250, 224 * SCALE + TITLE_PX)
    saliency = np.load(raw)
    assert saliency.shape == (224, 224) and saliency.dtype == np.float32
    mask = content_mask(letterbox_box(1955, 1841, 224), 224)
    assert (~mask).sum() == 224 * 13 and not saliency[~mask].any() and saliency[mask].max() > 0
    # each preview pixel is a SCALE x SCALE block: the block centres are the `preview` command's picture
    # with the positive map painted over it, and grey (the preview's own black) over the padding
    pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
    blocks = pixels[TITLE_PX + SCALE // 2 :: SCALE, SCALE // 2 : 224 * SCALE : SCALE][:224]
    preview = preview_image(dicom)
    expected = np.rint(composite(preview, saliency, float(saliency.max())) * 255)
    assert np.abs(blocks - expected).max() <= 1
    grey = np.asarray(preview, dtype=np.int16)
    assert np.abs(blocks[~mask] - grey[~mask][:, None]).max() <= 1
    painted = np.abs(blocks[..., 0] - blocks[..., 2]) > 20
    assert painted[mask].any() and not painted[~mask].any()


def test_errors_are_typed_and_the_command_exits_2_with_a_message(runtime, tmp_path, capsys):
    image, out = example_image_path(), tmp_path / "m.png"
    with pytest.raises(ModelMismatch, match="different model"):
        explain_image(image, model="imagenet-effnet-lite0", progress=False)
    assert main(["explain", str(image), "--model", "imagenet-effnet-lite0", "--out", str(out)]) == 2
    assert "cxr-embed explain: error: probe nih-pneumonia-linear.json was made by a different model" \
        in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "cxr-embed-probe/1", "name": "x"}))
    with pytest.raises(ProbeFileError, match="bad.json"):
        explain_image(image, bad, runtime=runtime)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a radiograph")
    with pytest.raises(NotAnImage, match="notes.png"):
        explain_image(not_image, runtime=runtime)
    with pytest.raises(InputError, match="no such file"):
        explain_image(tmp_path / "missing.dcm", runtime=runtime)
    with pytest.raises(ConfigError, match=r"classes are 0, 1 \(no finding, pneumonia\)"):
        explain_image(image, runtime=runtime, target="effusion")
    assert explain_image(image, runtime=runtime, target="pneumonia", method="grad-cam").target == "pneumonia"
    for args, message in [([str(not_image)], "notes.png: not a DICOM"), ([str(image), "--probe", str(bad)], "bad.json"),
                          ([str(image), "--patch", "8", "--stride", "16"], "stride <= patch")]:
        assert main(["explain", *args, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    for name, message in [("--out", "name it *.png"), ("--raw", "name it *.npy")]:  # refused before any work
        paths = {"--out": str(out), "--raw": str(tmp_path / "m.npy"), name: str(tmp_path / "m.jpg")}
        assert main(["explain", str(image), *[a for kv in paths.items() for a in kv]]) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_what_would_mislead_is_refused_or_said(runtime, dcm_dir, tmp_path, capsys):
    """Each case here was taken in silently before: a probe whose probability falls as its score rises,
    a map of a non-chest image, the threshold beside the other class, an output over the input, a raw
    map saved under another name, a probe name read as maths, an unbounded batch."""
    image = example_image_path()
    doc = json.loads(example_probe_path().read_text())
    doc["calibration"]["a"] = -abs(doc["calibration"]["a"])
    flipped = tmp_path / "flipped.json"
    flipped.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="flipped.json: its calibration slope is -"):
        explain_image(image, flipped, runtime=runtime)
    with pytest.raises(ConfigError, match="batch size 0"):
        explain_image(image, runtime=runtime, method="grad-cam", batch_size=0)

    tibia = explain_image(dcm_dir / "RG3_UNCR.dcm", runtime=runtime, progress=False)
    assert any(n.startswith("not a frontal chest X-ray") for n in tibia.notes), tibia.notes
    assert "note: not a frontal chest X-ray" in tibia.text()
    chest = explain_image(image, runtime=runtime, progress=False)
    assert not any(n.startswith("not a frontal") for n in chest.notes)
    assert chest.target == "pneumonia" and chest.threshold is not None
    other = explain_image(image, runtime=runtime, target="0", progress=False)
    assert other.threshold is None  # the threshold is on P(1): not printed beside P(0)

    copy = tmp_path / "cxr.png"
    copy.write_bytes(image.read_bytes())
    assert main(["explain", str(copy), "--out", str(copy)]) == 2
    assert "is an input of this command" in capsys.readouterr().err and copy.read_bytes() == image.read_bytes()

    doc = json.loads(example_probe_path().read_text())
    doc["name"] = "cost $5 vs $6 \\nope$"  # mathtext would fail on this after the work was done
    named = tmp_path / "named.json"
    named.write_text(json.dumps(doc))
    raw = tmp_path / "MAP.NPY"
    assert main(["explain", str(copy), "--probe", str(named), "--out", str(tmp_path / "m.png"), "--raw", str(raw),
                 "--no-progress"]) == 0
    assert np.load(open(raw, "rb")).shape == (224, 224)  # that name, not MAP.NPY.npy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MAP.NPY", "cxr.png", "flipped.json", "m.png", "named.json"]

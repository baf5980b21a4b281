"""Regenerate every artefact the package ships, from the shipped weights and the team's shared data.

    python scripts/make_artifacts.py [--data ../shared/data] [--only reference|probe|example|onnx]

- reference: the chest-check reference set `cxr_embed/weights/imagenet-effnet-lite0.reference.npz`
  (500 CXRs of pretrain.csv drawn with seed 0, ImageNet EfficientNet-Lite0 at 128 px). The pool of
  pretrain.csv changed on 2026-11-30, so a rebuild draws other images than the shipped set did.
- probe: the example probe `probes/data/nih-pneumonia-linear.json`: the NIH pneumonia task (public
  NIH ChestX-ray14 images, no use restriction) embedded with the shipped default model, a linear
  probe trained on its train split (`--positive pneumonia`), then evaluated on its test split (the
  numbers in MODEL_CARD.md).
- example: the example radiograph `probes/data/example-nih-00000061_015.jpg` (NIH, Pneumonia,
  test split) that `cxr-embed predict --example` scores.
- onnx: the checked ONNX export of every registered model, `cxr_embed/weights/<model>.onnx`
  (`cxr-embed export-onnx`): what the OpenVINO backend runs, and all a slim install (no PyTorch)
  has of the shipped model and of the chest check's network. Needs no data.

Every step runs our own commands (`cxr-embed embed`, `probe`, `evaluate`, `reference`, `export-onnx`), so what is
shipped is what a user gets from the same commands. `tests/test_artifacts.py` checks that each
artefact records the identity of the model it sits on.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever copy of cxr-embed is installed
PROBE_OUT = ROOT / "probes" / "data" / "nih-pneumonia-linear.json"
EXAMPLE = "00000061_015.jpg"
EXAMPLE_OUT = ROOT / "probes" / "data" / f"example-nih-{EXAMPLE}"
STEPS = ("reference", "probe", "example", "onnx")


def run(*argv: str) -> None:
    """One `cxr-embed` command, as a user would run it; stop on failure."""
    from cxr_embed.cli import main

    print("+ cxr-embed " + " ".join(argv), flush=True)
    code = main(list(argv))
    if code:
        sys.exit(f"cxr-embed {argv[0]} failed with exit code {code}")


def make_reference(data: Path, work: Path) -> None:
    run("reference", "--images", str(data / "pretrain.csv"), "--image-root", str(data), "--n", "500", "--seed", "0")


def pneumonia_labels(data: Path, out: Path) -> Path:
    """The task CSV with readable labels (pneumonia / no finding), so the probe says P(pneumonia)."""
    with open(data / "tasks" / "nih_pneumonia.csv", newline="") as fh, open(out, "w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["image", "label", "split", "patient_id"])
        for row in csv.DictReader(fh):
            w.writerow([row["image"], "pneumonia" if row["label"] == "1" else "no finding", row["split"],
                        row["patient_id"]])
    return out


def make_probe(data: Path, work: Path) -> None:
    store = work / "nih_pneumonia.cxr-supcon-effnet-lite0.h5"
    labels = pneumonia_labels(data, work / "nih_pneumonia.csv")
    run("embed", "--images", str(data / "tasks" / "nih_pneumonia.csv"), "--image-root", str(data),
        "--out", str(store), "--model", "cxr-supcon-effnet-lite0", "--no-progress")
    run("probe", "--store", str(store), "--labels", str(labels), "--positive", "pneumonia", "--kind", "linear",
        "--name", "nih-pneumonia-linear", "--out", str(PROBE_OUT))
    run("evaluate", "--probe", str(PROBE_OUT), "--store", str(store), "--labels", str(labels),
        "--positive", "pneumonia", "--split", "test")


def make_example(data: Path, work: Path) -> None:
    shutil.copyfile(data / "images" / "nih" / EXAMPLE, EXAMPLE_OUT)
    print(f"wrote {EXAMPLE_OUT}")


def make_onnx(data: Path, work: Path) -> None:
    from cxr_embed.registry import WEIGHTS_DIR, get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        if spec.onnx_file:
            run("export-onnx", "--model", name, "--out", str(WEIGHTS_DIR / spec.onnx_file))


def main() -> None:
    default_data = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data, help="the shared data folder (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=ROOT / ".artifacts-work",
                    help="folder for intermediate stores and label files (default: %(default)s)")
    ap.add_argument("--only", action="append", choices=STEPS, help="make only this artefact (repeatable; default: all)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    steps = {"reference": make_reference, "probe": make_probe, "example": make_example, "onnx": make_onnx}
    for name in args.only or STEPS:
        steps[name](args.data, args.work)


if __name__ == "__main__":
    main()

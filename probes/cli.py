"""The probe commands of `cxr-embed` (`curve`, `finetune`, `probe`, `predict`, `evaluate`, `explain`), registered through the entry-point group
`cxr_embed.commands`: each is a thin wrapper over a documented Python function."""

from __future__ import annotations

import sys
from pathlib import Path

from cxr_embed.cli import add_backend_options
from cxr_embed.optional import require


def register(sub) -> None:
    """Add this package's subcommands to the `cxr-embed` parser."""
    _add_curve(sub)
    _add_finetune(sub)
    _add_probe(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_explain(sub)


def _warn(text: str) -> None:
    print(text, file=sys.stderr)


def _add_curve(sub) -> None:
    p = sub.add_parser("curve", help="data-efficiency curve: probe AUC vs. number of labelled images, per store")
    p.add_argument("--store", action="append", required=True,
                   help="an embedding store (repeat to compare models; the first is compared with each other one)")
    p.add_argument("--labels", required=True, help="CSV with image, label, split (train/test) [, patient_id, view, source]")
    p.add_argument("--positive", help="the positive class, for labels other than 0/1, true/false, yes/no")
    p.add_argument("--test-labels", help="external test set CSV (image, label); replaces the test split")
    p.add_argument("--sizes", default="45,85,170,340,680,full", help="training-set sizes (default %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="draws per size (default %(default)s)")
    p.add_argument("--probe", action="append", choices=["linear", "gbm"], help="probe kind (repeatable; default both)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and the bootstrap (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="replicates of the patient-level test bootstrap (default %(default)s)")
    p.add_argument("--no-metadata-baseline", action="store_true",
                   help="skip the metadata-only baseline (view, source columns of the labels)")
    p.add_argument("--extra-rows", action="append", default=[],
                   help="rows file of fits made on the same draws (`cxr-embed finetune --out`), compared with the "
                        "first store's probes (repeatable)")
    p.add_argument("--target-auc", default="0.8",
                   help="AUC(s) to ask the fitted learning curve about: how many labels reach each (comma-separated, "
                        "or 'none'; default %(default)s, 'excellent' discrimination by Hosmer & Lemeshow's rule of "
                        "thumb: set your own). Answers in fit.csv; the fit needs 3 or more sizes")
    p.add_argument("--out", required=True, help="folder for curve.csv, summary.csv, comparison.csv, fit.csv and curve.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_curve)


def _cmd_curve(args) -> int:
    from .curve import OUTPUT_FILES, parse_sizes, run_curve
    from .lcfit import parse_targets

    res = run_curve(args.store, args.labels, args.out, sizes=parse_sizes(args.sizes), repeats=args.repeats,
                    probes=args.probe or ["linear", "gbm"], test_labels=args.test_labels, seed=args.seed,
                    progress=not args.no_progress, positive=args.positive, log=_warn, bootstrap=args.bootstrap,
                    metadata=not args.no_metadata_baseline, extra_rows=args.extra_rows,
                    targets=parse_targets(args.target_auc))
    print(f"{'model':<36} {'probe':<8} {'n_train':>7} {'draws':>5} {'AUC':>6}  95% CI      {'AUPRC':>6}")
    for r in res.summary:
        print(f"{r['model']:<36} {r['probe']:<8} {r['n_train']:>7} {r['draws']:>5} {r['auc_mean']:>6.3f}  "
              f"{r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f} {r['auprc_mean']:>6.3f}")
    for c in res.comparisons:
        b = c["model_b"] if c["probe_b"] == c["probe"] else f"{c['model_b']} ({c['probe_b']})"
        print(f"{c['probe']} n={c['n_train']} ({c['draws']} draws): {c['model_a']} - {b} AUC {c['difference']:+.3f} "
              f"(95% CI {c['diff_ci_low']:+.3f} to {c['diff_ci_high']:+.3f}), one-sided p = {c['p_one_sided']:.3g}, "
              f"Holm p = {c['p_holm']:.3g}")
    _print_fits(res.fits)
    shares = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds_by_probe.items())
    written = [f for f in OUTPUT_FILES if (Path(args.out) / f).exists()]
    print(f"wrote {', '.join(written)} to {args.out} in {res.seconds:.1f} s ({shares})")
    return 0


def _print_fits(fits: list[dict]) -> None:
    shown = set()
    for f in fits:
        if (f["model"], f["probe"]) not in shown:
            shown.add((f["model"], f["probe"]))
            print(f"fit {f['model']} / {f['probe']}: AUC(n) = {f['a']:.3f} - {f['b']:.3g} n^-{f['c']:.2f} "
                  f"(plateau a: 95% CI {f['a_ci_low']:.3f}-{f['a_ci_high']:.3f})")
        if f["target_auc"] != "":
            n, lo, hi = (_count(f[k]) for k in ("labels_needed", "labels_ci_low", "labels_ci_high"))
            print(f"  AUC {f['target_auc']:g}: {n} labels (95% CI {lo}-{hi}), {f['status']}")


def _count(n: float | str) -> str:
    if n == "":
        return "n/a"  # "no trend": the sizes give no number
    return f"{n:.2g}" if n > 1e6 else str(n)  # inf stays inf; a far guess needs no 10 digits


def _add_finetune(sub) -> None:
    from .finetune_config import STRATEGIES, FinetuneConfig  # torch-free: a slim install builds this parser too

    d = FinetuneConfig  # the class: its defaults, without making a recipe (which imports torch)
    p = sub.add_parser("finetune", help="fine-tuning baselines on the curve's draws: a backbone with a linear head, "
                                        "trained on each draw, scored on the test split (resumable)")
    p.add_argument("--labels", required=True, help="CSV with image, label, split (train/test) [, patient_id]")
    p.add_argument("--image-root", help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    p.add_argument("--positive", help="the positive class, for labels other than 0/1, true/false, yes/no")
    p.add_argument("--model", required=True, help="registered model or .safetensors checkpoint whose backbone is tuned")
    p.add_argument("--strategy", choices=STRATEGIES, default="full",
                   help="full: every weight trains; last-block: only the last stage, the head convolution and the "
                        "linear head (default %(default)s)")
    p.add_argument("--sizes", default="45,85,170", help="training-set sizes, as for curve (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="draws per size; draw k is the curve's draw k (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws: the curve's --seed (default %(default)s)")
    p.add_argument("--out", required=True, help="rows CSV to write or extend (curve.csv's format; per-image test scores "
                                                "go beside it in <stem>.scores.jsonl); finished fits are skipped")
    p.add_argument("--cache", help="HDF5 cache of the decoded, preprocessed images (default: <out stem>.cache.h5)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps per fit (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="backbone learning rate; the head's is 10x (default %(default)g)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    import dataclasses

    require("torch", "cxr-embed finetune")  # a slim install: MissingDependency, not a traceback
    from .curve import parse_sizes
    from .finetune import FinetuneConfig, run_finetune

    cfg = dataclasses.replace(FinetuneConfig(), steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    res = run_finetune(args.labels, args.image_root, args.model, args.strategy, parse_sizes(args.sizes), args.repeats,
                       args.out, seed=args.seed, config=cfg, positive=args.positive, cache=args.cache,
                       device=args.device, threads=args.threads, progress=not args.no_progress, log=_warn)
    print(f"{res.model}: {res.finished} fit(s) run, {res.already} already in {res.out}; "
          f"{res.seconds:.0f} s ({res.cpu_seconds:.0f} CPU-s). Compare: cxr-embed curve ... --extra-rows {res.out}")
    return 0


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="train a probe on a store's embeddings and save it (for predict and serve)")
    p.add_argument("--store", required=True, help="the embedding store (from `cxr-embed embed`)")
    p.add_argument("--labels", required=True, help="CSV with image, label [, split]: trains on the train split if present")
    p.add_argument("--positive", help="the positive class, for labels other than 0/1, true/false, yes/no")
    p.add_argument("--kind", choices=["linear", "gbm"], default="linear", help="probe kind (default %(default)s)")
    p.add_argument("--threshold", choices=["youden", "sensitivity"], default="youden",
                   help="how the operating threshold is chosen (default %(default)s)")
    p.add_argument("--target-sensitivity", type=float, default=0.9,
                   help="with --threshold sensitivity: the sensitivity to reach (default %(default)s)")
    p.add_argument("--name", help="probe name (default: the output file's stem)")
    p.add_argument("--out", required=True, help="probe file to write (.json)")
    p.set_defaults(func=_cmd_probe)


def _cmd_probe(args) -> int:
    from cxr_embed.errors import CxrEmbedError

    from .training import train_probe_from_labels

    if not args.out.lower().endswith(".json"):
        raise CxrEmbedError(f"--out {args.out}: a probe file is JSON; name it *.json (serve and predict read *.json)")
    report = train_probe_from_labels(args.store, args.labels, kind=args.kind, positive=args.positive, out=args.out,
                                     name=args.name, warn=_warn, threshold_method=args.threshold,
                                     target_sensitivity=args.target_sensitivity)
    print(report.text())
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="score images with saved probes into a CSV (resumable; default probe: the "
                                       "shipped NIH pneumonia example)")
    p.add_argument("--probe", help="a probe file (.json) or a folder of them (default: the shipped example probe)")
    p.add_argument("--images", help="a folder of DICOM/PNG/JPEG files, a CSV with an 'image' column, or one image")
    p.add_argument("--image-root", help="folder that CSV image paths are relative to (default: the CSV's folder)")
    p.add_argument("--out", help="CSV to write or extend (ids already in it are skipped); with --example, "
                                 "optional (the scores are printed)")
    p.add_argument("--example", action="store_true",
                   help="score the shipped example radiograph (an NIH CXR) instead of --images")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_backend_options(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    import csv
    import tempfile
    from pathlib import Path

    from cxr_embed.errors import CxrEmbedError

    from .examples import EXAMPLE_IMAGE_NOTE, example_image_path
    from .predict import predict_images

    if args.example == bool(args.images):
        raise CxrEmbedError("give --images (a folder, CSV or image) or --example (the shipped example radiograph)")
    if args.images and not args.out:
        raise CxrEmbedError("--out is required with --images: the CSV the scores are written to (e.g. scores.csv)")
    images = example_image_path() if args.example else args.images
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "scores.csv"
        summary = predict_images(images, out, probes=args.probe, image_root=args.image_root, device=args.device,
                                 batch_size=args.batch_size, progress=not (args.no_progress or args.example), log=_warn,
                                 backend=args.backend, precision=args.precision)
        if args.example:
            print(f"{EXAMPLE_IMAGE_NOTE}:")
            with open(out, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    print("\n".join(f"  {k}: {v}" for k, v in row.items() if v != ""))
    print(summary.text() if args.out else f"scored in {summary.seconds:.1f} s")
    return 0


def _add_evaluate(sub) -> None:
    from .evaluate import SPLIT_CHOICES

    p = sub.add_parser("evaluate", help="score a saved probe on your own labelled images: AUC, AUPRC (95%% CIs), "
                                        "sensitivity and specificity at its threshold")
    p.add_argument("--probe", help="the probe file (.json) (default: the shipped example probe)")
    p.add_argument("--store", required=True, help="store holding the labelled images (embedded with the probe's model)")
    p.add_argument("--labels", required=True, help="CSV with image, label [, split]")
    p.add_argument("--positive", help="the positive class, for labels other than 0/1, true/false, yes/no")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="auto",
                   help="rows to score: auto (the test split when the file has a split column, else every row), "
                        "test, train or all (default %(default)s)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    import json

    from .evaluate import evaluate_probe
    from .examples import example_probe_path

    result = evaluate_probe(args.probe or example_probe_path(), args.store, args.labels, positive=args.positive,
                            split=args.split, warn=_warn)
    print(result.text())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result.to_dict(), fh, indent=1)
    return 0


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="saliency map: which regions of an image drive a probe's score, over the "
                                       "model's preview (Grad-CAM for linear probes, occlusion for GBM probes)")
    p.add_argument("image", help="a DICOM, PNG or JPEG file")
    p.add_argument("--probe", help="the probe file (.json) (default: the shipped example probe)")
    p.add_argument("--out", required=True, help="PNG to write: the preview with the map over it and a colour bar")
    p.add_argument("--raw", help="also save the map as .npy (224x224 float32, signed, in units of the probe's score, "
                                 "0 over the letterbox padding)")
    p.add_argument("--method", choices=["auto", "grad-cam", "occlusion"], default="auto",
                   help="auto: grad-cam for a linear probe, occlusion for a GBM probe (default %(default)s)")
    p.add_argument("--target", help="class whose score to explain (default: a binary probe's positive class, "
                                    "a multi-class probe's most probable class)")
    p.add_argument("--model", help="model name or checkpoint (default: the probe's model; another one is refused)")
    p.add_argument("--patch", type=int, default=32, help="occlusion: patch side, px of the 224 px input (default %(default)s)")
    p.add_argument("--stride", type=int, default=16,
                   help="occlusion: step between patches in px (default %(default)s: at most 13 x 13 patches, 170 forward passes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=16, help="occlusion: images per forward pass (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args) -> int:
    require("torch", "cxr-embed explain")  # Grad-CAM and occlusion run the torch model
    from .explain import explain_image, write_explanation
    from .overlay import check_outputs

    check_outputs(args.out, args.raw, inputs=(args.image, args.probe))
    result = explain_image(args.image, args.probe, method=args.method, model=args.model, device=args.device,
                           target=args.target, patch=args.patch, stride=args.stride, batch_size=args.batch_size,
                           progress=not args.no_progress)
    write_explanation(result, args.out, args.raw)
    print(result.text())
    print(f"wrote {args.out}" + (f" and {args.raw}" if args.raw else ""))
    return 0

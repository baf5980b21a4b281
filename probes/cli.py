"""The probe commands of `cxr-embed` (`curve`, `probe`, `predict`, `evaluate`), registered through the entry-point group
`cxr_embed.commands`: each is a thin wrapper over a documented Python function."""

from __future__ import annotations

import sys
from pathlib import Path

from cxr_embed.cli import add_backend_options


def register(sub) -> None:
    """Add this package's subcommands to the `cxr-embed` parser."""
    _add_curve(sub)
    _add_probe(sub)
    _add_predict(sub)
    _add_evaluate(sub)


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
    p.add_argument("--out", required=True, help="folder for curve.csv, summary.csv, comparison.csv and curve.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_curve)


def _cmd_curve(args) -> int:
    from .curve import OUTPUT_FILES, parse_sizes, run_curve

    res = run_curve(args.store, args.labels, args.out, sizes=parse_sizes(args.sizes), repeats=args.repeats,
                    probes=args.probe or ["linear", "gbm"], test_labels=args.test_labels, seed=args.seed,
                    progress=not args.no_progress, positive=args.positive, log=_warn, bootstrap=args.bootstrap,
                    metadata=not args.no_metadata_baseline)
    print(f"{'model':<36} {'probe':<7} {'n_train':>7} {'draws':>5} {'AUC':>6}  95% CI      {'AUPRC':>6}")
    for r in res.summary:
        print(f"{r['model']:<36} {r['probe']:<7} {r['n_train']:>7} {r['draws']:>5} {r['auc_mean']:>6.3f}  "
              f"{r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f} {r['auprc_mean']:>6.3f}")
    for c in res.comparisons:
        print(f"{c['probe']} n={c['n_train']}: {c['model_a']} - {c['model_b']} AUC {c['difference']:+.3f} "
              f"(95% CI {c['diff_ci_low']:+.3f} to {c['diff_ci_high']:+.3f}), one-sided p = {c['p_one_sided']:.3g}, "
              f"Holm p = {c['p_holm']:.3g}")
    shares = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds_by_probe.items())
    written = [f for f in OUTPUT_FILES if (Path(args.out) / f).exists()]
    print(f"wrote {', '.join(written)} to {args.out} in {res.seconds:.1f} s ({shares})")
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

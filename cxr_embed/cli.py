"""The `cxr-embed` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import CxrEmbedError


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embed a folder or CSV of images into an HDF5 store (resumable)")
    p.add_argument("--images", required=True, help="folder of DICOM/PNG/JPEG files, or a CSV with an 'image' column")
    p.add_argument("--image-root", help="folder that CSV image paths are relative to (default: the CSV's folder)")
    p.add_argument("--out", required=True, help="the HDF5 store to create or extend")
    p.add_argument("--model", default=None, help="registered model name or .safetensors checkpoint (default: the shipped model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--commit-every", type=float, default=30.0, help="seconds between durable commits (default 30)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args) -> int:
    from .batch import embed_to_store, list_inputs, shard_path
    from .embedder import Embedder

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist = None
    if world > 1:  # started by torchrun: one shard per process, one store file per shard
        import torch.distributed as dist

        dist.init_process_group("gloo")
    items = list_inputs(args.images, args.image_root)
    if not items:
        raise CxrEmbedError(f"no images found in {args.images}")
    device = args.device
    if world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    embedder = Embedder(args.model, batch_size=args.batch_size, device=device)
    summary = embed_to_store(
        items, args.out, embedder, commit_every_s=args.commit_every, progress=not args.no_progress, rank=rank, world=world
    )
    print(summary.text())
    if dist is not None:
        dist.barrier()
        if rank == 0:
            shards = " ".join(str(shard_path(Path(args.out), r, world)) for r in range(world))
            print(f"all {world} shards done; merge them with:\n  cxr-embed merge --out {args.out} {shards}")
        dist.destroy_process_group()
    return 1 if summary.failed and summary.embedded == 0 and summary.total_in_store == 0 else 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print what a store holds")
    p.add_argument("store")
    p.set_defaults(func=lambda a: _print_info(a.store))


def _print_info(path: str) -> int:
    from .store import Store

    print(Store(path).summary())
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge shard stores (e.g. from torchrun) into one store")
    p.add_argument("--out", required=True)
    p.add_argument("stores", nargs="+")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    from .store import merge_stores

    store = merge_stores(args.stores, args.out)
    print(f"merged {len(args.stores)} store(s) into {store.path}: {len(store)} images, {len(store.failed)} failed")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered embedding models")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args) -> int:
    from .models import _REGISTRY, default_model_name, list_models

    default = default_model_name()
    for name in list_models():
        spec = _REGISTRY[name]
        mark = " (default)" if name == default else ""
        print(f"{name}{mark}: {spec.arch}, dim {spec.dim}, {spec.preprocess.identity} - {spec.description}")
    return 0


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="SupCon-pretrain a backbone on labelled CXRs (resumable)")
    p.add_argument("--config", help="YAML or TOML file; every field has a default (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting (YAML value)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("pack", help="decode a pretraining pool once into compact JPEG pack file(s)")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True)
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--quality", type=int, default=90)
    p.set_defaults(func=_cmd_pack)


def _pretrain_config(args):
    import yaml

    from .pretrain import PretrainConfig

    cfg = PretrainConfig.from_file(args.config)
    if args.set:
        data = cfg.to_dict()
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise CxrEmbedError(f"--set expects KEY=VALUE, got {item!r}")
            data[key.strip()] = yaml.safe_load(value)
        cfg = PretrainConfig.from_dict(data, source="--set")
    return cfg


def _cmd_pretrain(args) -> int:
    from .pretrain import pretrain

    final = pretrain(_pretrain_config(args), progress=not args.no_progress)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {final}")
    return 0


def _cmd_pack(args) -> int:
    from .pretrain import build_pack

    for path in build_pack(_pretrain_config(args), args.out, parts=args.parts, quality=args.quality):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _add_probes(sub) -> None:
    p = sub.add_parser("curve", help="data-efficiency curve: probe AUC vs. number of labelled images, per store")
    p.add_argument("--store", action="append", required=True, help="an embedding store (repeat to compare models)")
    p.add_argument("--labels", required=True, help="CSV with image, label, split (train/test) [, patient_id]")
    p.add_argument("--test-labels", help="external test set CSV (image, label); replaces the test split")
    p.add_argument("--sizes", default="45,85,170,340,680,full")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--probe", action="append", choices=["linear", "gbm"], help="probe kind (repeatable; default both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for curve.csv, summary.csv and curve.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_curve)

    p = sub.add_parser("probe", help="train a probe on a store's embeddings and save it (for the service)")
    p.add_argument("--store", required=True)
    p.add_argument("--labels", required=True, help="CSV with image, label [, split]: trains on the train split if present")
    p.add_argument("--kind", choices=["linear", "gbm"], default="linear")
    p.add_argument("--threshold", choices=["youden", "sensitivity"], default="youden")
    p.add_argument("--target-sensitivity", type=float, default=0.9)
    p.add_argument("--name", help="probe name (default: the output file's stem)")
    p.add_argument("--out", required=True, help="probe file to write (.json)")
    p.set_defaults(func=_cmd_probe)


def _cmd_curve(args) -> int:
    from probes.curve import parse_sizes, run_curve

    res = run_curve(args.store, args.labels, args.out, sizes=parse_sizes(args.sizes), repeats=args.repeats,
                    probes=args.probe or ["linear", "gbm"], test_labels=args.test_labels, seed=args.seed,
                    progress=not args.no_progress)
    print(f"{'model':<28} {'probe':<7} {'n_train':>7} {'AUC':>6}  95% range")
    for r in res.summary:
        print(f"{r['model']:<28} {r['probe']:<7} {r['n_train']:>7} {r['auc_mean']:>6.3f}  {r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f}")
    for c in res.comparisons:
        print(f"full training split, {c['probe']}: {c['model_a']} AUC {c['auc_a']:.3f} vs {c['model_b']} "
              f"{c['auc_b']:.3f}, paired DeLong p = {c['delong_p']:.3g}")
    shares = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds_by_probe.items())
    print(f"wrote {args.out}/curve.csv, summary.csv, curve.png in {res.seconds:.1f} s ({shares})")
    return 0


def _cmd_probe(args) -> int:
    import numpy as np

    from probes import auc_ci, save_probe, sensitivity_specificity, train_probe
    from probes.curve import LabelTable

    from .store import Store

    store = Store(args.store)
    table = LabelTable.read(args.labels, require_split=False)
    has_split = any(table.splits)
    rows = [i for i, s in enumerate(table.splits) if s == "train" or not has_split]
    missing = [table.images[i] for i in rows if table.images[i] not in store]
    if missing:
        print(f"warning: {len(missing)} training image(s) have no embedding in {args.store} (e.g. {missing[0]})", file=sys.stderr)
    rows = [i for i in rows if table.images[i] in store]
    X = store.get([table.images[i] for i in rows])
    probe = train_probe(X, table.labels[rows], kind=args.kind, identity=store.identity,
                        threshold_method=args.threshold, target_sensitivity=args.target_sensitivity)
    path = save_probe(probe, args.out, name=args.name, description=f"{args.kind} probe on {Path(args.labels).name}")
    print(f"wrote {path}: {args.kind} probe, classes {probe.classes_.tolist()}, {len(rows)} training images, "
          f"threshold {probe.threshold_} ({probe.threshold_info_['method']})")
    test = [i for i, s in enumerate(table.splits) if s == "test" and table.images[i] in store]
    if test and len(probe.classes_) == 2:
        y = table.labels[test] == probe.classes_[1]
        p = probe.predict_proba(store.get([table.images[i] for i in test]))[:, 1]
        a = auc_ci(y, p)
        sens, spec = sensitivity_specificity(y, p, probe.threshold_)
        print(f"test split: AUC {a.auc:.3f} (95% CI {a.ci_low:.3f}-{a.ci_high:.3f}), "
              f"sensitivity {sens:.3f}, specificity {spec:.3f} at the threshold; n={len(test)}")
    return 0


def _add_reference(sub) -> None:
    p = sub.add_parser("reference", help="build the reference CXR set used to flag inputs that are not chest radiographs")
    p.add_argument("--images", required=True, help="CSV with an 'image' column of frontal CXRs")
    p.add_argument("--image-root")
    p.add_argument("--model", default="imagenet-effnet-lite0", help="default: the chest-check model")
    p.add_argument("--n", type=int, default=500, help="images drawn at random (seeded) from the CSV")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="input size of the check (default 128)")
    p.add_argument("--out", help="default: next to the model weights, <model>.reference.npz")
    p.set_defaults(func=_cmd_reference)


def _cmd_reference(args) -> int:
    import numpy as np
    import torch

    from .batch import list_inputs
    from .chest import ReferenceSet, check_embeddings
    from .embedder import Embedder

    items = list_inputs(args.images, args.image_root)
    rng = np.random.default_rng(args.seed)
    pick = sorted(rng.choice(len(items), size=min(args.n, len(items)), replace=False))
    embedder = Embedder(args.model, device="cpu")
    tensors = [embedder.prepare(items[i].path)[0] for i in pick]
    embs = np.concatenate([check_embeddings(embedder.model, torch.stack(tensors[i : i + 32]), args.size)
                           for i in range(0, len(tensors), 32)])
    ref = ReferenceSet.build(embs, embedder.model.weights_hash, size=args.size)
    out = args.out or ReferenceSet.path_for(embedder.model.name)
    ref.save(out)
    print(f"wrote {out}: {len(embs)} reference embeddings of {embedder.model.name} at {args.size} px, "
          f"threshold {ref.threshold:.4f}")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (FastAPI under uvicorn)")
    p.add_argument("--host", default=None, help="default 127.0.0.1 (CXR_EMBED_HOST)")
    p.add_argument("--port", type=int, default=None, help="default 8000 (CXR_EMBED_PORT)")
    p.add_argument("--model", default=None, help="model name or checkpoint (CXR_EMBED_MODEL; default: shipped model)")
    p.add_argument("--probes", default=None, help="folder of saved probes, *.json (CXR_EMBED_PROBES)")
    p.add_argument("--store", default=None, help="store for /search (CXR_EMBED_STORE)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (CXR_EMBED_DEVICE; default auto)")
    p.add_argument("--image-check", default=None, choices=["auto", "always", "never"],
                   help="is-it-a-frontal-CXR check by the image: auto (default) when DICOM tags do not already say "
                        "CR/DX chest AP/PA, always, or never (tags only) (CXR_EMBED_IMAGE_CHECK)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import uvicorn

    from service.app import create_app
    from service.engine import Engine
    from service.settings import ServiceSettings

    try:
        settings = ServiceSettings.from_env(model=args.model, probes=args.probes, store=args.store, device=args.device,
                                            image_check=args.image_check)
    except ValueError as exc:
        raise CxrEmbedError(str(exc)) from None
    engine = Engine(settings)
    host = args.host or os.environ.get("CXR_EMBED_HOST", "127.0.0.1")
    port = args.port or int(os.environ.get("CXR_EMBED_PORT", "8000"))
    print(f"serving on http://{host}:{port} (docs at /docs); /ready answers 503 until the model is loaded", flush=True)
    uvicorn.run(create_app(settings, engine, exit_on_load_error=True), host=host, port=port, log_level=args.log_level)
    if engine.load_error:
        raise CxrEmbedError(f"could not start: {engine.load_error}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-embed", description="Chest X-ray embeddings, probes and an embedding service (PyTorch, open weights)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_embed(sub)
    _add_info(sub)
    _add_merge(sub)
    _add_models(sub)
    _add_pretrain(sub)
    _add_probes(sub)
    _add_reference(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CxrEmbedError as exc:
        print(f"cxr-embed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxr-embed {args.command}: interrupted (finished work was saved)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

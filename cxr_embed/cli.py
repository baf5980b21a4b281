"""The `cxr-embed` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import ModelMismatch, CxrEmbedError


def note(text: str) -> None:
    """A one-line message for the person at the terminal (stderr: stdout stays the command's result)."""
    print(text, file=sys.stderr, flush=True)


def loading_message(model: str | None) -> str:
    """Why the first seconds are slow, said once before the model loads."""
    from .registry import default_model_name

    return (f"loading {model or default_model_name()} (a few seconds; the first batch is slower while the model "
            "warms up, later ones run at full speed)")


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embed a folder or CSV of images into an HDF5 store (resumable)")
    p.add_argument("--images", required=True, help="folder of DICOM/PNG/JPEG files, or a CSV with an 'image' column")
    p.add_argument("--image-root", help="folder that CSV image paths are relative to (default: the CSV's folder)")
    p.add_argument("--out", required=True, help="the HDF5 store to create or extend")
    p.add_argument("--model", default=None, help="registered model name or .safetensors checkpoint (default: the shipped model)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_backend_options(p)
    p.add_argument("--commit-every", type=float, default=30.0, help="seconds between durable commits (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_options(p)
    p.set_defaults(func=_cmd_embed)


def add_ray_options(p) -> None:
    """--ray and the shape of a Ray job (cxr_embed.distributed; the `ray` extra)."""
    g = p.add_argument_group("on a Ray cluster (pip install 'cxr-embed[ray]')")
    g.add_argument("--ray", metavar="ADDRESS", help="run the job on Ray: 'local' (a Ray instance on this machine) or a "
                   "cluster's address (HOST:6379, or 'auto' on a node of it); shard stores beside --out are merged into it")
    g.add_argument("--ray-actors", type=int, default=0, metavar="N",
                   help="model actors (default: as many as the cluster's CPUs, or GPUs, hold)")
    g.add_argument("--ray-actor-cpus", type=float, default=0, metavar="C",
                   help="CPUs per actor, also its model threads (default 2; local with --ray-actors: the cores shared out)")
    g.add_argument("--ray-actor-gpus", type=float, default=0, metavar="G",
                   help="GPUs per actor (default 0: the model runs on the CPU)")


def add_backend_options(p, default: str | None = "auto") -> None:
    """--runtime and --precision, for every command that runs the model (embed, serve)."""
    p.add_argument("--runtime", "--backend", dest="backend", default=default, choices=["auto", "torch", "openvino"],
                   help="what runs the model: torch, or openvino (CPU; the model's ONNX export shipped in the "
                        "package, or for a checkpoint built once into the cache folder, CXR_EMBED_CACHE; the only "
                        "one a slim install has) (default: auto, torch where it is installed, else openvino)")
    p.add_argument("--precision", default="f32" if default else None, choices=["f32", "bf16"],
                   help="f32 (default; openvino gives torch's embeddings within 1e-4) or bf16 (openvino "
                        "only: faster, embeddings off by up to about 0.5; opt-in)")


def _check_store_model(out: Path, model: str | None) -> None:
    """A store of another registered model is refused before the model loads (the full check, weights
    included, comes when the store is opened for writing)."""
    from .registry import default_model_name, is_registered
    from .store import Store

    name = model or default_model_name()
    if not out.exists() or not is_registered(name):
        return
    held = Store(out).model_name
    if held != name:
        raise ModelMismatch(f"store {out} holds embeddings of model {held}, not {name}: embed into another --out, "
                            f"or pass --model {held}")


def _cmd_embed(args) -> int:
    from .batch import check_paths_exist, embed_to_store, list_inputs, shard_path
    from .embedder import Embedder

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.ray:
        if world > 1:
            raise CxrEmbedError("--ray and torchrun are two ways to spread the job: use one of them")
        return _embed_on_ray(args)
    dist = None
    if world > 1:  # started by torchrun: one shard per process, one store file per shard
        import torch.distributed as dist

        dist.init_process_group("gloo")
    items = list_inputs(args.images, args.image_root, warn=note)
    if not items:
        raise CxrEmbedError(f"no images found in {args.images}")
    check_paths_exist(items, args.images, warn=note)
    device = args.device
    if world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    _check_store_model(Path(args.out) if world == 1 else shard_path(Path(args.out), rank, world), args.model)
    note(loading_message(args.model))
    embedder = Embedder(args.model, batch_size=args.batch_size, device=device, backend=args.backend,
                        precision=args.precision)
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


def _embed_on_ray(args) -> int:
    from .batch import check_paths_exist, list_inputs
    from .distributed import RayPlan, embed_on_ray, require_ray
    from .runtime import RuntimeSettings

    require_ray()  # before the image list is read: a missing extra is said at once
    items = list_inputs(args.images, args.image_root)
    if not items:
        raise CxrEmbedError(f"no images found in {args.images}")
    check_paths_exist(items, args.images, warn=note)
    settings = RuntimeSettings(model=args.model, device=args.device, backend=args.backend, precision=args.precision)
    plan = RayPlan(args.ray, args.ray_actors, args.ray_actor_cpus, args.ray_actor_gpus)
    note(f"{loading_message(args.model)}; then starting Ray ({args.ray})")
    summary = embed_on_ray(items, args.out, settings, plan, batch_size=args.batch_size,
                           commit_every_s=args.commit_every, progress=not args.no_progress)
    print(summary.text())
    return 1 if summary.failed and summary.embedded == 0 and summary.total_in_store == 0 else 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print what a store holds")
    p.add_argument("store", help="the HDF5 store (from `cxr-embed embed`)")
    p.set_defaults(func=lambda a: _print_info(a.store))


def _print_info(path: str) -> int:
    from .store import Store

    print(Store(path).summary())
    return 0


def _add_store(sub) -> None:
    p = sub.add_parser("store", help="maintain a store: remove images for good, upgrade an old format")
    ops = p.add_subparsers(dest="store_command", required=True, metavar="ACTION", help="remove or upgrade")
    rm = ops.add_parser("remove", help="remove images (embedding, metadata, failure record) from a store for good")
    rm.add_argument("store", help="the store file (.h5)")
    rm.add_argument("--ids", nargs="+", default=[], help="image ids to remove")
    rm.add_argument("--ids-file", help="a text file of image ids, one per line")
    rm.set_defaults(func=_cmd_store_remove)
    up = ops.add_parser("upgrade", help="rewrite a store of an older format with checksums (in place, atomically)")
    up.add_argument("store", help="the store file (.h5)")
    up.set_defaults(func=lambda a: _cmd_store_upgrade(a.store))


def _cmd_store_remove(args) -> int:
    from .store import remove_images

    ids = list(args.ids)
    if args.ids_file:
        try:
            ids += [line.strip() for line in Path(args.ids_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise CxrEmbedError(f"--ids-file {args.ids_file}: cannot read it ({exc})") from None
    if not ids:
        raise CxrEmbedError("name the images to remove with --ids or --ids-file")
    report = remove_images(args.store, ids)
    print(f"{report.path}: removed {len(report.removed)} image(s) and {len(report.removed_failures)} failure record(s); "
          f"{report.remaining} remain. The file was rewritten without them; rebuild any index saved from it, "
          "and remove copies and shard stores yourself. Take them out of the CSV or folder you embed from too: "
          "an `embed` run that lists them again embeds them again")
    return 0


def _cmd_store_upgrade(path: str) -> int:
    from .store import upgrade_store

    print(f"{upgrade_store(path)}: in the current format, with checksums")
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge shard stores (e.g. from torchrun) into one store")
    p.add_argument("--out", required=True, help="the merged store to create or extend")
    p.add_argument("stores", nargs="+", help="shard stores to merge (same model)")
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
    from .registry import default_model_name, get_spec, list_models

    default = default_model_name()
    for name in list_models():
        spec = get_spec(name)
        mark = " (default)" if name == default else ""
        print(f"{name}{mark}: {spec.arch}, dim {spec.dim}, {spec.preprocess.identity} - {spec.description}")
    return 0


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="SupCon-pretrain a backbone on labelled CXRs (resumable)")
    p.add_argument("--config", help="YAML or TOML file; every field has a default (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting (YAML value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("pack", help="decode a pretraining pool once into compact pack file(s) (every CSV column kept)")
    p.add_argument("--config", help="the pretraining config (YAML or TOML) whose pool is packed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting (YAML value)")
    p.add_argument("--out", required=True, help="pack file to write (.h5; with --parts, NAME.partK.h5)")
    p.add_argument("--parts", type=int, default=1, help="number of pack files (default %(default)s)")
    p.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality of the packed images (default %(default)s)")
    p.add_argument("--format", dest="image_format", default="jpeg", choices=["jpeg", "webp"],
                   help="image compression: jpeg (default) or webp (about half the size at the same error)")
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

    for path in build_pack(_pretrain_config(args), args.out, parts=args.parts, quality=args.quality,
                           image_format=args.image_format):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _add_reference(sub) -> None:
    p = sub.add_parser("reference", help="build the reference CXR set used to flag inputs that are not chest radiographs")
    p.add_argument("--images", required=True, help="CSV with an 'image' column of frontal CXRs")
    p.add_argument("--image-root", help="folder that CSV image paths are relative to (default: the CSV's folder)")
    p.add_argument("--model", default="imagenet-effnet-lite0", help="default: the chest-check model")
    p.add_argument("--n", type=int, default=500, help="images drawn at random (seeded) from the CSV")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default %(default)s)")
    p.add_argument("--size", type=int, default=128, help="input size of the check (default 128)")
    p.add_argument("--out", help="default: next to the model weights, <model>.reference.npz")
    p.set_defaults(func=_cmd_reference)


def _cmd_reference(args) -> int:
    import numpy as np

    from .batch import list_inputs
    from .chest import ReferenceSet, build_reference

    items = list_inputs(args.images, args.image_root)
    pick = sorted(np.random.default_rng(args.seed).choice(len(items), size=min(args.n, len(items)), replace=False))
    ref = build_reference([items[i].path for i in pick], args.model, args.size, progress=True)
    out = args.out or ReferenceSet.path_for(args.model)
    ref.save(out)
    print(f"wrote {out}: {len(pick)} reference embeddings of {args.model} at {args.size} px, threshold {ref.threshold:.4f}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a store's ids, embeddings and metadata to Parquet or .npz")
    p.add_argument("--store", required=True, help="the HDF5 store (from `cxr-embed embed`)")
    p.add_argument("--out", required=True, help="file to write: *.parquet (needs pyarrow) or *.npz")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .export import export_store
    from .store import Store

    store = Store(args.store)
    out = export_store(store, args.out)
    print(f"wrote {out}: {len(store)} embeddings of {store.model_name} (dim {store.dim}), ids and metadata")
    return 0


def _add_export_onnx(sub) -> None:
    p = sub.add_parser("export-onnx", help="write a model's checked ONNX export (for --runtime openvino, and a slim "
                                           "install's --model FILE.onnx)")
    p.add_argument("--model", default=None, help="registered model name or .safetensors checkpoint (default: the shipped model)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.set_defaults(func=_cmd_export_onnx)


def _cmd_export_onnx(args) -> int:
    from .export_onnx import check_onnx, export_onnx
    from .models import create_model

    if not args.out.endswith(".onnx"):
        raise CxrEmbedError(f"--out {args.out}: name it *.onnx (a slim install takes --model FILE.onnx)")
    model = create_model(args.model)
    meta = check_onnx(export_onnx(model, args.out), model.identity)
    print(f"wrote {args.out}: {model.name} (weights {meta['weights_hash']}, {meta['preprocess_version']}, "
          f"dim {meta['dim']}), ONNX {meta['format']}")
    return 0


def _add_preview(sub) -> None:
    p = sub.add_parser("preview", help="save the exact image the model sees (after windowing and letterboxing)")
    p.add_argument("image", help="a DICOM, PNG or JPEG file")
    p.add_argument("--out", required=True, help="picture to write (.png recommended)")
    p.add_argument("--model", default=None, help="model whose preprocessing to show (default: the shipped model)")
    p.set_defaults(func=_cmd_preview)


def _cmd_preview(args) -> int:
    from .preview import preview_image
    from .registry import default_model_name, get_spec

    name = args.model or default_model_name()
    try:
        config = get_spec(name).preprocess
    except CxrEmbedError:  # a checkpoint path: its preprocessing is in the file (PyTorch: the full package)
        from .models import create_model

        config = create_model(name).preprocess
    image = preview_image(args.image, config)
    try:
        image.save(args.out)
    except (OSError, ValueError) as exc:
        raise CxrEmbedError(f"cannot write {args.out}: {exc}; name it *.png (or *.jpg)") from None
    print(f"wrote {args.out}: {image.width}x{image.height} px, what {name} sees ({config.identity})")
    return 0


COMMAND_GROUP = "cxr_embed.commands"


def command_plugins() -> list:
    """The `register(subparsers)` functions of the packages above this one (probes, service, ...).

    Layers point one way: cxr_embed imports neither probes nor service; each contributes its own
    commands through the `cxr_embed.commands` entry-point group of its distribution."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-embed", description="Chest X-ray embeddings, probes and an embedding service (PyTorch, open weights)."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cxr-embed {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_embed(sub)
    _add_export(sub)
    _add_export_onnx(sub)
    _add_preview(sub)
    _add_info(sub)
    _add_store(sub)
    _add_merge(sub)
    _add_models(sub)
    _add_pretrain(sub)
    _add_reference(sub)
    for register in command_plugins():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .process import configure_process

    try:
        configure_process()  # the one place the CLI changes process-wide settings (process.py)
        return int(args.func(args) or 0)
    except CxrEmbedError as exc:
        print(f"cxr-embed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxr-embed {args.command}: interrupted (finished work was saved)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

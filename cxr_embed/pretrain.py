"""SupCon pretraining: make a registered backbone CXR-specific with noisy labels.

Two augmented views per image go through the backbone and a projection head; pytorch-metric-
learning's SupConLoss pulls together views of images with the same label and pushes the rest apart.
The embedding that ships is the backbone's pooled output, not the projection.

Positives: images are positives of each other when their whole label vector is equal. With one
binary column (the default `abnormal`) that is normal vs abnormal, as CXR Foundation did; with
several columns (e.g. the 14 NIH findings) each distinct combination of findings is one class, and
combinations seen fewer than `min_class_count` times are dropped from training (reported).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .optional import require

require("torch", "pretraining (cxr-embed pretrain, pack)")
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .augment import AugmentConfig, augment, center_view  # noqa: E402
from .errors import CxrEmbedError, InputError, LabelError  # noqa: E402
from .ingest import load_image, read_bytes  # noqa: E402
from .labels import read_labels  # noqa: E402
from .models import EmbeddingModel, create_model, save_checkpoint  # noqa: E402
from .preprocess import letterbox  # noqa: E402
from .threads import decode_pool  # noqa: E402


@dataclass
class PretrainConfig:
    labels: str = "../shared/data/pretrain.csv"
    image_root: str | None = None  # CSV paths are relative to this (default: the CSV's folder)
    label_columns: list[str] = field(default_factory=lambda: ["abnormal"])
    packs: list[str] = field(default_factory=list)  # pre-decoded packs (see build_pack) instead of the CSV
    base_model: str = "imagenet-effnet-lite0"
    name: str = "cxr-supcon-effnet-lite0"
    out_dir: str = "runs/pretrain"
    input_size: int = 224
    epochs: int = 20
    batch_size: int = 256
    classes_per_batch: int = 0  # 0: min(number of classes, batch_size // 4)
    min_class_count: int = 8
    lr: float = 3e-4  # backbone; the head uses head_lr_mult times this
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    temperature: float = 0.1
    projection_hidden: int = 512
    projection_dim: int = 128
    freeze_blocks: int = 0  # freeze the stem and this many early stages (saves CPU time)
    amp: bool = True  # bfloat16 autocast on CUDA; ignored on the CPU
    device: str = "auto"
    seed: int = 0
    holdout: int = 1000  # images kept out of training for the quick linear-probe AUC
    probe_every: int = 1  # epochs between quick probes (0: only at the start and end)
    log_every: int = 20  # steps
    checkpoint_every: int = 200  # steps
    max_steps: int = 0  # stop after this many steps in all (0: run every epoch)
    max_images: int = 0  # use only the first N rows (0: all); for smoke tests
    snapshot_epochs: list[int] = field(default_factory=list)  # also write fp16 checkpoints after these epochs
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def from_file(cls, path: str | os.PathLike | None) -> "PretrainConfig":
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise CxrEmbedError(f"no config file at {path}")
        text = path.read_text()
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "PretrainConfig":
        if not isinstance(data, dict):
            raise CxrEmbedError(f"{source}: expected a mapping of settings")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CxrEmbedError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        data = dict(data)
        if "augment" in data:
            aug = data["augment"] or {}
            anames = {f.name for f in dataclasses.fields(AugmentConfig)}
            bad = sorted(set(aug) - anames)
            if bad:
                raise CxrEmbedError(f"{source}: unknown augment setting(s) {', '.join(bad)}")
            data["augment"] = AugmentConfig(**aug)
        if isinstance(data.get("label_columns"), str):
            data["label_columns"] = [data["label_columns"]]
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the pool of training images ------------------------------------------------------------------

@dataclass
class Pool:
    """Letterboxed uint8 images in memory, their ids and class keys, and the data's hash."""

    images: np.ndarray  # (N, S, S) uint8
    ids: list[str]
    keys: list[str]  # the label vector as text, e.g. "1" or "0|1|0"
    data_hash: str
    failed: dict[str, str] = field(default_factory=dict)


def _read_label_rows(cfg: PretrainConfig) -> list[tuple[str, str]]:
    """(image, class key) rows of the pool through the one label reader (cxr_embed.labels)."""
    table = read_labels(cfg.labels, cfg.label_columns, max_rows=cfg.max_images or 0, encode=False)
    return [(image, table.key(i)) for i, image in enumerate(table.images)]


def _decode_one(data: bytes, size: int) -> np.ndarray:
    sq = letterbox(load_image(data).pixels, size)
    return (sq * 255.0 + 0.5).astype(np.uint8)


def load_pool_from_csv(cfg: PretrainConfig, progress: bool = True) -> Pool:
    rows = _read_label_rows(cfg)
    root = Path(cfg.image_root) if cfg.image_root else Path(cfg.labels).parent
    images = np.zeros((len(rows), cfg.input_size, cfg.input_size), np.uint8)
    ok = np.zeros(len(rows), bool)
    failed: dict[str, str] = {}
    h = hashlib.sha256()

    def work(n: int):
        image_id = rows[n][0]
        try:
            data = read_bytes(root / image_id)
            digest = hashlib.sha256(data).hexdigest()
            images[n] = _decode_one(data, cfg.input_size)
            return n, digest, None
        except InputError as exc:
            return n, None, f"{exc.code}: {exc}"

    with decode_pool(min(8, os.cpu_count() or 1), prefix="cxr-load") as pool:  # see threads.py
        results = list(tqdm(pool.map(work, range(len(rows))), total=len(rows), unit="img", desc="loading images",
                            disable=not progress, file=sys.stderr, mininterval=2.0))
    for n, digest, err in results:
        if err is None:
            ok[n] = True
            h.update(f"{rows[n][0]}\t{rows[n][1]}\t{digest}\n".encode())
        else:
            failed[rows[n][0]] = err
    keep = np.flatnonzero(ok)
    return Pool(images[keep], [rows[n][0] for n in keep], [rows[n][1] for n in keep], h.hexdigest()[:16], failed)


def build_pack(cfg: PretrainConfig, out: str | os.PathLike, parts: int = 1, quality: int = 90, progress: bool = True) -> list[Path]:
    """Decode the pool once and write it as JPEG-compressed letterboxed images in HDF5 file(s).

    A pack moves the training data to another machine (e.g. a GPU host) in a few tens of MB. The data
    hash recorded is that of the original files, so a model trained from a pack names its real source.
    """
    from PIL import Image

    pool = load_pool_from_csv(cfg, progress=progress)
    out = Path(out)
    paths = []
    for part in range(parts):
        path = out if parts == 1 else out.with_name(f"{out.stem}.part{part}{out.suffix}")
        sel = range(part, len(pool.ids), parts)
        with h5py.File(path, "w") as f:
            f.attrs["format"] = "cxr-embed-pack/1"
            f.attrs["data_hash"] = pool.data_hash
            f.attrs["size"] = cfg.input_size
            f.attrs["label_columns"] = json.dumps(cfg.label_columns)
            f.attrs["quality"] = quality
            f.attrs["n_failed"] = len(pool.failed)
            jpeg = f.create_dataset("jpeg", (len(sel),), dtype=h5py.vlen_dtype(np.uint8))
            for j, n in enumerate(sel):
                buf = io.BytesIO()
                Image.fromarray(pool.images[n]).save(buf, format="JPEG", quality=quality)
                jpeg[j] = np.frombuffer(buf.getvalue(), np.uint8)
            f.create_dataset("ids", data=[pool.ids[n] for n in sel], dtype=h5py.string_dtype())
            f.create_dataset("keys", data=[pool.keys[n] for n in sel], dtype=h5py.string_dtype())
        paths.append(path)
    return paths


def load_pool_from_packs(paths: list[str], label_columns: list[str], progress: bool = True) -> Pool:
    """The pool stored in pack file(s); refuses packs whose class keys were built from other label
    columns than `label_columns` (the checkpoint would record columns it was not trained on)."""
    from PIL import Image

    images, ids, keys, hashes = [], [], [], set()
    for p in paths:
        with h5py.File(p, "r") as f:
            if f.attrs.get("format") != "cxr-embed-pack/1":
                raise CxrEmbedError(f"{p} is not a cxr-embed pack")
            packed = json.loads(f.attrs.get("label_columns", "null"))
            if packed != list(label_columns):
                raise CxrEmbedError(f"pack {p} holds labels of column(s) {packed}, but the config asks for "
                                    f"{list(label_columns)}: rebuild the pack with `cxr-embed pack` and these columns")
            hashes.add(str(f.attrs["data_hash"]))
            blobs = f["jpeg"][:]
            ids += [x.decode() if isinstance(x, bytes) else x for x in f["ids"][:]]
            keys += [x.decode() if isinstance(x, bytes) else x for x in f["keys"][:]]
        for b in tqdm(blobs, desc=f"unpacking {Path(p).name}", unit="img", disable=not progress, file=sys.stderr, mininterval=2.0):
            images.append(np.asarray(Image.open(io.BytesIO(b.tobytes())).convert("L")))
    if len(hashes) != 1:
        raise CxrEmbedError(f"packs come from different data ({sorted(hashes)})")
    order = np.argsort(ids, kind="stable")  # parts interleave rows; restore one canonical order
    arr = np.stack(images)[order]
    return Pool(arr, [ids[n] for n in order], [keys[n] for n in order], hashes.pop())


# --- pieces of the training loop ------------------------------------------------------------------

class ClassBalancedBatches:
    """Batches of `classes_per_batch` classes x `per_class` images; deterministic per (seed, epoch, rank)."""

    def __init__(self, labels: np.ndarray, batch_size: int, classes_per_batch: int, seed: int, rank: int = 0):
        self.labels = labels
        self.classes = np.unique(labels)
        self.cpb = min(len(self.classes), classes_per_batch or max(2, batch_size // 4))
        self.per_class = max(2, batch_size // self.cpb)
        self.batch_size = self.cpb * self.per_class
        self.by_class = {c: np.flatnonzero(labels == c) for c in self.classes}
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        perms = {c: rng.permutation(ix) for c, ix in self.by_class.items()}
        cursor = {c: 0 for c in self.classes}
        batches = []
        for _ in range(len(self)):
            chosen = rng.choice(self.classes, size=self.cpb, replace=False)
            parts = []
            for c in chosen:
                ix = perms[c]
                if cursor[c] + self.per_class > len(ix):
                    perms[c] = ix = rng.permutation(ix)
                    cursor[c] = 0
                take = ix[cursor[c] : cursor[c] + self.per_class]
                if len(take) < self.per_class:  # a class smaller than per_class: sample with replacement
                    take = rng.choice(ix, self.per_class, replace=True)
                cursor[c] += self.per_class
                parts.append(take)
            batches.append(np.concatenate(parts))
        return batches


class ProjectionHead(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def freeze_stages(backbone: nn.Module, blocks: int) -> list[nn.Module]:
    """Freeze the stem and the first `blocks` stages; returns the frozen modules (kept in eval mode)."""
    if blocks <= 0:
        return []
    frozen = [m for m in (getattr(backbone, "conv_stem", None), getattr(backbone, "bn1", None)) if m is not None]
    frozen += list(backbone.blocks[:blocks])
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return frozen


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def embed_uint8(backbone: nn.Module, images: np.ndarray, device: torch.device, batch: int = 256) -> np.ndarray:
    was = backbone.training
    backbone.eval()
    out = []
    for i in range(0, len(images), batch):
        x = center_view(torch.from_numpy(images[i : i + batch]).to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(backbone(x).float().cpu().numpy())
    backbone.train(was)
    return np.concatenate(out) if out else np.zeros((0, backbone.num_features), np.float32)


def quick_probe_auc(emb: np.ndarray, keys: list[str]) -> float | None:
    """5-fold cross-validated AUC of a logistic regression on held-aside embeddings (binary keys only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.metrics import roc_auc_score

    classes = sorted(set(keys))
    if len(classes) != 2 or min(keys.count(c) for c in classes) < 5:
        return None
    y = np.array([classes.index(k) for k in keys])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    scores = cross_val_predict(clf, emb, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), method="decision_function")
    return float(roc_auc_score(y, scores))


def _git_commit() -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _hardware(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)}"
    return f"{world} process(es) on CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads each)"


# --- the loop --------------------------------------------------------------------------------------

def _start_processes(cfg: PretrainConfig) -> tuple[torch.device, int, int]:
    """The device, rank and world size; starts the process group under torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else torch.device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


class RunLog:
    """JSON lines to `out_dir/log.jsonl` and stderr, from the main process only."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = path, is_main

    def __call__(self, record: dict) -> None:
        if self.is_main:
            record = {"time": round(time.time(), 1), **record}
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(json.dumps(record), file=sys.stderr, flush=True)


def split_pool(pool: Pool, cfg: PretrainConfig, log) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(holdout rows, training rows, class index of every row): a fixed, seeded holdout for the quick
    probe; classes rarer than `min_class_count` are not trained on."""
    order = np.random.default_rng(cfg.seed).permutation(len(pool.ids))
    n_hold = min(cfg.holdout, len(order) // 5)
    hold, train_ix = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    key_list = sorted(set(pool.keys))
    labels_all = np.array([key_list.index(k) for k in pool.keys])
    counts = np.bincount(labels_all[train_ix], minlength=len(key_list))
    rare = [c for c in range(len(key_list)) if counts[c] < cfg.min_class_count]
    if rare:
        train_ix = train_ix[np.isin(labels_all[train_ix], rare, invert=True)]
        log({"event": "dropped_rare_classes", "classes": [key_list[c] for c in rare][:20], "count": len(rare)})
    if len(np.unique(labels_all[train_ix])) < 2:
        raise LabelError("SupCon needs at least two label classes with enough images")
    return hold, train_ix, labels_all


class Trainer:
    """One SupCon pretraining run: model, optimiser, loss and the resumable state of the loop."""

    def __init__(self, cfg: PretrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.device, self.rank, self.world = _start_processes(cfg)
        self.is_main = self.rank == 0
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(self.out_dir / "log.jsonl", self.is_main)
        self.ckpt_path = self.out_dir / "last.pt"
        self.pool = load_pool_from_packs(cfg.packs, cfg.label_columns, progress and self.is_main) if cfg.packs \
            else load_pool_from_csv(cfg, progress and self.is_main)
        if self.pool.failed:
            self.log({"event": "skipped_images", "count": len(self.pool.failed),
                      "examples": dict(list(self.pool.failed.items())[:5])})
        self.hold, self.train_ix, self.labels_all = split_pool(self.pool, cfg, self.log)
        self._build_model()
        self.batches = ClassBalancedBatches(self.labels_all[self.train_ix], cfg.batch_size, cfg.classes_per_batch,
                                            cfg.seed, self.rank)
        self.steps_per_epoch = len(self.batches)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.step, self.history, self.train_seconds = 0, [], 0.0

    def _build_model(self) -> None:
        from pytorch_metric_learning.losses import SupConLoss

        cfg, device = self.cfg, self.device
        self.base = create_model(cfg.base_model)
        self.backbone = self.base.backbone.to(device)
        self.head = ProjectionHead(self.base.dim, cfg.projection_hidden, cfg.projection_dim).to(device)
        self.frozen = freeze_stages(self.backbone, cfg.freeze_blocks)
        if device.type == "cuda":
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        params = [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
                  {"params": list(self.head.parameters()), "lr_mult": cfg.head_lr_mult}]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.loss_fn = SupConLoss(temperature=cfg.temperature)
        self.train_model: nn.Module = nn.Sequential(self.backbone, self.head)
        if self.world > 1:
            from pytorch_metric_learning.utils import distributed as pml_dist
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)
            self.loss_fn = pml_dist.DistributedLossWrapper(self.loss_fn)

    # --- state ----------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from `out_dir/last.pt` when present (tensors and plain data only: weights_only)."""
        if not self.ckpt_path.exists():
            return
        try:
            state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        except Exception as exc:  # torch raises several kinds on a damaged or foreign file
            raise CxrEmbedError(f"cannot resume from {self.ckpt_path}: {type(exc).__name__}: {exc}; "
                                "delete it to start over") from None
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.history, self.train_seconds = state["step"], state["history"], state["train_seconds"]
        self.log({"event": "resumed", "step": self.step, "from": str(self.ckpt_path)})

    def save_state(self) -> None:
        if not self.is_main:
            return
        tmp = self.ckpt_path.with_name("last.pt.tmp")
        torch.save({"backbone": self.backbone.state_dict(), "head": self.head.state_dict(),
                    "optimizer": self.opt.state_dict(), "step": self.step, "history": self.history,
                    "train_seconds": self.train_seconds, "config": self.cfg.to_dict()}, tmp)
        os.replace(tmp, self.ckpt_path)

    def probe(self, tag: str) -> None:
        """The quick linear-probe AUC on the holdout, logged and kept in the history."""
        if not self.is_main or len(self.hold) == 0:
            return
        emb = embed_uint8(self.backbone, self.pool.images[self.hold], self.device)
        auc = quick_probe_auc(emb, [self.pool.keys[n] for n in self.hold])
        self.history.append({"step": self.step, "when": tag, "holdout_auc": auc})
        self.log({"event": "quick_probe", "step": self.step, "when": tag, "holdout_auc": auc,
                  "holdout_images": int(len(self.hold))})

    # --- the loop -------------------------------------------------------------------------------

    def train_step(self, images_dev: torch.Tensor, gen: torch.Generator) -> tuple[float, float, int]:
        """One optimiser step on a class-balanced batch of two augmented views: (loss, lr, images)."""
        cfg, device = self.cfg, self.device
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        idx = self.train_ix[self.batches.epoch(epoch)[in_epoch]]
        gen.manual_seed(cfg.seed * 1_000_003 + self.step * 31 + self.rank)
        lr = lr_at(self.step, self.total_steps, cfg.lr, cfg.warmup_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        imgs = images_dev[torch.from_numpy(idx).to(device)]
        views = torch.cat([augment(imgs, cfg.augment, gen), augment(imgs, cfg.augment, gen)])
        if device.type == "cuda":
            views = views.contiguous(memory_format=torch.channels_last)
        labels = torch.from_numpy(self.labels_all[idx]).to(device).repeat(2)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            z = self.train_model(views)
        loss = self.loss_fn(z.float(), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return loss.item(), lr, len(idx)

    def after_step(self) -> None:
        """Checkpoints, snapshots and quick probes due after this step."""
        cfg, step = self.cfg, self.step
        if step % cfg.checkpoint_every == 0:
            self.save_state()
        if step % self.steps_per_epoch:
            return
        epoch = step // self.steps_per_epoch
        if epoch in cfg.snapshot_epochs and self.is_main:
            snap = EmbeddingModel(copy.deepcopy(self.backbone).float().cpu(), cfg.name, self.base.arch, self.base.preprocess)
            save_checkpoint(snap, self.out_dir / "snapshots" / f"{cfg.name}-epoch{epoch}.safetensors", half=True,
                            extra={"config": cfg.to_dict(), "data_hash": self.pool.data_hash, "step": step})
        if cfg.probe_every and epoch % cfg.probe_every == 0 and step < self.total_steps:
            self.probe(f"epoch {epoch}")

    def loop(self) -> None:
        images_dev = torch.from_numpy(self.pool.images).to(self.device)  # uint8; 19k x 224^2 is 1 GB
        gen = torch.Generator(device=self.device)
        self.backbone.train()
        for m in self.frozen:
            m.eval()
        t_log, n_log = time.perf_counter(), 0
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="pretraining",
                   disable=not (self.progress and self.is_main), file=sys.stderr, mininterval=5.0)
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                loss, lr, n = self.train_step(images_dev, gen)
                n_log += n
                if self.device.type == "cuda" and self.step % self.cfg.log_every == 0:
                    torch.cuda.synchronize()
                self.train_seconds += time.perf_counter() - t0
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    self.log({"event": "train", "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                              "loss": round(loss, 4), "lr": lr,
                              "images_per_s": round(n_log * self.world / (time.perf_counter() - t_log), 1)})
                    t_log, n_log = time.perf_counter(), 0
                self.after_step()
        finally:
            bar.close()
            self.save_state()

    def finish(self) -> Path:
        """The final probe and the fp16 safetensors checkpoint with its provenance."""
        self.probe("end")
        self.save_state()
        final = self.out_dir / f"{self.cfg.name}.safetensors"
        if self.is_main:
            backbone = self.backbone.float().cpu().to(memory_format=torch.contiguous_format)
            model = EmbeddingModel(backbone, self.cfg.name, self.base.arch, self.base.preprocess)
            save_checkpoint(model, final, half=True, extra={
                "base_model": self.cfg.base_model, "config": self.cfg.to_dict(), "data_hash": self.pool.data_hash,
                "train_images": int(len(self.train_ix)), "git_commit": _git_commit(),
                "train_seconds": round(self.train_seconds, 1), "hardware": _hardware(self.device, self.world),
                "quick_probe": self.history, "torch": torch.__version__,
            })
            self.log({"event": "done", "checkpoint": str(final), "train_seconds": round(self.train_seconds, 1)})
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
        return final


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Train; resumes from `out_dir/last.pt` when present. Returns the final safetensors checkpoint."""
    trainer = Trainer(cfg, progress)
    trainer.resume()
    trainer.log({"event": "start", "images": len(trainer.train_ix), "holdout": int(len(trainer.hold)),
                 "classes": len(np.unique(trainer.labels_all[trainer.train_ix])), "batch_size": trainer.batches.batch_size,
                 "steps": trainer.total_steps, "device": str(trainer.device), "world": trainer.world,
                 "data_hash": trainer.pool.data_hash})
    if trainer.step == 0:
        trainer.probe("start")
    trainer.loop()
    return trainer.finish()

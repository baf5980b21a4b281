"""SupCon pretraining: make a registered backbone CXR-specific with noisy labels.

Two augmented views per image go through the backbone and a projection head; pytorch-metric-
learning's SupConLoss pulls together views of images with the same label and pushes the rest apart.
The embedding that ships is the backbone's pooled output, not the projection.

Positives: images are positives of each other when their class key is equal. The key is the label
vector (`label_columns`; with the default `abnormal`, normal vs abnormal, as CXR Foundation did; with
several columns each distinct combination is one class, and combinations seen fewer than
`min_class_count` times are dropped from training, reported), or, with `label_map`, the class its
first matching pattern names (e.g. the pool's `finding` mapped to normal / COVID-19 / TB / bacterial
/ viral pneumonia). Which rows train (`exclude`) and how classes get their keys: cxr_embed.pool.
Batches: class-balanced, and with `balance_by` balanced by group within a class: cxr_embed.sampler.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .optional import require

require("torch", "pretraining (cxr-embed pretrain, pack)")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .augment import AugmentConfig, augment, center_view  # noqa: E402
from .errors import CxrEmbedError, LabelError  # noqa: E402
from .models import EmbeddingModel, create_model, save_checkpoint  # noqa: E402
from .pool import (Pool, build_pack, load_pool_from_csv, load_pool_from_packs, normalise_exclude,  # noqa: E402
                   normalise_label_map)
from .sampler import ClassBalancedBatches  # noqa: E402
from .threads import model_threads  # noqa: E402

__all__ = ["PretrainConfig", "Pool", "Trainer", "pretrain", "build_pack", "ClassBalancedBatches"]


@dataclass
class PretrainConfig:
    labels: str = "../shared/data/pretrain.csv"
    image_root: str | None = None  # CSV paths are relative to this (default: the CSV's folder)
    label_columns: list[str] = field(default_factory=lambda: ["abnormal"])
    label_map: list[list[str]] = field(default_factory=list)  # [[pattern, class], ...]: first match (re.match) wins
    exclude: dict[str, list[str]] = field(default_factory=dict)  # {column or "class": [value, ...]}: rows left out
    balance_by: list[str] = field(default_factory=list)  # columns (e.g. [source]) balanced within each class
    balance_alpha: float = 0.0  # group shares within a class ~ size ** alpha: 0 even, 1 as in the pool
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
    max_train_seconds: float = 0  # stop training after this long and write the checkpoint, marked (0: no limit)
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
        for name in ("label_columns", "balance_by"):
            if isinstance(data.get(name), str):
                data[name] = [data[name]]
        data["label_map"] = normalise_label_map(data.get("label_map"), source)
        data["exclude"] = normalise_exclude(data.get("exclude"), source)
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- pieces of the training loop ------------------------------------------------------------------

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
    """5-fold cross-validated AUC of a logistic regression on held-aside embeddings: binary keys as
    they are, several classes as the macro one-vs-rest AUC over the classes with 5 or more images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = Counter(keys)
    classes = sorted(c for c, n in counts.items() if n >= 5)
    if len(classes) < 2:
        return None
    rows = [i for i, k in enumerate(keys) if k in classes]
    y = np.array([classes.index(keys[i]) for i in rows])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    if len(classes) == 2:
        scores = cross_val_predict(clf, emb[rows], y, cv=cv, method="decision_function")
        return float(roc_auc_score(y, scores))
    probs = cross_val_predict(clf, emb[rows], y, cv=cv, method="predict_proba")
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def _git_commit() -> str:
    """This code's commit: git's answer, else CXR_EMBED_GIT_COMMIT (set where the code is a copy without git)."""
    if os.environ.get("CXR_EMBED_GIT_COMMIT"):
        return os.environ["CXR_EMBED_GIT_COMMIT"]
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


RESUME_KEYS = ("labels", "packs", "label_columns", "label_map", "exclude", "balance_by", "balance_alpha", "base_model",
               "input_size", "batch_size", "classes_per_batch", "min_class_count", "seed", "holdout", "max_images")


class Trainer:
    """One SupCon pretraining run: model, optimiser, loss and the resumable state of the loop."""

    def __init__(self, cfg: PretrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.device, self.rank, self.world = _start_processes(cfg)
        self.threads = torch.get_num_threads()  # the quick probe (scikit-learn) may change it: loop() restores it
        self.is_main = self.rank == 0
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(self.out_dir / "log.jsonl", self.is_main)
        self.ckpt_path = self.out_dir / "last.pt"
        self.pool = load_pool_from_packs(cfg, progress and self.is_main) if cfg.packs \
            else load_pool_from_csv(cfg, progress and self.is_main)
        if self.pool.failed:
            self.log({"event": "skipped_images", "count": len(self.pool.failed),
                      "examples": dict(list(self.pool.failed.items())[:5])})
        self.hold, self.train_ix, self.labels_all = split_pool(self.pool, cfg, self.log)
        self._build_model()
        groups = self.pool.groups(cfg.balance_by)
        self.batches = ClassBalancedBatches(self.labels_all[self.train_ix], cfg.batch_size, cfg.classes_per_batch,
                                            cfg.seed, self.rank, None if groups is None else groups[self.train_ix],
                                            cfg.balance_alpha)
        self.steps_per_epoch = len(self.batches)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.step, self.history, self.train_seconds, self.stopped_early = 0, [], 0.0, False

    def composition(self) -> dict:
        """Training images per class and, with balance_by, per group: {class: {group: [images, share]}}."""
        b, keys = self.batches, sorted(set(self.pool.keys))
        if not self.cfg.balance_by:
            return {keys[c]: int(len(b.cells[c][0])) for c in b.classes}
        return {keys[c]: {g: [len(ix), round(float(share), 4)] for g, ix, share in
                          zip(b.group_names[c], b.cells[c], b.shares[c])} for c in b.classes}

    def _build_model(self) -> None:
        from pytorch_metric_learning.losses import SupConLoss

        cfg, device = self.cfg, self.device
        self.base = create_model(cfg.base_model)
        self.backbone = self.base.backbone.to(device)
        with torch.random.fork_rng(devices=[]):  # the head's initial weights follow the seed, nothing else changes
            torch.manual_seed(cfg.seed)
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
        self._check_same_run(state.get("config", {}))
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.history, self.train_seconds = state["step"], state["history"], state["train_seconds"]
        self.log({"event": "resumed", "step": self.step, "from": str(self.ckpt_path)})

    def _check_same_run(self, saved: dict) -> None:
        """Refuse to resume a run whose data, classes or batches the config now defines differently."""
        now = self.cfg.to_dict()
        changed = [k for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
        if changed:
            raise CxrEmbedError(f"{self.ckpt_path} was written by a run with other {', '.join(changed)} "
                                f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}): use another out_dir, "
                                "or delete it to start over")

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
        model_threads(self.threads)
        emb = embed_uint8(self.backbone, self.pool.images[self.hold], self.device)
        record = {"step": self.step, "when": tag,
                  "holdout_auc": quick_probe_auc(emb, [self.pool.keys[n] for n in self.hold])}
        if "source" in self.pool.columns:  # how well the pool's collection is told from the embedding
            record["holdout_source_auc"] = quick_probe_auc(emb, [self.pool.columns["source"][n] for n in self.hold])
        self.history.append(record)
        self.log({"event": "quick_probe", **record, "holdout_images": int(len(self.hold))})

    # --- the loop -------------------------------------------------------------------------------

    def train_step(self, images_dev: torch.Tensor, gen: torch.Generator) -> tuple[float, float, int]:
        """One optimiser step on a class-balanced batch of two augmented views: (loss, lr, images)."""
        cfg, device = self.cfg, self.device
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        idx = self.train_ix[self.batches.epoch(epoch)[in_epoch]]
        step_seed = cfg.seed * 1_000_003 + self.step * 31 + self.rank
        gen.manual_seed(step_seed)  # the augmentations
        torch.manual_seed(step_seed + 1)  # dropout (timm's drop_rate on the pooled features); loop() forks the RNG
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
        model_threads(self.threads)  # measured: after the start probe, training ran on 1 thread without this
        images_dev = torch.from_numpy(self.pool.images).to(self.device)  # uint8; 19k x 224^2 is 1 GB
        gen = torch.Generator(device=self.device)
        self.backbone.train()
        for m in self.frozen:
            m.eval()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="pretraining",
                   disable=not (self.progress and self.is_main), file=sys.stderr, mininterval=5.0)
        rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):  # per-step seeds, and the caller's RNG state kept
            self._steps(images_dev, gen, bar)

    def _steps(self, images_dev: torch.Tensor, gen: torch.Generator, bar) -> None:
        t_log, n_log = time.perf_counter(), 0
        try:
            while self.step < self.total_steps:
                if self._time_up():
                    self.stopped_early = True
                    self.log({"event": "stopped_early", "step": self.step, "of_steps": self.total_steps,
                              "train_seconds": round(self.train_seconds, 1)})
                    break
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

    def _time_up(self) -> bool:
        """max_train_seconds reached (every process stops at the same step under torchrun)."""
        if not self.cfg.max_train_seconds:
            return False
        up = self.train_seconds >= self.cfg.max_train_seconds
        if self.world == 1:
            return up
        import torch.distributed as dist

        flag = torch.tensor([float(up)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

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
                "quick_probe": self.history, "torch": torch.__version__, "classes": self.composition(),
                "steps": self.step, "planned_steps": self.total_steps, "stopped_early": self.stopped_early,
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
                 "data_hash": trainer.pool.data_hash, "composition": trainer.composition()})
    if trainer.step == 0:
        trainer.probe("start")
    trainer.loop()
    return trainer.finish()

"""Fine-tuning baselines on the curve's own draws: what the field reports next to frozen-embedding probes.

For each size and draw of `curve` (the same function, the same seed: draw k at size n is the same set
of images), a fresh copy of a registered backbone gets a linear head and is trained on the draw's
images, then scored on the task's fixed test split. Strategies (the seed papers'):
- `full`: every weight trains;
- `last-block`: the stem and every stage but the last are frozen (no gradient, BatchNorm statistics
  kept); the last stage (`blocks[-1]`), the 1x1 convolution to the pooled features after it
  (`conv_head`, `bn2`) and the head train.

The recipe is fixed (FinetuneConfig) and was chosen before any test score was seen; nothing is tuned
or stopped early on the test split, and there is no validation split to carve from 45 images: a fixed
number of steps at every size (BiT's rule for small sets), AdamW with warm-up and a cosine schedule,
binary cross-entropy, and pretraining's augmentation. The network sees the canonical input: images
go through the runtime's ingestion and preprocessing once (image_cache.py), augmentation acts on
those grey levels, the test split is scored on the canonical tensors as they are.

Rows go to a CSV in curve.csv's format (model `finetune-<strategy>:<backbone>`, probe `finetune`)
with each fit's test scores beside it (rows.py): `cxr-embed curve --extra-rows` compares them with
the probes, paired. A fit is saved when it ends; a killed run resumes with the next unfinished fit.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cxr_embed.augment import augment
from cxr_embed.errors import ConfigError, CxrEmbedError, LabelError
from cxr_embed.labels import read_labels
from cxr_embed.models import EmbeddingModel, create_model
from cxr_embed.pretrain import freeze_stages, lr_at
from cxr_embed.torch_backend import pick_device
from cxr_embed.threads import model_threads

from .curve import check_disjoint, plan_draws
from .finetune_config import PROBE, STRATEGIES, FinetuneConfig  # noqa: F401 (public here too)
from .image_cache import TensorCache, canonical, open_or_build
from .rows import RowsFileError, ScoredFit, ScoredRows, file_hash, fit_row, writing


class FitDiverged(CxrEmbedError):
    """A fit whose test scores are not finite (its training diverged): not stored as a result."""

    code = "fit_diverged"

class Classifier(nn.Module):
    """A backbone and a linear head giving one logit per image; the head starts at zero."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.num_features), 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(1)


def build_classifier(base: EmbeddingModel, strategy: str) -> tuple[Classifier, list[nn.Module]]:
    """A fresh copy of `base`'s backbone with a head, and the modules the strategy freezes."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    backbone = copy.deepcopy(base.backbone).float()
    frozen = freeze_stages(backbone, len(backbone.blocks) - 1) if strategy == "last-block" else []
    return Classifier(backbone), frozen


def fit_seed(seed: int, size, repeat: int) -> int:
    """The seed of one fit's head, batches, augmentation and dropout: the same for every backbone and
    strategy on a draw, so their differences are not differences of luck."""
    return int(np.random.SeedSequence([seed, 0 if size == "full" else int(size), repeat, 5]).generate_state(1)[0])


def _batches(n: int, cfg: FinetuneConfig, rng: np.random.Generator) -> np.ndarray:
    """(steps, batch_size) indices: shuffled passes over the n images, one after the other."""
    passes = math.ceil(cfg.steps * cfg.batch_size / n)
    return np.concatenate([rng.permutation(n) for _ in range(passes)])[: cfg.steps * cfg.batch_size].reshape(cfg.steps, -1)


def train_fit(clf: Classifier, frozen: list[nn.Module], planes: torch.Tensor, y: np.ndarray, cfg: FinetuneConfig,
              seed: int, device: torch.device, mean: float, std: float, on_step=None) -> None:
    """Train `clf` in place on grey planes (N, S, S) in [0, 1] with labels y (0/1), per the recipe."""
    cpu = device.type == "cpu"
    clf.to(device)
    if cpu:  # depthwise convolutions: about 1.7x less CPU per image than contiguous (BENCHMARKS.md)
        clf.to(memory_format=torch.channels_last)
    groups = [{"params": [p for p in clf.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
              {"params": list(clf.head.parameters()), "lr_mult": cfg.head_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = _batches(len(y), cfg, np.random.default_rng(seed))
    x_all, y_all = planes.to(device), torch.as_tensor(np.asarray(y), dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    clf.train()
    for m in frozen:
        m.eval()
    with torch.random.fork_rng(devices=[] if cpu else [device]):  # dropout's draws, without touching the caller's
        torch.manual_seed(seed)
        for step, idx in enumerate(batches):
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            ix = torch.from_numpy(idx).to(device)
            x = augment(x_all[ix], cfg.augment, gen, mean, std)
            if cpu:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.binary_cross_entropy_with_logits(clf(x), y_all[ix])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step()


@torch.no_grad()
def score(clf: Classifier, planes: torch.Tensor, device: torch.device, mean: float, std: float,
          batch: int = 32) -> np.ndarray:
    """Logits of the canonical (un-augmented) input of each plane, in evaluation mode."""
    clf.eval()
    out = []
    for i in range(0, len(planes), batch):
        x = canonical(planes[i : i + batch], mean, std).to(device)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(clf(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@dataclass
class FinetuneTask:
    """A task's train and test images that decoded, in label-file order, and their cache."""

    name: str
    tr_images: list[str]
    tr_y: np.ndarray
    tr_pat: list[str]
    te_images: list[str]
    te_y: np.ndarray
    cache: TensorCache


def load_task(labels, image_root, base: EmbeddingModel, cache_path, positive: str | None, progress: bool,
              log) -> FinetuneTask:
    """Read a binary task's labels and decode its images once (image_cache.py); images that do not
    decode are left out and reported, as `embed` leaves them out of a store."""
    table = read_labels(labels, require_split=True, positive=positive)
    if not table.binary:
        raise LabelError(f"{table.path}: fine-tuning baselines are for binary tasks; its labels have "
                         f"{len(table.classes)} classes: name one with --positive to draw it against the rest")
    root = Path(image_root) if image_root else table.path.parent
    train, test = table.rows("train"), table.rows("test")
    for split, rows in (("train", train), ("test", test)):
        if len({int(table.labels[i]) for i in rows}) < 2:
            raise LabelError(f"{table.path}: its {split} split has one class only; an AUC needs both")
    cache = open_or_build(cache_path, [table.images[i] for i in train + test], root, base, progress, log)
    if cache.failed:
        first = next(iter(cache.failed.items()))
        log(f"warning: {len(cache.failed)} image(s) did not decode and are left out (e.g. {first[0]}: {first[1]})")
    train = [i for i in train if table.images[i] in cache]
    test = [j for j in test if table.images[j] in cache]
    check_disjoint(table, train, table, test)
    if not train or not test:
        raise LabelError(f"{table.path}: no train or no test image decoded under {root}; is --image-root right?")
    if len({int(table.labels[j]) for j in test}) < 2:
        raise LabelError(f"{table.path}: the test images of one class did not decode under {root}; an AUC needs both")
    return FinetuneTask(table.task, [table.images[i] for i in train], table.labels[train],
                        [table.patients[i] for i in train], [table.images[j] for j in test], table.labels[test], cache)


@dataclass
class Estimate:
    """The cost of the fits to run, from two training steps measured here just now."""

    fits: int
    images: int  # image passes (forward + backward) in all
    cpu_s_per_image: float
    wall_s_per_image: float

    def text(self, device: torch.device) -> str:
        what = (f"{self.fits} fit(s) x {self.images // max(1, self.fits):,} image passes (forward + backward) = "
                f"{self.images:,}")
        wall = f"about {_duration(self.images * self.wall_s_per_image)} wall at this machine's current load"
        if device.type != "cpu":
            return f"estimate: {what} at {self.wall_s_per_image * 1e3:.1f} ms each on {device}: {wall}"
        return (f"estimate: {what} at {self.cpu_s_per_image:.3f} CPU-s each (2 steps measured here just now): "
                f"{_duration(self.images * self.cpu_s_per_image)} of CPU time, {wall}; scoring the test split adds a few %")


def _duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def measure(base: EmbeddingModel, strategy: str, cfg: FinetuneConfig, planes: torch.Tensor, y: np.ndarray,
            device: torch.device) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per image of one training step, the second of two (the first warms up)."""
    clf, frozen = build_classifier(base, strategy)
    marks: list[tuple[float, float]] = []
    probe = dataclasses.replace(cfg, steps=2, warmup_steps=1)

    def mark() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append((time.process_time(), time.perf_counter()))

    train_fit(clf, frozen, planes, y, probe, 0, device, base.preprocess.mean, base.preprocess.std, on_step=mark)
    (c0, w0), (c1, w1) = marks
    return (c1 - c0) / cfg.batch_size, (w1 - w0) / cfg.batch_size


@dataclass
class FinetuneResult:
    out: Path
    model: str  # the rows' model column
    finished: int  # fits run by this call
    already: int  # fits found done in the rows file
    estimate: Estimate | None
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def run_finetune(labels: str | os.PathLike, image_root: str | os.PathLike | None, model: str, strategy: str,
                 sizes=(45, 85, 170), repeats: int = 5, out: str | os.PathLike = "finetune.csv", *, seed: int = 0,
                 config: FinetuneConfig = FinetuneConfig(), positive: str | None = None, cache=None,
                 device: str = "auto", threads: int = 0, progress: bool = True, log=print) -> FinetuneResult:
    """Fine-tune `model` by `strategy` on every draw of `sizes` x `repeats` (the curve's draws for this
    seed), score each on the test split and add its row to `out` (module docstring); resumable."""
    if threads:
        model_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    dev = pick_device(device)
    base = create_model(model)
    name = f"finetune-{strategy}:{base.name}"
    build_classifier(base, strategy)  # refuses an unknown strategy before any decoding
    out = Path(out)
    with writing(out):
        rows = ScoredRows(out)
        _check_rows(rows, name, Path(labels).stem, config, out)
        run = {"weights": base.weights_hash, "labels_sha256": file_hash(labels), "positive": positive, "seed": int(seed)}
        _check_run(rows, name, run, out)  # before decoding a task's images: the cheap part first
        task = load_task(labels, image_root, base, Path(cache) if cache else out.with_name(f"{out.stem}.cache.h5"),
                         positive, progress, log)
        run["images"] = task.cache.data_hash
        _check_run(rows, name, run, out)
        plan = plan_draws(task.tr_y, task.tr_pat, list(sizes), repeats, seed, log)
        _check_draws(rows, name, plan, task, out)
        todo = [(size, rep, idx) for size, rep, idx in plan if (name, PROBE, str(size), rep) not in rows]
        result = FinetuneResult(out, name, 0, len(plan) - len(todo), None)
        if not todo:
            log(f"all {len(plan)} fits of {name} are already in {out}")
            return result
        first = todo[0][2]
        cpu_img, wall_img = measure(base, strategy, config, task.cache.planes([task.tr_images[i] for i in first]),
                                    task.tr_y[first], dev)
        result.estimate = Estimate(len(todo), len(todo) * config.steps * config.batch_size, cpu_img, wall_img)
        log(f"{name} on {task.name}: {len(todo)} of {len(plan)} fits to run. {result.estimate.text(dev)}")
        _run_fits(task, base, strategy, name, config, todo, rows, dev, seed, progress, run)
    result.finished = len(todo)
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return result


_RUN_WORDS = {"weights": "model weights", "labels_sha256": "labels file contents", "positive": "--positive",
              "seed": "--seed", "images": "image bytes under --image-root"}


def _check_run(rows: ScoredRows, name: str, run: dict, out: Path) -> None:
    """Refuse to resume fits of `name` made from anything else than this run is made from (`run`'s keys)."""
    for fit in (f for k, f in rows.fits.items() if k[0] == name):
        if fit.run is None:
            raise RowsFileError(f"{out} holds {name} fits written by an older cxr-embed, which did not record what "
                                "they were made from, so they cannot be resumed safely: write to another --out (the "
                                "curve still takes the old file in)")
        differ = [_RUN_WORDS.get(k, k) for k in run if fit.run.get(k) != run[k]]
        if differ:
            raise RowsFileError(f"{out} holds {name} fits of another run (other {', '.join(differ)}); they are not "
                                "this run's fits: write to another --out")


def _check_draws(rows: ScoredRows, name: str, plan: list, task: FinetuneTask, out: Path) -> None:
    """Each finished fit of `name` was trained on this run's draw and scored on this run's test images."""
    planned = {(str(size), rep): [task.tr_images[i] for i in idx] for size, rep, idx in plan}
    for key, fit in rows.fits.items():
        if key[0] != name:
            continue
        if list(fit.scores) != task.te_images or planned.get(key[2:], fit.train_images) != fit.train_images:
            raise RowsFileError(f"{out}: the {name} fit of size {key[2]}, draw {key[3]} was trained or scored on "
                                "other images than this run's draws: write to another --out")


def _check_rows(rows: ScoredRows, name: str, task: str, cfg: FinetuneConfig, out: Path) -> None:
    """Refuse to add fits to rows of another task (and its image cache), or of this model with another recipe."""
    tasks = {f.row["task"] for f in rows.fits.values()} - {task}
    if tasks:
        raise RowsFileError(f"{out} holds fits of task {sorted(tasks)[0]!r}, not {task!r}: one rows file per task; "
                            "write to another --out")
    other = {f.row["chosen"] for k, f in rows.fits.items() if k[0] == name} - {cfg.describe()}
    if other:
        raise RowsFileError(f"{out} holds {name} fits made with another recipe ({sorted(other)[0]}); this run asks "
                            f"for {cfg.describe()}: write to another --out")


def _run_fits(task: FinetuneTask, base: EmbeddingModel, strategy: str, name: str, cfg: FinetuneConfig, todo: list,
              rows: ScoredRows, device: torch.device, seed: int, progress: bool, run: dict) -> None:
    mean, std = base.preprocess.mean, base.preprocess.std
    test = task.cache.planes(task.te_images)  # kept for every fit; a draw's planes are read per fit
    bar = tqdm(total=len(todo) * cfg.steps, unit="step", desc=f"{name} {task.name}", disable=not progress,
               file=sys.stderr, mininterval=2.0)
    try:
        for size, rep, idx in todo:
            bar.set_postfix_str(f"size {size} draw {rep}")
            images = [task.tr_images[i] for i in idx]
            clf, frozen = build_classifier(base, strategy)
            train_fit(clf, frozen, task.cache.planes(images), task.tr_y[idx], cfg, fit_seed(seed, size, rep), device,
                      mean, std, on_step=lambda: bar.update(1))
            p = score(clf, test, device, mean, std)
            if not np.isfinite(p).all():
                raise FitDiverged(f"the {name} fit of size {size}, draw {rep} gave non-finite test scores (its "
                                  f"training diverged); nothing was stored for it: try a lower --lr than {cfg.lr:g}")
            row = fit_row(task.name, name, "", PROBE, size, rep, len(idx), task.te_y, p, cfg.describe())
            rows.add(ScoredFit(row, images, dict(zip(task.te_images, p.astype(float).tolist())), run))
    finally:
        bar.close()

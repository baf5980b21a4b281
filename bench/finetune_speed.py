"""What a fine-tuning baseline costs on this machine: CPU seconds per image of one training step
(forward + backward + AdamW) for each strategy, against the runtime's inference forward pass
(what `embed` costs per image) measured in the same run, and the CPU budget of the full baseline
run that follows from them (4 tasks x 3 sizes x 5 draws x 3 strategy/backbone pairs).

    python3 bench/finetune_speed.py                  # 5 timed steps of 16 images per variant
    python3 bench/finetune_speed.py --steps 2        # a quick check that it runs

The images are real (the first TB training images, decoded through the runtime into the cache
format `cxr-embed finetune` uses); timings on a shared machine are not final numbers.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr_embed.models import create_model
from cxr_embed.process import configure_process
from cxr_embed.runtime import Runtime, RuntimeSettings
from probes.finetune import FinetuneConfig, build_classifier, train_fit
from probes.image_cache import canonical, open_or_build

ROOT = Path(__file__).resolve().parents[1]
# test images per task (BENCHMARKS.md): tb_shenzhen_mc, covid_cohen, nih_pneumonia, rsna_opacity
TEST_IMAGES = {"tb_shenzhen_mc": 98, "covid_cohen": 169, "nih_pneumonia": 208, "rsna_opacity": 206}
RUNS = [("full", "imagenet-effnet-lite0"), ("full", "cxr-supcon-effnet-lite0"), ("last-block", "cxr-supcon-effnet-lite0")]


def step_cost(base, strategy: str, planes: torch.Tensor, y: np.ndarray, cfg: FinetuneConfig, steps: int) -> tuple[float, float]:
    """(CPU s, wall s) per image of `train_fit`'s steps, over `steps` timed steps after one warm-up step."""
    clf, frozen = build_classifier(base, strategy)
    marks = []
    run = dataclasses.replace(cfg, steps=steps + 1, warmup_steps=1)
    train_fit(clf, frozen, planes, y, run, 0, torch.device("cpu"), 0.5, 0.5,
              on_step=lambda: marks.append((time.process_time(), time.perf_counter())))
    (c0, w0), (c1, w1) = marks[0], marks[-1]
    n = steps * cfg.batch_size
    return (c1 - c0) / n, (w1 - w0) / n


def layout_cost(base, planes: torch.Tensor, y: np.ndarray, cfg: FinetuneConfig, steps: int, fmt) -> float:
    """CPU s per image of a bare full-network step (no augmentation) with weights and input in `fmt`:
    why train_fit uses channels_last on the CPU."""
    clf, _ = build_classifier(base, "full")
    clf.train().to(memory_format=fmt)
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr)
    x = canonical(planes[: cfg.batch_size], 0.5, 0.5).contiguous(memory_format=fmt)
    t = torch.as_tensor(y[: cfg.batch_size], dtype=torch.float32)
    for i in range(steps + 1):
        if i == 1:
            c0 = time.process_time()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(clf(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.process_time() - c0) / (steps * len(x))


def inference_cost(model, planes: torch.Tensor, rounds: int) -> tuple[float, float]:
    """(CPU s, wall s) per image of the runtime's forward pass (folded BatchNorm, its CPU chunks)."""
    rt = Runtime(RuntimeSettings(device="cpu"), model=model)
    x = canonical(planes, 0.5, 0.5).contiguous()
    rt.forward(x[:4])
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        rt.forward(x)
    return (time.process_time() - c0) / (rounds * len(x)), (time.perf_counter() - w0) / (rounds * len(x))


def budget(costs: dict, infer_cpu: float, cfg: FinetuneConfig, sizes: int = 3, draws: int = 5) -> None:
    """Print the full baseline's CPU budget, with its arithmetic."""
    images = cfg.steps * cfg.batch_size
    total = 0.0
    print(f"\nbudget: {len(TEST_IMAGES)} tasks x {sizes} sizes x {draws} draws per run; each fit "
          f"{cfg.steps} steps x {cfg.batch_size} images = {images} image passes, then the test split scored")
    for strategy, model in RUNS:
        fits = len(TEST_IMAGES) * sizes * draws
        train = fits * images * costs[(strategy, model)]
        score = sizes * draws * sum(TEST_IMAGES.values()) * infer_cpu
        total += train + score
        print(f"  {strategy:<10} {model:<24} {fits} fits x {images} x {costs[(strategy, model)]:.3f} CPU-s = "
              f"{train / 3600:.1f} CPU-h + scoring {sizes * draws} x {sum(TEST_IMAGES.values())} test images x "
              f"{infer_cpu * 1e3:.0f} ms = {score / 3600:.2f} CPU-h")
    print(f"  total {total / 3600:.1f} CPU-hours: {total / 3600 / 2:.1f} h wall on 2 free cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (default %(default)s)")
    args = ap.parse_args()
    configure_process()
    cfg = FinetuneConfig()
    rows = [r for r in csv.DictReader(open(Path(args.data) / "tasks" / "tb_shenzhen_mc.csv")) if r["split"] == "train"]
    rows = rows[: cfg.batch_size * 2]
    models = {m: create_model(m) for m in {m for _, m in RUNS}}
    with tempfile.TemporaryDirectory() as tmp:
        cache = open_or_build(Path(tmp) / "c.h5", [r["image"] for r in rows], args.data, models[RUNS[0][1]], progress=False)
        planes, y = cache.planes(cache.ids), np.array([int(r["label"]) for r in rows])
    infer_cpu, infer_wall = inference_cost(models[RUNS[0][1]], planes, max(1, args.steps // 2))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; per image, CPU s (wall s), ratio to inference CPU")
    print(f"  inference forward (runtime, baseline)      {infer_cpu:.4f} ({infer_wall:.4f})  1.0x")
    costs = {}
    for strategy, model in RUNS + [("last-block", "imagenet-effnet-lite0")]:
        cpu, wall = step_cost(models[model], strategy, planes, y, cfg, args.steps)
        costs[(strategy, model)] = cpu
        print(f"  train step {strategy:<10} {model:<24} {cpu:.4f} ({wall:.4f})  {cpu / infer_cpu:.1f}x")
    layouts = [layout_cost(models[RUNS[0][1]], planes, y, cfg, args.steps, f)
               for f in (torch.contiguous_format, torch.channels_last)]
    print(f"  bare full step, contiguous {layouts[0]:.4f} vs channels_last {layouts[1]:.4f} CPU-s: "
          f"{layouts[0] / layouts[1]:.2f}x")
    budget(costs, infer_cpu, cfg)
    extra = len(TEST_IMAGES) * 3 * 5 * cfg.steps * cfg.batch_size * costs[("last-block", "imagenet-effnet-lite0")]
    print(f"  (last-block from ImageNet weights too: +{extra / 3600:.1f} CPU-h)")


if __name__ == "__main__":
    main()

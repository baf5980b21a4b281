#!/usr/bin/env bash
# SupCon ablation arms back to back on the device machine, in ONE call (MODEL_CARD.md, "Ablations on
# the GPU"). Prepare the carry here first (scripts/prepare_gpu_carry.sh), then call the device tool:
#
#   run(command="bash scripts/gpu_pretrain.sh", carry=[".devdata/gpu"], timeout_s=600)
#
# One call because a call carries 64 MiB at most and a machine forgets everything 30 s after a call.
# Each arm trains from the same pack and starting weights, with configs/gpu-ablation.yaml changed
# only by the arm's label settings; every arm gets a cap on its training seconds from the time left
# (BUDGET_S for the whole script), so a slow machine ends arms early, marked `stopped_early` in
# their checkpoints, instead of losing them all at the call's limit. As each arm ends, its fp16
# checkpoint (6.9 MB) and the logs so far are copied to $OUT: at most 8 files of 16 MiB come back.
# Settings: ARMS (order = priority), EPOCHS, BUDGET_S, CARRY, OUT; for a dry run on the CPU with a
# small pack: REQUIRE_GPU=0 and EXTRA="device=cpu max_steps=2 ..." (more --set options, no spaces).
set -uo pipefail
START=$(date +%s)
CARRY=${CARRY:-.devdata/gpu}
OUT=${OUT:-out/gpu}
EPOCHS=${EPOCHS:-10}
BUDGET_S=${BUDGET_S:-560}
ARMS=${ARMS:-baseline finer_source finer finer_source_nokids}
REQUIRE_GPU=${REQUIRE_GPU:-1}
EXTRA=${EXTRA:-}
RUNS=${RUNS:-/tmp/cxr-ablation}
SITE=${SITE:-/tmp/cxr-site}
export PYTHONUNBUFFERED=1 REQUIRE_GPU
mkdir -p "$OUT" "$RUNS"
OUT=$(cd "$OUT" && pwd)
[ -f "$CARRY/commit.txt" ] && export CXR_EMBED_GIT_COMMIT=$(cat "$CARRY/commit.txt")

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$CARRY"/wheels/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD
# fail in seconds, not after the first arm: the GPU, WebP in Pillow, every import the trainer needs
python3 - <<'EOF' || exit 1
import PIL.features, torch
import cxr_embed.pretrain, pydicom, pytorch_metric_learning  # noqa: F401
import os
assert torch.cuda.is_available() or os.environ["REQUIRE_GPU"] == "0", "no CUDA device"
assert PIL.features.check("webp"), "this Pillow reads no WebP: rebuild the packs with --format jpeg (larger)"
print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU", flush=True)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

arm_settings() {  # the arm's --set options, one per line
    local finer=("label_columns=[finding]" "label_map=configs/finding-classes.yaml")
    case $1 in
        baseline) printf '%s\n' "label_columns=[abnormal]" ;;
        finer) printf '%s\n' "${finer[@]}" ;;
        finer_source) printf '%s\n' "${finer[@]}" "balance_by=[source]" ;;
        finer_source_nokids) printf '%s\n' "${finer[@]}" "balance_by=[source]" "exclude={source: [kermany_pediatric], image: configs/pool-task-overlap.txt}" ;;
        *) echo "unknown arm $1" >&2; return 1 ;;
    esac
}

packs=$(ls "$CARRY"/pool224.part*.h5 | paste -sd, -)
read -r -a arms <<< "$ARMS"
read -r -a extra <<< "$EXTRA"
for arm in "${arms[@]}"; do arm_settings "$arm" > /dev/null || exit 1; done
for i in "${!arms[@]}"; do
    arm=${arms[$i]}
    left=$((BUDGET_S - ($(date +%s) - START)))
    # per arm: its share of the time left, less about 35 s to start, load the pack, probe and save
    cap=$((left / (${#arms[@]} - i) - 35))
    if [ "$cap" -lt 30 ]; then echo "no time left for $arm" | tee -a "$OUT/summary.txt"; break; fi
    sets=()
    while IFS= read -r kv; do sets+=(--set "$kv"); done < <(arm_settings "$arm"; printf '%s\n' "${extra[@]}")
    echo "== $arm: at most $cap s of training, started $(($(date +%s) - START)) s in" | tee -a "$OUT/summary.txt"
    python3 -m cxr_embed pretrain --config configs/gpu-ablation.yaml --no-progress \
        --set "packs=[$packs]" --set "base_model=$CARRY/imagenet-effnet-lite0.safetensors" \
        --set "out_dir=$RUNS/$arm" --set "name=cxr-supcon-$arm" --set "epochs=$EPOCHS" \
        --set "max_train_seconds=$cap" "${sets[@]}" 2> "$RUNS/$arm.err"
    echo "   exit $?, ended $(($(date +%s) - START)) s in" | tee -a "$OUT/summary.txt"
    grep -h '"event": "\(quick_probe\|done\|stopped_early\)"' "$RUNS/$arm/log.jsonl" >> "$OUT/summary.txt" 2>/dev/null
    grep -v '^{' "$RUNS/$arm.err" | tail -5 >> "$OUT/summary.txt"  # errors (the JSON log lines are in log.jsonl)
    cp "$RUNS/$arm/cxr-supcon-$arm.safetensors" "$OUT/" 2>/dev/null
    (cd "$RUNS" && tar czf "$OUT/logs.tar.gz" ./*.err ./*/log.jsonl 2>/dev/null) || true
done
ls -la "$OUT"

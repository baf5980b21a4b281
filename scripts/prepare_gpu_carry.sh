#!/usr/bin/env bash
# Prepare the one folder that scripts/gpu_pretrain.sh needs on the GPU host (run here, on the CPU).
#
#   scripts/prepare_gpu_carry.sh            # writes .devdata/gpu (git-ignored), about 4 CPU minutes
#
# It holds: the 19,376-image pool as a 2-part WebP pack at 224 px (quality 40: about 35 MiB in all),
# the ImageNet starting weights (13 MiB, fp32, weights hash 0a7b34212a6f8eec) and the two wheels the
# GPU host lacks (pydicom, pytorch-metric-learning). One device call carries at most 64 MiB in all,
# the checkout's own files included, so the script adds them up and refuses a carry that would not
# fit (lower QUALITY then, e.g. QUALITY=35). Settings: CARRY, QUALITY, PARTS, LIMIT_MIB, DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.devdata/gpu}
QUALITY=${QUALITY:-40}
PARTS=${PARTS:-2}
LIMIT_MIB=${LIMIT_MIB:-61}  # of the 64 MiB a call carries: room for the checkout to grow a little
DATA=${DATA:-../shared/data}
PY=${PY:-python3}

mkdir -p "$CARRY/wheels"
if ! git check-ignore -q "$CARRY"; then
    echo "$CARRY is not ignored by git: a carried folder must be (add it to .git/info/exclude)" >&2
    exit 1
fi

rm -f "$CARRY"/pool224*.h5
$PY -m cxr_embed pack --set "labels=$DATA/pretrain.csv" --set input_size=224 --out "$CARRY/pool224.h5" \
    --parts "$PARTS" --format webp --quality "$QUALITY"
$PY -c "import sys; from cxr_embed import create_model, save_checkpoint; \
m = create_model('imagenet-effnet-lite0'); save_checkpoint(m, sys.argv[1]); print('base weights', m.weights_hash)" \
    "$CARRY/imagenet-effnet-lite0.safetensors"

# the code's commit, recorded in each checkpoint (the device's copy of the checkout has no git)
echo "$(git rev-parse HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo +uncommitted)" > "$CARRY/commit.txt"

rm -f "$CARRY"/wheels/*.whl
for pkg in pydicom pytorch-metric-learning; do
    version=$($PY -m pip show "$pkg" | sed -n 's/^Version: //p')
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" "$pkg==$version"
done

# what one call carries: tracked and untracked-not-ignored files of the checkout, and the carry
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carry=$(du -sb "$CARRY" | cut -f1)
total=$((tree + carry))
awk -v t="$tree" -v c="$carry" -v l="$LIMIT_MIB" \
    'BEGIN {printf "checkout %.1f MiB + carry %.1f MiB = %.1f MiB (limit %s MiB of 64)\n", t / 1048576, c / 1048576, (t + c) / 1048576, l}'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "too large for one device call: rebuild with a lower QUALITY (now $QUALITY)" >&2
    exit 1
fi
echo "ready: run scripts/gpu_pretrain.sh on the device with carry [$CARRY] (MODEL_CARD.md, 'Ablations on the GPU')"

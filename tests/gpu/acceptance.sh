#!/usr/bin/env bash
# GPU acceptance check of issue 12, for a machine with one NVIDIA GPU (not run by pytest).
#
#   bash tests/gpu/acceptance.sh [WORKDIR]        # ~5-8 min on one H100/H200 node, no network
#
# Needs xpbatch installed with its GPU extra (`pip install -e '.[test,cuda13]'`, or [cuda12] to
# match torch's CUDA build) and `nvidia-smi`. It:
#   1. builds a mock store of ACCEPT_ROWS (default 3,145,728) rows: 262,144 generated mock
#      spectra, tiled with new source_ids (speed does not depend on which spectra);
#   2. encodes it with `--cluster local-cuda` and, as the reference, on CPU workers;
#   3. checks both catalogues agree: flags equal; latent_mean, latent_std and rmse to
#      |Δ| < 1e-4, scatter (e-/s) to |Δ| < 1e-4 relative to max(|value|, 1);
#   4. times 20 epochs of training at the published batch size (1024) on ~450k rows;
#   5. prints one line each: spectra/s per GPU, mean GPU utilisation while encoding, s/epoch.
# Exits non-zero when a step fails or the catalogues differ.
set -euo pipefail

work=${1:-$(mktemp -d -t xpbatch-accept-XXXXXX)}
rows=${ACCEPT_ROWS:-3145728}
train_rows=${ACCEPT_TRAIN_ROWS:-458752}
python=${PYTHON:-python}
mkdir -p "$work"
log() { printf '[acceptance] %s\n' "$*" >&2; }

command -v nvidia-smi >/dev/null || { log "nvidia-smi not found: this check needs an NVIDIA GPU"; exit 2; }
"$python" -c 'import dask_cuda, torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { log "dask_cuda missing or torch sees no CUDA GPU; install '.[cuda13]' (or [cuda12])"; exit 2; }
n_gpus=$(nvidia-smi --list-gpus | wc -l)
log "workdir $work; $n_gpus GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"

log "1/4 building the stores ($rows rows to encode, $train_rows to train on)"
"$python" - "$work" "$rows" "$train_rows" <<'PY'
import sys
from pathlib import Path

from xpbatch.benchmarks.encode import bench_model, mock_store, tiled_store

work, rows, train_rows = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
source = mock_store(262_144, work, echo=print)
tiled_store(source, rows, work, echo=print)
tiled_store(source, train_rows, work, echo=print)
bench_model(source, work)
PY
store=$work/tiled-$rows.zarr
model=$work/bench-model.safetensors

log "2/4 encoding on the GPU (--cluster local-cuda), sampling utilisation"
nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$work/util.txt" &
sampler=$!
start=$(date +%s.%N)
xpbatch encode-catalog "$store" -m "$model" -o "$work/gpu.zarr" --overwrite --cluster local-cuda \
    --dashboard-address :0 2>&1 | tee "$work/gpu.log" || true
end=$(date +%s.%N)
kill "$sampler" 2>/dev/null || true
grep -q "verified complete" "$work/gpu.log" || { log "the GPU encode did not finish verified"; exit 1; }
xpbatch info "$work/gpu.zarr" | grep -E "encoded on" >&2

log "   reference: the same store on CPU workers (--device cpu)"
xpbatch encode-catalog "$store" -m "$model" -o "$work/cpu.zarr" --overwrite --device cpu \
    --dashboard-address :0 >"$work/cpu.log" 2>&1
grep -q "verified complete" "$work/cpu.log" || { log "the CPU encode did not finish verified"; exit 1; }

log "3/4 comparing the catalogues"
"$python" - "$work/gpu.zarr" "$work/cpu.zarr" <<'PY'
import sys

import numpy as np
import zarr

gpu, cpu = (zarr.open_group(p, mode="r") for p in sys.argv[1:3])
n, step = gpu["flags"].shape[0], gpu["flags"].chunks[0]
worst = {"latent_mean": 0.0, "latent_std": 0.0, "rmse": 0.0, "scatter": 0.0}
for start in range(0, n, step):
    rows = slice(start, start + step)
    if not np.array_equal(gpu["flags"][rows], cpu["flags"][rows]):
        sys.exit(f"flags differ in rows {start}..")
    for name in worst:
        a, b = np.asarray(gpu[name][rows]), np.asarray(cpu[name][rows])
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            sys.exit(f"{name}: NaN in different places in rows {start}..")
        scale = np.maximum(np.abs(b), 1.0) if name == "scatter" else 1.0
        diff = np.nan_to_num(np.abs(a - b) / scale)
        worst[name] = max(worst[name], float(diff.max(initial=0.0)))
print("max |Δ| GPU vs CPU:", ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
sys.exit(1 if max(worst.values()) >= 1e-4 else 0)
PY

log "4/4 training 20 epochs at batch 1024 on $train_rows rows"
t0=$(date +%s.%N)
xpbatch train "$work/tiled-$train_rows.zarr" -o "$work/trained.safetensors" --epochs 20 \
    --batch-size 1024 --device cuda --overwrite --no-progress >"$work/train.log" 2>&1
t1=$(date +%s.%N)

"$python" - "$rows" "$start" "$end" "$n_gpus" "$work/util.txt" "$t0" "$t1" <<'PY'
import sys

rows, start, end, n_gpus, util, t0, t1 = sys.argv[1:8]
samples = [float(v) for v in open(util).read().split() if v.replace(".", "").isdigit()]
print(f"spectra/s per GPU: {int(rows) / (float(end) - float(start)) / int(n_gpus):,.0f} "
      "(encode-catalog end to end, verification included)")
mean = sum(samples) / len(samples) if samples else float("nan")
print(f"GPU utilisation while encoding: {mean:.0f} % (mean of {len(samples)} samples)")
print(f"training: {(float(t1) - float(t0)) / 20:.2f} s/epoch (20 epochs, batch 1024, start-up included)")
PY

#!/usr/bin/env bash
# The GPU profile in one go: `bench/gpu.sh [OUT_DIR]` (default bench-output) writes OUT_DIR/gpu.json.
# Needs only `make venv` with a CUDA build of torch; stops after MMSAE_BENCH_GPU_TIMEOUT seconds (default 480).
# Exits non-zero when a part failed (gpu.json lists it under "failed" and still holds the other parts); the
# parts finished so far are in OUT_DIR/gpu.partial.json from the start, so a timeout loses only the running one.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-output}"
if [ ! -x .venv/bin/python ]; then
  make venv
fi
if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: torch sees no GPU (a CPU build of torch, or no device); the full shapes need one" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
df -h /dev/shm || true
mkdir -p "$out"
# each finished part is written here at once: a run cut short by the timeout keeps them
export MMSAE_BENCH_GPU_PARTIAL="$out/gpu.partial.json" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
timeout "${MMSAE_BENCH_GPU_TIMEOUT:-480}" .venv/bin/python -m bench --out "$out" gpu
.venv/bin/python - "$out/gpu.json" <<'PY'
import json
import sys

failed = json.load(open(sys.argv[1]))["failed"]
if failed:
    sys.exit(f"bench/gpu.sh: parts failed: {failed}")
PY

#!/usr/bin/env bash
# The GPU check in one command: bash tests/gpu/run.sh [OUT_DIR]
# OUT_DIR defaults to $OUT (set on a borrowed device machine) else gpu-check-out. Extra options
# for python -m tests.gpu.check (e.g. --quick --sizes 512x256) come from GPU_CHECK_ARGS.
# The check stops starting measurements after its deadline (300 s); `timeout` is the backstop
# that keeps the whole command under 6 minutes even if one measurement hangs.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
out="${1:-${OUT:-gpu-check-out}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of words
PYTHONUNBUFFERED=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 \
  timeout -k 10 "${GPU_CHECK_TIMEOUT:-350}" "$python" -m tests.gpu.check --out "$out" \
  ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu-check.log"
rc=${PIPESTATUS[0]}
[ -f "$out/gpu-check.md" ] && cat "$out/gpu-check.md"
exit "$rc"

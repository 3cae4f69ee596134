#!/usr/bin/env bash
# Create .venv and install the project for CPU work, offline-friendly, with the latest transformers 5.
# torch is installed first and pinned so that no dependency pulls a multi-GB CUDA build.
# (scripts/setup_compat.sh makes .venv-compat with transformers 4.x at the claimed lower bounds.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[export,test,reference]" "transformers>=5"
python -c "import torch, transformers, accelerate, datasets, onnxruntime; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| onnxruntime', onnxruntime.__version__)"

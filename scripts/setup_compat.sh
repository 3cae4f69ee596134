#!/usr/bin/env bash
# Create .venv-compat: the project at the lowest transformers / tokenizers / accelerate / datasets
# versions it claims (transformers 4.x, scripts/constraints-lowest.txt), with the optional
# [optimum] extra that only installs beside transformers 4.x. CI runs the fast tests here.
# torch is installed first and pinned, as in setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-compat/bin/python ] || "$PY" -m venv .venv-compat
. .venv-compat/bin/activate
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[export,test,reference,optimum]" -c scripts/constraints-lowest.txt
python -c "import torch, transformers, accelerate, datasets, tokenizers, optimum.exporters.onnx; print('compat: torch', torch.__version__, '| transformers', transformers.__version__, '| tokenizers', tokenizers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)"

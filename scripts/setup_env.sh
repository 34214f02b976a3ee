#!/usr/bin/env bash
# Create the project's virtual environment on a fresh machine (Python 3.11, CPU or GPU).
# Order matters: torch is pinned and installed first (a CPU build on the dev/CI machines), so that nothing
# later can pull a multi-GB CUDA torch; DeepSpeed ships only as an sdist, built without ops against that torch.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
MCORE_VERSION=${MCORE_VERSION:-0.16.1}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel
pip install -q "torch==$TORCH_VERSION"
# deepspeed's setup.py imports torch: build it against the torch above, ops compiled lazily (none here)
# (on the CPU none at all: cbs/pipeline/distributed.py keeps DeepSpeed from JIT-building deepspeed_shm_comm, whose
# build lock in ~/.cache/torch_extensions, left by a killed run, made every later run hang)
DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
pip install -q "megatron-core==$MCORE_VERSION"
pip install -q -e ".[test]"
"$VENV/bin/python" - <<'PY'
import torch, deepspeed, megatron.core, sentencepiece
print(f"env ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"megatron-core {megatron.core.__version__}, sentencepiece {sentencepiece.__version__}")
PY

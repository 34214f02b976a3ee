#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels that `make gpu-check` installs on a GPU machine that reaches
# nothing: the GPU machines this project is lent have Python 3.12 with torch, numpy, sentencepiece, tensorboard,
# statsmodels, pyyaml (scripts/gpu_image_packages.txt) but no DeepSpeed, megatron-core or datasets.
#
#   bash scripts/gpu_wheels.sh            # into .whl/ (git-ignored; the device tool carries it with `carry: [.whl]`)
#   WHEEL_DIR=/path PY_VERSION=3.12 bash scripts/gpu_wheels.sh
#
# Versions are those of this project's CPU environment (.venv, made by scripts/setup_env.sh), so the GPU runs the
# library versions CI tests. DeepSpeed ships only as an sdist: its wheel is built here without ops
# (DS_BUILD_OPS=0; pure Python, any Python 3), as setup_env.sh installs it; ops are JIT-built where needed.
# Then scripts/wheel_check.py checks every wheel's declared requirements against the folder and the GPU image's
# package list, and the folder is kept under 60 MiB (the device tool carries at most 64 MiB with the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_DIR=${WHEEL_DIR:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
VENV=${VENV:-.venv}
MAX_MIB=${MAX_MIB:-60}
# What the GPU image lacks: DeepSpeed (+ hjson, pydantic and pydantic's own needs), megatron-core, datasets (+ dill,
# multiprocess), schedulefree (optimizer.kind schedule_free), and a typing-extensions as new as pydantic needs.
# torch, numpy and the rest are the image's own; never carry a second torch.
PACKAGES=(deepspeed megatron-core pydantic pydantic-core annotated-types typing-inspection hjson datasets dill
          multiprocess schedulefree typing-extensions)

if [ ! -x "$VENV/bin/python" ]; then
  echo "gpu_wheels: $VENV/bin/python not found: run \`make setup\` first (its versions are the ones fetched)" >&2
  exit 2
fi
version() { "$VENV/bin/python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
mkdir -p "$WHEEL_DIR"
rm -f "$WHEEL_DIR"/*.whl  # one version of each: two wheels of a name stop pip's whole install
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for name in "${PACKAGES[@]}"; do
  v=$(version "$name")
  if [ "$name" = deepspeed ]; then
    # an sdist only: build its (pure) wheel against this venv's torch, as setup_env.sh installs it
    DS_BUILD_OPS=0 "$VENV/bin/python" -m pip --disable-pip-version-check wheel -q --no-deps --no-build-isolation \
      -w "$WHEEL_DIR" "deepspeed==$v"
  else
    "$VENV/bin/python" -m pip --disable-pip-version-check download -q --no-deps --only-binary=:all: \
      --python-version "$PY_VERSION" --implementation cp "${PLATFORMS[@]}" -d "$WHEEL_DIR" "$name==$v"
  fi
  echo "gpu_wheels: $name $v"
done
"$VENV/bin/python" scripts/wheel_check.py "$WHEEL_DIR" --python-version "$PY_VERSION" \
  --assume-installed scripts/gpu_image_packages.txt --optional datasets
mib=$(du -sm "$WHEEL_DIR" | cut -f1)
echo "gpu_wheels: $(ls "$WHEEL_DIR"/*.whl | wc -l) wheels, ${mib} MiB in $WHEEL_DIR"
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "gpu_wheels: $WHEEL_DIR is ${mib} MiB, over the ${MAX_MIB} MiB that travels with the tree" >&2
  exit 1
fi

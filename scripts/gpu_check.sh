#!/usr/bin/env bash
# `make gpu-check`: all the GPU work in one command, for a machine with one or more CUDA GPUs that may reach no
# package registry, from the project's tree alone. About 5 minutes on one H100/H200; every part has its own time
# limit and writes its log under $OUT as it goes, so a run cut short still returns what it measured.
#
#   make gpu-check                       # or: bash scripts/gpu_check.sh; figures in $OUT (default out/gpu-check)
#   GPU_CHECK_DRY_RUN=1 make gpu-check   # anywhere (CI does): print every step, check the wheel folder, exit 0
#
# Parts (the log of each in $OUT/<part>.log; one line per part in $OUT/summary.txt):
#   1 setup  install what the machine lacks from the wheels in $WHEEL_DIR (made by scripts/gpu_wheels.sh on a
#            machine that reaches PyPI) into $GPU_CHECK_SITE, with --no-index --no-deps (no registry needed);
#            check every wheel's requirements against what is installed; print the versions and the GPUs.
#            Skipped where deepspeed and megatron-core are already importable (a `make setup` environment).
#   2 tests  the GPU test tier (pytest -m gpu), and at the same time
#   3 study  a small study end to end on the GPU (configs/gpu_check.yaml: preprocess, 5 batch sizes sharing the
#            GPU, evaluate, fit): both use a small part of the GPU, so they run side by side.
#   4 bench  alone: bench/throughput.py at the GPT-2-small and 151M shapes, ours (the Trainer's train_step, eager
#            and `compile: true`) beside compiled plain PyTorch in one process: tok/s, MFU, ms/step, peak memory.
# $OUT holds at most 8 files: summary.txt, setup.log, tests.log, study.log, bench.log, study_report.md,
# study_fit.tar.gz (the fit's figures and CSVs).
# Exit status: 0 when every part passed, else 1 (the summary names the parts that failed or timed out).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/out/gpu-check}
WORK=${GPU_CHECK_WORK:-$ROOT/out/gpu-check-work}
WHEEL_DIR=${WHEEL_DIR:-$ROOT/.whl}
SITE=${GPU_CHECK_SITE:-/tmp/cbs-gpu-site}
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# seconds per part: the whole stays under 6 minutes, so that a second try fits a 15-minute GPU window
SETUP_S=${GPU_CHECK_SETUP_S:-45}
TESTS_S=${GPU_CHECK_TESTS_S:-150}
STUDY_S=${GPU_CHECK_STUDY_S:-150}
BENCH_S=${GPU_CHECK_BENCH_S:-140}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---shapes gpt2-small 151M --repeats 3 --steps 20}

mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=()
note() { echo "$*" | tee -a "$SUMMARY"; }

# part NAME LIMIT_S COMMAND...: run COMMAND with a time limit, its output to the console and $OUT/NAME.log
# (a part that is a function of this script runs as `bash -c NAME`: `timeout` runs programs, and the functions
# and the variables they read are exported)
part() {
  local name=$1 limit=$2
  shift 2
  note "== $name (limit ${limit}s): $*"
  if [ "$DRY" = 1 ]; then
    if [ "$1 $2" = "bash -c" ]; then declare -f "$3" | sed '1,2d;$d; s/^/     /'; fi  # a function's own steps
    return 0
  fi
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local what="passed"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then what="TIMED OUT"; elif [ "$rc" != 0 ]; then what="FAILED (exit $rc)"; fi
  [ "$what" = passed ] || FAILED+=("$name")
  note "   $name: $what in $((SECONDS - t0)) s"
  return "$rc"
}

note "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); out: $OUT; dry run: $DRY"

# ------------------------------------------------------------------------------------------- 1 setup
setup() {
  set -e
  nvidia-smi -L || echo "nvidia-smi: not found"
  if "$PYTHON" -c "import deepspeed, megatron.core" 2>/dev/null; then
    echo "deepspeed and megatron-core already importable: nothing to install"
  elif [ -d "$WHEEL_DIR" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEEL_DIR"/*.whl
    echo "installed $(ls "$WHEEL_DIR"/*.whl | wc -l) wheels from $WHEEL_DIR into $SITE"
  else
    echo "no $WHEEL_DIR and no deepspeed here: run scripts/gpu_wheels.sh on a machine that reaches PyPI" >&2
    return 2
  fi
  if [ -d "$WHEEL_DIR" ]; then  # reported, not fatal: what decides is whether the imports below work
    "$PYTHON" scripts/wheel_check.py "$WHEEL_DIR" --optional datasets \
      --python-version "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
      || echo "WARNING: requirements unmet (above); going on while deepspeed and megatron-core import"
  fi
  "$PYTHON" - <<'PY'
import importlib.metadata as m, platform, torch
names = ["torch", "deepspeed", "megatron-core", "datasets", "numpy", "sentencepiece", "tensorboard", "statsmodels"]
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "missing"
print(f"python {platform.python_version()}; " + "; ".join(f"{n} {version(n)}" for n in names))
print(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
assert torch.cuda.is_available(), "no CUDA device: make gpu-check needs a GPU (GPU_CHECK_DRY_RUN=1 to only print)"
import deepspeed, megatron.core  # noqa: E401 -- importable from the installed wheels
PY
}

export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"  # this tree's packages, then the installed wheels
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 PYTHON OUT WORK WHEEL_DIR SITE
export -f setup
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT

if [ "$DRY" = 1 ]; then
  # what can be checked without a GPU: the wheel folder against the GPU image's packages, the study config
  note "== dry run: python $("$PYTHON" -c 'import platform; print(platform.python_version())'), $PYTHON"
  if [ -d "$WHEEL_DIR" ]; then
    DS_ACCELERATOR=cpu "$PYTHON" scripts/wheel_check.py "$WHEEL_DIR" --assume-installed scripts/gpu_image_packages.txt \
      --optional datasets || { echo "gpu-check: the wheels in $WHEEL_DIR leave requirements unmet" >&2; exit 1; }
  else
    note "   no $WHEEL_DIR here: scripts/gpu_wheels.sh makes it (a GPU machine without DeepSpeed needs it)"
  fi
  DS_ACCELERATOR=cpu "$PYTHON" -m cbs.pipeline.cli study configs/gpu_check.yaml --out "$WORK/study" --dry-run \
    >/dev/null || { echo "gpu-check: configs/gpu_check.yaml does not plan" >&2; exit 1; }
fi

part setup "$SETUP_S" bash -c setup || { note "gpu-check: setup failed, nothing else can run"; exit 1; }

# ------------------------------------------------------------------------------------------- 2 tests + 3 study
study() {
  set -e
  rm -rf "$WORK/study"  # a fresh study each time: its minutes are part of what is measured
  "$PYTHON" -m cbs.pipeline.cli study configs/gpu_check.yaml --out "$WORK/study" --parallel 5
  "$PYTHON" -m cbs.pipeline.cli status "$WORK/study"
  cp "$WORK/study/fit/report.md" "$OUT/study_report.md"
  tar czf "$OUT/study_fit.tar.gz" -C "$WORK/study" fit
}
export -f study
part tests "$TESTS_S" "$PYTHON" -m pytest -m gpu -q -rsP -p no:cacheprovider tests &
TESTS_PID=$!
part study "$STUDY_S" bash -c study
wait "$TESTS_PID" || FAILED+=(tests)

# ------------------------------------------------------------------------------------------- 4 bench
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
part bench "$BENCH_S" "$PYTHON" bench/throughput.py $BENCH_ARGS

if [ "$DRY" = 1 ]; then
  note "gpu-check: dry run done (nothing was run)"
  exit 0
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  note "gpu-check: FAILED: ${FAILED[*]} (logs in $OUT)"
  exit 1
fi
note "gpu-check: all parts passed in $SECONDS s (logs in $OUT)"

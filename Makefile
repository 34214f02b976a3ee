# The two commands a new user runs on a fresh machine:  make demo  (the main job)  and  make test.
# Both create the virtual environment first (once; `make setup` alone does only that).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# DeepSpeed's CPU accelerator only where there is no GPU: forcing it on a GPU machine would train on the CPU
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: setup demo test bench gpu-check clean
setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

# The main job: a whole CBS study on the embedded default corpus (~5 min on 2 CPU cores, venv included): preprocess, 5 runs,
# evaluate, fit. Re-running resumes; `make demo DEMO_OUT=...` puts it elsewhere.
DEMO_OUT ?= out/demo
demo: $(STAMP)
	$(VENV)/bin/cbs study configs/demo.yaml --out $(DEMO_OUT) --parallel 2
	@echo "report: $(DEMO_OUT)/fit/report.md   runs: $(VENV)/bin/cbs status $(DEMO_OUT)"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/preprocess_throughput.py --repeat 2
	$(PY) bench/throughput.py
	$(PY) bench/fit_bench.py

# All the GPU work in one command (scripts/gpu_check.sh; README "Running on GPUs"): installs what the machine lacks
# from .whl/ (scripts/gpu_wheels.sh), the GPU tests, a small study, the throughput bench; figures in $OUT.
# No venv is made: the GPU machine's own Python (PYTHON=...) with its torch, or .venv where one exists.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) out *.egg-info

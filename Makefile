# The two commands a new user runs on a fresh machine:  make demo  (the main job)  and  make test.
# Both create the virtual environment first (once; `make setup` alone does only that).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test bench clean
setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

# Until the study stage exists (issue #5) the demo preprocesses the embedded default corpus.
demo: $(STAMP)
	$(VENV)/bin/cbs preprocess configs/preprocess_stdlib.yaml

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/preprocess_throughput.py --repeat 2

clean:
	rm -rf $(VENV) out *.egg-info

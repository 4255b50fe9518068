# `make run`: set up (idempotent) and rebuild the model with DVC. `make test`: set up and run the tests.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test flow schedule serve predict-folder recheck bench
NGINX := /usr/sbin/nginx
CHROMIUM := /usr/bin/chromium
setup: $(STAMP) $(NGINX) $(CHROMIUM)

# The server's front (serve/server.py): Debian's nginx, installed once (needs root, or run the two lines by hand).
$(NGINX):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx

# Headless Chromium for the report page's browser test, from Debian's packages.
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

# Re-installs only when requirements.txt changes; the machine's pip config prints noise about absent mirrors.
$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
	touch $@

run: $(STAMP)
	dvc repro
	@echo; echo "== results (outputs/evaluate/summary.txt) =="; cat outputs/evaluate/summary.txt

test: $(STAMP) $(NGINX) $(CHROMIUM)
	python -m pytest -q tests

# The pipeline through Prefect: a local server (SQLite in .prefect/) is started when none answers.
flow schedule: export PREFECT_HOME := $(CURDIR)/.prefect
flow schedule: export PREFECT_API_URL ?= http://127.0.0.1:4200/api

flow: $(STAMP)
	python -m flows.server
	python -m flows.pipeline

schedule: $(STAMP)
	python -m flows.server
	python -m flows.schedule

# Serving the deploy model the pipeline chose (see serve/). predict-folder: IMAGES=folder-or-URI (s3://...) on Ray
# Data (RAY_ADDRESS: that cluster; else this machine), OUT=folder (Parquet tables) or OUT=file.csv; re-runs resume.
CARD := outputs/deploy/card.json
serve: $(STAMP) $(NGINX)
	python -m serve.app --card $(CARD)

predict-folder: $(STAMP)
	python -m serve.batch --card $(CARD) --images $(IMAGES) --out $(OUT)

# On the machine that will serve: would the deploy stage choose the shipped variant here? (stages/recheck.py)
recheck: $(STAMP)
	python -m stages.recheck --card $(CARD)

# Benchmarks against the classic recipe and the alternatives (36 min on 2 quiet cores, 2026-11-28):
# benchmarks/RESULTS.md. `python -m benchmarks.run --quick --out /tmp/bench` checks the harness in minutes.
bench: $(STAMP)
	python -m benchmarks.datasets --out benchmarks
	python -m benchmarks.run --out benchmarks
	python -m benchmarks.scale | tee benchmarks/SCALE.md
	python -m benchmarks.scale_train | tee benchmarks/SCALE_TRAIN.md
	python -m benchmarks.batch_bench | tee benchmarks/BATCH.md
	python -m benchmarks.label_bench | tee benchmarks/LABELS.md
	python -m benchmarks.serve_bench | tee benchmarks/SERVING.md
	python -m benchmarks.stability | tee benchmarks/STABILITY.md
	python -m benchmarks.gpu_check | tee benchmarks/GPU.md

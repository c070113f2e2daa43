# The two commands: `make up` starts the suite, `make test` runs the tests. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: manifests up test test-nightly bench bench-ledger bench-smoke demo certs gen gen-check lint format buf buf-baseline check clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $(STAMP)

up: $(STAMP)  ## start all four services on localhost (SQLite files under data/)
	$(BIN)/python -m tools.suite

test: $(STAMP)  ## run the whole test suite (real servers; SQLite and PostgreSQL)
	$(BIN)/pytest

test-nightly: $(STAMP)  ## the chaos test with the shipped reconciler timings (~5 min; not in make test)
	$(BIN)/pytest -m nightly -s

bench: $(STAMP)  ## performance: the suite against its gRPC ceilings, SQLite and PostgreSQL (~9 min)
	$(BIN)/python -m benchmarks.perf --backend both

bench-ledger: $(STAMP)  ## the ledger at 10k, 1M and 10M entries in one account: pages, audit, memory (PostgreSQL, ~20 min)
	$(BIN)/python -m benchmarks.ledger --service wallet --scales 10k,1m,10m

bench-smoke: $(STAMP)  ## every benchmark case for a second: checks the benchmarks run, no timing asserted
	$(BIN)/python -m benchmarks.perf --smoke
	$(BIN)/python -m benchmarks.ledger --smoke --service wallet
	$(BIN)/python -m benchmarks.ledger --smoke --service payout

demo: $(STAMP)  ## drive the real money flow against a running suite (`make up` first)
	$(BIN)/coinsctl demo

certs: $(STAMP)  ## generate the dev CA, service certificates and token key under certs/ (never committed)
	$(BIN)/python -m runtime.pki

gen: $(STAMP)  ## regenerate gen/ and build/image.binpb from protos/
	$(BIN)/python tools/gen_protos.py

manifests: $(STAMP)  ## regenerate deploy/k8s/base from the services' settings
	$(BIN)/python -m tools.deploy_manifests

gen-check: gen  ## fail if the committed generated code is stale
	@git diff --exit-code --stat -- gen || (echo "gen/ is stale: run make gen and commit" && exit 1)
	@test -z "$$(git status --porcelain -- gen)" || (git status --porcelain -- gen; echo "gen/ has uncommitted files: run make gen and commit"; exit 1)

lint: $(STAMP)  ## ruff (lint and format) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: $(STAMP)  ## format the code
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

buf: gen  ## buf lint (STANDARD + COMMENTS) and buf breaking (FILE) against the committed baseline
	cd protos && buf lint ../build/image.binpb --path coins --config buf.yaml
	cd protos && buf breaking ../build/image.binpb --against baseline.binpb --path coins --config buf.yaml

buf-baseline: gen  ## accept the current contracts as the new breaking-change baseline
	cp build/image.binpb protos/baseline.binpb

check: lint buf gen-check test bench-smoke  ## everything CI runs

clean:  ## remove the virtual environment, build output and local databases
	rm -rf $(VENV) build data certs

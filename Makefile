# fastcast developer tasks (pydantic-core's Makefile is the model).
.DEFAULT_GOAL := help
PYTHON ?= python3

.PHONY: help
help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

.PHONY: dev
dev:  ## build the extension in release mode and install fastcast editable, with test deps
	$(PYTHON) -m pip install -e '.[test,dev]'

.PHONY: test
test:  ## the test command README.md gives: core tests, then pytest
	cargo test --release -p fastcast-core
	$(PYTHON) -m pytest tests

.PHONY: lint
lint:  ## rustfmt, clippy, ruff, mypy and the stub check
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	$(PYTHON) -m ruff check python tests benches
	$(PYTHON) -m ruff format --check python tests benches
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest fastcast._core

.PHONY: format
format:  ## apply rustfmt and ruff format
	cargo fmt --all
	$(PYTHON) -m ruff check --fix python tests benches
	$(PYTHON) -m ruff format python tests benches

.PHONY: bench
bench:  ## end-to-end benchmark vs the I/O floor and the usual scripts (benches/results/)
	$(PYTHON) benches/bench_convert.py

.PHONY: bench-kernels
bench-kernels:  ## cast-kernel throughput (criterion), GB/s of input per core
	cargo bench -p fastcast-core --bench kernels

.PHONY: fuzz
fuzz:  ## fuzz the header parser for 10 minutes (CI runs it for 20 s)
	FASTCAST_FUZZ_SECONDS=600 cargo test --release -p fastcast-core --test fuzz_header -- --nocapture

# fastcast developer tasks (pydantic-core's Makefile is the model).
.DEFAULT_GOAL := help
PYTHON ?= python3

.PHONY: help
help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

.PHONY: dev
dev:  ## build the extension in release mode and install fastcast editable, with test deps
	$(PYTHON) -m pip install -e '.[test,dev]'

.PHONY: wheel
wheel:  ## an abi3 manylinux2014 x86-64 wheel in dist/ (zig links it, auditwheel checks it)
	$(PYTHON) -m pip install --quiet 'maturin>=1.9.4,<2' 'ziglang>=0.13' 'auditwheel>=6'
	rm -rf dist
	$(PYTHON) -m maturin build --release --zig --compatibility manylinux2014 -o dist
	$(PYTHON) -m auditwheel show dist/fastcast-*.whl | grep -q 'consistent with the following platform tag' \
	  && $(PYTHON) -m auditwheel show dist/fastcast-*.whl | grep -A1 'consistent with' | grep -q manylinux_2_17_x86_64

.PHONY: wheel-check
wheel-check: wheel  ## install the wheel into a fresh venv with no Rust on PATH and convert with it
	bash .ci/wheel-check

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

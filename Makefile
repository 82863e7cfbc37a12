# The two commands of the README are `make demo` and `make test`; both set up .venv first.
.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/rlhf-ray demo --config configs/demo.yaml

test: setup
	.venv/bin/pytest tests --durations=15

test-fast: setup
	.venv/bin/pytest -m "not integration" tests

bench: setup
	.venv/bin/python bench/tokenizer_throughput.py

# The two commands of the README are `make demo` and `make test`; both set up .venv first.
.PHONY: setup bench-setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

# The benchmarks' extra (TRL, for bench/trl_grpo.py) on top of setup, without breaking it.
bench-setup:
	@SETUP_EXTRAS=bench bash scripts/setup.sh

demo: setup
	.venv/bin/rlhf-ray demo --config configs/demo.yaml

test: setup
	.venv/bin/pytest tests --durations=15

test-fast: setup
	.venv/bin/pytest -m "not integration" tests

bench: setup
	.venv/bin/python bench/tokenizer_throughput.py

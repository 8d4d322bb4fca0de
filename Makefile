# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
.PHONY: demo test lint bench venv clean

demo:
	@scripts/venv.sh demo
	.venv/bin/spendtap demo

test:
	@scripts/venv.sh test
	@scripts/ci-deps.sh
	.venv/bin/ruff check .
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint:
	@scripts/venv.sh test
	.venv/bin/ruff check .
	.venv/bin/ruff format --check addon cli sim

bench:
	@scripts/venv.sh test
	.venv/bin/python -m bench $(if $(PEERS),--peers $(PEERS)) $(BENCH_ARGS)

clean:
	rm -rf .venv build *.egg-info .pytest_cache .hypothesis

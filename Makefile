# The two commands a newcomer needs: `make demo` and `make test`.
# Both set up the host first (Debian packages, .venv); guest images and kernels
# are fetched and built on first use and cached (see README).
.PHONY: setup demo test lint bench clean

setup:
	@scripts/setup

demo: setup
	.venv/bin/transmigrate demo

test:
	@scripts/setup --tests
	.venv/bin/pytest

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/mypy

bench: setup
	.venv/bin/python bench/boot.py

clean:
	-.venv/bin/transmigrate clean

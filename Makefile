.PHONY: demo test bench

demo:
	./scripts/setup && .venv/bin/sgdscope demo

test:
	./scripts/setup --dev && .venv/bin/python -m pytest

bench:
	./scripts/setup && .venv/bin/pip install -q -e ".[bench]" && .venv/bin/python bench/curvature.py && .venv/bin/python bench/interpolation.py && .venv/bin/python bench/tracking.py

.PHONY: demo test bench

demo:
	./scripts/setup && .venv/bin/sgdscope demo

test:
	./scripts/setup --dev && .venv/bin/python -m pytest

bench:
	# the peers go in with --no-deps so that the pinned CPU torch stays (pyhessian pins nothing useful)
	./scripts/setup --dev && .venv/bin/pip install -q --no-deps pyhessian==0.1 \
	  && for b in curvature cold tracking interpolation wholerun distributed paper_estimates; do \
	    [ ! -f bench/$$b.py ] || .venv/bin/python bench/$$b.py || exit 1; done

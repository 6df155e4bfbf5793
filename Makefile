# instdisc_lite — the two commands of the README are `make run` and `make test`; both set up what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install install-data run test test-unit lint bench

# torch/torchvision pinned to the releases that pip takes from this machine's disk (CPU here, CUDA on a GPU box).
install: install-data
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev,book]"

install-data:
	@if [ ! -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] && [ ! -f data/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# The main job: train the quick config on Fashion-MNIST and print its evaluation.
run: install
	$(PYTHON) -m instdisc_lite train --config fashion_mnist_quick --overwrite

test: install
	$(MAKE) test-unit

test-unit:
	$(PYTHON) -m pytest -q tests

lint:
	ruff check instdisc_lite tests benchmarks
	ruff format --check instdisc_lite tests benchmarks

bench:
	$(PYTHON) benchmarks/objectives.py
	$(PYTHON) benchmarks/quality.py

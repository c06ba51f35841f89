# Two entry points (README.md): `make demo` and `make test`. Both create .venv on first use.
# `make docs` builds the documentation site into build/site (`make test` builds it too, strictly,
# in tests/test_docs.py, so a broken reference fails the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Everything the install reads: editing any of them (content or timestamp) reinstalls.
INSTALL_INPUTS := requirements/dev.txt requirements/nodeps.txt requirements/megatron.txt pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(INSTALL_INPUTS) | cksum | cut -d' ' -f1)

.PHONY: demo test docs install clean

$(STAMP): $(INSTALL_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# DS_BUILD_OPS=0: DeepSpeed compiles no CUDA ops at install time (the tests run it on CPU).
	DS_BUILD_OPS=0 $(PIP) install --quiet -r requirements/dev.txt
	# megatron-core declares Python >= 3.12 and runs on 3.11 (requirements/megatron.txt).
	$(PIP) install --quiet --ignore-requires-python -r requirements/megatron.txt
	# timm pulls a torchvision that cannot load beside this torch: install it without
	# dependencies; the parity tests load timm/utils/agc.py by file path.
	$(PIP) install --quiet --no-deps -r requirements/nodeps.txt
	$(PIP) install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradclip compare

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d build/site

clean:
	rm -rf $(VENV) build *.egg-info

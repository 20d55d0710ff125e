# hps_jax — the two commands a fresh clone needs:  `make demo`  and  `make test`.
# Both create ./.venv themselves and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
# The PyTorch references the parity tests compare against (open_clip needs torchvision).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n auto --dist loadscope --durations=15

.PHONY: demo test lint venv venv-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Core install. open_clip_torch is added without its dependencies only for the CLIP BPE vocabulary its wheel
# ships (bpe_simple_vocab_16e6.txt.gz); hps_jax reads that file and never imports open_clip or torch.
$(VENV)/.stamp-core: setup.cfg pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps open_clip_torch
	touch $@

# The human-study web app (Flask, SQLAlchemy, waitress): the demo's last step runs a study through it.
$(VENV)/.stamp-study: $(VENV)/.stamp-core
	$(PIP) install -q -e '.[study]'
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-core
	$(PIP) install -q -e '.[test]' $(TORCH_PINS)
	touch $@

venv: $(VENV)/.stamp-core
venv-test: $(VENV)/.stamp-test

demo: $(VENV)/.stamp-study
	rm -rf demo_out
	$(PY) -m hps_jax.cli demo --outdir demo_out

# Style (ruff lint + format check) and layering (import-linter contracts in setup.cfg), before the tests.
lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

test: lint
	@$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: $(VENV)/.stamp-test
	$(PY) -m bench.score

clean:
	rm -rf $(VENV) demo_out .pytest_cache

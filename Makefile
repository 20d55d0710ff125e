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

# Wheels for the GPU machine (Python 3.12, manylinux x86_64, no network there) of what its image lacks
# (bench/gpu_wheels.txt, dependencies listed explicitly) plus hps_jax itself, into .whl/ (git-ignored; the device
# tool carries it: carry=[".whl"]). bench/gpu_suite.sh installs from there only what is missing.
WHEELHOUSE ?= .whl
GPU_WHEEL_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
.PHONY: wheelhouse gpu-suite-smoke
wheelhouse: | $(VENV)/bin/python
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PIP) download -q --no-deps $(GPU_WHEEL_TARGET) -d $(WHEELHOUSE) -r bench/gpu_wheels.txt
	@# hps_jax from a clean copy of the working tree (the in-tree build/ may hold stale modules)
	@src=$$(mktemp -d) && git ls-files -z -co --exclude-standard | \
	  xargs -0 tar --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C $$src && \
	  $(PIP) wheel -q --no-deps -w $(WHEELHOUSE) $$src; rc=$$?; rm -rf $$src; exit $$rc
	@ls -1 $(WHEELHOUSE)
	@$(PY) -c "import pathlib, sys; n = sum(p.stat().st_size for p in pathlib.Path('$(WHEELHOUSE)').glob('*.whl')); \
	  print(f'wheelhouse $(WHEELHOUSE): {len(list(pathlib.Path(\"$(WHEELHOUSE)\").glob(\"*.whl\")))} wheels, {n / 2**20:.1f} MiB'); \
	  sys.exit(0 if n < 60 * 2**20 else 'wheelhouse over 60 MiB')"

# The GPU suite end to end on this CPU at tiny sizes (what tests/test_gpu_suite.py runs).
gpu-suite-smoke: $(VENV)/.stamp-test
	bash bench/gpu_suite.sh --cpu-smoke

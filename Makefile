# sru_cupy development tasks.
#   make venv       build .venv (editable install with the test and torch extras)
#   make demo       train character-level language models, SRU, SRU++ and an LSTM of the same
#                   hidden size, for about three minutes together, and print bits-per-character
#                   and speed (DEMO_ARGS=...)
#   make test       run the test suite inside .venv (extra args: PYTEST_ARGS=...)
#   make gpu-check  on a GPU machine (torch, cupy, pytest installed; no downloads): environment
#                   report, smoke checks, the GPU tests in value order, the GPU benchmark, within
#                   9 minutes (GPU_CHECK_ARGS=--quick: 4.5). GPU_CHECK_OUT=$OUT: $OUT receives
#                   summary.txt, summary.json and gpu-check.tar.gz (everything else), rewritten
#                   after every stage; unpack with tar -xzf into benchmarks/results/. Without it:
#                   plain files in benchmarks/results/<device>-<date>/
#   make clean      remove build outputs (keeps .venv)
#   make distclean  clean, and remove .venv and .hypothesis too

PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
DEMO_ARGS ?=

VENV_PY := $(VENV)/bin/python
VENV_PIP := $(VENV_PY) -m pip
# Rebuilt only when the packaging metadata changes.
VENV_STAMP := $(VENV)/.sru_cupy-venv.stamp

# Folder that receives gpu-check's summary and archive; empty means plain files in
# benchmarks/results/<device>-<date>.
GPU_CHECK_OUT ?=
# Extra arguments of benchmarks/gpu_check.py, e.g. --quick.
GPU_CHECK_ARGS ?=

.PHONY: venv test demo gpu-check clean distclean

venv: $(VENV_STAMP)

$(VENV_STAMP): setup.cfg pyproject.toml
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	# setuptools>=64 (PEP 660 editable installs) and wheel: an older bundled
	# setuptools is upgraded only when it is below 64.
	$(VENV_PIP) install 'setuptools>=64' wheel
	# CPU build of torch; taken from local wheels when the pip config points at them.
	$(VENV_PIP) install torch==2.13.0
	# pynvrtc 9.2 is a yanked sdist (so pinned exactly) whose build needs wheel.
	$(VENV_PIP) install --no-build-isolation pynvrtc==9.2
	$(VENV_PIP) install -e '.[test,torch,examples,bench]'
	# The sru 3.0.0.dev6 parity oracle (SRU++ and 3.0's SRU checkpoints), in a folder of its own
	# (it cannot sit beside the sru 2.6 of the test extra); tests/test_srupp_parity.py and
	# tests/test_sru_parity.py run it in a child process (tests/sru3_child.py).
	$(VENV_PIP) install --upgrade --no-deps --target $(VENV)/sru3 --pre sru==3.0.0.dev6
	touch $@

demo: $(VENV_STAMP)
	$(VENV_PY) examples/train_lm.py $(DEMO_ARGS)

test: $(VENV_STAMP)
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

# Runs from the source tree with the machine's own python3 and packages: installs nothing.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT)) $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist .pytest_cache
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name '__pycache__' -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .hypothesis

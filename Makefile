# Two commands take a fresh machine to a running job and to passing tests:
#   make quickstart    install into .venv, then run the tiny-model pipeline end to end
#   make test          install into .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed's JIT-built ops go into the venv (trainer/op_cache.py), not ~/.cache/torch_extensions where
# other venvs and clones rebuild them; a TORCH_EXTENSIONS_DIR set by the user wins.
TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export TORCH_EXTENSIONS_DIR

.PHONY: quickstart rlhf-quickstart grpo-quickstart test test-fast install clean

install: $(VENV)/.installed

# torch==2.13.0 (pinned in setup.py) resolves to the local CPU build on the CPU machines here.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

quickstart: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash tools/quickstart.sh

# SFT -> reward model -> PPO with rlhf.py on the tiny model (README "RLHF"); output in runs/rlhf-quickstart/
rlhf-quickstart: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash tools/rlhf_quickstart.sh

# SFT -> GRPO (a rule-checked reward) with rlhf.py on the tiny model (README "SFT -> GRPO"); output in runs/grpo-quickstart/
grpo-quickstart: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash tools/grpo_quickstart.sh

test: install
	$(PY) -m pytest

# the suite without the tests that launch DeepSpeed ranks (marked multirank): ~2 minutes instead of ~17
test-fast: install
	$(PY) -m pytest -m "not multirank"

# only what the make targets made: runs/ also holds the README's real checkpoints (runs/llama-7b-sft, ...)
clean:
	rm -rf runs/quickstart runs/rlhf-quickstart runs/grpo-quickstart .pytest_cache data/.cache

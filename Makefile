# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch is installed first: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	@echo "== tieaudit check fixtures/demo/llama-untied-missing-head  (a real save_pretrained output that loads a random lm_head) =="
	@$(BIN)/tieaudit check fixtures/demo/llama-untied-missing-head; echo "exit code: $$?  (1 = findings at or above --fail-on)"
	@echo
	@echo "== tieaudit check fixtures/demo/llama-clean  (the same model saved tied) =="
	@$(BIN)/tieaudit check fixtures/demo/llama-clean; echo "exit code: $$?"
	@echo
	@echo "== tieaudit check fixtures/demo/llama-lora-tied  (a real peft LoRA whose peft merge adds the tied delta twice) =="
	@$(BIN)/tieaudit check fixtures/demo/llama-lora-tied -q; echo "exit code: $$?"
	@echo
	@echo "== tieaudit merge fixtures/demo/llama-lora-tied --output-dir <tmp>  (the exact merge; the tie is kept) =="
	@tmp=$$(mktemp -d) && $(BIN)/tieaudit merge fixtures/demo/llama-lora-tied --output-dir $$tmp/merged; \
	  code=$$?; rm -rf $$tmp; echo "exit code: $$code"
	@echo
	@echo "== tieaudit explain TIE002 =="
	@$(BIN)/tieaudit explain TIE002

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_check.py
	$(BIN)/python benchmarks/bench_adapter.py
	$(BIN)/python benchmarks/bench_fix.py
	$(BIN)/python benchmarks/bench_merge.py
	$(BIN)/python benchmarks/bench_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

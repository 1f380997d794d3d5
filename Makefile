# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# They install the exact versions of constraints.txt (the lock the suite was verified with); pyproject.toml keeps
# the ranges users install against. `make test-latest` runs the suite on the newest allowed versions instead, and
# `make lock` rewrites constraints.txt from them once that suite passes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := constraints.txt
LATEST := .venv-latest
# torch comes first, from the PyTorch CPU index: on Linux x86-64 a plain `torch` requirement resolves to the CUDA
# build (several GB). Where that index does not answer within 5 s, the default index is used, with one line saying
# so. Override: TORCH_INDEX_URL=<a CUDA or mirror index> (empty: the default index), TORCH_SPEC=torch==<version>.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==$(shell sed -n 's/^torch==//p' $(LOCK))
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: demo test lint bench clean test-latest lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed on its own (its spec may be overridden), the rest under the lock without torch's line
$(STAMP): pyproject.toml $(LOCK) tools/envlock.py | $(BIN)/python
	$(BIN)/python -m pip install $(PIP_QUIET) -c $(LOCK) pip
	$(BIN)/python tools/envlock.py install-torch "$(TORCH_SPEC)" "$(TORCH_INDEX_URL)"
	$(BIN)/python tools/envlock.py without torch $(LOCK) $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(BIN)/python -m pip install $(PIP_QUIET) -e ".[test]"
	$(BIN)/python tools/envlock.py check $(LOCK) torch
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
	$(BIN)/python -m pytest -n 2 --dist worksteal -q

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
	$(BIN)/python benchmarks/bench_peft_check.py

# Not part of CI: the suite on the newest versions pyproject.toml allows, in a separate venv made anew each time,
# so a new transformers or peft release is checked on purpose. Prints what differs from the lock first.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(LATEST)/bin/python tools/envlock.py install-torch torch "$(TORCH_INDEX_URL)"
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST)/bin/python tools/envlock.py diff $(LOCK)
	$(LATEST)/bin/python -m pytest -n 2 --dist worksteal -q -p no:cacheprovider

# A deliberate update of the lock: the suite must pass on the newest versions before they are written down.
lock: test-latest
	$(LATEST)/bin/python tools/envlock.py freeze $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .ruff_cache

# Every target bootstraps .venv itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench compile lint clean chromium

venv: $(STAMP)

# torch first, pinned: it is the CPU build that lies on disk; a loose pin would pull a CUDA build.
# DS_BUILD_OPS=0 installs DeepSpeed as pure Python (its C++ ops are never compiled here).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[dev,train]'
	touch $(STAMP)

# The dashboard's browser test uses Debian's chromium; installed here when missing and apt-get can.
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium fonts-liberation >/dev/null) \
	  || echo "chromium could not be installed: the browser test will be skipped"

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/mmsae demo --out demo-output

bench: $(STAMP)
	$(BIN)/python -m bench --out bench-output

compile: $(STAMP)
	$(BIN)/mmsae pipeline compile --out pipelines/compiled

lint: $(STAMP)
	$(BIN)/ruff check src tests bench components pipelines

clean:
	rm -rf $(VENV) demo-output bench-output

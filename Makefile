# The two quick-start commands are `make demo` and `make test`; each sets itself up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MUTATE_STAMP := $(VENV)/.installed-mutate

.PHONY: demo test mutate proto bench-apply bench-cluster clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The virtual environment alone (the examples' headers start with it).
.PHONY: venv
venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/kv demo

test: $(STAMP)
	$(BIN)/python -m pytest

$(MUTATE_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,mutate]'
	touch $(MUTATE_STAMP)

# Mutation testing of the safety modules against the unit tests (not part of `make test`):
# fails on a surviving mutant that tests/mutation/survivors.toml does not explain.
# `make mutate GROUP=durability` mutates one group of modules (tests/mutation/run.py, GROUPS).
mutate: $(MUTATE_STAMP)
	$(BIN)/python tests/mutation/run.py $(if $(GROUP),--group $(GROUP))

# Regenerate the committed protobuf code (tests/unit/test_generated_code.py fails when it is stale).
proto: $(STAMP)
	$(BIN)/python kvstore/protogen.py

bench-apply: $(STAMP)
	$(BIN)/python benchmarks/bench_apply.py

bench-cluster: $(STAMP)
	$(BIN)/python benchmarks/bench_cluster.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis mutants

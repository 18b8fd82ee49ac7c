# Two commands do all set-up on a fresh machine:  make demo  |  make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench clean ui

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# Plain version ranges: pip resolves a matching torch/torchvision pair from the index.
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -c "import torchvision, torch; torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)" \
		|| { echo "torch/torchvision C++ ops do not load: rm -rf $(VENV) and retry"; exit 1; }
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rcnn-lab run experiments/quickstart.yaml

# Two pytest-xdist workers, each test file on one worker (its module fixtures run once), the files with slow tests
# first (tests/conftest.py); serially: make test TEST_WORKERS=
TEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder

# PYTHONDONTWRITEBYTECODE emptied: the ~100 processes the tests start reuse the package's compiled bytecode, and
# pytest its rewritten test files, rather than compiling them again each time (docs/benchmarks/test_suite.md)
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest tests $(TEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check rcnn_lab tests benchmarks registry

ui: $(STAMP)
	$(BIN)/rcnn-lab ui

clean:
	rm -rf $(VENV) *.egg-info

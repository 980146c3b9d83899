# The two commands a newcomer needs (each sets up .venv first; quick when already done):
#   make demo   train the GPT demo on tiny-shakespeare for 4.5 minutes of training time (the main job);
#               bit-reproducible by steps instead: make demo ARGS="train.max_minutes=0 train.max_steps=1350"
#   make test   the default test suite (<= 15 min on 2 cores)
# CI (.ci/run) runs `make test` with the slow cases added (-m "not slurm and not notebooks"), then
# `make test-slurm test-notebooks`.
PY := .venv/bin/python
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-slurm test-notebooks test-slow

setup:
	@bash scripts/setup_venv.sh

demo: setup
	.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/pretrain_gpt.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-slurm: setup
	$(PY) -m pytest -q -m slurm $(ARGS)

test-notebooks: setup
	$(PY) -m pytest -q -m notebooks $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

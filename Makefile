# gdro: `make help` lists the targets. Everything runs inside .venv (created by `make setup`).
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the venv's tools first for every recipe and its children: DeepSpeed builds its CPU op with the first `ninja` on
# PATH, and a different one than the last build's forces a 2-minute rebuild
export PATH := $(abspath $(BIN)):$(PATH)
# torch 2.14.1 + torchvision 0.29.1: the pair whose torchvision imports (open_clip needs it); on this machine pip takes
# both from local disk (a CUDA build that runs on the CPU). PyPI's torchvision does not import beside the CPU torch 2.13.0.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PRESET ?= toy
ARGS ?=
ROUNDS ?= 3

.PHONY: help setup lint test test-fast rollouts train eval bench bench-gpu toy-base toy-samples prompts clean \
	slurm-rollouts slurm-train slurm-eval slurm-all slurm-up slurm-down hack-demo toy-check ceiling \
	rounds offline-vs-online

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

setup: $(BIN)/gdro ## create .venv and install gdro with the pinned torch + torchvision pair (installed first; open_clip needs torchvision)

$(BIN)/gdro: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

test: setup lint ## run the test suite (after the linter)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q tests

lint: setup ## pyflakes-level checks with ruff
	$(BIN)/ruff check --select F,E9 pipeline stages schemas tests

test-fast: setup ## run the tests not marked slow
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not slow" tests

rollouts: setup ## stage one: generate and score groups into a sharded dataset (toy world by default)
	$(BIN)/gdro rollouts --preset $(PRESET) $(ARGS)

train: setup ## stage two: DeepSpeed training from the shards
	$(BIN)/gdro train --preset $(PRESET) $(ARGS)

eval: setup ## evaluate a trained run against the reference
	$(BIN)/gdro eval --preset $(PRESET) $(ARGS)

rounds: setup ## ROUNDS rounds of rollouts from the current model -> train -> eval (runs/rounds; resumable)
	$(BIN)/gdro rounds --rounds $(ROUNDS) --preset $(PRESET) $(ARGS)

offline-vs-online: setup ## offline gdro, rounds and the online baselines vs. wall-clock (~60 min; docs/offline_vs_online.md)
	$(BIN)/gdro offline-vs-online --preset $(PRESET) --ceiling train --docs docs $(ARGS)

hack-demo: setup ## reward hacking, caught (docs/evaluation.md): rollouts -> train -> eval of preset toy_hack, ~10 min
	OMP_NUM_THREADS=1 $(BIN)/gdro rollouts --preset toy_hack $(ARGS)
	OMP_NUM_THREADS=1 $(BIN)/gdro train --preset toy_hack $(ARGS)
	OMP_NUM_THREADS=1 $(BIN)/gdro eval --preset toy_hack $(ARGS)

slurm-rollouts: setup ## submit stage one to Slurm as an array job (gdro submit rollouts; --dry-run via ARGS)
	$(BIN)/gdro submit rollouts --preset $(PRESET) $(ARGS)

slurm-train: setup ## submit stage two to Slurm: N nodes x torchrun, requeues itself on preemption
	$(BIN)/gdro submit train --preset $(PRESET) $(ARGS)

slurm-eval: setup ## submit the evaluation to Slurm
	$(BIN)/gdro submit eval --preset $(PRESET) $(ARGS)

slurm-all: setup ## submit rollouts -> manifest -> train -> eval to Slurm, chained with afterok
	$(BIN)/gdro submit all --preset $(PRESET) $(ARGS)

slurm-up: ## install (apt-get) and start a local single-node Slurm on this machine (root; no systemd needed)
	cluster/local/slurm.sh install && cluster/local/slurm.sh start

slurm-down: ## stop the local Slurm started by slurm-up (by its pid files)
	cluster/local/slurm.sh stop

bench: setup ## benchmarks, written as a table to bench/out/
	$(BIN)/gdro bench $(ARGS)

BENCH_GPU_LIMIT ?= 15m
bench-gpu: setup ## full-size SD3.5-Medium benchmark on one GPU (random weights; refuses without CUDA; stopped after BENCH_GPU_LIMIT)
	timeout --signal=INT --kill-after=60s $(BENCH_GPU_LIMIT) $(BIN)/gdro bench --full-size $(ARGS)

toy-base: setup ## re-train the shipped toy base model: stage 1 draws, stage 2 adds the noisy captions (about 2 hours on 2 CPU cores)
	$(BIN)/gdro toy pretrain --config pipeline/toy/recipes/base_stage1.yaml $(ARGS)
	$(BIN)/gdro toy pretrain --config pipeline/toy/recipes/base_stage2.yaml $(ARGS)

toy-check: setup ## the toy base model's checks: per-kind table, true renders of the same lines, PASS/MISS
	$(BIN)/gdro toy score --model models/toy-base

ceiling: setup ## the ground-truth ceiling (outside the paradigm): fit true renders for the compute of `make train`, then evaluate it
	$(BIN)/gdro toy ceiling --preset $(PRESET) $(ARGS)
	$(BIN)/gdro eval --preset $(PRESET) --set eval.checkpoint=runs/toy-ceiling/export --set eval.out=runs/toy-ceiling/eval $(ARGS)

toy-samples: setup ## draw the toy base model's sample grid (docs/toy_base_samples.png)
	$(BIN)/gdro toy samples --model models/toy-base --out docs/toy_base_samples.png

prompts: setup ## regenerate the toy prompt files in prompts/
	$(BIN)/gdro toy prompts --out prompts

clean: ## remove runs/ and datasets/ (never the shipped model)
	rm -rf runs datasets

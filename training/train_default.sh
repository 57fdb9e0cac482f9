#!/usr/bin/env bash
# Reproduces models/default: the shipped router for gpt-4-1106-preview (strong) vs Mixtral-8x7B (weak).
# Recipe chosen by measurement (training/README.md): `learned-router train`'s defaults. About 25 s on 2 cores with a
# warm embedding cache; a cold one first embeds the ~16k prompts (minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DATASETS:-../shared/datasets}
learned-router train \
  --data "$D/routellm_mmlu.parquet" --data "$D/routellm_gsm8k.parquet" \
  --data "$D/arena_bench_v1.parquet" --data "$D/alpaca_eval.parquet" \
  --strong gpt-4-1106-preview --weak mistralai/Mixtral-8x7B-Instruct-v0.1 \
  --label-policy relative --margin 0 --tie-target 0.5 \
  --variants int8 --name default --out models/default "$@"

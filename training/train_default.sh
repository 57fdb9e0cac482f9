#!/usr/bin/env bash
# Reproduces models/default: the quality model on every graded source in ../shared/datasets, with the recipe's
# defaults (learned_router.recipe.Recipe; training/README.md says how they were chosen). Extra options pass through,
# e.g. --out models/mine or --overwrite. A cold embedding cache first embeds the ~30k prompts (minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DATASETS:-../shared/datasets}
LR=${VIRTUAL_ENV:-$PWD/.venv}/bin/learned-router
args=()
for f in routellm_mmlu routellm_gsm8k mmlu_pro arena_bench_v1 arena_battles_1k arena_hard_v01_battles vicuna_bench \
         alpaca_eval alpaca_eval_v1 routerbench_mbpp routerarena; do
  args+=(--data "$D/$f.parquet")
done
out=(--out models/default)
for a in "$@"; do [ "$a" = --out ] && out=(); done
"$LR" train "${args[@]}" --variants int8 --name default "${out[@]}" "$@"

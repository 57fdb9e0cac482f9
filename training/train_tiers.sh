#!/usr/bin/env bash
# Reproduces models/alpaca-tiers: the shipped multi-tier router, P(answer passes) for each of the 56 models graded
# by AlpacaEval 2 (the judge's probability of preferring the answer over GPT-4-Turbo's). About 30 s on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DATASETS:-../shared/datasets}
learned-router train-tiers --data "$D/alpaca_eval.parquet" --variants int8 --name alpaca-tiers --out models/alpaca-tiers "$@"

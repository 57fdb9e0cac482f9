#!/usr/bin/env bash
# Offline demo: fake providers (127.0.0.1:9001 strong, :9002 weak, which cannot answer proofs or code: a prompt
# with one of its --fail-words; :9004 a judge for `learned-router label`) and the routing service with the shipped router on
# http://127.0.0.1:8000. `serving/demo.sh tiers`: three tiers (a third fake provider on :9003). Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
LR=${VIRTUAL_ENV:-$PWD/.venv}/bin/learned-router
case "${1:-}" in
  "") config=serving/config.example.yaml; strong=gpt-4-1106-preview; weak=mistralai/Mixtral-8x7B-Instruct-v0.1 ;;
  tiers) config=serving/config.tiers.example.yaml; strong=gpt-4-1106-preview; weak=mistralai/Mixtral-8x7B-Instruct-v0.1
         "$LR" fake-provider --port 9003 --name small --model llama-2-7b-chat & ;;
  *) echo "usage: serving/demo.sh [tiers]" >&2; exit 2 ;;
esac
"$LR" fake-provider --port 9001 --name strong --model "$strong" &
"$LR" fake-provider --port 9002 --name weak --model "$weak" --fail-words prove,proof,python,code,function,sql &
"$LR" fake-provider --port 9004 --name judge --model gpt-4o --judge &
trap 'kill $(jobs -p) 2>/dev/null' EXIT
export STRONG_API_KEY=sk-fake-strong WEAK_API_KEY=sk-fake-weak SMALL_API_KEY=sk-fake-small JUDGE_API_KEY=sk-fake-judge  # the fakes accept any key
"$LR" serve --config "$config"

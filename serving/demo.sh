#!/usr/bin/env bash
# Offline demo: two fake providers (127.0.0.1:9001 strong, :9002 weak) and the routing service with the shipped
# router on http://127.0.0.1:8000. Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
LR=${VIRTUAL_ENV:-$PWD/.venv}/bin/learned-router
"$LR" fake-provider --port 9001 --name strong --model gpt-4-1106-preview &
"$LR" fake-provider --port 9002 --name weak --model mistralai/Mixtral-8x7B-Instruct-v0.1 &
trap 'kill $(jobs -p) 2>/dev/null' EXIT
export STRONG_API_KEY=sk-fake-strong WEAK_API_KEY=sk-fake-weak   # the fakes accept any key
"$LR" serve --config serving/config.example.yaml

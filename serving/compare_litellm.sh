#!/usr/bin/env bash
# Side by side with LiteLLM's proxy (optional, not in CI): the same chat load, interleaved, sent to one fake upstream
# directly, through learned-router and through LiteLLM (installed in a venv of its own), at ~30-, ~250- and ~1,000-token
# prompts, concurrency 1 and 16, streaming and not; prints what each adds to the direct call, the ratios and the targets
# met or missed, then the scorer's own targets (learned-router bench), and writes it all to serving/COMPARISON.md.
#   serving/compare_litellm.sh [--chat-requests N]     (LITELLM_VENV, LITELLM_VERSION to override)
set -euo pipefail
cd "$(dirname "$0")/.."
LR=${VIRTUAL_ENV:-$PWD/.venv}/bin/learned-router
VENV=${LITELLM_VENV:-/tmp/litellm-venv}
VERSION=${LITELLM_VERSION:-1.108.7}
UPSTREAM_PORT=${UPSTREAM_PORT:-9311}
LITELLM_PORT=${LITELLM_PORT:-4011}
if [ ! -x "$VENV/bin/litellm" ]; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "litellm[proxy]==$VERSION"
fi
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
cat > "$tmp/litellm.yaml" <<YAML
model_list:
  - model_name: router
    litellm_params: {model: openai/fake-model, api_base: "http://127.0.0.1:$UPSTREAM_PORT/v1", api_key: sk-fake}
general_settings: {master_key: sk-litellm-bench}
litellm_settings: {telemetry: false}
YAML
"$LR" fake-provider --port "$UPSTREAM_PORT" --name upstream > "$tmp/upstream.log" 2>&1 &
"$VENV/bin/litellm" --config "$tmp/litellm.yaml" --host 127.0.0.1 --port "$LITELLM_PORT" --num_workers 1 > "$tmp/litellm.log" 2>&1 &
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$LITELLM_PORT/health/liveliness" > /dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$LITELLM_PORT/health/liveliness" > /dev/null || { tail -20 "$tmp/litellm.log"; exit 1; }
export LITELLM_BENCH_KEY=sk-litellm-bench
out=$("$LR" bench-serve --upstream "http://127.0.0.1:$UPSTREAM_PORT/v1" --compare "litellm=http://127.0.0.1:$LITELLM_PORT/v1" \
  --compare-key-env litellm=LITELLM_BENCH_KEY "$@")
echo "$out"
scorer=$("$LR" bench --repeats 100 2>/dev/null | grep -E '^(threads|tokens read|short prompt|long prompt|~1000-token|int8 vs fp32|target)')
echo "$scorer"
{
  echo "# learned-router next to LiteLLM's proxy"
  echo
  echo "Written by \`serving/compare_litellm.sh $*\` on $(date -u +%Y-%m-%d), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "before the run; learned-router $("$LR" --version | cut -d' ' -f2), LiteLLM $("$VENV/bin/pip" show litellm | sed -n 's/^Version: //p')."
  echo "Added latency is the proxy's p50/p99 minus the direct call's (a stream: to its first event); a ratio below 1"
  echo "means learned-router adds less, a requests/s ratio above 1 that it serves more."
  echo
  echo '```'
  echo "$out"
  echo '```'
  echo
  echo "The scorer alone (\`learned-router bench --repeats 100\`, one prompt per call, one thread):"
  echo
  echo '```'
  echo "$scorer"
  echo '```'
} > serving/COMPARISON.md

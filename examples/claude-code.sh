#!/usr/bin/env bash
# Claude Code through `fallthrough serve`, in front of `fallthrough mock`: two identical
# `claude -p` runs; the second is answered from the cache. Not run by CI (it needs Claude Code:
# `npm install @anthropic-ai/claude-code`, then CLAUDE=path/to/claude).
#
#   cargo build && CLAUDE=claude bash examples/claude-code.sh
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug/fallthrough}
CLAUDE=${CLAUDE:-claude}
MOCK_ADDR=${MOCK_ADDR:-127.0.0.1:18780}
PROXY_ADDR=${PROXY_ADDR:-127.0.0.1:18787}
CACHE=$(mktemp -d)
# The working directory and home are part of Claude Code's prompt: keep both fixed, so that the
# two runs send the same requests.
WORK=$(mktemp -d)

"$BIN" mock --listen "$MOCK_ADDR" >/dev/null 2>&1 &
MOCK_PID=$!
"$BIN" serve --upstream "http://$MOCK_ADDR" --listen "$PROXY_ADDR" --cache-dir "$CACHE" >/dev/null 2>&1 &
PROXY_PID=$!
trap 'kill "$PROXY_PID" "$MOCK_PID" 2>/dev/null; wait "$PROXY_PID" "$MOCK_PID" 2>/dev/null; rm -rf "$CACHE" "$WORK"' EXIT
for _ in $(seq 50); do
    curl -fsS "http://$PROXY_ADDR/healthz" >/dev/null 2>&1 && curl -fsS "http://$MOCK_ADDR/mock/stats" >/dev/null 2>&1 && break
    sleep 0.1
done

run() {
    (cd "$WORK" && ANTHROPIC_BASE_URL="http://$PROXY_ADDR" ANTHROPIC_API_KEY=sk-ant-example \
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 \
        timeout 120 "$CLAUDE" -p "Say hello in five words." --model claude-sonnet-4-6)
}

for pass in first second; do
    started=$SECONDS
    echo "== $pass run"
    run
    echo "(took $((SECONDS - started)) s)"
    echo "upstream /v1/messages calls so far: $(curl -fsS "http://$MOCK_ADDR/mock/stats" | sed -E 's/.*"\/v1\/messages":([0-9]+).*/\1/')"
done
echo "== the proxy's answers"
curl -fsS "http://$PROXY_ADDR/metrics" | grep '^fallthrough_requests_total'

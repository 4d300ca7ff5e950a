#!/usr/bin/env bash
# The disk tier at scale (issue 13): what start-up, /metrics, `cache stats` and the directory
# cost as the cache grows.
#
#   bash benches/disk_scale.sh                    # SIZES="10000 100000 1000000"
#   SIZES="10000 100000" bash benches/disk_scale.sh
#
# For each size N: N entries of ~1 KB (a Messages answer) are imported into a fresh cache
# directory (`cache import`), then it measures
#   start-up    `serve` started until its first `/healthz` answers 200
#   metrics     one `/metrics` scrape (median of 5)
#   stats       `cache stats` (the proxy stopped): wall time and peak RSS
#   dir         the directory's size on disk (`du`), against the entries' logical bytes
# and, in a second directory whose `disk_bytes` is half the entries' bytes (so eviction runs
# during the import), the directory's size against that bound.
# BOUNDED=0 skips the bounded directory (its import is the slow part at 1M entries).
# Prints a table; needs python3, curl and GNU time (/usr/bin/time).
set -euo pipefail
export LC_ALL=C

SIZES=${SIZES:-10000 100000 1000000}
BOUNDED=${BOUNDED:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
say() { printf '%s\n' "$*" >&2; }
die() { say "disk_scale.sh: $*"; exit 1; }
command -v python3 >/dev/null || die "needs python3"
command -v curl >/dev/null || die "needs curl"
[[ -x /usr/bin/time ]] || die "needs GNU time at /usr/bin/time (apt-get install time)"

say "building (cargo build --release --bin fallthrough)…"
(cd "$ROOT" && cargo build --release --bin fallthrough >&2)
FT=$TARGET_DIR/release/fallthrough

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fallthrough-scale.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# gen N FILE: an export file of N entries (~1 KB bodies), fresh for a day.
gen() {
    python3 - "$1" "$2" <<'PY'
import json, os, sys, time
n, path = int(sys.argv[1]), sys.argv[2]
now = int(time.time() * 1000)
text = "The quick brown fox jumps over the lazy dog. " * 20
with open(path, "w") as out:
    out.write(json.dumps({"key_secret": "scale-bench"}) + "\n")
    for i in range(n):
        key = os.urandom(32).hex()
        body = {"id": f"msg_{i}", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
                "content": [{"type": "text", "text": f"{i} {text}"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 20, "output_tokens": 200}}
        out.write(json.dumps({"key": key, "model": "claude-sonnet-4-6", "stored_at": now,
                              "fresh_until": now + 86_400_000, "stale_until": now + 2 * 86_400_000,
                              "body": body}, separators=(",", ":")) + "\n")
PY
}

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

# startup DIR: prints "startup_ms metrics_ms" for a `serve` over DIR, then stops it.
startup() {
    local dir=$1 out=$WORK/serve.out t0 addr="" i
    : >"$out"
    t0=$(date +%s%N)
    env -u RUST_LOG "$FT" serve --listen 127.0.0.1:0 --upstream http://127.0.0.1:9 \
        --cache-dir "$dir" >"$out" 2>"$WORK/serve.err" &
    local pid=$!
    PIDS+=("$pid")
    for i in $(seq 1 6000); do
        addr=$(grep -o 'http://[^ ]*' "$out" 2>/dev/null | head -1 || true)
        if [[ -n $addr ]] && [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$addr/healthz") == 200 ]]; then
            break
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/serve.err" >&2; die "serve exited"; }
        sleep 0.005
    done
    local up
    up=$(ms_since "$t0")
    local times=()
    for i in 1 2 3 4 5; do
        times+=("$(curl -s -o /dev/null -w '%{time_total}' --max-time 60 "$addr/metrics")")
    done
    local metrics
    metrics=$(printf '%s\n' "${times[@]}" | sort -g | sed -n 3p | awk '{ printf "%.2f", $1 * 1000 }')
    kill -TERM "$pid"
    wait "$pid" || true
    echo "$up $metrics"
}

printf '\n%-9s %9s %11s %11s %10s %12s %10s %10s %14s %12s\n' entries import_s startup_ms metrics_ms stats_s stats_rss_mb logical_mb dir_mb evicted_bound dir_evicted >&2
rows=()
for n in $SIZES; do
    file=$WORK/export-$n.jsonl
    say "generating $n entries…"
    gen "$n" "$file"
    dir=$WORK/cache-$n
    t0=$(date +%s%N)
    "$FT" cache --cache-dir "$dir" import "$file" >/dev/null
    import_s=$(awk -v ms="$(ms_since "$t0")" 'BEGIN { printf "%.1f", ms / 1000 }')
    read -r up metrics <<<"$(startup "$dir")"
    /usr/bin/time -f '%e %M' -o "$WORK/time.out" "$FT" cache --cache-dir "$dir" stats --json >"$WORK/stats.json"
    read -r stats_s stats_kib <"$WORK/time.out"
    logical=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes"])' "$WORK/stats.json")
    du_bytes=$(du -sb "$dir" | cut -f1)
    # The same entries into a directory bounded at half their bytes.
    bound=$(( logical / 2 ))
    bdir=$WORK/bounded-$n
    bdu=0
    if (( BOUNDED )); then
        printf '[cache]\ndisk_bytes = %d\n' "$bound" >"$WORK/bounded.toml"
        "$FT" cache --cache-dir "$bdir" --config "$WORK/bounded.toml" import "$file" >/dev/null
        bdu=$(du -sb "$bdir" | cut -f1)
    fi
    row=$(printf '%-9s %9s %11s %11s %10s %12.1f %10.1f %10.1f %14.1f %12.1f' "$n" "$import_s" "$up" "$metrics" \
        "$stats_s" "$(awk -v k="$stats_kib" 'BEGIN { print k / 1024 }')" \
        "$(awk -v b="$logical" 'BEGIN { print b / 1048576 }')" "$(awk -v b="$du_bytes" 'BEGIN { print b / 1048576 }')" \
        "$(awk -v b="$bound" 'BEGIN { print b / 1048576 }')" "$(awk -v b="$bdu" 'BEGIN { print b / 1048576 }')")
    rows+=("$row")
    say "$row"
    rm -rf "$dir" "$bdir" "$file"
done
printf '\n%-9s %9s %11s %11s %10s %12s %10s %10s %14s %12s\n' entries import_s startup_ms metrics_ms stats_s stats_rss_mb logical_mb dir_mb evicted_bound dir_evicted
printf '%s\n' "${rows[@]}"
echo "(MB = MiB; targets at 1M entries: start-up ≤ 200 ms, /metrics ≤ 5 ms, stats RSS ≤ 64 MiB,"
echo " dir_evicted ≤ evicted_bound + 10% + 16 MiB)"

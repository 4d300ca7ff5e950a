#!/usr/bin/env bash
# Load benchmark of `fallthrough serve` (issue 6, point 2), side by side with its ceiling (a bare
# hyper server answering a fixed body from memory) and nginx `proxy_cache` caching POST keyed on
# the body, interleaved over rounds so that the noise of a shared machine spreads evenly.
#
#   bash benches/load.sh                      # DURATION=10 CONNECTIONS=32 ROUNDS=3
#   DURATION=5 ROUNDS=2 bash benches/load.sh
#
# Every server runs pinned to SERVER_CPU (default 0), wrk to LOAD_CPU (default 1). Needs Linux,
# two cores, and (for the packages it installs when missing: wrk, nginx, curl) apt-get as root.
#
# Scenarios, each once per round, in this order:
#   bare      the fixed-body server (examples/fixed_body.rs): the ceiling
#   nginx     nginx proxy_cache hits (POST cached, key = URI + body)
#   memory    fallthrough memory hits
#   token     fallthrough memory hits of a caller admitted by an access token (require_token)
#   disk      fallthrough disk hits (a second `serve` with [cache] memory_bytes = "0")
#   shared    fallthrough shared hits: memory and disk tiers off, a redis-server (started here,
#             on the server core too) as the shared tier
#   miss      fallthrough misses: a unique body per request, through to the mock (latency 0)
#   direct    the mock called directly with the same kind of unique bodies
#   miss1     as miss, one connection   } the miss overhead (target ≤ 0.3 ms) is miss1 − direct1:
#   direct1   as direct, one connection } at 32 connections latency is mostly queueing
#
# The hit scenarios' caches are warmed from the fixed-body server (its ~2 KB body is a complete
# Message), so bare, nginx, memory and disk all answer the very same 2048 bytes; the mock's own
# answers are ~0.5 KB. HIT_UPSTREAM=mock warms them from the mock instead.
#
# Prints a table (medians with min–max over rounds) and the ratios the issue asks for, and writes
# target/load-summary.json (or $CARGO_TARGET_DIR/load-summary.json).
set -euo pipefail
export LC_ALL=C

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
ROUNDS=${ROUNDS:-3}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
HIT_UPSTREAM=${HIT_UPSTREAM:-fixed}
# SCENARIOS="memory token" runs only those (in that order).
read -r -a SCENARIOS <<<"${SCENARIOS:-bare nginx memory token disk shared miss direct miss1 direct1}"
TOKEN=ft-load-benchmark-token

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SUMMARY=$TARGET_DIR/load-summary.json

say() { printf '%s\n' "$*" >&2; }
die() { say "load.sh: $*"; exit 1; }

for v in DURATION CONNECTIONS ROUNDS SERVER_CPU LOAD_CPU; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
done
(( DURATION >= 1 && CONNECTIONS >= 1 && ROUNDS >= 1 )) || die "DURATION, CONNECTIONS, ROUNDS must be ≥ 1"
[[ $HIT_UPSTREAM == fixed || $HIT_UPSTREAM == mock ]] || die "HIT_UPSTREAM must be fixed or mock"
[[ $(uname -s) == Linux ]] || die "needs Linux (taskset, /proc)"
ncpu=$(getconf _NPROCESSORS_ONLN)
(( SERVER_CPU < ncpu && LOAD_CPU < ncpu && SERVER_CPU != LOAD_CPU )) \
    || die "needs two distinct cores SERVER_CPU=$SERVER_CPU LOAD_CPU=$LOAD_CPU (this machine has $ncpu)"

# ---------------------------------------------------------------------------------------------
# 1. What it needs.
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
command -v redis-server >/dev/null || missing+=(redis-server)
if (( ${#missing[@]} )); then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    sudo=()
    (( EUID == 0 )) || sudo=(sudo)
    say "installing ${missing[*]} (apt-get)…"
    "${sudo[@]}" apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

say "building (cargo build --release --bin fallthrough --example fixed_body)…"
(cd "$ROOT" && cargo build --release --bin fallthrough --example fixed_body >&2)
FT=$TARGET_DIR/release/fallthrough
FIXED=$TARGET_DIR/release/examples/fixed_body
[[ -x $FT && -x $FIXED ]] || die "built binaries not found under $TARGET_DIR/release"

per_run=$(( DURATION + 2 ))   # the run, and letting the server core settle before it
total=$(( ${#SCENARIOS[@]} * ROUNDS * per_run ))
say "load benchmark: ${#SCENARIOS[@]} scenarios × $ROUNDS rounds × ${DURATION}s" \
    "(≈ $(( total / 60 )) min $(( total % 60 )) s, plus start-up); servers on core $SERVER_CPU," \
    "wrk -t1 -c$CONNECTIONS on core $LOAD_CPU"

# ---------------------------------------------------------------------------------------------
# 2. Processes. Every one this script starts is recorded, and only those are stopped.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fallthrough-load.XXXXXX")
cd "$WORK"   # nothing of this run lands in the checkout
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 0.2
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    [[ -n ${KEEP_WORK:-} ]] && say "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD pinned to the server core, stdout/stderr to $WORK/NAME.{out,err}.
start() {
    local name=$1; shift
    env -u RUST_LOG taskset -c "$SERVER_CPU" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PIDS+=($!)
    eval "PID_$name=$!"
}

# wait_addr NAME: the host:port that NAME printed as `… listening on http://ADDR`.
wait_addr() {
    local name=$1 pid_var="PID_$1"
    for _ in $(seq 1 200); do
        local line
        line=$(grep -o 'listening on http://[^ ]*' "$WORK/$name.out" 2>/dev/null | head -1 || true)
        if [[ -n $line ]]; then echo "${line#listening on http://}"; return; fi
        kill -0 "${!pid_var}" 2>/dev/null || { cat "$WORK/$name.err" >&2; die "$name exited at start"; }
        sleep 0.1
    done
    cat "$WORK/$name.err" >&2
    die "$name did not print its address within 20 s"
}

free_port() {
    local port
    for _ in $(seq 1 100); do
        port=$(( 20000 + RANDOM % 40000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
    done
    die "no free port found"
}

# The request: a Messages request padded to ~2 KB; @@TAG@@ is replaced by a fixed word, or by a
# per-request counter for the unique (miss) bodies.
pad=$(printf 'The quick brown fox jumps over the lazy dog. %.0s' $(seq 1 42))
printf '{"model":"claude-sonnet-4-6","max_tokens":1024,"messages":[{"role":"user","content":"@@TAG@@ Summarise this passage in one sentence: %s"}]}' \
    "$pad" >"$WORK/template.json"
sed 's/@@TAG@@/fixed/' "$WORK/template.json" >"$WORK/body.json"

lua_common='
local function slurp(path)
  local f = assert(io.open(path, "rb")); local s = f:read("*a"); f:close(); return s
end
wrk.method = "POST"
wrk.path = "/v1/messages"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "sk-bench"
wrk.headers["anthropic-version"] = "2023-06-01"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "FT_RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d " ..
    "connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
'
cat >"$WORK/fixed.lua" <<EOF
$lua_common
wrk.body = slurp("$WORK/body.json")
EOF
cat >"$WORK/unique.lua" <<EOF
$lua_common
local template = slurp("$WORK/template.json")
local at = string.find(template, "@@TAG@@", 1, true)
local prefix, suffix = string.sub(template, 1, at - 1), string.sub(template, at + 7)
local tag, counter = "u", 0
function init(args) tag = args[1] or "u" end
function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, prefix .. tag .. "-" .. counter .. suffix)
end
EOF

cat >"$WORK/token.lua" <<EOF
$lua_common
wrk.headers["x-api-key"] = "$TOKEN"
wrk.body = slurp("$WORK/body.json")
EOF

# post URL [BODYFILE] [KEY]: the response headers of one POST of the benchmark body.
post() {
    curl -sS --max-time 10 -o /dev/null -D - -X POST "$1" --data-binary @"${2:-$WORK/body.json}" \
        -H 'content-type: application/json' -H "x-api-key: ${3:-sk-bench}" \
        -H 'anthropic-version: 2023-06-01' | tr -d '\r'
}
# header_of NAME: the first value of header NAME in headers on stdin (reads them all, so that
# curl never writes into a closed pipe).
header_of() {
    awk -v h="$1" 'found == "" && tolower(substr($0, 1, length(h) + 1)) == tolower(h) ":" {
        found = substr($0, length(h) + 2); sub(/^ +/, "", found) } END { print found }'
}

say "starting the servers…"
start mock "$FT" mock --listen 127.0.0.1:0 --latency 0
MOCK=$(wait_addr mock)
start fixed "$FIXED" 127.0.0.1:0
FIXED_ADDR=$(wait_addr fixed)
if [[ $HIT_UPSTREAM == fixed ]]; then HIT_ORIGIN=$FIXED_ADDR; else HIT_ORIGIN=$MOCK; fi

mkdir -p "$WORK/cache-memory" "$WORK/cache-token" "$WORK/cache-disk" "$WORK/cache-miss"
printf '[cache]\nmemory_bytes = "0"\n' >"$WORK/disk.toml"
: >"$WORK/default.toml"
printf '[access]\nrequire_token = true\n[[access.tokens]]\nname = "bench"\nsha256 = "%s"\n' \
    "$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)" >"$WORK/token.toml"
start serve_memory "$FT" serve --listen 127.0.0.1:0 --upstream "http://$HIT_ORIGIN" \
    --cache-dir "$WORK/cache-memory" --config "$WORK/default.toml"
SERVE_MEMORY=$(wait_addr serve_memory)
start serve_token env ANTHROPIC_API_KEY=sk-bench "$FT" serve --listen 127.0.0.1:0 \
    --upstream "http://$HIT_ORIGIN" --cache-dir "$WORK/cache-token" --config "$WORK/token.toml"
SERVE_TOKEN=$(wait_addr serve_token)
start serve_disk "$FT" serve --listen 127.0.0.1:0 --upstream "http://$HIT_ORIGIN" \
    --cache-dir "$WORK/cache-disk" --config "$WORK/disk.toml"
SERVE_DISK=$(wait_addr serve_disk)
REDIS_PORT=$(free_port)
start redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --dir "$WORK"
printf '[cache]\nmemory_bytes = "0"\ndisk_bytes = "0"\n[shared]\nurl = "redis://127.0.0.1:%s/0"\n' \
    "$REDIS_PORT" >"$WORK/shared.toml"
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && break; sleep 0.1; done
start serve_shared "$FT" serve --listen 127.0.0.1:0 --upstream "http://$HIT_ORIGIN" \
    --cache-dir "$WORK/cache-shared" --config "$WORK/shared.toml"
SERVE_SHARED=$(wait_addr serve_shared)
start serve_miss "$FT" serve --listen 127.0.0.1:0 --upstream "http://$MOCK" \
    --cache-dir "$WORK/cache-miss" --config "$WORK/default.toml"
SERVE_MISS=$(wait_addr serve_miss)

NGINX_PORT=$(free_port)
mkdir -p "$WORK/nginx/cache" "$WORK/nginx/logs"
nginx_user=""
(( EUID == 0 )) && nginx_user="user root;"
cat >"$WORK/nginx/nginx.conf" <<EOF
$nginx_user
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy_temp;
    fastcgi_temp_path $WORK/nginx/fastcgi_temp;
    uwsgi_temp_path $WORK/nginx/uwsgi_temp;
    scgi_temp_path $WORK/nginx/scgi_temp;
    proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=bench:16m max_size=1g
                     inactive=60m use_temp_path=off;
    upstream origin {
        server $HIT_ORIGIN;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        keepalive_requests 1000000;
        client_max_body_size 1m;
        client_body_buffer_size 64k;
        client_body_in_single_buffer on;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_cache bench;
            proxy_cache_methods POST;
            proxy_cache_key "\$request_uri|\$request_body";
            proxy_cache_valid 200 10m;
            add_header X-Cache-Status \$upstream_cache_status always;
        }
    }
}
EOF
start nginx "$NGINX" -p "$WORK/nginx" -e "$WORK/nginx/logs/error.log" -c "$WORK/nginx/nginx.conf"
NGINX_ADDR=127.0.0.1:$NGINX_PORT
for _ in $(seq 1 100); do
    curl -s --max-time 1 -o /dev/null "http://$NGINX_ADDR/" && break
    kill -0 "$PID_nginx" 2>/dev/null || { cat "$WORK/nginx.err" "$WORK/nginx/logs/error.log" >&2; die "nginx exited at start"; }
    sleep 0.1
done
# nginx's worker is the master's child: record it too, so that it is stopped even if the master
# has to be killed.
NGINX_WORKERS=()
for child in $(pgrep -P "$PID_nginx" 2>/dev/null || cat /proc/"$PID_nginx"/task/*/children 2>/dev/null); do
    PIDS+=("$child"); NGINX_WORKERS+=("$child")
done
(( ${#NGINX_WORKERS[@]} )) || NGINX_WORKERS=("$PID_nginx")

# Prewarm each cache with one request and check that the next one is a hit.
prewarm() { # NAME URL HEADER WANT [KEY]
    local name=$1 url=$2 header=$3 want=$4 key=${5:-sk-bench} got=""
    post "$url" "$WORK/body.json" "$key" >/dev/null
    for _ in $(seq 1 50); do
        got=$(post "$url" "$WORK/body.json" "$key" | header_of "$header")
        [[ $got == "$want" ]] && break
        sleep 0.1
    done
    [[ $got == "$want" ]] || die "$name: the second request answered $header: '${got:-none}', not $want"
    say "  $name: $header: $got"
}
prewarm nginx "http://$NGINX_ADDR/v1/messages" x-cache-status HIT
prewarm memory "http://$SERVE_MEMORY/v1/messages" x-fallthrough-cache memory
prewarm token "http://$SERVE_TOKEN/v1/messages" x-fallthrough-cache memory "$TOKEN"
refused=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' -X POST --data-binary @"$WORK/body.json" \
    -H 'content-type: application/json' -H 'x-api-key: sk-bench' "http://$SERVE_TOKEN/v1/messages")
[[ $refused == 401 ]] || die "token: a caller without the token got $refused, not 401"
prewarm disk "http://$SERVE_DISK/v1/messages" x-fallthrough-cache disk
prewarm shared "http://$SERVE_SHARED/v1/messages" x-fallthrough-cache shared
sed 's/@@TAG@@/check/' "$WORK/template.json" >"$WORK/check.json"
got=$(post "http://$SERVE_MISS/v1/messages" "$WORK/check.json" | header_of x-fallthrough-cache)
[[ $got == miss ]] || die "miss: a new body answered x-fallthrough-cache: '${got:-none}', not miss"
say "  miss: x-fallthrough-cache: $got"
bare_len=$(curl -s --max-time 5 -X POST --data-binary @"$WORK/body.json" "http://$FIXED_ADDR/v1/messages" | wc -c)
hit_len=$(curl -s --max-time 5 -X POST --data-binary @"$WORK/body.json" -H 'x-api-key: sk-bench' \
    -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' \
    "http://$SERVE_MEMORY/v1/messages" | wc -c)
say "  request body $(wc -c <"$WORK/body.json") B; bare answer $bare_len B; cached answer $hit_len B"

# ---------------------------------------------------------------------------------------------
# 3. The runs.

# Busy and total jiffies of the two cores, from /proc/stat.
cpu_snap() {
    awk -v a="cpu$SERVER_CPU" -v b="cpu$LOAD_CPU" '
        $1 == a || $1 == b { t = 0; for (i = 2; i <= NF; i++) t += $i; busy[$1] = t - $5 - $6; tot[$1] = t }
        END { print busy[a], tot[a], busy[b], tot[b] }' /proc/stat
}
pct() { awk -v b0="$1" -v t0="$2" -v b1="$3" -v t1="$4" 'BEGIN { d = t1 - t0; printf "%.0f", (d > 0 ? 100 * (b1 - b0) / d : 0) }'; }

# CPU time (ticks) used so far by the given processes, from /proc/PID/stat.
proc_ticks() {
    local pid sum=0 t
    for pid in "$@"; do
        t=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
        sum=$(( sum + t ))
    done
    echo "$sum"
}
CLK_TCK=$(getconf CLK_TCK)

# Waits (at most 10 s) until this script's servers are nearly idle (under 10% of a core): sled
# flushing or nginx writing its cache after one run must not be billed to the next. Other
# tenants of the machine are not waited for; the core% columns show them.
settle() {
    local t0 t1
    for _ in $(seq 1 20); do
        t0=$(proc_ticks "${PIDS[@]}"); sleep 0.5; t1=$(proc_ticks "${PIDS[@]}")
        (( (t1 - t0) * 100 < CLK_TCK * 5 )) && return   # < 10% of a core over 0.5 s
    done
    say "  (the servers were still busy after 10 s: $(( (t1 - t0) * 200 / CLK_TCK ))% of a core; running anyway)"
}

RESULTS=$WORK/results.txt
: >"$RESULTS"
run() { # SCENARIO ROUND URL SCRIPT CONNECTIONS SERVER_PID...
    local name=$1 round=$2 url=$3 script=$4 conns=$5 line s0 s1 p0 p1 w0 w1
    shift 5
    settle
    s0=($(cpu_snap)); p0=$(proc_ticks "$@"); w0=$(date +%s%N)
    # `time` gives wrk's own CPU (user and system), told apart from whatever else runs on its core.
    { TIMEFORMAT='FT_TIME %U %S'; time timeout $(( DURATION + 30 )) taskset -c "$LOAD_CPU" \
        wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 5s -s "$WORK/$script" "$url" -- "r$round-$name-$$" \
        >"$WORK/wrk.out" 2>&1 || true; } 2>"$WORK/wrk.time"
    s1=($(cpu_snap)); p1=$(proc_ticks "$@"); w1=$(date +%s%N)
    line=$(grep '^FT_RESULT' "$WORK/wrk.out" || true)
    [[ -n $line ]] || { cat "$WORK/wrk.out" >&2; die "$name: wrk printed no result"; }
    local core0 core1 srv wrk_cpu
    core0=$(pct "${s0[0]}" "${s0[1]}" "${s1[0]}" "${s1[1]}")
    core1=$(pct "${s0[2]}" "${s0[3]}" "${s1[2]}" "${s1[3]}")
    srv=$(awk -v t="$(( p1 - p0 ))" -v hz="$CLK_TCK" -v ns="$(( w1 - w0 ))" 'BEGIN { printf "%.0f", 100 * t / hz / (ns / 1e9) }')
    wrk_cpu=$(awk -v ns="$(( w1 - w0 ))" '$1 == "FT_TIME" { printf "%.0f", 100 * ($2 + $3) / (ns / 1e9) }' "$WORK/wrk.time")
    # scenario round rps p50_ms p99_ms errors core_server% core_load% server_procs% wrk%
    awk -v n="$name" -v r="$round" -v c0="$core0" -v c1="$core1" -v sp="$srv" -v wp="${wrk_cpu:-0}" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        err = v["connect"] + v["read"] + v["write"] + v["status"] + v["timeout"]
        printf "%s %d %.1f %.3f %.3f %d %d %d %d %d\n", n, r, v["requests"] / (v["duration_us"] / 1e6),
               v["p50_us"] / 1000, v["p99_us"] / 1000, err, c0, c1, sp, wp
    }' <<<"$line" | tee -a "$RESULTS" | awk '{ printf "  round %d %-8s %8.0f req/s  p50 %6.3f ms  p99 %6.3f ms  err %d  core%s %3d%% (server %3d%%)  core%s %3d%% (wrk %3d%%)\n",
        $2, $1, $3, $4, $5, $6, "'"$SERVER_CPU"'", $7, $9, "'"$LOAD_CPU"'", $8, $10 }' >&2
}

started=$(date +%s)
for round in $(seq 1 "$ROUNDS"); do
    for s in "${SCENARIOS[@]}"; do
        case $s in
            bare)    run "$s" "$round" "http://$FIXED_ADDR/v1/messages" fixed.lua "$CONNECTIONS" "$PID_fixed" ;;
            nginx)   run "$s" "$round" "http://$NGINX_ADDR/v1/messages" fixed.lua "$CONNECTIONS" "${NGINX_WORKERS[@]}" ;;
            memory)  run "$s" "$round" "http://$SERVE_MEMORY/v1/messages" fixed.lua "$CONNECTIONS" "$PID_serve_memory" ;;
            token)   run "$s" "$round" "http://$SERVE_TOKEN/v1/messages" token.lua "$CONNECTIONS" "$PID_serve_token" ;;
            disk)    run "$s" "$round" "http://$SERVE_DISK/v1/messages" fixed.lua "$CONNECTIONS" "$PID_serve_disk" ;;
            shared)  run "$s" "$round" "http://$SERVE_SHARED/v1/messages" fixed.lua "$CONNECTIONS" "$PID_serve_shared" "$PID_redis" ;;
            miss)    run "$s" "$round" "http://$SERVE_MISS/v1/messages" unique.lua "$CONNECTIONS" "$PID_serve_miss" "$PID_mock" ;;
            direct)  run "$s" "$round" "http://$MOCK/v1/messages" unique.lua "$CONNECTIONS" "$PID_mock" ;;
            miss1)   run "$s" "$round" "http://$SERVE_MISS/v1/messages" unique.lua 1 "$PID_serve_miss" "$PID_mock" ;;
            direct1) run "$s" "$round" "http://$MOCK/v1/messages" unique.lua 1 "$PID_mock" ;;
        esac
    done
done
elapsed=$(( $(date +%s) - started ))

# The hits must still have been hits at the end.
for check in "nginx http://$NGINX_ADDR x-cache-status HIT" \
             "memory http://$SERVE_MEMORY x-fallthrough-cache memory" \
             "disk http://$SERVE_DISK x-fallthrough-cache disk" \
             "shared http://$SERVE_SHARED x-fallthrough-cache shared"; do
    read -r name url header want <<<"$check"
    got=$(post "$url/v1/messages" | header_of "$header")
    [[ $got == "$want" ]] || say "WARNING: after the runs, $name answered $header: '$got', not $want"
done

# ---------------------------------------------------------------------------------------------
# 4. Memory of `serve`.
proc_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
tier_bytes() { # ADDR TIER: fallthrough_cache_bytes{tier=TIER}
    curl -s --max-time 5 "http://$1/metrics" |
        awk -v t="tier=\"$2\"" 'index($0, "fallthrough_cache_bytes") == 1 && index($0, t) { print $NF; exit }'
}
tier_entries() {
    curl -s --max-time 5 "http://$1/metrics" |
        awk -v t="tier=\"$2\"" 'index($0, "fallthrough_cache_entries") == 1 && index($0, t) { print $NF; exit }'
}
BOUND_MIB=256   # [cache] memory_bytes default; the configs above do not change it for these two
mem_report=()
for which in memory miss; do
    pid_var="PID_serve_$which"; addr_var="SERVE_${which^^}"
    rss=$(proc_kib "${!pid_var}" VmRSS); hwm=$(proc_kib "${!pid_var}" VmHWM)
    mb=$(tier_bytes "${!addr_var}" memory); me=$(tier_entries "${!addr_var}" memory)
    mem_report+=("$which ${rss:-0} ${hwm:-0} ${mb:-0} ${me:-0}")
done

# ---------------------------------------------------------------------------------------------
# 5. The table, the ratios, the summary.
# stats SCENARIO COLUMN: "median min max" of a column (3 rps, 4 p50, 5 p99, 6 errors, 7/8 cpu).
stats() {
    awk -v s="$1" -v c="$2" '$1 == s { print $c }' "$RESULTS" | sort -g | awk '
        { v[NR] = $1 } END {
            if (NR == 0) { print "0 0 0"; exit }
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            print m, v[1], v[NR] }'
}
med() { stats "$1" "$2" | cut -d' ' -f1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
diff_ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

label() {
    case $1 in
        bare) echo "bare fixed-body server" ;;   nginx) echo "nginx proxy_cache hits" ;;
        memory) echo "fallthrough memory hits" ;; disk) echo "fallthrough disk hits" ;;
        shared) echo "fallthrough shared hits" ;;
        token) echo "memory hits, access token" ;;
        miss) echo "fallthrough misses" ;;       direct) echo "mock direct (unique)" ;;
        miss1) echo "fallthrough misses" ;;      direct1) echo "mock direct (unique)" ;;
    esac
}
conns_of() { case $1 in miss1|direct1) echo 1 ;; *) echo "$CONNECTIONS" ;; esac; }

r_nginx=$(ratio "$(med memory 3)" "$(med nginx 3)")
r_bare=$(ratio "$(med memory 3)" "$(med bare 3)")
r_disk=$(ratio "$(med disk 3)" "$(med memory 3)")
r_token=$(ratio "$(med token 3)" "$(med memory 3)")
o1_p50=$(diff_ms "$(med miss1 4)" "$(med direct1 4)")
o1_p99=$(diff_ms "$(med miss1 5)" "$(med direct1 5)")
o32_p50=$(diff_ms "$(med miss 4)" "$(med direct 4)")
mark() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN { ok = (op == ">=") ? v >= t : v <= t; print ok ? "met" : "MISSED" }'; }

{
    echo
    printf 'fallthrough load benchmark — %s rounds × %ss, wrk -t1 on core %s, servers on core %s, %s\n' \
        "$ROUNDS" "$DURATION" "$LOAD_CPU" "$SERVER_CPU" "$(date -u +%Y-%m-%dT%H:%MZ)"
    printf '%-24s %4s %7s %15s %7s %7s %5s %5s %5s %5s %3s\n' scenario conn 'req/s' '(min–max)' 'p50 ms' 'p99 ms' \
        "srv%" "core$SERVER_CPU" "wrk%" "core$LOAD_CPU" err
    for s in "${SCENARIOS[@]}"; do
        read -r rm rlo rhi <<<"$(stats "$s" 3)"
        printf '%-24s %4s %7.0f %15s %7.3f %7.3f %4.0f%% %4.0f%% %4.0f%% %4.0f%% %3.0f\n' "$(label "$s")" "$(conns_of "$s")" \
            "$rm" "($(printf '%.0f–%.0f' "$rlo" "$rhi"))" "$(med "$s" 4)" "$(med "$s" 5)" \
            "$(med "$s" 9)" "$(med "$s" 7)" "$(med "$s" 10)" "$(med "$s" 8)" "$(stats "$s" 6 | cut -d' ' -f3)"
    done
    echo "(srv% = CPU of the server process(es) under test, % of one core; core% = the whole core's busy"
    echo " share, other tenants included; wrk% = wrk's own CPU. Medians over rounds; err = the most in a run.)"
    echo
    printf '%-44s %8s   target %-10s %s\n' "memory hits / nginx hits" "${r_nginx}×" "≥ 1.5×" "$(mark "$r_nginx" 1.5 '>=')"
    printf '%-44s %8s   target %-10s %s\n' "memory hits / bare server" "${r_bare}×" "≥ 0.6×" "$(mark "$r_bare" 0.6 '>=')"
    printf '%-44s %8s\n' "disk hits / memory hits" "${r_disk}×"
    printf '%-44s %8s   target %-10s %s\n' "token hits / memory hits" "${r_token}×" "≥ 0.95×" "$(mark "$r_token" 0.95 '>=')"
    printf '%-44s %8s   target %-10s %s\n' "miss overhead, p50, 1 conn (miss1 − direct1)" "$o1_p50 ms" "≤ 0.3 ms" "$(mark "$o1_p50" 0.3 '<=')"
    printf '%-44s %8s\n' "miss overhead, p99, 1 conn" "$o1_p99 ms"
    printf '%-44s %8s\n' "miss p50 − direct p50 at $CONNECTIONS conns (queueing)" "$o32_p50 ms"
    for m in "${mem_report[@]}"; do
        read -r which rss hwm mb me <<<"$m"
        printf 'serve (%-6s) RSS %6.1f MiB, peak %6.1f MiB; memory tier %6.1f MiB in %s entries (bound %s MiB); RSS − tier %5.1f MiB (target ≤ 60)\n' \
            "$which" "$(awk -v k="$rss" 'BEGIN{print k/1024}')" "$(awk -v k="$hwm" 'BEGIN{print k/1024}')" \
            "$(awk -v b="$mb" 'BEGIN{print b/1048576}')" "$me" "$BOUND_MIB" \
            "$(awk -v k="$rss" -v b="$mb" 'BEGIN{print k/1024 - b/1048576}')"
    done
    printf 'runs took %ss; summary in %s\n' "$elapsed" "$SUMMARY"
} | tee "$WORK/table.txt"

# Machine-readable summary.
mkdir -p "$TARGET_DIR"
{
    printf '{\n  "duration_s": %s, "connections": %s, "rounds": %s, "server_cpu": %s, "load_cpu": %s,\n' \
        "$DURATION" "$CONNECTIONS" "$ROUNDS" "$SERVER_CPU" "$LOAD_CPU"
    printf '  "hit_upstream": "%s", "request_bytes": %s, "hit_answer_bytes": %s,\n' \
        "$HIT_UPSTREAM" "$(wc -c <"$WORK/body.json")" "$hit_len"
    printf '  "scenarios": {\n'
    first=1
    for s in "${SCENARIOS[@]}"; do
        (( first )) || printf ',\n'; first=0
        read -r rm rlo rhi <<<"$(stats "$s" 3)"
        runs=$(awk -v s="$s" '$1 == s { printf "%s{\"rps\": %s, \"p50_ms\": %s, \"p99_ms\": %s, \"errors\": %s, \"core_server_pct\": %s, \"core_load_pct\": %s, \"server_cpu_pct\": %s, \"wrk_cpu_pct\": %s}", (n++ ? ", " : ""), $3, $4, $5, $6, $7, $8, $9, $10 }' "$RESULTS")
        printf '    "%s": {"connections": %s, "rps_median": %s, "rps_min": %s, "rps_max": %s, "p50_ms_median": %s, "p99_ms_median": %s, "runs": [%s]}' \
            "$s" "$(conns_of "$s")" "$rm" "$rlo" "$rhi" "$(med "$s" 4)" "$(med "$s" 5)" "$runs"
    done
    printf '\n  },\n  "ratios": {"memory_over_nginx": %s, "memory_over_bare": %s, "disk_over_memory": %s, "token_over_memory": %s},\n' \
        "$r_nginx" "$r_bare" "$r_disk" "$r_token"
    printf '  "miss_overhead_ms": {"p50_1conn": %s, "p99_1conn": %s, "p50_%sconn": %s},\n' \
        "$o1_p50" "$o1_p99" "$CONNECTIONS" "$o32_p50"
    printf '  "serve_memory": {\n'
    first=1
    for m in "${mem_report[@]}"; do
        read -r which rss hwm mb me <<<"$m"
        (( first )) || printf ',\n'; first=0
        printf '    "%s": {"vmrss_kib": %s, "vmhwm_kib": %s, "memory_tier_bytes": %s, "memory_tier_entries": %s, "memory_bound_mib": %s}' \
            "$which" "$rss" "$hwm" "$mb" "$me" "$BOUND_MIB"
    done
    printf '\n  }\n}\n'
} >"$SUMMARY"

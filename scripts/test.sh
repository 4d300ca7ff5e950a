#!/usr/bin/env bash
# The test command: provisions what the tests need when it is missing, then runs every test.
#
#   bash scripts/test.sh            # all tests (what .ci/run calls)
#   bash scripts/test.sh --test sdk # extra arguments go to `cargo test --all-targets`
#
# Provisions (each only when missing, so a second run starts the tests at once):
# - .venv with the official `anthropic` Python SDK, pinned below (tests/sdk.rs drives it);
# - tests/ts/node_modules with the official TypeScript SDK, pinned in tests/ts/package.json
#   and package-lock.json (tests/ts_sdk.rs drives it with node);
# - redis-server from Debian's packages (tests/shared.rs starts its own on a free port), when
#   neither it nor FALLTHROUGH_REDIS_SERVER is there; installing needs root (CI runs as root).
# A test whose dependency cannot be provisioned fails with the reason; none is skipped.
set -euo pipefail

cd "$(dirname "$0")/.."

# The official Python SDK that tests/sdk.rs drives against the proxy. Pinned: bump on purpose.
ANTHROPIC_SDK_VERSION="2.12.0"

say() {
    printf '==> %s\n' "$*" >&2
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# The venv's Python, with anthropic==$ANTHROPIC_SDK_VERSION importable.
provision_python() {
    local py=.venv/bin/python
    if [ -x "$py" ] && "$py" -c "import anthropic, sys; sys.exit(anthropic.__version__ != '$ANTHROPIC_SDK_VERSION')" 2>/dev/null; then
        return
    fi
    command -v python3 >/dev/null || die "python3 is not installed; tests/sdk.rs needs it (Debian: apt-get install python3 python3-venv)"
    if [ ! -x "$py" ]; then
        say "creating .venv"
        python3 -m venv .venv || die "python3 -m venv failed; install the venv module (Debian: apt-get install python3-venv) and run again"
    fi
    say "installing anthropic==$ANTHROPIC_SDK_VERSION into .venv"
    "$py" -m pip install --quiet --disable-pip-version-check "anthropic==$ANTHROPIC_SDK_VERSION" \
        || die "pip could not install anthropic==$ANTHROPIC_SDK_VERSION (is PyPI reachable?)"
}

# The TypeScript SDK at the version tests/ts/package-lock.json pins.
provision_typescript() {
    command -v node >/dev/null || die "node is not installed; tests/ts_sdk.rs needs Node.js 18+ (Debian: apt-get install nodejs npm)"
    local want have
    want=$(node -p 'require("./tests/ts/package.json").dependencies["@anthropic-ai/sdk"]')
    have=$(node -p 'try { require("./tests/ts/node_modules/@anthropic-ai/sdk/package.json").version } catch { "" }')
    if [ "$have" = "$want" ]; then
        return
    fi
    command -v npm >/dev/null || die "npm is not installed; tests/ts_sdk.rs needs it to install @anthropic-ai/sdk (Debian: apt-get install npm)"
    say "installing @anthropic-ai/sdk@$want into tests/ts/node_modules"
    npm ci --prefix tests/ts --no-audit --no-fund --loglevel=error \
        || die "npm could not install @anthropic-ai/sdk@$want (is the npm registry reachable?)"
}

# A Redis server binary for tests/shared.rs, and openssl for its TLS test's certificates.
provision_redis() {
    local missing=()
    if [ -z "${FALLTHROUGH_REDIS_SERVER:-}" ] && ! command -v redis-server >/dev/null; then
        missing+=(redis-server)
    fi
    command -v openssl >/dev/null || missing+=(openssl)
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" = 0 ] || die "${missing[*]} not installed and installing needs root; run: sudo apt-get install ${missing[*]} (or set FALLTHROUGH_REDIS_SERVER to a redis-server binary)"
    command -v apt-get >/dev/null || die "${missing[*]} not installed and there is no apt-get; install Redis 6+ (or Valkey, with FALLTHROUGH_REDIS_SERVER naming its server binary) and openssl"
    say "installing ${missing[*]} from Debian's packages"
    apt-get update -qq || die "apt-get update failed (are Debian's package mirrors reachable?)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get could not install ${missing[*]}"
}

provision_python
provision_typescript
provision_redis
export FALLTHROUGH_NODE="$(command -v node)"
export FALLTHROUGH_PYTHON="$PWD/.venv/bin/python"
say "python: $("$FALLTHROUGH_PYTHON" -c 'import anthropic; print("anthropic", anthropic.__version__)')"
say "redis: $("${FALLTHROUGH_REDIS_SERVER:-redis-server}" --version)"

say "cargo test --all-targets $*"
exec cargo test --all-targets "$@"

#!/usr/bin/env bash
# The test command: provisions what the tests need when it is missing, then runs every test.
#
#   bash scripts/test.sh            # all tests (what .ci/run calls)
#   bash scripts/test.sh --test sdk # extra arguments go to `cargo test --all-targets`
#
# Provisions (each only when missing, so a second run starts the tests at once):
# - .venv with the official `anthropic` Python SDK, pinned below (tests/sdk.rs drives it).
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

provision_python
export FALLTHROUGH_PYTHON="$PWD/.venv/bin/python"
say "python: $("$FALLTHROUGH_PYTHON" -c 'import anthropic; print("anthropic", anthropic.__version__)')"

say "cargo test --all-targets $*"
exec cargo test --all-targets "$@"

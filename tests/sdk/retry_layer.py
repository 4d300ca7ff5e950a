"""One failing request through the official `anthropic` Python SDK at its default retries.

Run by `tests/sdk.rs` with `ANTHROPIC_BASE_URL` set either straight at the mock or at the
proxy in front of it. The request must fail; prints one JSON line `RESULT {...}` with the
status the SDK raised and the proxy's `x-fallthrough-attempts` (null straight at the mock),
so the Rust side can compare the upstream calls both ways.
"""

import json
import sys
import warnings

import anthropic

warnings.filterwarnings("ignore", category=DeprecationWarning)

MODEL = sys.argv[1]

# The SDK's defaults: max_retries=2, its own backoff, retry-after and x-should-retry obeyed.
client = anthropic.Anthropic(timeout=60.0)
try:
    client.messages.create(
        model=MODEL,
        max_tokens=32,
        messages=[{"role": "user", "content": "one retry layer"}],
    )
except anthropic.APIStatusError as e:
    print("RESULT " + json.dumps({
        "status": e.status_code,
        "attempts": e.response.headers.get("x-fallthrough-attempts"),
        "should_retry": e.response.headers.get("x-should-retry"),
    }))
    sys.exit(0)
print("the request did not fail", file=sys.stderr)
sys.exit(1)

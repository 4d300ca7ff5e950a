"""The official `anthropic` Python SDK against `fallthrough`'s proxy in front of the mock.

Run by `tests/sdk.rs`, which starts the mock and the proxy and sets `ANTHROPIC_BASE_URL`
(the proxy) and `ANTHROPIC_API_KEY`. Plain asserts; exits non-zero on the first failure.
On success, prints one JSON line `RESULT {...}` that the Rust side reads: which prompts
were sent how many times, so it can check the upstream calls in the mock's counters.
"""

import json
import sys
import traceback
import warnings

import anthropic

MODEL = "claude-sonnet-4-6"
OVERLOADED = "claude-overloaded"  # the mock answers 529 for this model, always

# The SDK warns about deprecated model names; the mock's names are just names.
warnings.filterwarnings("ignore", category=DeprecationWarning)

# SDK retries off: the proxy retries; a test of the SDK's own retries would be slow.
client = anthropic.Anthropic(max_retries=0, timeout=30.0)


def request(prompt, **extra):
    body = {
        "model": MODEL,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": prompt}],
    }
    body.update(extra)
    return body


TOOLS = [
    {
        "name": "search",
        "description": "Searches the index.",
        "input_schema": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    }
]

NO_CACHE = {"cache-control": "no-cache"}
# What a `no-cache` fetch is labelled: it went upstream, past the lookup.
FETCHED = ("miss", "bypass")


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


def dump(message):
    """`model_dump()` of a Message; a streamed `ParsedMessage` dumps to the same keys."""
    return message.model_dump()


def plain_create(body, headers=None):
    """A plain call through `with_raw_response`: (Message, x-fallthrough-cache)."""
    raw = client.messages.with_raw_response.create(**body, extra_headers=headers or {})
    message = raw.parse()
    assert isinstance(message, anthropic.types.Message), type(message)
    return message, raw.headers.get("x-fallthrough-cache")


def streamed(body, headers=None):
    """A streamed call the SDK assembles: (final message, text from text_stream, cache header)."""
    with client.messages.stream(**body, extra_headers=headers or {}) as s:
        cache = s.response.headers.get("x-fallthrough-cache")
        content_type = s.response.headers.get("content-type", "")
        assert content_type.startswith("text/event-stream"), content_type
        text = "".join(s.text_stream)
        final = s.get_final_message()
    return final, text, cache


def test_plain():
    body = request("sdk: plain call")
    message, cache = plain_create(body)
    assert message.model == MODEL, message.model
    assert message.role == "assistant"
    assert message.stop_reason == "end_turn", message.stop_reason
    assert text_of(message), "no text in the answer"
    assert cache == "miss", cache

    again, cache = plain_create(body)
    assert cache == "memory", cache
    assert dump(again) == dump(message)

    # create() without the raw wrapper, as most callers use it.
    third = client.messages.create(**body)
    assert dump(third) == dump(message)


def test_stream_miss_then_hit():
    body = request("sdk: streamed call")
    final, text, cache = streamed(body)
    assert cache == "miss", cache
    assert final.model == MODEL, final.model
    assert final.stop_reason == "end_turn", final.stop_reason
    assert text and text == text_of(final), (text, text_of(final))

    # The same streamed call again: a hit, replayed as an event stream, the same Message.
    final2, text2, cache2 = streamed(body)
    assert cache2 == "memory", cache2
    assert dump(final2) == dump(final), (dump(final2), dump(final))
    assert text2 == text

    # And the plain call of the same request: the same entry, the same Message.
    plain, cache3 = plain_create(body)
    assert cache3 == "memory", cache3
    assert dump(plain) == dump(final)


def test_stream_equals_plain():
    # Plain first (a miss: the upstream's own JSON), then streamed (a hit replayed).
    body = request("sdk: plain first, then streamed")
    plain, cache = plain_create(body)
    assert cache == "miss", cache
    final, text, cache = streamed(body)
    assert cache == "memory", cache
    assert dump(final) == dump(plain), (dump(final), dump(plain))
    assert text == text_of(plain)

    # And a streamed miss (relayed upstream events) against the upstream's plain answer,
    # fetched past the cache with `cache-control: no-cache`.
    body = request("sdk: streamed miss against a plain no-cache fetch")
    final, _, cache = streamed(body)
    assert cache == "miss", cache
    plain, cache = plain_create(body, NO_CACHE)
    assert cache in FETCHED, cache
    assert dump(final) == dump(plain), (dump(final), dump(plain))


def test_tools_stream():
    body = request("sdk: tools", tools=TOOLS)
    final, _, cache = streamed(body)
    assert cache == "miss", cache
    assert final.stop_reason == "tool_use", final.stop_reason
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) == 1, final.content
    assert uses[0].name == "search"
    assert isinstance(uses[0].input, dict) and uses[0].input, uses[0].input

    plain, cache = plain_create(body, NO_CACHE)
    assert cache in FETCHED, cache
    plain_uses = [b for b in plain.content if b.type == "tool_use"]
    assert len(plain_uses) == 1, plain.content
    assert uses[0].input == plain_uses[0].input, (uses[0].input, plain_uses[0].input)
    assert uses[0].id == plain_uses[0].id
    assert dump(final) == dump(plain), (dump(final), dump(plain))

    # Replayed from the cache: the same tool_use input again.
    again, _, cache = streamed(body)
    assert cache == "memory", cache
    assert dump(again) == dump(final)


def test_overloaded():
    body = request("sdk: overloaded", model=OVERLOADED)
    try:
        client.messages.create(**body)
    except anthropic.APIStatusError as e:
        error = e
    else:
        raise AssertionError("a model the mock always overloads answered")
    assert error.status_code == 529, error.status_code
    overloaded = getattr(anthropic, "OverloadedError", None)
    if overloaded is not None:
        assert isinstance(error, overloaded), type(error)
    else:
        assert isinstance(error, anthropic.InternalServerError), type(error)
    retry_after = error.response.headers.get("retry-after")
    assert retry_after is not None, dict(error.response.headers)
    assert int(retry_after) >= 1, retry_after
    assert error.body["error"]["type"] == "overloaded_error", error.body

    # Streamed: the error comes before the first byte, so the SDK raises it too.
    try:
        with client.messages.stream(**request("sdk: overloaded stream", model=OVERLOADED)) as s:
            s.get_final_message()
    except anthropic.APIStatusError as e:
        assert e.status_code == 529, e.status_code
    else:
        raise AssertionError("a streamed call to an overloaded model answered")


def test_count_tokens():
    body = {"model": MODEL, "messages": [{"role": "user", "content": "sdk: count my tokens"}]}
    raw = client.messages.with_raw_response.count_tokens(**body)
    counted = raw.parse()
    assert counted.input_tokens > 0, counted
    assert raw.headers.get("x-fallthrough-cache") == "miss", raw.headers.get("x-fallthrough-cache")
    raw = client.messages.with_raw_response.count_tokens(**body)
    assert raw.parse().input_tokens == counted.input_tokens
    assert raw.headers.get("x-fallthrough-cache") == "memory", raw.headers.get("x-fallthrough-cache")


def test_models_pass_through():
    raw = client.models.with_raw_response.list()
    assert raw.headers.get("x-fallthrough-cache") == "bypass", raw.headers.get("x-fallthrough-cache")
    ids = [m.id for m in raw.parse().data]
    assert MODEL in ids, ids
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL


TESTS = [
    test_plain,
    test_stream_miss_then_hit,
    test_stream_equals_plain,
    test_tools_stream,
    test_overloaded,
    test_count_tokens,
    test_models_pass_through,
]


def main():
    print(f"anthropic {anthropic.__version__}, python {sys.version.split()[0]}")
    failed = []
    for test in TESTS:
        try:
            test()
        except Exception:  # noqa: BLE001 - report every test, then fail
            failed.append(test.__name__)
            print(f"FAIL {test.__name__}")
            traceback.print_exc()
        else:
            print(f"ok   {test.__name__}")
    if failed:
        print(f"{len(failed)} of {len(TESTS)} failed: {', '.join(failed)}")
        return 1
    print("RESULT " + json.dumps({"passed": len(TESTS)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

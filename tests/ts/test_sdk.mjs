// The official TypeScript SDK (@anthropic-ai/sdk, pinned in package.json) through the proxy.
//
// Run by tests/ts_sdk.rs with MOCK_PROXY (the proxy in front of the mock) and FIXED_PROXY (the
// proxy in front of an upstream that always sends one refusal with a tool call, see
// tests/support/proxy.rs FAITHFUL). The SDK runs at its defaults: max_retries 2. Throws on the
// first failed check; on success prints one line `RESULT {...}` for the Rust side.
import Anthropic from "@anthropic-ai/sdk";

const MODEL = "claude-sonnet-4-6";
const OVERLOADED = "claude-overloaded";

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

// What came over the wire: the SDK's stream helper adds `parsed_output` of its own.
const wire = (message) =>
  JSON.stringify(message, (key, value) => (key === "parsed_output" ? undefined : value));

const request = (prompt) => ({
  model: MODEL,
  max_tokens: 64,
  messages: [{ role: "user", content: prompt }],
});

async function plainAndStreamedAreOne(client) {
  const { data: plain, response } = await client.messages
    .create(request("ts plain first"))
    .withResponse();
  check(response.headers.get("x-fallthrough-cache") === "miss", "a plain miss");
  check((response.headers.get("request-id") ?? "").startsWith("req_"), "request-id on a miss");
  const streamed = await client.messages.stream(request("ts plain first")).finalMessage();
  check(
    wire(streamed) === wire(plain),
    `a streamed hit equals the plain answer:\n${wire(streamed)}\n${wire(plain)}`,
  );

  const live = await client.messages.stream(request("ts streamed first")).finalMessage();
  const { data: hit, response: hitResponse } = await client.messages
    .create(request("ts streamed first"))
    .withResponse();
  check(hitResponse.headers.get("x-fallthrough-cache") === "memory", "a plain hit of a stream");
  check(wire(hit) === wire(live), "a plain hit equals the streamed miss");
}

async function faithfulReplay(client) {
  const plain = await client.messages.create(request("faithful"));
  const streamed = await client.messages.stream(request("faithful")).finalMessage();
  check(
    wire(streamed) === wire(plain),
    `the replay carries every field in order:\n${wire(streamed)}\n${wire(plain)}`,
  );
  check(streamed.stop_details?.category === "cyber", "stop_details survives the replay");
  const tool = streamed.content.find((b) => b.type === "tool_use");
  check(Object.keys(tool.input).join(",") === "zeta,alpha", "tool input keeps its key order");
}

async function errorStatus(promise) {
  try {
    await promise;
  } catch (e) {
    if (e instanceof Anthropic.APIError) return { status: e.status, headers: e.headers };
    throw e;
  }
  throw new Error("the request did not fail");
}

async function errors(client) {
  const overloaded = await errorStatus(
    client.messages.create({ ...request("busy"), model: OVERLOADED }),
  );
  check(overloaded.status === 529, `529 for the overloaded model, got ${overloaded.status}`);
  const attempts = Number(overloaded.headers.get("x-fallthrough-attempts"));
  check(overloaded.headers.get("x-should-retry") === "false", "x-should-retry: false");
  const invalid = await errorStatus(
    client.messages.create({ max_tokens: 8, messages: [] }),
  );
  check(invalid.status === 400, `400 for a body without model, got ${invalid.status}`);
  return attempts;
}

const mock = new Anthropic({ baseURL: process.env.MOCK_PROXY, apiKey: "sk-test" });
const fixed = new Anthropic({ baseURL: process.env.FIXED_PROXY, apiKey: "sk-test" });
await plainAndStreamedAreOne(mock);
await faithfulReplay(fixed);
const overloadedAttempts = await errors(mock);
console.log("RESULT " + JSON.stringify({ overloadedAttempts }));

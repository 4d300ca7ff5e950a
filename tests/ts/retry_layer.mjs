// One failing request through the official TypeScript SDK at its default retries (2), with
// ANTHROPIC_BASE_URL straight at the mock or at the proxy in front of it. Prints one line
// `RESULT {...}`: the status the SDK raised, the proxy's x-fallthrough-attempts (null straight),
// and x-should-retry, for tests/ts_sdk.rs to compare the upstream calls both ways.
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({ baseURL: process.env.ANTHROPIC_BASE_URL, apiKey: "sk-test" });
try {
  await client.messages.create({
    model: process.argv[2],
    max_tokens: 32,
    messages: [{ role: "user", content: "one retry layer" }],
  });
} catch (e) {
  if (!(e instanceof Anthropic.APIError)) throw e;
  console.log(
    "RESULT " +
      JSON.stringify({
        status: e.status,
        attempts: e.headers?.get("x-fallthrough-attempts") ?? null,
        should_retry: e.headers?.get("x-should-retry") ?? null,
      }),
  );
  process.exit(0);
}
console.error("the request did not fail");
process.exit(1);

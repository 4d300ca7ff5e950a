//! Deterministic answers: a Message that is a pure function of the request body.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::key::canonical_body;

pub(super) const WORDS: &[&str] = &[
    "the",
    "cache",
    "answers",
    "quickly",
    "while",
    "upstream",
    "models",
    "rest",
    "a",
    "stream",
    "of",
    "tokens",
    "flows",
    "through",
    "quiet",
    "servers",
    "and",
    "every",
    "request",
    "finds",
    "its",
    "way",
    "home",
    "under",
    "bright",
    "autumn",
    "skies",
    "with",
    "patient",
    "retries",
    "gentle",
    "backoff",
    "keeps",
    "traffic",
    "calm",
    "when",
    "load",
    "rises",
    "fallback",
    "paths",
    "stay",
    "open",
    "for",
    "careful",
    "clients",
    "who",
    "measure",
    "latency",
    "in",
    "small",
    "steps",
    "rivers",
    "carry",
    "old",
    "answers",
    "to",
    "new",
    "questions",
    "so",
    "nothing",
    "waits",
    "long",
    "today",
    "again",
];

pub(super) const ALPHANUMERIC: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Whether the last message is the user's and holds a `tool_result` block.
fn answers_a_tool_result(request: &Value) -> bool {
    let Some(last) = request["messages"].as_array().and_then(|m| m.last()) else {
        return false;
    };
    last["role"] == "user"
        && last["content"]
            .as_array()
            .is_some_and(|blocks| blocks.iter().any(|b| b["type"] == "tool_result"))
}

/// A value that fits `schema` (a JSON Schema as tools declare them): its required properties
/// (all of them when none is marked required), each of its type, the first of an `enum`.
fn instance_of(schema: &Value, rng: &mut StdRng, depth: usize) -> Value {
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    if let Some(constant) = schema.get("const") {
        return constant.clone();
    }
    let kind = match &schema["type"] {
        Value::Array(kinds) => kinds
            .iter()
            .find(|k| *k != "null")
            .cloned()
            .unwrap_or(Value::Null),
        kind => kind.clone(),
    };
    let pick = |rng: &mut StdRng| WORDS[rng.random_range(0..WORDS.len())];
    match kind.as_str() {
        Some("string") => json!(pick(rng)),
        Some("integer") => json!(schema["minimum"].as_i64().unwrap_or(1)),
        Some("number") => json!(schema["minimum"].as_f64().unwrap_or(1.0)),
        Some("boolean") => json!(false),
        Some("null") => Value::Null,
        Some("array") if depth < 4 => {
            let items = (0..schema["minItems"].as_u64().unwrap_or(1).min(3))
                .map(|_| instance_of(&schema["items"], rng, depth + 1))
                .collect();
            Value::Array(items)
        }
        Some("array") => json!([]),
        _ if depth >= 4 => json!({}),
        _ => {
            let properties = schema["properties"].as_object();
            let required: Vec<&str> = match schema["required"].as_array() {
                Some(names) => names.iter().filter_map(Value::as_str).collect(),
                None => properties.map_or(Vec::new(), |p| p.keys().map(String::as_str).collect()),
            };
            let mut out = serde_json::Map::new();
            for name in required {
                let property = properties.and_then(|p| p.get(name)).unwrap_or(&Value::Null);
                out.insert(name.to_owned(), instance_of(property, rng, depth + 1));
            }
            Value::Object(out)
        }
    }
}

/// About four characters per token, as a rough tokenizer would give.
pub(super) fn input_tokens(canonical: &str) -> u64 {
    (canonical.len() as u64 / 4).max(1)
}

pub(super) fn id_from(rng: &mut StdRng, prefix: &str, len: usize) -> String {
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    for _ in 0..len {
        id.push(ALPHANUMERIC[rng.random_range(0..ALPHANUMERIC.len())] as char);
    }
    id
}

pub(super) fn new_request_id() -> String {
    let mut rng = StdRng::from_rng(&mut rand::rng());
    id_from(&mut rng, "req_011C", 20)
}

pub(super) fn sentence(rng: &mut StdRng, words: u64) -> String {
    let mut text = String::new();
    for i in 0..words {
        let word = WORDS[rng.random_range(0..WORDS.len())];
        if i == 0 {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                text.extend(first.to_uppercase());
                text.push_str(chars.as_str());
            }
        } else {
            text.push(' ');
            text.push_str(word);
        }
    }
    text.push('.');
    text
}

/// The Message for a valid `/v1/messages` request: a pure function of the body without `stream`.
pub(super) fn answer(request: &Value) -> Value {
    let canonical = canonical_body(request);
    let mut rng = StdRng::from_seed(*blake3::hash(canonical.as_bytes()).as_bytes());
    let id = id_from(&mut rng, "msg_01", 22);
    let natural: u64 = rng.random_range(12..=30);
    let max_tokens = request["max_tokens"].as_u64().unwrap_or(natural).max(1);
    let truncated = max_tokens < natural;
    let words = natural.min(max_tokens);
    let mut output_tokens = words;
    let mut content = Vec::new();

    if request["thinking"]["type"] == "enabled" {
        let thinking_words = rng.random_range(8..=16);
        output_tokens += thinking_words;
        let thinking = format!("Let me think. {}", sentence(&mut rng, thinking_words));
        let signature = format!("{}=", id_from(&mut rng, "Eq", 62));
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": signature}));
    }
    content.push(json!({"type": "text", "text": sentence(&mut rng, words)}));

    // An agent's stand-in: a tool is called (the first offered) unless the conversation just
    // gave back a tool's result, which is then answered in words; so an agent's loop ends.
    let first_tool = request["tools"].as_array().and_then(|t| t.first());
    let first_tool = first_tool.filter(|_| !answers_a_tool_result(request));
    let stop_reason = match first_tool {
        _ if truncated => "max_tokens",
        Some(tool) => {
            let name = tool["name"].as_str().unwrap_or("tool");
            let input = instance_of(&tool["input_schema"], &mut rng, 0);
            content.push(json!({
                "type": "tool_use",
                "id": id_from(&mut rng, "toolu_01", 22),
                "name": name,
                "input": input,
            }));
            output_tokens += 12;
            "tool_use"
        }
        None => "end_turn",
    };

    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": request["model"],
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {
            "input_tokens": input_tokens(&canonical),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
            "service_tier": "standard",
        },
    })
}

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

/// The tool the answer calls, as an agent's stand-in would: never right after a tool's result
/// (that is answered in words, so an agent's loop ends) nor under `tool_choice: none`; the one
/// `tool_choice` names; else a tool the prompt names (as a word), else the only tool offered
/// (or, with `tool_choice: any`, the first). An agent that offers many tools (Claude Code) gets
/// words unless it asks for one by name, so the same prompt makes the same requests every run.
fn tool_to_call(request: &Value) -> Option<&Value> {
    let tools = request["tools"].as_array()?;
    let choice = &request["tool_choice"];
    if answers_a_tool_result(request) || choice["type"] == "none" {
        return None;
    }
    let named = |name: &str| tools.iter().find(|t| t["name"] == name);
    if choice["type"] == "tool" {
        return choice["name"].as_str().and_then(named);
    }
    let text = last_user_text(request).to_lowercase();
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
        .collect();
    let mentioned = tools.iter().find(|t| {
        t["name"]
            .as_str()
            .is_some_and(|n| words.contains(&n.to_lowercase().as_str()))
    });
    mentioned.or_else(|| match (tools.len(), choice["type"] == "any") {
        (1, _) | (_, true) => tools.first(),
        _ => None,
    })
}

/// The prompt itself: the last text block of the last user message (an agent puts its
/// reminders, which name every tool, in blocks before it).
fn last_user_text(request: &Value) -> String {
    let Some(last) = request["messages"].as_array().and_then(|m| m.last()) else {
        return String::new();
    };
    match &last["content"] {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => (blocks.iter().rev())
            .find_map(|b| b["text"].as_str())
            .unwrap_or("")
            .to_owned(),
        _ => String::new(),
    }
}

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

    let tool = tool_to_call(request);
    let stop_reason = match tool {
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

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

    let first_tool = request["tools"].as_array().and_then(|t| t.first());
    let stop_reason = match first_tool {
        _ if truncated => "max_tokens",
        Some(tool) => {
            let name = tool["name"].as_str().unwrap_or("tool");
            let pick = |rng: &mut StdRng| WORDS[rng.random_range(0..WORDS.len())];
            let input = json!({
                "query": pick(&mut rng),
                "options": {
                    "limit": rng.random_range(1..=10),
                    "tags": [pick(&mut rng), pick(&mut rng)],
                    "exact": rng.random_bool(0.5),
                },
            });
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

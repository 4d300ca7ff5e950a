//! A stored Message back into the event sequence the API sends for it.

use bytes::Bytes;
use serde_json::{json, Value};

use super::frame::write_frame;
use super::{protocol, SseError};

/// The whole event stream for a complete Message, as bytes ready to send.
pub fn replay(message: &Value) -> Result<Bytes, SseError> {
    let mut out = Vec::new();
    for (event, data) in replay_frames(message)? {
        write_frame(&mut out, &event, &data.to_string());
    }
    Ok(Bytes::from(out))
}

/// Top-level Message fields that `message_start` alone carries; every other one goes in
/// `message_delta.delta` as well (PROTOCOL.md, "Message events").
const START_ONLY_FIELDS: [&str; 6] = ["id", "type", "role", "model", "content", "usage"];
/// What the API's `message_delta.usage` holds, when the Message's usage has it.
const DELTA_USAGE_FIELDS: [&str; 5] = [
    "output_tokens",
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "server_tool_use",
];

/// Words per `text_delta` / `thinking_delta` chunk in a replay.
const WORDS_PER_DELTA: usize = 4;
/// Pieces the compact JSON of a tool input is cut into (at most) in a replay.
const JSON_PIECES: usize = 3;

/// The events (name, JSON) the API sends for `message`, in order.
///
/// `message_start` carries the Message with empty `content`, null `stop_reason` and
/// `stop_sequence`, and `output_tokens` of at most 1; each block is started empty and filled by
/// deltas; `message_delta` carries the stop reason and the final usage. Block types this module
/// does not know (and `redacted_thinking`) are sent whole in their `content_block_start`.
pub fn replay_frames(message: &Value) -> Result<Vec<(String, Value)>, SseError> {
    let obj = message
        .as_object()
        .ok_or_else(|| protocol("the message to replay is not a JSON object"))?;
    let content = obj
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| protocol("the message to replay has no `content` array"))?;

    let mut events = Vec::with_capacity(4 + content.len() * 4);
    let mut start = obj.clone();
    start.insert("content".into(), json!([]));
    start.insert("stop_reason".into(), Value::Null);
    start.insert("stop_sequence".into(), Value::Null);
    if start.contains_key("stop_details") {
        start.insert("stop_details".into(), Value::Null);
    }
    if let Some(Value::Object(usage)) = start.get_mut("usage") {
        if let Some(out) = usage.get("output_tokens").and_then(Value::as_u64) {
            usage.insert("output_tokens".into(), json!(out.min(1)));
        }
    }
    events.push(ev(
        "message_start",
        json!({"type": "message_start", "message": start}),
    ));

    for (index, block) in content.iter().enumerate() {
        replay_block(index, block, &mut events)?;
    }

    let mut delta = json!({
        "type": "message_delta",
        "delta": {
            "stop_reason": obj.get("stop_reason").cloned().unwrap_or(Value::Null),
            "stop_sequence": obj.get("stop_sequence").cloned().unwrap_or(Value::Null),
        },
    });
    // Every other top-level field (`stop_details`, `container`, `context_management`, ...)
    // travels in the delta too: both SDKs overwrite the Message's fields from it.
    for (name, value) in obj {
        if !START_ONLY_FIELDS.contains(&name.as_str()) && delta["delta"].get(name).is_none() {
            delta["delta"][name] = value.clone();
        }
    }
    if let Some(Value::Object(usage)) = obj.get("usage") {
        // The API's message_delta usage holds the counts only: not `service_tier`, not the
        // nested `cache_creation` object, which belongs to `message_start`.
        let usage: serde_json::Map<String, Value> = usage
            .iter()
            .filter(|(name, _)| DELTA_USAGE_FIELDS.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        delta["usage"] = Value::Object(usage);
    }
    events.push(ev("message_delta", delta));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    Ok(events)
}

fn ev(name: &str, data: Value) -> (String, Value) {
    (name.to_owned(), data)
}

fn block_start(index: usize, block: Value) -> (String, Value) {
    ev(
        "content_block_start",
        json!({"type": "content_block_start", "index": index, "content_block": block}),
    )
}

fn block_delta(index: usize, delta: Value) -> (String, Value) {
    ev(
        "content_block_delta",
        json!({"type": "content_block_delta", "index": index, "delta": delta}),
    )
}

fn replay_block(
    index: usize,
    block: &Value,
    events: &mut Vec<(String, Value)>,
) -> Result<(), SseError> {
    let obj = block
        .as_object()
        .ok_or_else(|| protocol(format!("content block {index} is not an object")))?;
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let text_field = |name: &str| -> Result<&str, SseError> {
        obj.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| protocol(format!("{kind} block {index} has no string `{name}`")))
    };
    let mut start = obj.clone();
    match kind {
        "text" => {
            let text = text_field("text")?;
            start.insert("text".into(), json!(""));
            let citations = match obj.get("citations") {
                Some(Value::Array(citations)) => {
                    start.insert("citations".into(), json!([]));
                    citations.as_slice()
                }
                _ => &[],
            };
            events.push(block_start(index, Value::Object(start)));
            for citation in citations {
                events.push(block_delta(
                    index,
                    json!({"type": "citations_delta", "citation": citation}),
                ));
            }
            for piece in word_chunks(text, WORDS_PER_DELTA) {
                events.push(block_delta(
                    index,
                    json!({"type": "text_delta", "text": piece}),
                ));
            }
        }
        "thinking" => {
            let thinking = text_field("thinking")?;
            let signature = obj.get("signature").and_then(Value::as_str);
            start.insert("thinking".into(), json!(""));
            start.insert("signature".into(), json!(""));
            events.push(block_start(index, Value::Object(start)));
            for piece in word_chunks(thinking, WORDS_PER_DELTA) {
                events.push(block_delta(
                    index,
                    json!({"type": "thinking_delta", "thinking": piece}),
                ));
            }
            if let Some(signature) = signature {
                events.push(block_delta(
                    index,
                    json!({"type": "signature_delta", "signature": signature}),
                ));
            }
        }
        "tool_use" | "server_tool_use" | "mcp_tool_use" if obj.contains_key("input") => {
            let input = serde_json::to_string(&obj["input"])
                .map_err(|e| protocol(format!("tool input of block {index}: {e}")))?;
            start.insert("input".into(), json!({}));
            events.push(block_start(index, Value::Object(start)));
            for piece in split_pieces(&input, JSON_PIECES) {
                events.push(block_delta(
                    index,
                    json!({"type": "input_json_delta", "partial_json": piece}),
                ));
            }
        }
        _ => events.push(block_start(index, block.clone())),
    }
    events.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    ));
    Ok(())
}

/// Cuts `text` into pieces of `words` words each; the pieces concatenate back to `text`.
pub(super) fn word_chunks(text: &str, words: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut seen = 0;
    let mut prev_space = true;
    for (i, c) in text.char_indices() {
        let space = c.is_whitespace();
        if prev_space && !space {
            if seen == words {
                pieces.push(&text[start..i]);
                start = i;
                seen = 0;
            }
            seen += 1;
        }
        prev_space = space;
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// Cuts `s` into at most `n` non-empty pieces on char boundaries; at least one piece.
pub(super) fn split_pieces(s: &str, n: usize) -> Vec<&str> {
    let size = s.len().div_ceil(n.max(1)).max(1);
    let mut pieces = Vec::with_capacity(n);
    let mut start = 0;
    while start < s.len() {
        let mut end = (start + size).min(s.len());
        while !s.is_char_boundary(end) {
            end += 1;
        }
        pieces.push(&s[start..end]);
        start = end;
    }
    if pieces.is_empty() {
        pieces.push(s);
    }
    pieces
}

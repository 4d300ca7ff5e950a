//! Server-sent events: parse frames, assemble a Message from its events, replay a Message as events.
//!
//! Three pieces, shared by the proxy (which relays and stores upstream streams) and the fake API
//! (which produces streams):
//! - [`FrameParser`] turns arbitrary byte chunks into complete [`Frame`]s;
//! - [`Assembler`] folds the frames of one stream into the final Message, the way the official
//!   SDKs do (`anthropic-sdk-python` `lib/streaming/_messages.py`, `accumulate_event`);
//! - [`replay`] / [`replay_frames`] turn a stored Message back into the event sequence the API
//!   sends, so that an SDK assembles it into the same Message.
//!
//! The property that ties them together, tested below: `assemble(parse(replay(m))) == m`,
//! however the bytes are chunked.

use bytes::Bytes;
use serde_json::{json, Map, Value};

/// What can go wrong while reading or producing an event stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    /// The stream carried an `event: error` frame; this is its data (`{"type":"error","error":{..}}`).
    #[error("error event in the stream: {}", describe_error(.0))]
    Upstream(Value),
    /// The stream (or the Message to replay) does not follow the Messages API's event protocol.
    #[error("malformed event stream: {0}")]
    Protocol(String),
}

fn describe_error(value: &Value) -> String {
    let error = &value["error"];
    match (error["type"].as_str(), error["message"].as_str()) {
        (Some(kind), Some(message)) => format!("{kind}: {message}"),
        _ => value.to_string(),
    }
}

fn protocol(message: impl Into<String>) -> SseError {
    SseError::Protocol(message.into())
}

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The `event:` field; `"message"` when the frame had none (the SSE default).
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

/// Incremental SSE parser: feed it chunks as they arrive, get the frames they complete.
///
/// Follows the WHATWG event-stream rules that matter here: `\n` and `\r\n` line ends, comment
/// lines starting with `:`, one optional space after the field's colon, several `data:` lines
/// joined by `\n`, a frame dispatched at an empty line only when it has data. Only the unfinished
/// tail of the current line is buffered, so feeding a long stream costs linear time.
#[derive(Debug, Default)]
pub struct FrameParser {
    /// Bytes of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// `event:` of the frame being built.
    event: Option<String>,
    /// `data:` lines of the frame being built, already joined.
    data: String,
    /// Whether at least one `data:` line was seen for the frame being built.
    has_data: bool,
    /// Whether the first line has been seen (a leading BOM is dropped there).
    started: bool,
}

impl FrameParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one chunk and returns the frames it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(pos);
            rest = &tail[1..];
            if self.line.is_empty() {
                self.line_done(head, &mut frames);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.line_done(&line, &mut frames);
                line.clear();
                self.line = line;
            }
        }
        self.line.extend_from_slice(rest);
        frames
    }

    /// Bytes held for a line or frame not yet complete (a caller bounds it: a peer that never
    /// sends a line end would otherwise grow it for ever).
    pub fn pending_bytes(&self) -> usize {
        self.line.len() + self.data.len()
    }

    /// True when no partial line or frame is pending: the stream ended on a frame boundary.
    pub fn is_idle(&self) -> bool {
        self.line.is_empty() && self.event.is_none() && !self.has_data
    }

    fn line_done(&mut self, line: &[u8], frames: &mut Vec<Frame>) {
        let mut line = line.strip_suffix(b"\r").unwrap_or(line);
        if !self.started {
            self.started = true;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            if self.has_data {
                frames.push(Frame {
                    event: self.event.take().unwrap_or_else(|| "message".to_owned()),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event = None;
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
                self.has_data = true;
            }
            _ => {} // id, retry and unknown fields do not matter to the Messages API.
        }
    }
}

/// Appends one frame, `event: NAME\ndata: DATA\n\n`, to `out`.
///
/// A `data` with line breaks (never the case for compact JSON) is written as several `data:`
/// lines, which a parser joins back.
pub fn write_frame(out: &mut Vec<u8>, event: &str, data: &str) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.push(b'\n');
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix('\r').unwrap_or(line).as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// Encodes one event (name and JSON) as frame bytes.
pub fn encode_event(event: &str, data: &Value) -> Bytes {
    let mut out = Vec::new();
    write_frame(&mut out, event, &data.to_string());
    Bytes::from(out)
}

/// The whole event stream for a complete Message, as bytes ready to send.
pub fn replay(message: &Value) -> Result<Bytes, SseError> {
    let mut out = Vec::new();
    for (event, data) in replay_frames(message)? {
        write_frame(&mut out, &event, &data.to_string());
    }
    Ok(Bytes::from(out))
}

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
    if let Some(Value::Object(usage)) = obj.get("usage") {
        // The API's message_delta usage carries the token counts, not `service_tier`.
        let mut usage = usage.clone();
        usage.remove("service_tier");
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
fn word_chunks(text: &str, words: usize) -> Vec<&str> {
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
fn split_pieces(s: &str, n: usize) -> Vec<&str> {
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

/// Where an [`Assembler`] is in the stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    BeforeStart,
    InMessage,
    Done,
}

/// A content block being built, with the raw tool input JSON gathered so far.
#[derive(Debug)]
struct OpenBlock {
    block: Map<String, Value>,
    /// Concatenated `input_json_delta.partial_json`; `None` until the first such delta.
    partial_json: Option<String>,
    stopped: bool,
}

/// Folds the frames of one stream into the final Message, as the official SDKs do.
///
/// Each frame is parsed once and applied to the snapshot; tool input JSON is parsed once, at the
/// block's stop. `ping`, data-only (`message`) frames and unknown events are ignored, as are
/// unknown delta types, so that new API features pass through. Frames out of order, bad
/// indexes, invalid JSON and known deltas on the wrong block type are [`SseError::Protocol`];
/// an `error` event is [`SseError::Upstream`].
#[derive(Debug, Default)]
pub struct Assembler {
    phase: Phase,
    message: Map<String, Value>,
    blocks: Vec<OpenBlock>,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `message_stop` has been seen.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether `message_start` has been seen.
    pub fn is_started(&self) -> bool {
        self.phase != Phase::BeforeStart
    }

    /// Applies one frame; returns the complete Message at `message_stop`.
    pub fn feed(&mut self, frame: &Frame) -> Result<Option<Value>, SseError> {
        match frame.event.as_str() {
            "ping" | "message" => return Ok(None),
            "error" => {
                let data = serde_json::from_str(&frame.data)
                    .unwrap_or_else(|_| json!({"type": "error", "error": {"type": "api_error", "message": frame.data}}));
                return Err(SseError::Upstream(data));
            }
            "message_start"
            | "content_block_start"
            | "content_block_delta"
            | "content_block_stop"
            | "message_delta"
            | "message_stop" => {}
            _ => return Ok(None),
        }
        if self.phase == Phase::Done {
            return Err(protocol(format!("`{}` after message_stop", frame.event)));
        }
        let data: Value = serde_json::from_str(&frame.data)
            .map_err(|e| protocol(format!("`{}` data is not JSON: {e}", frame.event)))?;
        if frame.event == "message_start" {
            return self.start(data).map(|()| None);
        }
        if self.phase != Phase::InMessage {
            return Err(protocol(format!("`{}` before message_start", frame.event)));
        }
        match frame.event.as_str() {
            "content_block_start" => self.block_start(data)?,
            "content_block_delta" => self.block_delta(data)?,
            "content_block_stop" => self.block_stop(&data)?,
            "message_delta" => self.message_delta(data)?,
            _ => return self.stop().map(Some),
        }
        Ok(None)
    }

    /// The Message as far as it got (Python's `get_final_message()` after a cut): blocks seen so
    /// far, tool inputs parsed where they are complete. `None` before `message_start`.
    pub fn partial(&self) -> Option<Value> {
        if self.phase == Phase::BeforeStart {
            return None;
        }
        let mut message = self.message.clone();
        let content = self
            .blocks
            .iter()
            .map(|b| {
                let mut block = b.block.clone();
                if let Some(input) = b.partial_json.as_deref().and_then(parse_input) {
                    block.insert("input".into(), input);
                }
                Value::Object(block)
            })
            .collect();
        message.insert("content".into(), Value::Array(content));
        Some(Value::Object(message))
    }

    fn start(&mut self, mut data: Value) -> Result<(), SseError> {
        if self.phase != Phase::BeforeStart {
            return Err(protocol("a second message_start"));
        }
        let Some(Value::Object(message)) = data.get_mut("message").map(Value::take) else {
            return Err(protocol("message_start without a message object"));
        };
        self.message = message;
        self.message.remove("content");
        self.phase = Phase::InMessage;
        Ok(())
    }

    fn index(&self, data: &Value, event: &str) -> Result<usize, SseError> {
        data.get("index")
            .and_then(Value::as_u64)
            .map(|i| i as usize)
            .ok_or_else(|| protocol(format!("{event} without an index")))
    }

    fn open_block(&mut self, index: usize, event: &str) -> Result<&mut OpenBlock, SseError> {
        match self.blocks.get_mut(index) {
            Some(block) if !block.stopped => Ok(block),
            Some(_) => Err(protocol(format!(
                "{event} for block {index} after its stop"
            ))),
            None => Err(protocol(format!(
                "{event} for block {index}, which was never started"
            ))),
        }
    }

    fn block_start(&mut self, mut data: Value) -> Result<(), SseError> {
        let index = self.index(&data, "content_block_start")?;
        if index != self.blocks.len() {
            return Err(protocol(format!(
                "content_block_start for block {index}, expected {}",
                self.blocks.len()
            )));
        }
        let Some(Value::Object(block)) = data.get_mut("content_block").map(Value::take) else {
            return Err(protocol(
                "content_block_start without a content_block object",
            ));
        };
        self.blocks.push(OpenBlock {
            block,
            partial_json: None,
            stopped: false,
        });
        Ok(())
    }

    fn block_delta(&mut self, mut data: Value) -> Result<(), SseError> {
        let index = self.index(&data, "content_block_delta")?;
        let Some(mut delta) = data.get_mut("delta").map(Value::take) else {
            return Err(protocol("content_block_delta without a delta"));
        };
        let open = self.open_block(index, "content_block_delta")?;
        let block_type = open.block.get("type").and_then(Value::as_str).unwrap_or("");
        let delta_type = delta.get("type").and_then(Value::as_str).unwrap_or("");
        let expect = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(protocol(format!(
                    "{delta_type} for block {index} of type {block_type}"
                )))
            }
        };
        let string = |delta: &Value, field: &str| -> Result<String, SseError> {
            delta
                .get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| protocol(format!("{delta_type} without a string `{field}`")))
        };
        match delta_type {
            "text_delta" => {
                expect(block_type == "text")?;
                append_str(&mut open.block, "text", &string(&delta, "text")?);
            }
            "thinking_delta" => {
                expect(block_type == "thinking")?;
                append_str(&mut open.block, "thinking", &string(&delta, "thinking")?);
            }
            "signature_delta" => {
                expect(block_type == "thinking")?;
                open.block
                    .insert("signature".into(), json!(string(&delta, "signature")?));
            }
            "input_json_delta" => {
                let piece = string(&delta, "partial_json")?;
                open.partial_json
                    .get_or_insert_with(String::new)
                    .push_str(&piece);
            }
            "citations_delta" => {
                expect(block_type == "text")?;
                let citation = delta
                    .get_mut("citation")
                    .map(Value::take)
                    .ok_or_else(|| protocol("citations_delta without a citation"))?;
                match open.block.entry("citations").or_insert_with(|| json!([])) {
                    Value::Array(list) => list.push(citation),
                    other => *other = json!([citation]),
                }
            }
            _ => {} // A delta type newer than this code: ignored, as the SDKs do.
        }
        Ok(())
    }

    fn block_stop(&mut self, data: &Value) -> Result<(), SseError> {
        let index = self.index(data, "content_block_stop")?;
        let open = self.open_block(index, "content_block_stop")?;
        if let Some(json) = open.partial_json.take() {
            let input = if json.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&json).map_err(|e| {
                    protocol(format!("tool input of block {index} is not JSON: {e}"))
                })?
            };
            open.block.insert("input".into(), input);
        }
        open.stopped = true;
        Ok(())
    }

    fn message_delta(&mut self, data: Value) -> Result<(), SseError> {
        let Value::Object(mut data) = data else {
            return Err(protocol("message_delta is not an object"));
        };
        if let Some(Value::Object(delta)) = data.remove("delta") {
            for (field, value) in delta {
                self.message.insert(field, value);
            }
        }
        if let Some(Value::Object(usage)) = data.remove("usage") {
            let target = self.message.entry("usage").or_insert_with(|| json!({}));
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(target) = target {
                for (field, value) in usage {
                    if !value.is_null() {
                        target.insert(field, value);
                    }
                }
            }
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<Value, SseError> {
        if let Some(i) = self.blocks.iter().position(|b| !b.stopped) {
            return Err(protocol(format!("message_stop while block {i} is open")));
        }
        self.phase = Phase::Done;
        let mut message = std::mem::take(&mut self.message);
        let content = std::mem::take(&mut self.blocks)
            .into_iter()
            .map(|b| Value::Object(b.block))
            .collect();
        message.insert("content".into(), Value::Array(content));
        Ok(Value::Object(message))
    }
}

fn append_str(block: &mut Map<String, Value>, field: &str, piece: &str) {
    match block.get_mut(field) {
        Some(Value::String(s)) => s.push_str(piece),
        _ => {
            block.insert(field.into(), json!(piece));
        }
    }
}

fn parse_input(json: &str) -> Option<Value> {
    if json.trim().is_empty() {
        Some(json!({}))
    } else {
        serde_json::from_str(json).ok()
    }
}

/// Parses and assembles a whole event stream held in memory.
///
/// Fails with [`SseError::Protocol`] when the stream ends before `message_stop`.
pub fn assemble(bytes: &[u8]) -> Result<Value, SseError> {
    let mut parser = FrameParser::new();
    let mut assembler = Assembler::new();
    // A stream whose last frame lacks its blank line still counts, as for the SDKs at EOF.
    let mut frames = parser.push(bytes);
    frames.extend(parser.push(b"\n\n"));
    for frame in &frames {
        if let Some(message) = assembler.feed(frame)? {
            return Ok(message);
        }
    }
    Err(protocol("the stream ended before message_stop"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage() -> Value {
        json!({"input_tokens": 377, "output_tokens": 65, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 12, "service_tier": "standard"})
    }

    fn message(content: Value, stop_reason: &str) -> Value {
        json!({"id": "msg_01ABC", "type": "message", "role": "assistant",
               "model": "claude-sonnet-4-5", "content": content, "stop_reason": stop_reason,
               "stop_sequence": null, "usage": usage()})
    }

    fn samples() -> Vec<Value> {
        vec![
            message(
                json!([{"type": "text", "text": "Hello there, this is a reply with\nseveral words, some \u{e9}t\u{e9} unicode \u{1f600} and  double  spaces."}]),
                "end_turn",
            ),
            message(
                json!([
                    {"type": "text", "text": "Let me look that up."},
                    {"type": "tool_use", "id": "toolu_01X", "name": "get_weather",
                     "input": {"location": {"city": "Paris", "zip": [75001, 75002]}, "unit": "c", "deep": {"a": {"b": [true, null, 1.5]}}}},
                ]),
                "tool_use",
            ),
            message(
                json!([
                    {"type": "thinking", "thinking": "The user wants a haiku. Count syllables carefully.", "signature": "EqQBCkYIBxgCKkA="},
                    {"type": "text", "text": "Autumn moonlight, a worm digs silently."},
                ]),
                "end_turn",
            ),
            message(
                json!([
                    {"type": "text", "text": "According to the document, "},
                    {"type": "text", "text": "the grass is green.", "citations": [
                        {"type": "char_location", "cited_text": "The grass is green.", "document_index": 0, "start_char_index": 0, "end_char_index": 20},
                        {"type": "char_location", "cited_text": "Grass.", "document_index": 0, "start_char_index": 21, "end_char_index": 27},
                    ]},
                ]),
                "end_turn",
            ),
            message(
                json!([
                    {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
                    {"type": "tool_use", "id": "toolu_02", "name": "noop", "input": {}},
                    {"type": "future_block", "payload": {"x": 1}},
                    {"type": "text", "text": ""},
                ]),
                "tool_use",
            ),
        ]
    }

    fn assemble_chunked(bytes: &[u8], chunk: usize) -> Value {
        let mut parser = FrameParser::new();
        let mut assembler = Assembler::new();
        let mut result = None;
        for piece in bytes.chunks(chunk) {
            for frame in parser.push(piece) {
                if let Some(m) = assembler.feed(&frame).unwrap() {
                    assert!(result.is_none(), "two messages");
                    result = Some(m);
                }
            }
        }
        assert!(parser.is_idle());
        result.expect("no message_stop")
    }

    #[test]
    fn replay_then_assemble_is_identity_at_any_chunking() {
        for m in samples() {
            let bytes = replay(&m).unwrap();
            assert_eq!(assemble(&bytes).unwrap(), m);
            for chunk in [1, 7, 64, bytes.len()] {
                assert_eq!(assemble_chunked(&bytes, chunk), m, "chunk {chunk}");
            }
            let crlf = String::from_utf8(bytes.to_vec())
                .unwrap()
                .replace('\n', "\r\n");
            for chunk in [1, 7] {
                assert_eq!(
                    assemble_chunked(crlf.as_bytes(), chunk),
                    m,
                    "crlf chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn replay_follows_the_api_event_shape() {
        for m in samples() {
            let frames = replay_frames(&m).unwrap();
            for (event, data) in &frames {
                assert_eq!(data["type"], json!(event));
            }
            let names: Vec<&str> = frames.iter().map(|(e, _)| e.as_str()).collect();
            assert_eq!(names.first(), Some(&"message_start"));
            assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
            let start = &frames[0].1["message"];
            assert_eq!(start["content"], json!([]));
            assert_eq!(start["stop_reason"], Value::Null);
            assert_eq!(start["usage"]["output_tokens"], json!(1));
            assert_eq!(start["usage"]["input_tokens"], json!(377));
            assert_eq!(start["usage"]["cache_read_input_tokens"], json!(12));
            let delta = &frames[frames.len() - 2].1;
            assert_eq!(delta["delta"]["stop_reason"], m["stop_reason"]);
            assert_eq!(delta["usage"]["output_tokens"], json!(65));
            // every block's start is empty of what the deltas fill in
            for (_, data) in frames.iter().filter(|(e, _)| e == "content_block_start") {
                let block = &data["content_block"];
                match block["type"].as_str().unwrap() {
                    "text" => assert_eq!(block["text"], json!("")),
                    "tool_use" => assert_eq!(block["input"], json!({})),
                    "thinking" => {
                        assert_eq!(block["thinking"], json!(""));
                        assert_eq!(block["signature"], json!(""));
                    }
                    _ => {}
                }
            }
        }
        let bytes = replay(&samples()[0]).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with("event: message_start\ndata: {"));
        assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }

    #[test]
    fn replay_splits_text_and_json_into_several_deltas() {
        let frames = replay_frames(&samples()[1]).unwrap();
        let deltas: Vec<&Value> = frames
            .iter()
            .filter(|(e, _)| e == "content_block_delta")
            .map(|(_, d)| &d["delta"])
            .collect();
        let json_pieces = deltas
            .iter()
            .filter(|d| d["type"] == "input_json_delta")
            .count();
        assert!(json_pieces >= 2, "{json_pieces}");
        let words = word_chunks("one two three four five six seven eight nine", 4);
        assert_eq!(
            words,
            ["one two three four ", "five six seven eight ", "nine"]
        );
        assert_eq!(word_chunks("", 4), Vec::<&str>::new());
        assert_eq!(split_pieces("{}", 3), ["{", "}"]);
        assert_eq!(split_pieces("\u{e9}\u{e9}", 4).concat(), "\u{e9}\u{e9}");
    }

    #[test]
    fn parser_handles_comments_multiline_data_and_defaults() {
        let mut p = FrameParser::new();
        let frames = p.push(
            b"\xEF\xBB\xBF: a comment\nevent:ping\ndata:{}\n\ndata: a\ndata:  b\nid: 7\nretry: 10\n\nevent: x\n\n",
        );
        assert_eq!(
            frames,
            [
                Frame {
                    event: "ping".into(),
                    data: "{}".into()
                },
                Frame {
                    event: "message".into(),
                    data: "a\n b".into()
                },
            ]
        );
        assert!(p.is_idle(), "an event line without data is not dispatched");
        assert!(p.push(b"event: a\r").is_empty());
        assert!(p.push(b"\ndata: 1\r\n").is_empty());
        assert!(!p.is_idle());
        assert_eq!(
            p.push(b"\r\n"),
            [Frame {
                event: "a".into(),
                data: "1".into()
            }]
        );
        let mut out = Vec::new();
        write_frame(&mut out, "e", "l1\nl2");
        assert_eq!(out, b"event: e\ndata: l1\ndata: l2\n\n");
        assert_eq!(
            FrameParser::new().push(&out),
            [Frame {
                event: "e".into(),
                data: "l1\nl2".into()
            }]
        );
    }

    fn frame(event: &str, data: Value) -> Frame {
        Frame {
            event: event.into(),
            data: data.to_string(),
        }
    }

    #[test]
    fn assembler_follows_the_sdk_rules() {
        let mut a = Assembler::new();
        let start = json!({"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "model": "x", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 3}}});
        assert!(a.feed(&frame("message_start", start)).unwrap().is_none());
        a.feed(&frame("ping", json!({"type": "ping"}))).unwrap();
        a.feed(&frame("something_new", json!({"type": "something_new"})))
            .unwrap();
        a.feed(&frame("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "n", "input": {}}}))).unwrap();
        // no input_json_delta at all: the start's input stays
        a.feed(&frame(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ))
        .unwrap();
        a.feed(&frame("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t2", "name": "n", "input": {}}}))).unwrap();
        a.feed(&frame("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}))).unwrap();
        a.feed(&frame("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "brand_new_delta", "x": 1}}))).unwrap();
        a.feed(&frame(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ))
        .unwrap();
        let partial = a.partial().unwrap();
        assert_eq!(partial["content"].as_array().unwrap().len(), 2);
        a.feed(&frame("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 40, "input_tokens": 9, "cache_read_input_tokens": null}}))).unwrap();
        let m = a
            .feed(&frame("message_stop", json!({"type": "message_stop"})))
            .unwrap()
            .expect("message at stop");
        assert_eq!(m["content"][0]["input"], json!({}));
        assert_eq!(m["content"][1]["input"], json!({}));
        assert_eq!(m["stop_reason"], json!("tool_use"));
        assert_eq!(
            m["usage"],
            json!({"input_tokens": 9, "output_tokens": 40, "cache_read_input_tokens": 3})
        );
        assert!(a.is_done());
        assert!(matches!(
            a.feed(&frame("message_start", json!({}))),
            Err(SseError::Protocol(_))
        ));
    }

    #[test]
    fn assembler_rejects_out_of_order_and_reports_error_events() {
        let start = frame(
            "message_start",
            json!({"type": "message_start", "message": {"id": "m", "content": [], "usage": {}}}),
        );
        let text_start = frame(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        );
        let text_delta = frame(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
        );
        let stop0 = frame(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        );
        let cases: Vec<Vec<Frame>> = vec![
            vec![text_delta.clone()],
            vec![start.clone(), text_delta.clone()],
            vec![
                start.clone(),
                frame(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
                ),
            ],
            vec![
                start.clone(),
                text_start.clone(),
                stop0.clone(),
                text_delta.clone(),
            ],
            vec![
                start.clone(),
                text_start.clone(),
                frame("message_stop", json!({"type": "message_stop"})),
            ],
            vec![
                start.clone(),
                text_start.clone(),
                Frame {
                    event: "content_block_delta".into(),
                    data: "{not json".into(),
                },
            ],
            vec![
                start.clone(),
                text_start.clone(),
                frame(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "x"}}),
                ),
            ],
            vec![
                start.clone(),
                frame(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "input": {}}}),
                ),
                frame(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
                ),
                stop0.clone(),
            ],
            vec![start.clone(), start.clone()],
        ];
        for (i, frames) in cases.into_iter().enumerate() {
            let mut a = Assembler::new();
            let result: Result<Vec<_>, _> = frames.iter().map(|f| a.feed(f)).collect();
            assert!(
                matches!(result, Err(SseError::Protocol(_))),
                "case {i}: {result:?}"
            );
        }
        let mut a = Assembler::new();
        a.feed(&start).unwrap();
        let error = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        match a.feed(&frame("error", error.clone())) {
            Err(SseError::Upstream(v)) => assert_eq!(v, error),
            other => panic!("{other:?}"),
        }
        let cut = replay(&samples()[0]).unwrap();
        assert!(matches!(
            assemble(&cut[..cut.len() - 40]),
            Err(SseError::Protocol(_))
        ));
    }

    #[test]
    fn replay_rejects_non_messages() {
        assert!(replay(&json!([1])).is_err());
        assert!(replay(&json!({"content": "x"})).is_err());
        assert!(replay(&json!({"content": [{"type": "text"}]})).is_err());
    }
}

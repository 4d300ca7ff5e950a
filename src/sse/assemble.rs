//! The frames of one stream folded into the final Message, as the official SDKs do.

use serde_json::{json, Map, Value};

use super::frame::{Frame, FrameParser};
use super::{protocol, SseError};

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
        // Emptied in place, not removed: the assembled Message keeps the upstream's field order.
        self.message
            .insert("content".into(), Value::Array(Vec::new()));
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
        if let Some(Value::Object(delta)) = data.shift_remove("delta") {
            for (field, value) in delta {
                self.message.insert(field, value);
            }
        }
        if let Some(Value::Object(usage)) = data.shift_remove("usage") {
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

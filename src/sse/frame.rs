//! Frames: bytes in arbitrary chunks to complete server-sent events, and events back to bytes.

use bytes::Bytes;
use serde_json::Value;

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

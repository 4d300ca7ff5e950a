//! Server-sent events: parse frames, assemble a Message from its events, replay a Message as events.
//!
//! Three pieces, shared by the proxy (which relays and stores upstream streams) and the fake API
//! (which produces streams):
//! - [`FrameParser`] (`frame.rs`) turns arbitrary byte chunks into complete [`Frame`]s;
//! - [`Assembler`] (`assemble.rs`) folds the frames of one stream into the final Message, the way the official
//!   SDKs do (`anthropic-sdk-python` `lib/streaming/_messages.py`, `accumulate_event`);
//! - [`replay`] / [`replay_frames`] (`replay.rs`) turn a stored Message back into the event sequence the API
//!   sends, so that an SDK assembles it into the same Message.
//!
//! The property that ties them together, tested in `tests.rs`: `assemble(parse(replay(m))) == m`,
//! however the bytes are chunked.

mod assemble;
mod frame;
mod replay;
#[cfg(test)]
mod tests;

pub use assemble::{assemble, Assembler};
pub use frame::{encode_event, write_frame, Frame, FrameParser};
pub use replay::{replay, replay_frames};

use serde_json::Value;

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

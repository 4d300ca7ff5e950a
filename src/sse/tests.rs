//! The property that ties the three pieces together, and each piece's edge cases.

use serde_json::{json, Value};

use super::replay::{split_pieces, word_chunks};
use super::*;

fn usage() -> Value {
    json!({"input_tokens": 377, "output_tokens": 65, "cache_creation_input_tokens": 0,
           "cache_read_input_tokens": 12, "service_tier": "standard"})
}

fn message(content: Value, stop_reason: &str) -> Value {
    json!({"id": "msg_01ABC", "type": "message", "role": "assistant",
           "model": "claude-sonnet-4-6", "content": content, "stop_reason": stop_reason,
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
    let error =
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
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

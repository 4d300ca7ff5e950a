//! JSONL input of Messages request bodies (`prewarm`, `bench`): which lines are requests, and
//! in words why a line is not, so a user can fix the line instead of guessing.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

/// A line that is not a request body, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InvalidLine {
    /// 1-based.
    pub line: u64,
    pub reason: String,
}

/// The lines of `input` that are not blank, trimmed, each with its number (from 1).
pub fn numbered_lines(input: &str) -> Vec<(u64, &str)> {
    (input.lines().enumerate())
        .map(|(i, l)| (i as u64 + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect()
}

/// A request body without its `stream` field (prewarm fetches plainly, a batch refuses
/// streams, and the key ignores it anyway); a body without one, or not JSON, as it is.
pub fn without_stream(body: Bytes) -> Bytes {
    match serde_json::from_slice::<Value>(&body) {
        Ok(mut v) if v.get("stream").is_some() => {
            v.as_object_mut().map(|o| o.shift_remove("stream"));
            Bytes::from(v.to_string())
        }
        _ => body,
    }
}

/// The request body on `line` (already trimmed, not blank), or why it is not one: a JSON
/// object with a non-empty string `model` (the rest is the API's to judge).
pub fn parse_request(line: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let Some(object) = value.as_object() else {
        return Err("not a JSON object: each line is one Messages request body".to_owned());
    };
    match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(value),
        Some(_) => Err("\"model\" is not a model name".to_owned()),
        None => Err("no \"model\": each line is one Messages request body".to_owned()),
    }
}

/// `line 2: not JSON (...)` for the first few, then how many more; for a human report.
pub fn describe(invalid: &[InvalidLine]) -> Vec<String> {
    const SHOWN: usize = 10;
    let mut out: Vec<String> = invalid
        .iter()
        .take(SHOWN)
        .map(|i| format!("line {}: {}", i.line, i.reason))
        .collect();
    if invalid.len() > SHOWN {
        out.push(format!("... and {} more", invalid.len() - SHOWN));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_say_what_is_wrong() {
        let reason = |line| parse_request(line).unwrap_err();
        assert!(
            reason("not json").starts_with("not JSON (expected"),
            "{}",
            reason("not json")
        );
        assert!(reason("[1, 2]").starts_with("not a JSON object"));
        assert!(reason(r#"{"no": "model"}"#).starts_with("no \"model\""));
        assert!(reason(r#"{"model": 3}"#).contains("not a model name"));
        assert!(parse_request(r#"{"model": "m", "messages": []}"#).is_ok());
    }

    #[test]
    fn stream_is_dropped_and_the_rest_kept_in_order() {
        let line = Bytes::from_static(br#"{"model":"m","stream":true,"max_tokens":5}"#);
        assert_eq!(
            &without_stream(line)[..],
            br#"{"model":"m","max_tokens":5}"#
        );
        let plain = Bytes::from_static(b"not json");
        assert_eq!(without_stream(plain.clone()), plain);
    }

    #[test]
    fn lines_are_numbered_from_one_and_blank_ones_skipped() {
        assert_eq!(numbered_lines("a\n\n  b  \n"), [(1, "a"), (3, "b")]);
    }
}

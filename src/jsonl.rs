//! JSONL input of Messages request bodies (`prewarm`, `bench`): which lines are requests, and
//! in words why a line is not, so a user can fix the line instead of guessing.

use serde::Serialize;
use serde_json::Value;

/// A line that is not a request body, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InvalidLine {
    /// 1-based.
    pub line: u64,
    pub reason: String,
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
}

//! The fake's own rules: pure answers, fault order, control routes.

use super::answer::*;
use super::state::*;
use super::*;
use serde_json::json;

#[test]
fn answers_are_pure_functions_of_the_body_without_stream() {
    let a =
        json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    let b = json!({"messages": [{"content": "hi", "role": "user"}], "stream": true, "max_tokens": 100, "model": "m"});
    assert_eq!(answer(&a), answer(&b));
    let c =
        json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "ho"}]});
    assert_ne!(answer(&a)["id"], answer(&c)["id"]);
    let short =
        json!({"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]});
    let short = answer(&short);
    assert_eq!(short["stop_reason"], "max_tokens");
    assert_eq!(short["usage"]["output_tokens"], 3);
}

#[test]
fn scripts_prefer_the_model_queue() {
    let shared = Shared::new(MockConfig::default());
    shared.script(None, vec![Scripted::Ok]);
    shared.script(Some("a"), vec![Scripted::SpendLimit]);
    assert_eq!(shared.next_scripted("a"), Some(Scripted::SpendLimit));
    assert_eq!(shared.next_scripted("a"), Some(Scripted::Ok));
    assert_eq!(shared.next_scripted("a"), None);
}

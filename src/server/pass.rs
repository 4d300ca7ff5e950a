//! Every other path: sent upstream as it is, answered as the upstream answers, never cached,
//! through the engine's limits ([`Client::pass_through`](crate::Client::pass_through)).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::Response as HttpResponse;

use super::errors::passed_error_response;
use super::{copy_upstream_headers, forwarded, read_request, App, Encoding, X_CACHE};
use crate::client::PassThrough;

pub(super) async fn pass_through(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
) -> HttpResponse {
    let (parts, body) = match read_request(&app, request).await {
        Ok(read) => read,
        Err(refusal) => return refusal,
    };
    let request = PassThrough {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        headers: forwarded(parts.headers),
        body,
    };
    let passed = match app.client.pass_through(request).await {
        Ok(passed) => passed,
        Err(e) => return passed_error_response(e),
    };
    let mut out = HttpResponse::new(Body::from_stream(passed.body));
    *out.status_mut() = passed.status;
    let h = out.headers_mut();
    copy_upstream_headers(&passed.headers, h, Encoding::AsSent);
    h.insert(X_CACHE, HeaderValue::from_static("bypass"));
    out
}

//! Every other path: sent upstream as it is, answered as the upstream answers, never cached,
//! through the engine's limits ([`Client::pass_through`](crate::Client::pass_through)).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, Method, Uri};
use axum::response::Response as HttpResponse;
use bytes::Bytes;

use super::errors::{api_error, error_response};
use super::{forwarded, App, X_CACHE};
use crate::client::PassThrough;

/// Response headers of the upstream never passed back (hop-by-hop and length, which the
/// server sets itself).
const NOT_RETURNED: [HeaderName; 6] = [
    axum::http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    axum::http::header::TRANSFER_ENCODING,
    axum::http::header::CONTENT_LENGTH,
    axum::http::header::TRAILER,
    axum::http::header::UPGRADE,
];

pub(super) async fn pass_through(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HttpResponse {
    let Ok(body) = body else {
        return api_error(413, "request body is too large");
    };
    let request = PassThrough {
        method,
        path_and_query: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        headers: forwarded(headers),
        body,
    };
    let passed = match app.client.pass_through(request).await {
        Ok(passed) => passed,
        Err(e) => return error_response(e),
    };
    let mut out = HttpResponse::builder().status(passed.status);
    for (name, value) in &passed.headers {
        if !NOT_RETURNED.contains(name) {
            out = out.header(name, value);
        }
    }
    out.header(X_CACHE, "bypass")
        .body(Body::from_stream(passed.body))
        .unwrap_or_else(|_| api_error(502, "upstream sent an unusable response"))
}

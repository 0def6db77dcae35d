//! The dashboard's files: plain HTML, CSS and JavaScript compiled into the library (no CDN, no
//! build step). The page reads the JSON API with URLs relative to where it is served, so the
//! same files work at the worker's `/` and under a Rack mount such as `/tasker/`.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

pub(super) const INDEX_HTML: &str = include_str!("assets/index.html");
pub(super) const LOGIN_HTML: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Nothing but this origin's own files; no framing (clickjacking the action buttons).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(super) fn page(html: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

pub(super) fn named(file: &str) -> Option<Response> {
    let (content_type, body) = match file {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        _ => return None,
    };
    Some(
        (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
    )
}

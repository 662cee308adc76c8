//! The Prometheus endpoint (`--metrics ADDR:PORT`): the counters of
//! `smtp-after-popd stats` at `http://ADDR:PORT/metrics`.
//!
//! Consumes: HTTP requests on a TCP listener, each connection accepted by
//! [`crate::net::serve_stream`] within [`LIMITS`] and served by
//! [`crate::net::http::serve`] (one request per connection).
//! Produces: the text exposition format (version 0.0.4) of
//! [`crate::service::control::Status::prometheus`] for `GET /metrics`; 404 for any
//! other path, 400 for any other method.
//! Trusts: peers in the listener's allow-list (`?allow=`, else
//! `--allow-from`), checked before a byte is read; nothing in the request
//! beyond its method and path, with the header bounded (8 KiB) and 10 s
//! for the request and its answer.

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, Request, StatusCode};

use crate::net::http::{self, Answer};
use crate::net::{Connection, Io, Limits};
use crate::service::control::Status;

/// The bounds of the metrics endpoint: a scraper asks once in a while.
pub const LIMITS: Limits = Limits {
    total: 16,
    per_peer: 4,
    request: Duration::from_secs(10),
    idle: Duration::from_secs(10),
    lifetime: Some(Duration::from_secs(10)),
};

/// Answers one HTTP connection.
pub async fn session(conn: Connection, io: Box<dyn Io>, status: Arc<Status>) {
    http::serve(conn, io, false, move |_, req| {
        let status = status.clone();
        async move { answer(&req, &status) }
    })
    .await;
}

/// The answer to one request.
fn answer<B>(req: &Request<B>, status: &Status) -> Answer {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => http::answer(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            status.prometheus(),
        ),
        (&Method::GET, _) => http::text(
            StatusCode::NOT_FOUND,
            "not found: the counters are at /metrics\n",
        ),
        _ => http::text(StatusCode::BAD_REQUEST, "expected GET /metrics\n"),
    }
}

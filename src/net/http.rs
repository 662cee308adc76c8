//! The one HTTP server: HTTP/1.1 (hyper) on a connection that the network
//! layer accepted, for the metrics endpoint and the auth-policy listener.
//!
//! Consumes: a [`Connection`] and its byte stream from
//! [`crate::net::serve_stream`], which has already checked the peer
//! against the listener's allow-list and bounds the connection with the
//! service's [`crate::net::Limits`] (connections per peer and in all, a
//! deadline for each request and its answer, and for idling between
//! requests); and a handler that turns one request into one answer.
//! Produces: the handler's answers, one per request, with `Connection:
//! close` and one request per connection unless the service keeps
//! connections alive; a request is marked complete
//! ([`Connection::completed`]) once its answer has been flushed to the
//! kernel, so that a connection waiting for its next request is bounded
//! by the idle deadline, not the request one.
//! Trusts: nothing in a request: hyper parses it, within [`MAX_HEADER`]
//! bytes of header; a body is read only through [`read_body`], which
//! stops at the service's limit.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::net::{Connection, Io};

/// Longest request header read (hyper's smallest read buffer).
pub const MAX_HEADER: usize = 8192;

/// What a handler answers.
pub type Answer = Response<Full<Bytes>>;

/// An answer with this status, content type and body.
pub fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Answer {
    answer(status, "text/plain; charset=utf-8", body.into())
}

/// Why a request body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Longer than the service's limit.
    TooLarge,
    /// The connection failed, or the body was malformed.
    Broken,
}

/// Reads a request body of at most `max` bytes.
pub async fn read_body<B>(body: B, max: usize) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if body.size_hint().lower() > max as u64 {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Broken),
    }
}

/// Serves HTTP/1.1 on one connection until it closes, fails or misses a
/// deadline: each request goes to `handler` with the connection it came
/// on. With `keep_alive` false, the connection closes after one answer.
pub async fn serve<H, F>(conn: Connection, io: Box<dyn Io>, keep_alive: bool, handler: H)
where
    H: Fn(Arc<Connection>, Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let conn = Arc::new(conn);
    let answered = Arc::new(AtomicBool::new(false));
    let io = Tracked {
        io,
        conn: conn.clone(),
        answered: answered.clone(),
    };
    let handler = Arc::new(handler);
    let service = hyper::service::service_fn(move |req| {
        let (conn, answered, handler) = (conn.clone(), answered.clone(), handler.clone());
        async move {
            let a = handler(conn, req).await;
            answered.store(true, Ordering::Relaxed);
            Ok::<_, Infallible>(a)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(keep_alive)
        .title_case_headers(true)
        .max_buf_size(MAX_HEADER)
        // The network layer's deadlines bound every read and write.
        .header_read_timeout(None)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// The connection's stream, which marks a request complete when its
/// answer has been flushed: from the handler's return until the next
/// request's first byte, every successful flush does.
struct Tracked {
    io: Box<dyn Io>,
    conn: Arc<Connection>,
    answered: Arc<AtomicBool>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.answered.store(false, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) && this.answered.load(Ordering::Relaxed) {
            this.conn.completed();
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{Access, Limits, StreamListener, serve_stream};
    use crate::stats::Stats;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    fn start(
        limits: Limits,
        keep_alive: bool,
        max: usize,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let l = StreamListener::bind_unix(&path, &Access::default(), "test").unwrap();
        tokio::spawn(serve_stream(
            l,
            limits,
            Arc::new(Stats::default()),
            move |conn, io| {
                serve(conn, io, keep_alive, move |_, req| async move {
                    let body = read_body(req.into_body(), max).await;
                    let body = body.map(|b| {
                        if b.len() > 20 {
                            format!("{} bytes", b.len()).into()
                        } else {
                            b
                        }
                    });
                    text(StatusCode::OK, format!("{body:?}\n"))
                })
            },
        ));
        (dir, path)
    }

    /// Sends a request and reads one answer (up to its body's end).
    async fn ask(s: &mut UnixStream, req: &str) -> String {
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => 0,
            };
            got.extend_from_slice(&buf[..n]);
            if n == 0 || got.ends_with(b")\n") {
                return String::from_utf8_lossy(&got).into_owned();
            }
        }
    }

    #[tokio::test]
    async fn a_kept_connection_waits_for_its_next_request_under_the_idle_deadline() {
        // A request deadline far shorter than the pause between requests:
        // were the first not marked complete, the connection would be cut.
        let limits = Limits {
            total: 4,
            per_peer: 4,
            request: Duration::from_millis(200),
            idle: Duration::from_secs(30),
            lifetime: None,
        };
        let (_dir, path) = start(limits, true, 16);
        let mut s = UnixStream::connect(&path).await.unwrap();
        let post = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
        let a = ask(&mut s, post).await;
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.contains("Content-Type: text/plain"), "{a}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let a = ask(&mut s, post).await;
        assert!(a.ends_with("Ok(b\"hi\")\n"), "{a}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_and_one_request_closes_without_keep_alive() {
        let limits = Limits {
            total: 4,
            per_peer: 4,
            request: Duration::from_secs(5),
            idle: Duration::from_secs(5),
            lifetime: None,
        };
        let (_dir, path) = start(limits, false, 16);
        let mut s = UnixStream::connect(&path).await.unwrap();
        let big = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n{}",
            "x".repeat(17)
        );
        let a = ask(&mut s, &big).await;
        assert!(a.contains("Connection: close"), "{a}");
        assert!(a.ends_with("Err(TooLarge)\n"), "{a}");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(matches!(n, Ok(Ok(0))), "closed after one answer");
        // Chunked, without a length: stopped at the limit too.
        let mut s = UnixStream::connect(&path).await.unwrap();
        let chunked = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n11\r\nxxxxxxxxxxxxxxxxx\r\n0\r\n\r\n";
        assert!(ask(&mut s, chunked).await.ends_with("Err(TooLarge)\n"));
    }

    #[tokio::test]
    async fn a_body_larger_than_the_header_buffer_is_read_whole() {
        let limits = Limits {
            total: 4,
            per_peer: 4,
            request: Duration::from_secs(5),
            idle: Duration::from_secs(5),
            lifetime: None,
        };
        let (_dir, path) = start(limits, true, 16 * 1024);
        let mut s = UnixStream::connect(&path).await.unwrap();
        let n = 3 * MAX_HEADER / 2;
        let req = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n{}",
            "x".repeat(n)
        );
        let a = ask(&mut s, &req).await;
        assert!(a.ends_with(&format!("Ok(b\"{n} bytes\")\n")), "{a}");
        // A header over MAX_HEADER is refused by hyper.
        let mut s = UnixStream::connect(&path).await.unwrap();
        let big = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nContent-Length: 0\r\n\r\n",
            "y".repeat(MAX_HEADER)
        );
        let a = ask(&mut s, &big).await;
        assert!(a.starts_with("HTTP/1.1 431"), "{a}");
    }
}

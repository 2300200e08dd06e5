//! The HTTP endpoints, on their own thread (tiny_http): `/healthz`,
//! `/readyz` and `/metrics`. Everything they report is read from atomics
//! the workers publish; nothing here touches a connection.

use crate::metrics::{self, Metrics, Value};
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tiny_http::{Header, Method, Response, Server};

/// How long `/readyz` waits for a TCP connect to the broker.
pub const READY_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What a request gets: status, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Routes one request. `upstream` is the broker's `host:port`, used by
/// `/readyz` when no pooled connection is up.
pub fn answer(method: &Method, path: &str, metrics: &Metrics, upstream: &str) -> Answer {
    let path = path.split('?').next().unwrap_or(path);
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if !known {
        return Answer::text(404, "not found\n");
    }
    if *method != Method::Get {
        return Answer::text(405, "method not allowed; use GET\n");
    }
    match path {
        "/healthz" => {
            if metrics.shutting_down.load(Ordering::Relaxed) {
                Answer::text(503, "shutting down\n")
            } else {
                Answer::text(200, "OK\n")
            }
        }
        "/readyz" => {
            if metrics.snapshot().get(Value::UpstreamConnections) > 0 {
                return Answer::text(200, "OK: a pooled upstream connection is up\n");
            }
            match connect(upstream) {
                Ok(addr) => Answer::text(200, format!("OK: broker {addr} accepts connections\n")),
                Err(e) => Answer::text(503, format!("upstream {upstream} unreachable: {e}\n")),
            }
        }
        _ => Answer {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics::render(&metrics.snapshot(), env!("CARGO_PKG_VERSION"), commit()),
        },
    }
}

/// The git commit the binary was built from, when the build knew it.
pub fn commit() -> &'static str {
    option_env!("AMQPROXY_GIT_COMMIT").unwrap_or("unknown")
}

fn connect(upstream: &str) -> io::Result<SocketAddr> {
    let mut last = io::Error::other("no address");
    for addr in upstream.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, READY_CONNECT_TIMEOUT) {
            Ok(_) => return Ok(addr),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Threads answering HTTP requests.
const HTTP_THREADS: usize = 4;

fn serve(request: tiny_http::Request, metrics: &Metrics, upstream: &str) {
    let a = answer(request.method(), request.url(), metrics, upstream);
    let mut response = Response::from_string(a.body).with_status_code(a.status);
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], a.content_type.as_bytes()) {
        response = response.with_header(h);
    }
    if a.status == 405 {
        if let Ok(h) = Header::from_bytes(&b"Allow"[..], &b"GET"[..]) {
            response = response.with_header(h);
        }
    }
    if let Err(e) = request.respond(response) {
        log::debug!("HTTP response failed: {e}");
    }
}

/// Binds the HTTP listener (so a port in use fails at start) and serves it
/// on threads of its own.
pub fn spawn(address: &str, port: u16, metrics: Arc<Metrics>, upstream: String) -> io::Result<()> {
    let addr = (address, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("{address} resolves to no address")))?;
    let server = Server::http(addr)
        .map_err(|e| io::Error::other(format!("cannot listen on {addr} for HTTP: {e}")))?;
    log::info!("HTTP endpoints on http://{addr}/healthz, /readyz, /metrics");
    // A few threads, so /healthz never waits behind a /readyz probing a
    // silent broker for up to a second.
    let server = Arc::new(server);
    for i in 0..HTTP_THREADS {
        let server = server.clone();
        let metrics = metrics.clone();
        let upstream = upstream.clone();
        std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || {
                for request in server.incoming_requests() {
                    serve(request, &metrics, &upstream);
                }
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let m = Metrics::new(1);
        assert_eq!(
            answer(&Method::Get, "/healthz", &m, "127.0.0.1:1").status,
            200
        );
        assert_eq!(
            answer(&Method::Post, "/healthz", &m, "127.0.0.1:1").status,
            405
        );
        assert_eq!(answer(&Method::Get, "/nope", &m, "127.0.0.1:1").status, 404);
        let metrics = answer(&Method::Get, "/metrics?x=1", &m, "127.0.0.1:1");
        assert_eq!(metrics.status, 200);
        assert!(metrics
            .body
            .contains("# TYPE amqproxy_client_connections gauge"));
        m.shutting_down.store(true, Ordering::Relaxed);
        assert_eq!(
            answer(&Method::Get, "/healthz", &m, "127.0.0.1:1").status,
            503
        );
    }

    #[test]
    fn readyz_without_a_pooled_connection_tries_the_broker() {
        let m = Metrics::new(1);
        // Port 1 on loopback: nothing listens there.
        let a = answer(&Method::Get, "/readyz", &m, "127.0.0.1:1");
        assert_eq!(a.status, 503);
        assert!(
            a.body.starts_with("upstream 127.0.0.1:1 unreachable"),
            "{}",
            a.body
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listener.local_addr().unwrap().to_string();
        assert_eq!(answer(&Method::Get, "/readyz", &m, &up).status, 200);
    }
}

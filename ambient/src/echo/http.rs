//! HTTP echo: every request is answered with a JSON description of itself as the server saw it.
//!
//! `?status=NNN` picks the response status (200 to 599), for tests of error handling; the
//! [`hooks`](super::hooks) add delays and failures on request. An `Upgrade` request switches
//! the connection to a raw byte echo.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tracing::info;

use super::hooks::{self, FAIL_SWITCH_PATH, Switch};
use super::server::{Body, Conn};

/// Largest request body echoed; larger ones are answered with 413.
pub const MAX_BODY: usize = 1024 * 1024;

/// How much of an oversized body is read and dropped before answering 413, so that an
/// HTTP/1.1 client still sending is not reset before it reads the answer.
const MAX_DRAIN: usize = 4 * MAX_BODY;

/// The JSON body of every HTTP echo reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EchoReply {
    pub pod: String,
    pub namespace: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The `Host` header, or the `:authority` of an HTTP/2 request.
    pub host: String,
    /// Request headers as received: name to values, in order.
    pub headers: BTreeMap<String, Vec<String>>,
    /// The peer address as the server saw it.
    pub remote_addr: SocketAddr,
    pub local_addr: SocketAddr,
    /// The request body, invalid UTF-8 replaced.
    pub body: String,
}

pub(super) enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

pub(super) async fn handle(req: Request<Incoming>, conn: &Conn) -> Response<Body> {
    let (parts, body) = req.into_parts();
    if parts.uri.path() == FAIL_SWITCH_PATH {
        return fail_switch(&parts.method, &parts.uri, conn);
    }
    let asked = requested_status(&parts.uri).and_then(|status| {
        let delay = hooks::requested_delay(&parts.uri)?;
        Ok((status, delay))
    });
    let mut body_bytes = 0;
    let response = match asked {
        Err(reason) => text(StatusCode::BAD_REQUEST, reason),
        Ok((status, delay)) => match read_body(body, MAX_BODY).await {
            Ok(body) => {
                body_bytes = body.len();
                let status = match conn.hooks.failing() {
                    Some(failing) => failing,
                    None if conn.hooks.fails_once(&parts.headers) => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    None => status,
                };
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let reply = EchoReply {
                    pod: conn.identity.pod.clone(),
                    namespace: conn.identity.namespace.clone(),
                    protocol: protocol_name(parts.version).to_owned(),
                    method: parts.method.to_string(),
                    path: parts
                        .uri
                        .path_and_query()
                        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.to_string()),
                    host: host(&parts.uri, &parts.headers),
                    headers: header_lists(&parts.headers),
                    remote_addr: conn.remote,
                    local_addr: conn.local,
                    body: String::from_utf8_lossy(&body).into_owned(),
                };
                json(status, &reply)
            }
            Err(BodyError::TooLarge) => text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body larger than {MAX_BODY} bytes"),
            ),
            Err(BodyError::Read(e)) => text(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body: {e}"),
            ),
        },
    };
    // The app's access log: one line per request, what a user would read to see what a pod
    // was sent.
    info!(
        target: "access",
        peer = %conn.remote,
        dst = %conn.local,
        protocol = protocol_name(parts.version),
        method = %parts.method,
        path = %parts.uri.path(),
        body_bytes,
        status = response.status().as_u16(),
        "http request"
    );
    response
}

/// Reads a body of at most `limit` bytes. A larger one is drained (up to a bound) and refused.
pub(super) async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        let Some(data) = frame.data_ref() else {
            continue; // trailers
        };
        if buf.len() + data.len() > limit {
            drain(body).await;
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(data);
    }
    Ok(buf.freeze())
}

async fn drain(mut body: Incoming) {
    let mut drained = 0;
    while drained < MAX_DRAIN {
        match body.frame().await {
            Some(Ok(frame)) => drained += frame.data_ref().map_or(0, Bytes::len),
            Some(Err(_)) | None => return,
        }
    }
}

/// The failure switch: see [`hooks`].
fn fail_switch(method: &http::Method, uri: &Uri, conn: &Conn) -> Response<Body> {
    let response = match hooks::switch(method, uri) {
        Err(reason) => text(StatusCode::BAD_REQUEST, reason),
        Ok(asked) => {
            match asked {
                Switch::Fail(status) => conn.hooks.set_failing(Some(status)),
                Switch::Stop => conn.hooks.set_failing(None),
                Switch::Show => {}
            }
            let reply = serde_json::json!({
                "pod": conn.identity.pod,
                "namespace": conn.identity.namespace,
                "failing": conn.hooks.failing().map(|s| s.as_u16()),
            });
            let mut body = reply.to_string().into_bytes();
            body.push(b'\n');
            response(StatusCode::OK, "application/json", body.into())
        }
    };
    info!(
        peer = %conn.remote,
        dst = %conn.local,
        method = %method,
        path = %uri.path(),
        status = response.status().as_u16(),
        failing = conn.hooks.failing().map_or(0, |s| s.as_u16()),
        "failure switch"
    );
    response
}

/// The status asked for with `?status=NNN`, else 200.
fn requested_status(uri: &Uri) -> Result<StatusCode, &'static str> {
    let Some(asked) = hooks::query_value(uri, "status") else {
        return Ok(StatusCode::OK);
    };
    asked
        .parse::<u16>()
        .ok()
        .filter(|code| (200..=599).contains(code))
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or("status must be a number from 200 to 599")
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// `Host`, else the URI's authority (HTTP/2 carries it in `:authority`).
fn host(uri: &Uri, headers: &HeaderMap) -> String {
    headers
        .get(HOST)
        .map(|host| String::from_utf8_lossy(host.as_bytes()).into_owned())
        .or_else(|| uri.authority().map(|authority| authority.to_string()))
        .unwrap_or_default()
}

fn header_lists(headers: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut lists: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        lists
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    lists
}

fn json(status: StatusCode, reply: &EchoReply) -> Response<Body> {
    let mut body =
        serde_json::to_vec_pretty(reply).expect("EchoReply holds only strings, maps and addresses");
    body.push(b'\n');
    response(status, "application/json", body.into())
}

pub(super) fn text(status: StatusCode, message: &str) -> Response<Body> {
    response(
        status,
        "text/plain; charset=utf-8",
        format!("{message}\n").into(),
    )
}

/// An HTTP/1.1 request asking to switch protocols (`Upgrade: websocket`, say) is answered 101
/// with the same `Upgrade`, and the connection then echoes raw bytes until the client closes
/// its side. There is no WebSocket framing: it shows that a proxy in between let the upgrade
/// through and copies both ways.
pub(super) fn upgrade(mut req: Request<Incoming>, conn: &Conn) -> Response<Body> {
    let protocol = req
        .headers()
        .get(UPGRADE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("websocket"));
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (peer, dst, path) = (conn.remote, conn.local, req.uri().path().to_owned());
    tokio::spawn(async move {
        let result = match on_upgrade.await {
            Ok(upgraded) => {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let copied = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
                copied.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(bytes) => info!(target: "access", %peer, %dst, %path, bytes, "upgraded connection"),
            Err(error) => {
                info!(target: "access", %peer, %dst, %path, %error, "upgraded connection failed")
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response.headers_mut().insert(UPGRADE, protocol);
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    response
}

/// Whether `req` asks to switch protocols (HTTP/1.1 only; HTTP/2 has no `Upgrade`).
pub(super) fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(UPGRADE)
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_comes_from_the_query() {
        let status = |uri: &'static str| requested_status(&Uri::from_static(uri));
        assert_eq!(status("/"), Ok(StatusCode::OK));
        assert_eq!(
            status("/?a=1&status=503"),
            Ok(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(status("/?status=204"), Ok(StatusCode::NO_CONTENT));
        for bad in ["/?status=", "/?status=101", "/?status=600", "/?status=abc"] {
            assert!(status(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repeated_headers_keep_every_value() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.append(
            "x-b",
            HeaderValue::from_bytes(b"\xff").expect("opaque bytes are a valid value"),
        );
        let lists = header_lists(&headers);
        assert_eq!(lists["x-a"], ["1", "2"]);
        assert_eq!(lists["x-b"], ["\u{fffd}"]);
    }
}

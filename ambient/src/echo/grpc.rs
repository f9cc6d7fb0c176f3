//! gRPC echo: the unary method `/echo.Echo/Echo` over h2c, framed and encoded by hand. Any
//! other method of any service (`/package.Service/Method`) is answered as if it were that one,
//! and the reply says which was called, so tests can see routing by method.
//!
//! ```proto
//! package echo;
//! service Echo { rpc Echo(EchoRequest) returns (EchoResponse); }
//! message EchoRequest { string message = 1; }
//! message EchoResponse {
//!   string message = 1;
//!   string pod = 2;
//!   string namespace = 3;
//!   map<string, string> metadata = 4;
//!   string method = 5;  // the path called, e.g. /echo.Echo/Echo
//! }
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Serialize;
use tracing::info;

use super::http::{BodyError, MAX_BODY, read_body};
use super::proto::{self, DecodeError, Fields, Value};
use super::server::{Body, Conn};

/// gRPC status codes (grpc/doc/statuscodes.md) this server returns.
pub mod code {
    pub const OK: u32 = 0;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
}

/// The echo service's own method, which the client calls unless told otherwise.
pub const ECHO_METHOD: &str = "/echo.Echo/Echo";
pub const CONTENT_TYPE_GRPC: &str = "application/grpc";

/// Compressed flag and big-endian message length in front of every message.
const FRAME_HEADER_LEN: usize = 5;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchoRequest {
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EchoResponse {
    pub message: String,
    pub pod: String,
    pub namespace: String,
    /// The request headers (pseudo-headers are not headers); repeated ones joined with `, `.
    pub metadata: BTreeMap<String, String>,
    /// The method called, as its path: `/echo.Echo/Echo`.
    pub method: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{0} bytes is shorter than the 5-byte message header")]
    Short(usize),
    #[error("message is compressed, and no compression was negotiated")]
    Compressed,
    #[error("compressed flag is {0}, not 0 or 1")]
    BadFlag(u8),
    #[error(
        "header says {declared} bytes but {actual} follow; a unary call carries exactly one message"
    )]
    LengthMismatch { declared: usize, actual: usize },
    #[error("message of {0} bytes does not fit a gRPC frame")]
    TooLarge(usize),
}

/// A gRPC failure: the status code and message sent in the trailers.
struct Status {
    code: u32,
    message: String,
}

impl EchoRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        proto::put_string(&mut buf, 1, &self.message);
        buf
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut request = EchoRequest::default();
        let mut fields = Fields::new(buf);
        while let Some((field, value)) = fields.next_field()? {
            if field == 1 {
                request.message = proto::string(field, value)?;
            }
        }
        Ok(request)
    }
}

impl EchoResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        proto::put_string(&mut buf, 1, &self.message);
        proto::put_string(&mut buf, 2, &self.pod);
        proto::put_string(&mut buf, 3, &self.namespace);
        let mut entry = Vec::new();
        for (key, value) in &self.metadata {
            entry.clear();
            proto::put_string(&mut entry, 1, key);
            proto::put_string(&mut entry, 2, value);
            proto::put_bytes(&mut buf, 4, &entry);
        }
        proto::put_string(&mut buf, 5, &self.method);
        buf
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut response = EchoResponse::default();
        let mut fields = Fields::new(buf);
        while let Some((field, value)) = fields.next_field()? {
            match field {
                1 => response.message = proto::string(field, value)?,
                2 => response.pod = proto::string(field, value)?,
                3 => response.namespace = proto::string(field, value)?,
                4 => {
                    let (key, value) = decode_map_entry(value)?;
                    response.metadata.insert(key, value);
                }
                5 => response.method = proto::string(field, value)?,
                _ => {}
            }
        }
        Ok(response)
    }
}

/// A `map<string, string>` entry: a message with the key in field 1 and the value in field 2.
fn decode_map_entry(entry: Value<'_>) -> Result<(String, String), DecodeError> {
    let entry = proto::len_delimited(4, entry)?;
    let (mut key, mut value) = (String::new(), String::new());
    let mut fields = Fields::new(entry);
    while let Some((field, v)) = fields.next_field()? {
        match field {
            1 => key = proto::string(field, v)?,
            2 => value = proto::string(field, v)?,
            _ => {}
        }
    }
    Ok((key, value))
}

/// One uncompressed message with its 5-byte header.
pub fn frame(message: &[u8]) -> Result<Bytes, FrameError> {
    let len = u32::try_from(message.len()).map_err(|_| FrameError::TooLarge(message.len()))?;
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN + message.len());
    buf.put_u8(0);
    buf.put_u32(len);
    buf.put_slice(message);
    Ok(buf.freeze())
}

/// The message of a unary call's body, which must hold exactly one uncompressed message.
pub fn unframe(body: &[u8]) -> Result<&[u8], FrameError> {
    let Some((header, message)) = body.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(FrameError::Short(body.len()));
    };
    match header[0] {
        0 => {}
        1 => return Err(FrameError::Compressed),
        flag => return Err(FrameError::BadFlag(flag)),
    }
    let declared = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if declared != message.len() {
        return Err(FrameError::LengthMismatch {
            declared,
            actual: message.len(),
        });
    }
    Ok(message)
}

/// Whether a request is a gRPC call, by its content type (`application/grpc`, `+proto`, ...).
pub(super) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value == CONTENT_TYPE_GRPC
                || value
                    .strip_prefix(CONTENT_TYPE_GRPC)
                    .is_some_and(|rest| rest.starts_with(['+', ';']))
        })
}

pub(super) async fn handle(req: Request<Incoming>, conn: &Conn) -> Response<Body> {
    let method = req.uri().path().to_owned();
    let result = if is_method_path(&method) {
        echo(req, conn).await
    } else {
        Err(Status {
            code: code::UNIMPLEMENTED,
            message: format!(
                "{method} is not a method path; this server answers /package.Service/Method, such as {ECHO_METHOD}"
            ),
        })
    };
    let grpc_status = result
        .as_ref()
        .map_or_else(|status| status.code, |_| code::OK);
    info!(
        peer = %conn.remote,
        dst = %conn.local,
        method = %method,
        grpc.status = grpc_status,
        "grpc request"
    );
    match result {
        Ok(message) => unary_ok(message),
        Err(status) => trailers_only(status),
    }
}

/// The framed response message, or the status to fail with.
async fn echo(req: Request<Incoming>, conn: &Conn) -> Result<Bytes, Status> {
    let (parts, body) = req.into_parts();
    let body = read_body(body, FRAME_HEADER_LEN + MAX_BODY)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => Status {
                code: code::RESOURCE_EXHAUSTED,
                message: format!("request larger than {MAX_BODY} bytes"),
            },
            BodyError::Read(e) => Status {
                code: code::INTERNAL,
                message: format!("reading the request: {e}"),
            },
        })?;
    let message = unframe(&body).map_err(|e| Status {
        code: code::INTERNAL,
        message: format!("malformed gRPC frame: {e}"),
    })?;
    let request = EchoRequest::decode(message).map_err(|e| Status {
        code: code::INVALID_ARGUMENT,
        message: format!("malformed EchoRequest: {e}"),
    })?;
    let response = EchoResponse {
        message: request.message,
        pod: conn.identity.pod.clone(),
        namespace: conn.identity.namespace.clone(),
        metadata: metadata(&parts.headers),
        method: parts.uri.path().to_owned(),
    };
    frame(&response.encode()).map_err(|e| Status {
        code: code::RESOURCE_EXHAUSTED,
        message: e.to_string(),
    })
}

/// `/service/method`, each part non-empty: what a gRPC client sends as the path.
fn is_method_path(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(service, method)| {
            !service.is_empty() && !method.is_empty() && !method.contains('/')
        })
}

fn metadata(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut metadata: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        metadata
            .entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    metadata
}

fn unary_ok(message: Bytes) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code::OK));
    let frames = [Frame::data(message), Frame::trailers(trailers)];
    let body = StreamBody::new(stream::iter(frames.map(Ok)));
    grpc_response(body.boxed())
}

/// A failed call: the status goes in the headers and there is no body.
fn trailers_only(status: Status) -> Response<Body> {
    let mut response = grpc_response(Empty::new().boxed());
    let headers = response.headers_mut();
    headers.insert("grpc-status", HeaderValue::from(status.code));
    if let Ok(message) = HeaderValue::from_str(&percent_encode(&status.message)) {
        headers.insert("grpc-message", message);
    }
    response
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_GRPC));
    response
}

/// `grpc-message` is percent-encoded: everything outside printable ASCII, and `%` itself.
fn percent_encode(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for &byte in message.as_bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// Reverses [`percent_encode`]; malformed escapes are kept as they are.
pub fn percent_decode(message: &str) -> String {
    let bytes = message.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let request = EchoRequest {
            message: "héllo".to_owned(),
        };
        assert_eq!(EchoRequest::decode(&request.encode()), Ok(request));

        let response = EchoResponse {
            message: "hi".to_owned(),
            pod: "echo-1".to_owned(),
            namespace: "ns".to_owned(),
            metadata: [("a", "1"), ("b", "")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            method: "/echo.Echo/Echo".to_owned(),
        };
        assert_eq!(EchoResponse::decode(&response.encode()), Ok(response));
    }

    #[test]
    fn request_encoding_matches_protoc() {
        // protoc --encode=echo.EchoRequest <<< 'message: "hi"'
        let request = EchoRequest {
            message: "hi".to_owned(),
        };
        assert_eq!(request.encode(), b"\x0a\x02hi");
        assert_eq!(EchoRequest::decode(b""), Ok(EchoRequest::default()));
    }

    #[test]
    fn frames_round_trip() {
        let framed = frame(b"abc").expect("small message");
        assert_eq!(&framed[..], b"\x00\x00\x00\x00\x03abc");
        assert_eq!(unframe(&framed), Ok(&b"abc"[..]));
    }

    #[test]
    fn malformed_frames_are_refused() {
        let cases: &[(&[u8], FrameError)] = &[
            (b"abc", FrameError::Short(3)),
            (b"\x01\x00\x00\x00\x00", FrameError::Compressed),
            (b"\x07\x00\x00\x00\x00", FrameError::BadFlag(7)),
            (
                b"\x00\x00\x00\x00\x05abc",
                FrameError::LengthMismatch {
                    declared: 5,
                    actual: 3,
                },
            ),
            (
                b"\x00\x00\x00\x00\x01a\x00\x00\x00\x00\x01b",
                FrameError::LengthMismatch {
                    declared: 1,
                    actual: 7,
                },
            ),
        ];
        for (body, want) in cases {
            assert_eq!(unframe(body).as_ref(), Err(want), "body {body:x?}");
        }
    }

    #[test]
    fn grpc_message_escapes_round_trip() {
        let message = "100% sure: ünïcode\n";
        let encoded = percent_encode(message);
        assert_eq!(encoded, "100%25 sure: %C3%BCn%C3%AFcode%0A");
        assert_eq!(percent_decode(&encoded), message);
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn any_method_path_is_answered() {
        for path in [
            ECHO_METHOD,
            "/echo.Echo/EchoV2",
            "/pkg.v1.Other/Call",
            "/S/M",
        ] {
            assert!(is_method_path(path), "{path}");
        }
        for path in [
            "/",
            "/echo.Echo",
            "/echo.Echo/",
            "//Echo",
            "echo.Echo/Echo",
            "/a/b/c",
        ] {
            assert!(!is_method_path(path), "{path}");
        }
    }

    #[test]
    fn grpc_is_told_by_content_type() {
        let with = |content_type: &'static str| {
            let mut req = Request::new(());
            req.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            is_grpc(&req)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/json"));
    }
}

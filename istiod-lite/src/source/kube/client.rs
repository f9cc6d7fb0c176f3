//! A small Kubernetes API client: one HTTP/1.1 connection per request, bearer token re-read
//! from its file on every request (projected tokens rotate), TLS verified against a CA bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tracing::debug;

use super::config::tls_connector;
use super::{KubeConfig, LineFramer, MAX_LINE};
use crate::model::{Kind, ObjectKey};

/// The largest non-watch response read (one page of a list).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// The most of an error response read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A cheap-to-clone handle on one API server.
#[derive(Clone)]
pub struct KubeClient {
    inner: Arc<Inner>,
}

/// Why a request to the API server failed; each message names the likely cause.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("API server URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error(
        "{0} is not set; is istiod-lite running in a pod? Outside a cluster give the API server URL"
    )]
    NotInCluster(&'static str),
    #[error(
        "reading the token file {path}: {source}; is the service account token mounted (automountServiceAccountToken)?"
    )]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA bundle {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error(
        "{url} is https but no CA bundle was given; pass the cluster CA (skipping verification is not supported)"
    )]
    NoCa { url: String },
    #[error(
        "connecting to the API server at {addr}: {source}; is the address right and reachable from here?"
    )]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "TLS handshake with the API server at {addr}: {source}; does the CA bundle sign its certificate, does it name {addr}, and does it speak TLS 1.3?"
    )]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP exchange with the API server: {0}")]
    Http(#[from] hyper::Error),
    #[error(
        "the API server did not answer within {0:?}; is it overloaded, or a proxy holding the connection?"
    )]
    Timeout(Duration),
    #[error(
        "401 from the API server for {path}: is the token file readable and current, and the service account bound to the istiod-lite ClusterRole? ({message})"
    )]
    Unauthorized { path: String, message: String },
    #[error(
        "403 from the API server for {path}: is the service account bound to the istiod-lite ClusterRole (manifests/)? ({message})"
    )]
    Forbidden { path: String, message: String },
    #[error("404 from the API server for {path}: is the CRD installed? ({message})")]
    NotFound { path: String, message: String },
    #[error(
        "410 Gone from the API server for {path}: the resource version is too old; list again ({message})"
    )]
    Gone { path: String, message: String },
    #[error("{code} from the API server for {path}: {message}")]
    Status {
        code: u16,
        path: String,
        message: String,
    },
    #[error(
        "the response for {path} is larger than {limit} bytes; is something other than the API server answering?"
    )]
    TooLarge { path: String, limit: usize },
    #[error(
        "a watch event longer than {limit} bytes; is something other than the API server answering?"
    )]
    LineTooLong { limit: usize },
    #[error("malformed response for {path}: {reason}")]
    Decode { path: String, reason: String },
}

struct Inner {
    scheme: Scheme,
    /// `host:port` as given, for the Host header and logs.
    authority: String,
    host: String,
    port: u16,
    /// Any path the URL had (an API server behind a path-routing proxy), without a trailing `/`.
    prefix: String,
    base_url: String,
    token_file: Option<PathBuf>,
    request_timeout: Duration,
}

enum Scheme {
    Http,
    Https(tokio_rustls::TlsConnector, ServerName<'static>),
}

/// Aborts the task driving a connection when the response it serves is dropped.
struct ConnGuard(JoinHandle<()>);

/// An open watch: the response body read line by line, each line bounded.
pub(crate) struct WatchStream {
    body: Incoming,
    lines: LineFramer,
    idle: Duration,
    ended: bool,
    _conn: ConnGuard,
}

impl KubeClient {
    /// Checks the URL and loads the CA bundle; nothing is sent yet.
    pub fn new(config: KubeConfig) -> Result<Self, KubeError> {
        let url = config.base_url.trim_end_matches('/').to_owned();
        let bad = |reason: &str| KubeError::Url {
            url: url.clone(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let authority = uri
            .authority()
            .ok_or_else(|| bad("no host; write it as https://host:port"))?;
        if uri.query().is_some() || authority.as_str().contains('@') {
            return Err(bad("must not carry a query or credentials"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let scheme = if https {
            let ca = config
                .ca_file
                .as_deref()
                .ok_or_else(|| KubeError::NoCa { url: url.clone() })?;
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| bad(&format!("{host:?} is not a TLS server name: {e}")))?;
            Scheme::Https(tls_connector(ca)?, name)
        } else {
            Scheme::Http
        };
        Ok(Self {
            inner: Arc::new(Inner {
                scheme,
                authority: authority.as_str().to_owned(),
                host: host.to_owned(),
                port,
                prefix: uri.path().trim_end_matches('/').to_owned(),
                base_url: url.clone(),
                token_file: config.token_file,
                request_timeout: config.request_timeout,
            }),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// Merge-patches `status` into the object's status subresource.
    pub async fn patch_status(&self, key: &ObjectKey, status: Value) -> Result<(), KubeError> {
        self.patch_status_at(key, status, None).await
    }

    /// Like [`KubeClient::patch_status`], but only if the object is still at
    /// `resource_version` (the API server answers 409 Conflict otherwise).
    pub async fn patch_status_at(
        &self,
        key: &ObjectKey,
        status: Value,
        resource_version: Option<&str>,
    ) -> Result<(), KubeError> {
        let mut path = object_path(key);
        path.push_str("/status");
        let mut patch = json!({ "status": status });
        if let Some(rv) = resource_version {
            patch["metadata"] = json!({ "resourceVersion": rv });
        }
        self.request_json(
            Method::PATCH,
            &path,
            Some(("application/merge-patch+json", patch)),
        )
        .await?;
        Ok(())
    }

    /// One page of a list of `kind` across all namespaces.
    /// One object, as the API server has it.
    pub async fn get(&self, key: &ObjectKey) -> Result<Value, KubeError> {
        self.request_json(Method::GET, &object_path(key), None)
            .await
    }

    pub(crate) async fn list_page(
        &self,
        kind: Kind,
        limit: usize,
        continue_token: Option<&str>,
    ) -> Result<Value, KubeError> {
        let mut path = format!("{}?limit={limit}", collection_path(kind, ""));
        if let Some(token) = continue_token {
            path.push_str("&continue=");
            path.push_str(&encode(token));
        }
        self.request_json(Method::GET, &path, None).await
    }

    /// Opens a watch of `kind` from `resource_version` (empty: from now, with the current
    /// objects sent as ADDED). The server ends it after `timeout`; silence for longer than
    /// `idle` ends it too.
    pub(crate) async fn watch(
        &self,
        kind: Kind,
        resource_version: &str,
        timeout: Duration,
        idle: Duration,
    ) -> Result<WatchStream, KubeError> {
        let mut path = format!(
            "{}?watch=1&allowWatchBookmarks=true&timeoutSeconds={}",
            collection_path(kind, ""),
            timeout.as_secs().max(1)
        );
        if !resource_version.is_empty() {
            path.push_str("&resourceVersion=");
            path.push_str(&encode(resource_version));
        }
        let limit = self.inner.request_timeout;
        let (resp, conn) = tokio::time::timeout(limit, self.send(Method::GET, &path, None))
            .await
            .map_err(|_| KubeError::Timeout(limit))??;
        let resp = check_status(&path, resp, limit).await?;
        Ok(WatchStream {
            body: resp.into_body(),
            lines: LineFramer::new(MAX_LINE),
            idle,
            ended: false,
            _conn: conn,
        })
    }

    pub(super) async fn request_json(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Value)>,
    ) -> Result<Value, KubeError> {
        let limit = self.inner.request_timeout;
        let exchange = async {
            let (resp, _conn) = self.send(method, path, body).await?;
            let resp = check_status(path, resp, limit).await?;
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(e) => KubeError::Http(*e),
                    Err(_) => KubeError::TooLarge {
                        path: path.to_owned(),
                        limit: MAX_BODY,
                    },
                })?
                .to_bytes();
            serde_json::from_slice(&bytes).map_err(|e| KubeError::Decode {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| KubeError::Timeout(limit))?
    }

    /// Connects, sends one request and returns the response once its headers are in.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Value)>,
    ) -> Result<(Response<Incoming>, ConnGuard), KubeError> {
        let inner = &*self.inner;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", inner.prefix))
            .header(header::HOST, &inner.authority)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "istiod-lite");
        if let Some(file) = &inner.token_file {
            let token = read_token(file).await?;
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some((content_type, v)) => {
                req = req.header(header::CONTENT_TYPE, content_type);
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| KubeError::Url {
            url: format!("{}{path}", inner.base_url),
            reason: e.to_string(),
        })?;

        let addr = inner.authority.clone();
        let tcp = TcpStream::connect((inner.host.as_str(), inner.port))
            .await
            .map_err(|source| KubeError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = match &inner.scheme {
            Scheme::Http => handshake(TokioIo::new(tcp)).await?,
            Scheme::Https(connector, name) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| KubeError::Tls { addr, source })?;
                handshake(TokioIo::new(tls)).await?
            }
        };
        let resp = sender.send_request(req).await?;
        Ok((resp, conn))
    }
}

impl WatchStream {
    /// The next event line, or `None` once the server has ended the watch.
    pub(crate) async fn next_line(&mut self) -> Result<Option<Bytes>, KubeError> {
        loop {
            if let Some(line) = self
                .lines
                .next_line()
                .map_err(|e| KubeError::LineTooLong { limit: e.limit })?
            {
                return Ok(Some(line));
            }
            if self.ended {
                // An event is always newline-terminated; anything after the last one was cut
                // off and is sent again on the next watch, since the version did not advance.
                if let Some(rest) = self.lines.rest() {
                    debug!(bytes = rest.len(), "watch ended inside an event");
                }
                return Ok(None);
            }
            match tokio::time::timeout(self.idle, self.body.frame()).await {
                Err(_) => return Err(KubeError::Timeout(self.idle)),
                Ok(None) => self.ended = true,
                Ok(Some(Err(e))) => return Err(KubeError::Http(e)),
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        self.lines.push(data);
                    }
                }
            }
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `/api/v1/pods`, `/apis/gateway.networking.k8s.io/v1/namespaces/ns/httproutes`.
fn object_path(key: &ObjectKey) -> String {
    let mut path = collection_path(key.kind, &key.namespace);
    path.push('/');
    path.push_str(&encode(&key.name));
    path
}

fn collection_path(kind: Kind, namespace: &str) -> String {
    let version = kind.versions().first().copied().unwrap_or("v1");
    let mut path = if kind.group().is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{}/{version}", kind.group())
    };
    if kind.is_namespaced() && !namespace.is_empty() {
        path.push_str("/namespaces/");
        path.push_str(&encode(namespace));
    }
    path.push('/');
    path.push_str(kind.plural());
    path
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for a path segment or a
/// query value (continue tokens are base64 and may hold `+`, `/` and `=`).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn read_token(path: &Path) -> Result<String, KubeError> {
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| KubeError::Token {
            path: path.to_owned(),
            source,
        })?;
    let token = token.trim();
    if token.is_empty() || token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(KubeError::Token {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "empty, or not a single line of printable ASCII",
            ),
        });
    }
    Ok(token.to_owned())
}

async fn handshake<T>(
    io: T,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        ConnGuard,
    ),
    KubeError,
>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let task = tokio::spawn(async move {
        // Errors surface on the request or the body; nothing more to say here.
        let _ = conn.await;
    });
    Ok((sender, ConnGuard(task)))
}

/// Turns a non-2xx response into the error that names its likely cause.
async fn check_status(
    path: &str,
    resp: Response<Incoming>,
    limit: Duration,
) -> Result<Response<Incoming>, KubeError> {
    let code = resp.status();
    if code.is_success() {
        return Ok(resp);
    }
    let body = tokio::time::timeout(
        limit,
        Limited::new(resp.into_body(), MAX_ERROR_BODY).collect(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(|b| b.to_bytes())
    .unwrap_or_default();
    let message = status_message(&body);
    let path = path.to_owned();
    Err(match code {
        StatusCode::UNAUTHORIZED => KubeError::Unauthorized { path, message },
        StatusCode::FORBIDDEN => KubeError::Forbidden { path, message },
        StatusCode::NOT_FOUND => KubeError::NotFound { path, message },
        StatusCode::GONE => KubeError::Gone { path, message },
        _ => KubeError::Status {
            code: code.as_u16(),
            path,
            message,
        },
    })
}

/// The message of a `kind: Status` body, or the start of whatever else came back.
fn status_message(body: &[u8]) -> String {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    if let Some(m) = parsed.as_ref().and_then(|v| v.get("message")?.as_str()) {
        return m.to_owned();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None if text.is_empty() => "no message".into(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let e = |url: &str| {
            KubeClient::new(KubeConfig::new(url))
                .err()
                .unwrap()
                .to_string()
        };
        assert!(e("ftp://x").contains("http or https"));
        assert!(e("https://10.0.0.1").contains("no CA bundle"));
        assert!(e("/just/a/path").contains("no host"));
        let c = KubeClient::new(KubeConfig::new("http://127.0.0.1:8001/proxy/")).unwrap();
        assert_eq!(c.inner.prefix, "/proxy");
        assert_eq!(c.inner.port, 8001);
        assert_eq!(c.base_url(), "http://127.0.0.1:8001/proxy");
    }

    #[test]
    fn paths() {
        assert_eq!(collection_path(Kind::Pod, ""), "/api/v1/pods");
        assert_eq!(
            collection_path(Kind::HTTPRoute, "apps"),
            "/apis/gateway.networking.k8s.io/v1/namespaces/apps/httproutes"
        );
        assert_eq!(collection_path(Kind::Namespace, "x"), "/api/v1/namespaces");
        assert_eq!(encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
    }

    #[test]
    fn error_messages_come_from_status_bodies() {
        assert_eq!(
            status_message(br#"{"kind":"Status","message":"pods is forbidden"}"#),
            "pods is forbidden"
        );
        assert_eq!(status_message(b"  "), "no message");
        assert_eq!(status_message(&[b'x'; 300]).chars().count(), 201);
    }
}

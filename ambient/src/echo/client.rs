//! The echo client: one request over HTTP/1.1, h2c, gRPC or raw TCP on a new connection, and the
//! `echo-client` command line.

use std::io::{self, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, TE};
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::flags::{Arg, Args, USAGE_EXIT_CODE, UsageError, bad_value};
use super::grpc::{self, CONTENT_TYPE_GRPC, ECHO_METHOD, EchoRequest, EchoResponse};
use super::http::EchoReply;
use super::watched::{FirstError, Watched};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest reply read; an echo of the largest body the server accepts fits easily.
const MAX_REPLY: usize = 16 * 1024 * 1024;

const CLIENT_USAGE: &str = "\
usage: ambient echo-client URL [--h2c | --grpc | --tcp] [-H 'Name: value']... [--data STR]
                           [--count N] [--timeout SECS] [--print-status]

  URL               http://host:port/path for HTTP; host:port for --tcp and --grpc
                    (--grpc also takes host:port/package.Service/Method)
  --h2c             HTTP/2 without TLS (prior knowledge) instead of HTTP/1.1
  --grpc            call /echo.Echo/Echo with the --data as the message
  --tcp             send the --data over raw TCP, half-close, print what comes back
  -H 'Name: value'  request header or gRPC metadata; repeatable
  --data STR        request body (makes an HTTP request a POST)
  --count N         make N requests, each on a new connection (default 1)
  --timeout SECS    give up on a request after SECS seconds (default 5)
  --print-status    print each reply's status instead of its body: the HTTP status code,
                    or the gRPC status code (0 is OK); 000 when no reply came

Exits 1 if any request failed: no reply, an HTTP status other than 2xx, a gRPC error.
";

/// How to talk to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
    Grpc,
    Tcp,
}

/// One request; build it with [`Request::new`], then set the public fields.
#[derive(Clone, Debug)]
pub struct Request {
    pub mode: Mode,
    target: Target,
    /// HTTP headers, or gRPC metadata. A `Host` header overrides the authority of the URL.
    pub headers: HeaderMap,
    /// HTTP body (sent with POST), gRPC message, or bytes sent over TCP.
    pub data: Option<String>,
    /// Limit on the whole exchange, connecting included.
    pub timeout: Duration,
}

/// What the server answered.
#[derive(Debug)]
pub enum Reply {
    Http(HttpReply),
    Grpc(EchoResponse),
    /// Everything the server sent before closing: the greeting line, then the echo.
    Tcp(Bytes),
}

#[derive(Debug)]
pub struct HttpReply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid target {target:?}: {reason}")]
    BadTarget { target: String, reason: String },
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("connection refused")]
    Refused,
    #[error("reset by peer")]
    Reset,
    #[error("connection closed before the reply was complete")]
    Closed,
    #[error("timed out after {}s", .0.as_secs_f64())]
    TimedOut(Duration),
    #[error("{0}")]
    Io(io::Error),
    #[error("HTTP error: {0}")]
    Http(hyper::Error),
    /// The server answered, with a status other than 2xx.
    #[error("HTTP {}", .status.as_u16())]
    Status { status: StatusCode, body: Bytes },
    #[error("gRPC status {code} ({}): {message}", code_name(*.code))]
    Grpc { code: u32, message: String },
    #[error("bad reply: {0}")]
    BadReply(String),
}

/// Where to connect, and the path to ask for.
#[derive(Clone, Debug)]
struct Target {
    /// Name or address, without the brackets of an IPv6 address.
    host: String,
    port: u16,
    /// `host:port` as written, for `Host` and `:authority`.
    authority: String,
    /// HTTP path and query, or gRPC method.
    path: String,
}

/// The parsed `echo-client` command line.
struct ClientArgs {
    request: Request,
    count: u32,
    /// Print statuses, not bodies.
    print_status: bool,
}

impl Request {
    /// A request for `target`: `http://host:port/path` for HTTP and h2c, `host:port` for TCP,
    /// `host:port` or `host:port/package.Service/Method` for gRPC.
    pub fn new(mode: Mode, target: &str) -> Result<Self, ClientError> {
        Ok(Request {
            mode,
            target: Target::parse(mode, target)?,
            headers: HeaderMap::new(),
            data: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }
}

impl HttpReply {
    /// The body as the echo server's JSON.
    pub fn echo(&self) -> Result<EchoReply, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The reply if its status is 2xx, else [`ClientError::Status`] with its body.
    pub fn error_for_status(self) -> Result<Self, ClientError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(ClientError::Status {
                status: self.status,
                body: self.body,
            })
        }
    }
}

impl Target {
    fn parse(mode: Mode, target: &str) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadTarget {
            target: target.to_owned(),
            reason: reason.to_owned(),
        };
        let (authority, port, path) = match mode {
            Mode::Http1 | Mode::H2c => {
                let uri: Uri = target
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
                match uri.scheme_str() {
                    Some("http") => {}
                    Some("https") => {
                        return Err(bad(
                            "https is not supported; the echo app speaks plain HTTP",
                        ));
                    }
                    _ => return Err(bad("expected http://host:port/path")),
                }
                let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
                let port = authority.port_u16().unwrap_or(80);
                let path = uri
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .to_owned();
                (authority, port, path)
            }
            Mode::Grpc | Mode::Tcp => {
                let rest = target.strip_prefix("http://").unwrap_or(target);
                let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                let path = match (mode, path) {
                    (Mode::Grpc, "") => ECHO_METHOD,
                    (Mode::Tcp, "") | (Mode::Grpc, _) => path,
                    _ => return Err(bad("a TCP target is host:port, without a path")),
                };
                let authority: Authority = authority
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
                let port = authority
                    .port_u16()
                    .ok_or_else(|| bad("no port; expected host:port"))?;
                (authority, port, path.to_owned())
            }
        };
        if authority.as_str().contains('@') {
            return Err(bad("user information is not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Target {
            host: host.to_owned(),
            port,
            authority: authority.as_str().to_owned(),
            path,
        })
    }
}

impl ClientArgs {
    fn parse(args: &[String]) -> Result<Self, UsageError> {
        let mut target = None;
        let mut modes = Vec::new();
        let mut headers = HeaderMap::new();
        let mut data = None;
        let mut count = 1;
        let mut timeout = DEFAULT_TIMEOUT;
        let mut print_status = false;
        let mut args = Args::new(args);
        while let Some(arg) = args.next_arg()? {
            let flag = match arg {
                Arg::Positional(url) if target.is_none() => {
                    target = Some(url);
                    continue;
                }
                Arg::Positional(extra) => {
                    return Err(UsageError::UnexpectedArgument(extra.to_owned()));
                }
                Arg::Flag(flag) => flag,
            };
            match flag {
                "--h2c" => modes.push(Mode::H2c),
                "--grpc" => modes.push(Mode::Grpc),
                "--tcp" => modes.push(Mode::Tcp),
                "-H" | "--header" => {
                    let (name, value) = parse_header(flag, args.value(flag)?)?;
                    headers.append(name, value);
                }
                "--data" => data = Some(args.value(flag)?.to_owned()),
                "--print-status" => print_status = true,
                "--count" => {
                    count = args.parse(flag)?;
                    if count == 0 {
                        return Err(bad_value(flag, "0", "must be at least 1"));
                    }
                }
                "--timeout" => {
                    let value = args.value(flag)?;
                    timeout = value
                        .parse::<f64>()
                        .ok()
                        .filter(|secs| *secs > 0.0)
                        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                        .ok_or_else(|| {
                            bad_value(flag, value, "expected a positive number of seconds")
                        })?;
                }
                _ => return Err(UsageError::UnknownFlag(flag.to_owned())),
            }
        }
        let mode = match modes[..] {
            [] => Mode::Http1,
            [mode] => mode,
            _ => {
                return Err(UsageError::Invalid(
                    "--h2c, --grpc and --tcp exclude each other".to_owned(),
                ));
            }
        };
        if print_status && mode == Mode::Tcp {
            return Err(UsageError::Invalid(
                "--print-status needs a protocol with statuses, not --tcp".to_owned(),
            ));
        }
        let target = target.ok_or_else(|| UsageError::Invalid("a URL is required".to_owned()))?;
        let mut request =
            Request::new(mode, target).map_err(|e| UsageError::Invalid(e.to_string()))?;
        request.headers = headers;
        request.data = data;
        request.timeout = timeout;
        Ok(ClientArgs {
            request,
            count,
            print_status,
        })
    }
}

/// Makes one request on a new connection. An HTTP reply is a reply whatever its status
/// ([`HttpReply::error_for_status`] tells failures apart); a gRPC call that fails is an error.
pub async fn request(req: &Request) -> Result<Reply, ClientError> {
    let exchange = async {
        let stream = connect(&req.target).await?;
        match req.mode {
            Mode::Http1 => http(stream, req, false).await,
            Mode::H2c => http(stream, req, true).await,
            Mode::Grpc => grpc(stream, req).await,
            Mode::Tcp => tcp(stream, req).await,
        }
    };
    tokio::time::timeout(req.timeout, exchange)
        .await
        .map_err(|_| ClientError::TimedOut(req.timeout))?
}

/// `ambient echo-client URL FLAGS`: `args` are the arguments after the subcommand.
pub fn client_main(args: &[String]) -> ExitCode {
    let cli = match ClientArgs::parse(args) {
        Ok(cli) => cli,
        Err(UsageError::Help) => {
            print!("{CLIENT_USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("echo-client: {e}");
            return ExitCode::from(USAGE_EXIT_CODE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("echo-client: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: ClientArgs) -> ExitCode {
    let (mut ok, mut failed) = (0u32, 0u32);
    for _ in 0..cli.count {
        let result = request(&cli.request).await.and_then(|reply| match reply {
            Reply::Http(http) => http.error_for_status().map(Reply::Http),
            other => Ok(other),
        });
        if cli.print_status {
            println!("{}", status_line(&result));
        }
        match result {
            Ok(reply) => {
                if !cli.print_status {
                    print_reply(&reply);
                }
                ok += 1;
            }
            Err(e) => {
                if let ClientError::Status { body, .. } = &e
                    && !cli.print_status
                {
                    print_bytes(body);
                }
                eprintln!("echo-client: {e}");
                failed += 1;
            }
        }
    }
    if cli.count > 1 {
        eprintln!("{ok} ok, {failed} failed");
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What `--print-status` prints for one request.
fn status_line(result: &Result<Reply, ClientError>) -> String {
    match result {
        Ok(Reply::Http(http)) => http.status.as_u16().to_string(),
        Ok(Reply::Grpc(_)) => grpc::code::OK.to_string(),
        Ok(Reply::Tcp(_)) => "ok".to_owned(),
        Err(ClientError::Status { status, .. }) => status.as_u16().to_string(),
        Err(ClientError::Grpc { code, .. }) => code.to_string(),
        Err(_) => "000".to_owned(),
    }
}

fn print_reply(reply: &Reply) {
    match reply {
        Reply::Http(http) => print_bytes(&http.body),
        Reply::Grpc(response) => {
            let json =
                serde_json::to_string_pretty(response).expect("EchoResponse holds only strings");
            print_bytes(json.as_bytes());
        }
        Reply::Tcp(bytes) => {
            // What came back, as it came back.
            let _ = io::stdout().lock().write_all(bytes);
        }
    }
}

/// Writes a reply body, ending it with a newline if it has none.
fn print_bytes(bytes: &[u8]) {
    let mut out = io::stdout().lock();
    // stdout closed early (`| head`) is not the request's failure.
    let _ = out.write_all(bytes);
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        let _ = out.write_all(b"\n");
    }
}

fn parse_header(flag: &str, header: &str) -> Result<(HeaderName, HeaderValue), UsageError> {
    let (name, value) = header
        .split_once(':')
        .ok_or_else(|| bad_value(flag, header, "expected 'Name: value'"))?;
    let name =
        HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| bad_value(flag, header, e))?;
    let value = HeaderValue::from_str(value.trim()).map_err(|e| bad_value(flag, header, e))?;
    Ok((name, value))
}

async fn connect(target: &Target) -> Result<TcpStream, ClientError> {
    let resolve_error = |source| ClientError::Resolve {
        host: target.host.clone(),
        source,
    };
    let addrs = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(resolve_error)?;
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(from_io)?;
                return Ok(stream);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(match last_error {
        Some(e) => from_io(e),
        None => resolve_error(io::Error::new(io::ErrorKind::NotFound, "no addresses")),
    })
}

async fn http(stream: TcpStream, req: &Request, h2: bool) -> Result<Reply, ClientError> {
    let mut headers = req.headers.clone();
    let method = if req.data.is_some() {
        Method::POST
    } else {
        Method::GET
    };
    let (uri, version) = if h2 {
        (h2_uri(&req.target, &mut headers)?, Version::HTTP_2)
    } else {
        if !headers.contains_key(HOST) {
            let host = HeaderValue::from_str(&req.target.authority)
                .map_err(|e| ClientError::BadRequest(format!("Host header: {e}")))?;
            headers.insert(HOST, host);
        }
        let path = Uri::try_from(req.target.path.as_str())
            .map_err(|e| ClientError::BadRequest(format!("request path: {e}")))?;
        (path, Version::HTTP_11)
    };
    let mut request = http::Request::builder()
        .method(method)
        .uri(uri)
        .version(version)
        .body(Full::new(Bytes::from(req.data.clone().unwrap_or_default())))
        .map_err(|e| ClientError::BadRequest(e.to_string()))?;
    *request.headers_mut() = headers;

    let (response, socket) = send(stream, request, h2).await?;
    let status = response.status();
    let version = response.version();
    let (parts, body) = response.into_parts();
    let body = collect(body, &socket).await?.to_bytes();
    Ok(Reply::Http(HttpReply {
        status,
        version,
        headers: parts.headers,
        body,
    }))
}

async fn grpc(stream: TcpStream, req: &Request) -> Result<Reply, ClientError> {
    let mut headers = req.headers.clone();
    let uri = h2_uri(&req.target, &mut headers)?;
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_GRPC));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    let message = EchoRequest {
        message: req.data.clone().unwrap_or_default(),
    };
    let body =
        grpc::frame(&message.encode()).map_err(|e| ClientError::BadRequest(e.to_string()))?;
    let mut request = http::Request::builder()
        .method(Method::POST)
        .uri(uri)
        .version(Version::HTTP_2)
        .body(Full::new(body))
        .map_err(|e| ClientError::BadRequest(e.to_string()))?;
    *request.headers_mut() = headers;

    let (response, socket) = send(stream, request, true).await?;
    let (parts, body) = response.into_parts();
    let collected = collect(body, &socket).await?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = collected.to_bytes();
    if !parts.status.is_success() {
        return Err(ClientError::Status {
            status: parts.status,
            body,
        });
    }
    // A failed call may put the status in the headers ("Trailers-Only").
    let status_from = if parts.headers.contains_key("grpc-status") {
        &parts.headers
    } else {
        &trailers
    };
    let code = status_from
        .get("grpc-status")
        .and_then(|code| code.to_str().ok())
        .and_then(|code| code.parse::<u32>().ok())
        .ok_or_else(|| ClientError::BadReply("no valid grpc-status in the reply".to_owned()))?;
    if code != grpc::code::OK {
        let message = status_from
            .get("grpc-message")
            .map(|message| grpc::percent_decode(&String::from_utf8_lossy(message.as_bytes())))
            .unwrap_or_default();
        return Err(ClientError::Grpc { code, message });
    }
    let message = grpc::unframe(&body)
        .map_err(|e| ClientError::BadReply(format!("malformed gRPC frame: {e}")))?;
    let response = EchoResponse::decode(message)
        .map_err(|e| ClientError::BadReply(format!("malformed EchoResponse: {e}")))?;
    Ok(Reply::Grpc(response))
}

async fn tcp(stream: TcpStream, req: &Request) -> Result<Reply, ClientError> {
    let (mut reader, mut writer) = stream.into_split();
    // Send and receive at once: the server echoes while we write, and both sides have
    // bounded buffers.
    let send = async {
        if let Some(data) = &req.data {
            writer.write_all(data.as_bytes()).await?;
        }
        writer.shutdown().await
    };
    let receive = async {
        let mut received = Vec::new();
        (&mut reader)
            .take(MAX_REPLY as u64 + 1)
            .read_to_end(&mut received)
            .await?;
        Ok::<_, io::Error>(received)
    };
    let (sent, received) = tokio::join!(send, receive);
    // A reset shows on the read side; report that rather than the broken pipe it causes.
    let received = received.map_err(from_io)?;
    sent.map_err(from_io)?;
    if received.len() > MAX_REPLY {
        return Err(ClientError::BadReply(format!(
            "more than {MAX_REPLY} bytes came back"
        )));
    }
    Ok(Reply::Tcp(received.into()))
}

/// The absolute URI of an HTTP/2 request, whose authority a `Host` header overrides (HTTP/2
/// sends it as `:authority` instead).
fn h2_uri(target: &Target, headers: &mut HeaderMap) -> Result<Uri, ClientError> {
    let authority = match headers.remove(HOST) {
        Some(host) => host
            .to_str()
            .map_err(|e| ClientError::BadRequest(format!("Host header: {e}")))?
            .to_owned(),
        None => target.authority.clone(),
    };
    format!("http://{authority}{}", target.path)
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::BadRequest(format!("request URI: {e}")))
}

/// Sends `request` on a new HTTP/1.1 or HTTP/2 connection; returns the response and what the
/// socket saw, to explain a failure while reading the body.
async fn send(
    stream: TcpStream,
    request: http::Request<Full<Bytes>>,
    h2: bool,
) -> Result<(http::Response<Incoming>, FirstError), ClientError> {
    let (stream, socket) = Watched::new(stream);
    let io = TokioIo::new(stream);
    // The connection tasks end once the sender is dropped; their errors reach the request.
    let response = if h2 {
        let (mut sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| from_hyper(e, &socket))?;
        tokio::spawn(conn);
        sender.send_request(request).await
    } else {
        let (mut sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| from_hyper(e, &socket))?;
        tokio::spawn(conn);
        sender.send_request(request).await
    };
    match response {
        Ok(response) => Ok((response, socket)),
        Err(e) => Err(from_hyper(e, &socket)),
    }
}

async fn collect(
    body: Incoming,
    socket: &FirstError,
) -> Result<http_body_util::Collected<Bytes>, ClientError> {
    Limited::new(body, MAX_REPLY).collect().await.map_err(|e| {
        if e.is::<LengthLimitError>() {
            return ClientError::BadReply(format!("reply larger than {MAX_REPLY} bytes"));
        }
        match e.downcast::<hyper::Error>() {
            Ok(e) => from_hyper(*e, socket),
            Err(e) => ClientError::BadReply(e.to_string()),
        }
    })
}

fn from_io(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ClientError::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => ClientError::Reset,
        io::ErrorKind::UnexpectedEof => ClientError::Closed,
        _ => ClientError::Io(e),
    }
}

/// A hyper error, explained by what the socket saw when that says more (a reset, say).
fn from_hyper(e: hyper::Error, socket: &FirstError) -> ClientError {
    if let Some(&kind) = socket.get() {
        match from_io(io::Error::from(kind)) {
            ClientError::Io(_) => {}
            classified => return classified,
        }
    }
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        return ClientError::Closed;
    }
    ClientError::Http(e)
}

fn code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|code| NAMES.get(code))
        .copied()
        .unwrap_or("unknown code")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(mode: Mode, s: &str) -> Result<(String, u16, String, String), String> {
        Target::parse(mode, s)
            .map(|t| (t.host, t.port, t.authority, t.path))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn targets_parse_per_mode() {
        let ok = |host: &str, port, authority: &str, path: &str| {
            Ok((host.to_owned(), port, authority.to_owned(), path.to_owned()))
        };
        assert_eq!(
            target(Mode::Http1, "http://echo.ns:8080/a?b=1"),
            ok("echo.ns", 8080, "echo.ns:8080", "/a?b=1")
        );
        assert_eq!(
            target(Mode::H2c, "http://[::1]"),
            ok("::1", 80, "[::1]", "/")
        );
        assert_eq!(
            target(Mode::Tcp, "10.0.0.1:9000"),
            ok("10.0.0.1", 9000, "10.0.0.1:9000", "")
        );
        assert_eq!(
            target(Mode::Grpc, "echo:9090"),
            ok("echo", 9090, "echo:9090", ECHO_METHOD)
        );
        assert_eq!(
            target(Mode::Grpc, "http://echo:9090/x.Y/Z"),
            ok("echo", 9090, "echo:9090", "/x.Y/Z")
        );
    }

    #[test]
    fn bad_targets_say_why() {
        let cases = [
            (Mode::Http1, "https://echo/", "https is not supported"),
            (Mode::Http1, "echo:80", "expected http://host:port/path"),
            (Mode::Tcp, "echo", "no port"),
            (Mode::Tcp, "echo:1/path", "without a path"),
            (Mode::Grpc, "user@echo:1", "user information"),
        ];
        for (mode, s, want) in cases {
            let err = target(mode, s).expect_err(s);
            assert!(err.contains(want), "{s}: {err}");
        }
    }

    #[test]
    fn command_line_builds_the_request() {
        let args: Vec<String> = [
            "echo:9090",
            "--grpc",
            "-H",
            "x-a: 1",
            "--data=hi",
            "--count",
            "3",
            "--timeout",
            "0.5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cli = ClientArgs::parse(&args).expect("valid command line");
        assert!(!cli.print_status);
        assert_eq!(cli.count, 3);
        assert_eq!(cli.request.mode, Mode::Grpc);
        assert_eq!(cli.request.headers["x-a"], "1");
        assert_eq!(cli.request.data.as_deref(), Some("hi"));
        assert_eq!(cli.request.timeout, Duration::from_millis(500));
    }

    #[test]
    fn bad_command_lines_are_usage_errors() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "a URL is required"),
            (&["a:1", "--tcp", "--grpc"], "exclude each other"),
            (&["http://a/", "-H", "no-colon"], "expected 'Name: value'"),
            (&["http://a/", "--count", "0"], "must be at least 1"),
            (
                &["http://a/", "--timeout", "-1"],
                "positive number of seconds",
            ),
            (&["http://a/", "http://b/"], "unexpected argument"),
            (&["http://a/", "--insecure"], "unknown flag --insecure"),
            (&["a:1", "--tcp", "--print-status"], "not --tcp"),
        ];
        for (args, want) in cases {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let err = ClientArgs::parse(&args)
                .err()
                .expect("invalid command line");
            assert!(err.to_string().contains(want), "{args:?}: {err}");
        }
        assert_eq!(
            client_main(&["--bogus".to_owned()]),
            ExitCode::from(USAGE_EXIT_CODE)
        );
    }

    #[test]
    fn statuses_print_as_numbers() {
        let http = |code: u16| HttpReply {
            status: StatusCode::from_u16(code).expect("valid code"),
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        let cases = [
            (Ok(Reply::Http(http(204))), "204"),
            (http(503).error_for_status().map(Reply::Http), "503"),
            (Ok(Reply::Grpc(EchoResponse::default())), "0"),
            (
                Err(ClientError::Grpc {
                    code: 14,
                    message: String::new(),
                }),
                "14",
            ),
            (Err(ClientError::Refused), "000"),
        ];
        for (result, want) in cases {
            assert_eq!(status_line(&result), want, "{result:?}");
        }
        assert!(http(200).error_for_status().is_ok());
        assert_eq!(
            http(404)
                .error_for_status()
                .expect_err("not 2xx")
                .to_string(),
            "HTTP 404"
        );
    }

    #[test]
    fn errors_read_as_one_line_reasons() {
        assert_eq!(
            ClientError::TimedOut(Duration::from_secs(5)).to_string(),
            "timed out after 5s"
        );
        assert_eq!(
            ClientError::Status {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: Bytes::new()
            }
            .to_string(),
            "HTTP 503"
        );
        assert_eq!(
            ClientError::Grpc {
                code: 12,
                message: "no such method".to_owned()
            }
            .to_string(),
            "gRPC status 12 (UNIMPLEMENTED): no such method"
        );
    }
}

//! The echo app over real sockets on loopback: what the server answers on each kind of port,
//! how it copes with bad input, and the client API and command line against it.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ambient::echo::hooks::FAIL_ONCE_HEADER;
use ambient::echo::{
    self, ClientError, EchoReply, HttpReply, MAX_BODY, Mode, Port, Protocol, Reply, Request,
    RunningServer, ServerConfig,
};
use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const POD: &str = "echo-1";
const NAMESPACE: &str = "test-ns";

/// An echo server on loopback with one port of each kind, chosen by the system.
async fn start_server(idle_timeout: Duration) -> RunningServer {
    let mut cfg = ServerConfig::new(POD, NAMESPACE);
    cfg.bind = Ipv4Addr::LOCALHOST.into();
    cfg.ports = [Protocol::Http, Protocol::Grpc, Protocol::Tcp]
        .map(|protocol| Port { protocol, port: 0 })
        .into();
    cfg.idle_timeout = idle_timeout;
    echo::start(cfg).await.expect("echo server starts")
}

async fn server() -> RunningServer {
    start_server(echo::DEFAULT_IDLE_TIMEOUT).await
}

fn addr(server: &RunningServer, protocol: Protocol) -> SocketAddr {
    server
        .addr(protocol)
        .expect("server listens on every protocol")
}

fn http_request(server: &RunningServer, mode: Mode, path: &str) -> Request {
    let url = format!("http://{}{path}", addr(server, Protocol::Http));
    Request::new(mode, &url).expect("valid URL")
}

async fn echo_reply(req: &Request) -> EchoReply {
    match echo::request(req).await.expect("request succeeds") {
        Reply::Http(reply) => reply.echo().expect("reply is the echo JSON"),
        other => panic!("expected an HTTP reply, got {other:?}"),
    }
}

/// Writes `request` on a new connection and reads until the server closes it.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (SocketAddr, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let local = stream.local_addr().expect("local address");
    stream.write_all(request).await.expect("send");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read until close");
    (local, String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test]
async fn http1_reply_describes_the_request() {
    let server = server().await;
    let mut req = http_request(&server, Mode::Http1, "/hello?x=1");
    req.headers
        .insert("x-test", HeaderValue::from_static("yes"));
    req.headers
        .append("x-test", HeaderValue::from_static("again"));

    let reply = echo_reply(&req).await;
    let http_addr = addr(&server, Protocol::Http);
    assert_eq!(
        (reply.pod.as_str(), reply.namespace.as_str()),
        (POD, NAMESPACE)
    );
    assert_eq!(reply.protocol, "HTTP/1.1");
    assert_eq!(reply.method, "GET");
    assert_eq!(reply.path, "/hello?x=1");
    assert_eq!(reply.host, http_addr.to_string());
    assert_eq!(reply.headers["x-test"], ["yes", "again"]);
    assert_eq!(reply.local_addr, http_addr);
    assert!(reply.remote_addr.ip().is_loopback());
    assert_eq!(reply.body, "");
}

#[tokio::test]
async fn http1_reports_the_peer_address_the_server_saw() {
    let server = server().await;
    let (local, response) = raw_exchange(
        addr(&server, Protocol::Http),
        b"GET /raw HTTP/1.1\r\nHost: echo.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let reply: EchoReply = serde_json::from_str(body).expect("echo JSON");
    assert_eq!(reply.remote_addr, local);
    assert_eq!(reply.host, "echo.test");
}

#[tokio::test]
async fn h2c_is_served_on_the_http_port() {
    let server = server().await;
    let mut req = http_request(&server, Mode::H2c, "/h2");
    req.data = Some("ping".to_owned());

    let reply = echo_reply(&req).await;
    assert_eq!(reply.protocol, "HTTP/2");
    assert_eq!(reply.method, "POST");
    assert_eq!(reply.path, "/h2");
    assert_eq!(reply.host, addr(&server, Protocol::Http).to_string());
    assert_eq!(reply.body, "ping");
}

/// The status and the reply of an HTTP request, whatever the status.
async fn http_reply(req: &Request) -> HttpReply {
    match echo::request(req).await.expect("a reply") {
        Reply::Http(reply) => reply,
        other => panic!("expected an HTTP reply, got {other:?}"),
    }
}

#[tokio::test]
async fn requested_status_is_returned_with_the_echo() {
    let server = server().await;
    for mode in [Mode::Http1, Mode::H2c] {
        let req = http_request(&server, mode, "/?status=503");
        let reply = http_reply(&req).await;
        assert_eq!(reply.status, 503);
        assert_eq!(
            reply.echo().expect("echo JSON with the 503").path,
            "/?status=503"
        );
        let err = reply.error_for_status().expect_err("503 is a failure");
        assert_eq!(err.to_string(), "HTTP 503");
        assert!(matches!(err, ClientError::Status { .. }));
    }
}

#[tokio::test]
async fn oversized_body_is_refused_with_413() {
    let server = server().await;
    for mode in [Mode::Http1, Mode::H2c] {
        let mut req = http_request(&server, mode, "/upload");
        req.data = Some("x".repeat(MAX_BODY + 1));
        assert_eq!(http_reply(&req).await.status, 413, "{mode:?}");

        req.data = Some("x".repeat(MAX_BODY));
        assert_eq!(
            echo_reply(&req).await.body.len(),
            MAX_BODY,
            "{mode:?}: the limit itself is fine"
        );
    }
}

#[tokio::test]
async fn an_upgrade_switches_the_connection_to_a_byte_echo() {
    let server = server().await;
    let mut stream = TcpStream::connect(addr(&server, Protocol::Http))
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert_ne!(reader.read_line(&mut head).await.unwrap(), 0, "{head:?}");
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head:?}"
    );
    let mut stream = reader.into_inner();
    stream.write_all(b"raw bytes").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"raw bytes");
}

#[tokio::test]
async fn garbage_gets_400_and_the_server_keeps_serving() {
    let server = server().await;
    let (_, response) = raw_exchange(
        addr(&server, Protocol::Http),
        b"\x16\x03\x01garbage\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response:?}");

    let reply = echo_reply(&http_request(&server, Mode::Http1, "/after")).await;
    assert_eq!(reply.path, "/after");
}

#[tokio::test]
async fn grpc_echo_returns_message_and_metadata() {
    let server = server().await;
    // The gRPC port, and the HTTP port, which answers gRPC calls too.
    for protocol in [Protocol::Grpc, Protocol::Http] {
        let mut req =
            Request::new(Mode::Grpc, &addr(&server, protocol).to_string()).expect("valid target");
        req.headers.insert("x-meta", HeaderValue::from_static("v"));
        req.data = Some("hello".to_owned());

        let Reply::Grpc(response) = echo::request(&req).await.expect("call succeeds") else {
            panic!("expected a gRPC reply");
        };
        assert_eq!(response.message, "hello");
        assert_eq!(
            (response.pod.as_str(), response.namespace.as_str()),
            (POD, NAMESPACE)
        );
        assert_eq!(response.metadata["x-meta"], "v");
        assert_eq!(response.metadata["content-type"], "application/grpc");
        assert_eq!(response.method, "/echo.Echo/Echo");
    }
}

#[tokio::test]
async fn grpc_any_method_is_answered_and_named() {
    let server = server().await;
    for method in ["/echo.Echo/EchoV2", "/other.v1.Service/Call"] {
        let target = format!("{}{method}", addr(&server, Protocol::Grpc));
        let mut req = Request::new(Mode::Grpc, &target).expect("valid target");
        req.data = Some("hi".to_owned());
        let Reply::Grpc(response) = echo::request(&req).await.expect("call succeeds") else {
            panic!("expected a gRPC reply");
        };
        assert_eq!(
            (
                response.method.as_str(),
                response.message.as_str(),
                response.pod.as_str()
            ),
            (method, "hi", POD)
        );
    }
}

#[tokio::test]
async fn grpc_path_that_names_no_method_is_unimplemented() {
    let server = server().await;
    let target = format!("{}/echo.Echo", addr(&server, Protocol::Grpc));
    let req = Request::new(Mode::Grpc, &target).expect("valid target");
    match echo::request(&req).await {
        Err(ClientError::Grpc { code, message }) => {
            assert_eq!(code, 12);
            assert!(
                message.contains("/echo.Echo is not a method path"),
                "{message}"
            );
        }
        other => panic!("expected UNIMPLEMENTED, got {other:?}"),
    }
}

#[tokio::test]
async fn delay_postpones_the_answer() {
    let server = server().await;
    for mode in [Mode::Http1, Mode::H2c] {
        let started = Instant::now();
        let reply = echo_reply(&http_request(&server, mode, "/slow?delay=300")).await;
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{mode:?} answered after {:?}",
            started.elapsed()
        );
        assert_eq!(reply.path, "/slow?delay=300");
    }
    // A client that gives up first sees a timeout.
    let mut req = http_request(&server, Mode::Http1, "/?delay=2000");
    req.timeout = Duration::from_millis(200);
    let err = echo::request(&req).await.expect_err("gave up");
    assert_eq!(err.to_string(), "timed out after 0.2s");

    let reply = http_reply(&http_request(&server, Mode::Http1, "/?delay=60001")).await;
    assert_eq!(reply.status, 400);
    assert!(
        String::from_utf8_lossy(&reply.body).contains("from 0 to 60000"),
        "{reply:?}"
    );
}

#[tokio::test]
async fn a_fail_once_key_fails_the_first_request_only() {
    let server = server().await;
    for (mode, key) in [(Mode::Http1, "k1"), (Mode::H2c, "k2")] {
        let mut req = http_request(&server, mode, "/retry");
        req.headers
            .insert(FAIL_ONCE_HEADER, HeaderValue::from_static(key));
        let first = http_reply(&req).await;
        assert_eq!(first.status, 503, "{mode:?}");
        assert_eq!(first.echo().expect("echo JSON").pod, POD);
        assert_eq!(http_reply(&req).await.status, 200, "{mode:?}");
        assert_eq!(http_reply(&req).await.status, 200, "{mode:?}");
    }
    // gRPC calls too: an HTTP 503, as a failing server would give.
    let mut req =
        Request::new(Mode::Grpc, &addr(&server, Protocol::Grpc).to_string()).expect("target");
    req.headers
        .insert(FAIL_ONCE_HEADER, HeaderValue::from_static("k3"));
    let err = echo::request(&req).await.expect_err("first call fails");
    assert_eq!(err.to_string(), "HTTP 503");
    assert!(matches!(echo::request(&req).await, Ok(Reply::Grpc(_))));
}

#[tokio::test]
async fn the_failure_switch_fails_everything_until_turned_off() {
    let server = server().await;
    let switch = |query: &str| {
        let mut req = http_request(&server, Mode::Http1, &format!("/echo/fail{query}"));
        req.data = Some(String::new());
        req
    };
    let on = http_reply(&switch("?status=503")).await;
    assert_eq!(on.status, 200);
    let said: serde_json::Value = serde_json::from_slice(&on.body).expect("JSON");
    assert_eq!(said["failing"], 503);
    assert_eq!(said["pod"], POD);

    for mode in [Mode::Http1, Mode::H2c] {
        let reply = http_reply(&http_request(&server, mode, "/any")).await;
        assert_eq!(reply.status, 503, "{mode:?}");
        assert_eq!(reply.echo().expect("echo JSON").path, "/any");
    }
    let grpc =
        Request::new(Mode::Grpc, &addr(&server, Protocol::Grpc).to_string()).expect("valid target");
    assert_eq!(
        echo::request(&grpc).await.expect_err("failing").to_string(),
        "HTTP 503"
    );
    // The switch itself still answers; a bad one is refused and changes nothing.
    let bad = http_reply(&switch("?status=200")).await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        http_reply(&http_request(&server, Mode::Http1, "/"))
            .await
            .status,
        503
    );

    let off = http_reply(&switch("?status=0")).await;
    assert_eq!(off.status, 200);
    let said: serde_json::Value = serde_json::from_slice(&off.body).expect("JSON");
    assert!(said["failing"].is_null(), "{said}");
    assert_eq!(
        echo_reply(&http_request(&server, Mode::Http1, "/"))
            .await
            .path,
        "/"
    );
    assert!(matches!(echo::request(&grpc).await, Ok(Reply::Grpc(_))));
}

#[tokio::test]
async fn grpc_malformed_frame_is_an_internal_error() {
    let server = server().await;
    let stream = TcpStream::connect(addr(&server, Protocol::Grpc))
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let request = http::Request::post(format!(
        "http://{}/echo.Echo/Echo",
        addr(&server, Protocol::Grpc)
    ))
    .header("content-type", "application/grpc")
    .body(Full::new(Bytes::from_static(b"abc")))
    .expect("valid request");

    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200, "gRPC errors travel in grpc-status");
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("body");
    let status = parts
        .headers
        .get("grpc-status")
        .or(collected.trailers().and_then(|t| t.get("grpc-status")));
    assert_eq!(status.expect("grpc-status"), "13");
    let message = parts.headers.get("grpc-message").expect("grpc-message");
    assert!(
        message
            .to_str()
            .expect("ASCII")
            .contains("malformed gRPC frame"),
        "{message:?}"
    );
}

#[tokio::test]
async fn tcp_greets_echoes_and_closes_on_half_close() {
    let server = server().await;
    let tcp_addr = addr(&server, Protocol::Tcp);
    let stream = TcpStream::connect(tcp_addr).await.expect("connect");
    let local = stream.local_addr().expect("local address");
    let mut stream = BufReader::new(stream);

    let mut greeting = String::new();
    stream.read_line(&mut greeting).await.expect("greeting");
    assert_eq!(
        greeting,
        format!("echo {NAMESPACE}/{POD} {tcp_addr} from {local}\n")
    );

    stream.get_mut().write_all(b"abc").await.expect("send");
    let mut echoed = [0; 3];
    stream.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(&echoed, b"abc");

    stream.get_mut().shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.expect("server closes");
    assert!(rest.is_empty(), "nothing after the echo: {rest:?}");
}

#[tokio::test]
async fn tcp_client_gets_greeting_and_echo() {
    let server = server().await;
    let mut req =
        Request::new(Mode::Tcp, &addr(&server, Protocol::Tcp).to_string()).expect("valid target");
    // Larger than the socket buffers: sending and receiving must overlap.
    let data = "0123456789abcdef".repeat(64 * 1024);
    req.data = Some(data.clone());

    let Reply::Tcp(received) = echo::request(&req).await.expect("exchange succeeds") else {
        panic!("expected a TCP reply");
    };
    let received = String::from_utf8(received.to_vec()).expect("ASCII");
    let (greeting, echoed) = received.split_once('\n').expect("greeting line");
    assert!(
        greeting.starts_with(&format!("echo {NAMESPACE}/{POD} ")),
        "{greeting}"
    );
    assert!(
        echoed == data,
        "echo differs: {} bytes back, {} sent",
        echoed.len(),
        data.len()
    );
}

#[tokio::test]
async fn given_listeners_are_served_and_shutdown_closes_them() {
    // As bound by a caller inside a pod's network namespace.
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let tcp_addr = listener.local_addr().expect("address");
    let mut cfg = ServerConfig::new(POD, NAMESPACE);
    cfg.listeners.push((Protocol::Tcp, listener));
    let server = echo::start(cfg).await.expect("echo server starts");
    assert_eq!(server.addr(Protocol::Tcp), Some(tcp_addr));

    let req = Request::new(Mode::Tcp, &tcp_addr.to_string()).expect("valid target");
    assert!(echo::request(&req).await.is_ok());

    server.shutdown().await;
    let err = echo::request(&req).await.expect_err("listener closed");
    assert_eq!(err.to_string(), "connection refused");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let idle = Duration::from_millis(300);
    let server = start_server(idle).await;
    let mut stream = BufReader::new(
        TcpStream::connect(addr(&server, Protocol::Tcp))
            .await
            .expect("connect"),
    );
    stream
        .read_line(&mut String::new())
        .await
        .expect("greeting");

    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut [0; 16]))
        .await
        .expect("server closes the idle connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= idle / 2,
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn client_names_connection_failures() {
    let refused = {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        listener.local_addr().expect("address")
    };
    let req = Request::new(Mode::Http1, &format!("http://{refused}/")).expect("valid URL");
    let err = echo::request(&req).await.expect_err("nobody listens");
    assert_eq!(err.to_string(), "connection refused");

    // Accepted by the kernel, never answered.
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let mut req = Request::new(
        Mode::H2c,
        &format!("http://{}/", silent.local_addr().expect("address")),
    )
    .expect("valid URL");
    req.timeout = Duration::from_millis(200);
    let err = echo::request(&req).await.expect_err("no answer");
    assert_eq!(err.to_string(), "timed out after 0.2s");

    // Accepted, then reset once the request is in, so the client is waiting for the reply.
    for mode in [Mode::Http1, Mode::H2c, Mode::Grpc, Mode::Tcp] {
        let resetting = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let target = resetting.local_addr().expect("address");
        tokio::spawn(async move {
            let (stream, _) = resetting.accept().await.expect("accept");
            let mut stream = BufReader::new(stream);
            stream
                .read_line(&mut String::new())
                .await
                .expect("request line");
            stream.get_ref().set_zero_linger().expect("SO_LINGER 0");
        });
        let target = match mode {
            Mode::Http1 | Mode::H2c => format!("http://{target}/"),
            Mode::Grpc | Mode::Tcp => target.to_string(),
        };
        let mut req = Request::new(mode, &target).expect("valid target");
        req.data = Some("line\n".to_owned());
        let err = echo::request(&req).await.expect_err("reset");
        assert_eq!(err.to_string(), "reset by peer", "{mode:?}");
    }
}

#[test]
fn client_command_line_exit_codes() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = runtime.block_on(server());
    let url = |path: &str| format!("http://{}{path}", addr(&server, Protocol::Http));
    let run = |args: &[String]| echo::client_main(args);

    assert_eq!(
        run(&[url("/"), "--count".to_owned(), "2".to_owned()]),
        ExitCode::SUCCESS
    );
    assert_eq!(run(&[url("/?status=500")]), ExitCode::FAILURE);
    assert_eq!(
        run(&[url("/?status=204"), "--print-status".to_owned()]),
        ExitCode::SUCCESS
    );
    assert_eq!(
        run(&[url("/?status=503"), "--print-status".to_owned()]),
        ExitCode::FAILURE
    );
    assert_eq!(run(&[url("/"), "--bogus".to_owned()]), ExitCode::from(2));
    assert_eq!(run(&["--tcp".to_owned()]), ExitCode::from(2), "no target");
}

#[test]
fn server_command_line_needs_a_port() {
    assert_eq!(echo::server_main(&[]), ExitCode::from(2));
    assert_eq!(
        echo::server_main(&["--http".to_owned(), "x".to_owned()]),
        ExitCode::from(2)
    );
}

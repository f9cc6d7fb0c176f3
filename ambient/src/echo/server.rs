//! The echo server: listeners for HTTP (HTTP/1.1 and h2c on one port), gRPC and raw TCP, and the
//! `echo-server` command line.

use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::flags::{Arg, Args, USAGE_EXIT_CODE, UsageError, bad_value};
use super::hooks::Hooks;
use super::idle::IdleTimeout;
use super::{grpc, http as echo_http, tcp};

/// Environment variable naming the pod, as the Kubernetes downward API sets it.
pub const POD_NAME_ENV: &str = "POD_NAME";
/// Environment variable naming the pod's namespace.
pub const POD_NAMESPACE_ENV: &str = "POD_NAMESPACE";
pub const DEFAULT_NAMESPACE: &str = "default";
/// The pod name when neither `--name`, `POD_NAME` nor the hostname gives one.
pub const DEFAULT_POD: &str = "echo";
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause after a failed `accept` (out of file descriptors, say) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

const SERVER_USAGE: &str = "\
usage: ambient echo-server [--http PORT]... [--grpc PORT]... [--tcp PORT]...
                           [--bind IP] [--name POD] [--namespace NS]

  --http PORT       HTTP/1.1 and h2c (prior knowledge) on PORT; repeatable
  --grpc PORT       gRPC (h2c) on PORT: any method answers as /echo.Echo/Echo; repeatable
  --tcp PORT        raw TCP: a greeting line, then every byte back; repeatable
  --bind IP         address to listen on (default 0.0.0.0)
  --name POD        pod name to report (default $POD_NAME, else the hostname)
  --namespace NS    namespace to report (default $POD_NAMESPACE, else default)

HTTP requests may ask for ?status=NNN (200-599) and ?delay=MS (0-60000). The first request
with a given x-echo-fail-once header value gets 503. POST /echo/fail?status=NNN makes every
later request fail with NNN (HTTP and gRPC), until POST /echo/fail?status=0.
";

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 and prior-knowledge HTTP/2 on one port, told apart by the HTTP/2 preface.
    /// gRPC requests (by content type) are answered here too.
    Http,
    /// gRPC over h2c: HTTP/2 only. Other HTTP/2 requests get the HTTP echo.
    Grpc,
    /// Raw TCP echo.
    Tcp,
}

/// A port to bind on [`ServerConfig::bind`]; port 0 lets the system choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug)]
pub struct ServerConfig {
    /// Pod name reported in every reply.
    pub pod: String,
    /// Namespace reported in every reply.
    pub namespace: String,
    /// Address the `ports` are bound on.
    pub bind: IpAddr,
    pub ports: Vec<Port>,
    /// Listeners the caller bound already, e.g. inside a pod's network namespace.
    pub listeners: Vec<(Protocol, std::net::TcpListener)>,
    /// A connection with no bytes moving either way for this long is closed.
    pub idle_timeout: Duration,
}

/// An address the server is listening on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundAddr {
    pub protocol: Protocol,
    pub addr: SocketAddr,
}

/// A started server. Dropping it closes the listeners and every open connection, soon after;
/// [`RunningServer::shutdown`] waits until they are closed.
pub struct RunningServer {
    addrs: Vec<BoundAddr>,
    listeners: JoinSet<()>,
}

/// The body of every HTTP and gRPC response.
pub(super) type Body = BoxBody<Bytes, Infallible>;

/// One accepted connection, as its handlers see it.
#[derive(Clone, Debug)]
pub(super) struct Conn {
    pub identity: Arc<Identity>,
    pub hooks: Arc<Hooks>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

#[derive(Debug)]
pub(super) struct Identity {
    pub pod: String,
    pub namespace: String,
}

struct Shared {
    identity: Arc<Identity>,
    hooks: Arc<Hooks>,
    idle_timeout: Duration,
}

impl ServerConfig {
    /// No ports yet, all addresses, the default idle timeout.
    pub fn new(pod: impl Into<String>, namespace: impl Into<String>) -> Self {
        ServerConfig {
            pod: pod.into(),
            namespace: namespace.into(),
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ports: Vec::new(),
            listeners: Vec::new(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }

    /// The `echo-server` flags (without the program or subcommand name); pod and namespace
    /// default from the environment.
    pub fn from_args(args: &[String]) -> Result<Self, UsageError> {
        let mut pod = None;
        let mut namespace = None;
        let mut cfg = ServerConfig::new(String::new(), String::new());
        let mut args = Args::new(args);
        while let Some(arg) = args.next_arg()? {
            let flag = match arg {
                Arg::Flag(flag) => flag,
                Arg::Positional(arg) => return Err(UsageError::UnexpectedArgument(arg.to_owned())),
            };
            let protocol = match flag {
                "--http" => Protocol::Http,
                "--grpc" => Protocol::Grpc,
                "--tcp" => Protocol::Tcp,
                "--bind" => {
                    cfg.bind = args.parse(flag)?;
                    continue;
                }
                "--name" => {
                    pod = Some(non_empty(flag, args.value(flag)?)?);
                    continue;
                }
                "--namespace" => {
                    namespace = Some(non_empty(flag, args.value(flag)?)?);
                    continue;
                }
                _ => return Err(UsageError::UnknownFlag(flag.to_owned())),
            };
            let port = args.parse(flag)?;
            cfg.ports.push(Port { protocol, port });
        }
        if cfg.ports.is_empty() {
            return Err(UsageError::Invalid(
                "at least one of --http, --grpc or --tcp is required".to_owned(),
            ));
        }
        cfg.pod = pod.unwrap_or_else(default_pod);
        cfg.namespace = namespace.unwrap_or_else(|| {
            env_non_empty(POD_NAMESPACE_ENV).unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
        });
        Ok(cfg)
    }
}

impl RunningServer {
    pub fn addrs(&self) -> &[BoundAddr] {
        &self.addrs
    }

    /// The first address serving `protocol`.
    pub fn addr(&self, protocol: Protocol) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|bound| bound.protocol == protocol)
            .map(|bound| bound.addr)
    }

    /// Closes the listeners and every open connection, and waits until they are closed.
    pub async fn shutdown(mut self) {
        self.listeners.abort_all();
        while self.listeners.join_next().await.is_some() {}
    }

    /// Serves until a listener task fails, which only a bug can make happen.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        while let Some(done) = self.listeners.join_next().await {
            done.context("echo listener task failed")?;
        }
        Ok(())
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        })
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.listeners.abort_all();
    }
}

/// Binds every port and starts serving in the background.
pub async fn start(cfg: ServerConfig) -> anyhow::Result<RunningServer> {
    anyhow::ensure!(
        !cfg.ports.is_empty() || !cfg.listeners.is_empty(),
        "the echo server has no port to listen on"
    );
    let mut bound = Vec::new();
    for port in &cfg.ports {
        let addr = SocketAddr::new(cfg.bind, port.port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding echo {} port {addr}", port.protocol))?;
        bound.push((port.protocol, listener));
    }
    for (protocol, listener) in cfg.listeners {
        listener
            .set_nonblocking(true)
            .context("making a given echo listener non-blocking")?;
        let listener = TcpListener::from_std(listener).context("adopting a given echo listener")?;
        bound.push((protocol, listener));
    }

    let shared = Arc::new(Shared {
        identity: Arc::new(Identity {
            pod: cfg.pod,
            namespace: cfg.namespace,
        }),
        hooks: Arc::new(Hooks::default()),
        idle_timeout: cfg.idle_timeout,
    });
    let mut server = RunningServer {
        addrs: Vec::new(),
        listeners: JoinSet::new(),
    };
    for (protocol, listener) in bound {
        let addr = listener
            .local_addr()
            .context("reading an echo listener's address")?;
        info!(%addr, %protocol, component = "echo", "listener established");
        server.addrs.push(BoundAddr { protocol, addr });
        server
            .listeners
            .spawn(accept_loop(listener, protocol, shared.clone()));
    }
    Ok(server)
}

/// Binds every port and serves until the process ends.
pub async fn serve(cfg: ServerConfig) -> anyhow::Result<()> {
    start(cfg).await?.wait().await
}

/// `ambient echo-server FLAGS`: `args` are the flags after the subcommand.
pub fn server_main(args: &[String]) -> ExitCode {
    let cfg = match ServerConfig::from_args(args) {
        Ok(cfg) => cfg,
        Err(UsageError::Help) => {
            print!("{SERVER_USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("echo-server: {e}");
            return ExitCode::from(USAGE_EXIT_CODE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("echo-server: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        let server = start(cfg).await?;
        for bound in server.addrs() {
            eprintln!("echo-server: {} on {}", bound.protocol, bound.addr);
        }
        server.wait().await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn accept_loop(listener: TcpListener, protocol: Protocol, shared: Arc<Shared>) {
    // Connections live in this set so that aborting the listener closes them too.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    conns.spawn(serve_conn(stream, remote, protocol, shared.clone()));
                }
                Err(e) => {
                    warn!(error = %e, component = "echo", "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    warn!(error = %e, component = "echo", "connection task failed");
                }
            }
        }
    }
}

async fn serve_conn(
    stream: TcpStream,
    remote: SocketAddr,
    protocol: Protocol,
    shared: Arc<Shared>,
) {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(e) => {
            debug!(peer = %remote, error = %e, "connection gone before it was served");
            return;
        }
    };
    let conn = Conn {
        identity: shared.identity.clone(),
        hooks: shared.hooks.clone(),
        local,
        remote,
    };
    let stream = IdleTimeout::new(stream, shared.idle_timeout);
    match protocol {
        Protocol::Tcp => match tcp::echo(stream, &conn).await {
            Ok(bytes) => info!(peer = %remote, dst = %local, bytes, "tcp connection"),
            Err(e) => info!(peer = %remote, dst = %local, error = %e, "tcp connection failed"),
        },
        Protocol::Http | Protocol::Grpc => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            if protocol == Protocol::Grpc {
                builder = builder.http2_only();
            }
            let service = service_fn(move |req| {
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(dispatch(req, &conn).await) }
            });
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                debug!(peer = %remote, dst = %local, error = %e, "http connection ended with an error");
            }
        }
    }
}

async fn dispatch(req: Request<Incoming>, conn: &Conn) -> Response<Body> {
    if echo_http::wants_upgrade(&req) {
        return echo_http::upgrade(req, conn);
    }
    if !grpc::is_grpc(&req) {
        return echo_http::handle(req, conn).await;
    }
    // A failure asked for by a hook is an HTTP status, as an overloaded server or a proxy in
    // front would give; gRPC clients read it as UNAVAILABLE (or UNKNOWN).
    let failure = match conn.hooks.failing() {
        Some(status) => Some(status),
        None if conn.hooks.fails_once(req.headers()) => Some(http::StatusCode::SERVICE_UNAVAILABLE),
        None => None,
    };
    match failure {
        Some(status) => {
            info!(
                peer = %conn.remote,
                dst = %conn.local,
                method = %req.uri().path(),
                status = status.as_u16(),
                "grpc request failed on request"
            );
            echo_http::text(status, "failing, as asked")
        }
        None => grpc::handle(req, conn).await,
    }
}

fn non_empty(flag: &str, value: &str) -> Result<String, UsageError> {
    if value.is_empty() {
        Err(bad_value(flag, value, "must not be empty"))
    } else {
        Ok(value.to_owned())
    }
}

fn env_non_empty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// `POD_NAME`, else the hostname, else [`DEFAULT_POD`].
fn default_pod() -> String {
    env_non_empty(POD_NAME_ENV)
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
        })
        .or_else(|| env_non_empty("HOSTNAME"))
        .unwrap_or_else(|| DEFAULT_POD.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServerConfig, UsageError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        ServerConfig::from_args(&args)
    }

    #[test]
    fn flags_build_the_config() {
        let cfg = parse(&[
            "--http",
            "80",
            "--http=8080",
            "--grpc",
            "9090",
            "--tcp",
            "9000",
            "--bind",
            "127.0.0.2",
            "--name",
            "echo-1",
            "--namespace",
            "ns",
        ])
        .expect("valid flags");
        let port = |protocol, port| Port { protocol, port };
        assert_eq!(
            cfg.ports,
            [
                port(Protocol::Http, 80),
                port(Protocol::Http, 8080),
                port(Protocol::Grpc, 9090),
                port(Protocol::Tcp, 9000),
            ]
        );
        assert_eq!(cfg.bind, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!((cfg.pod.as_str(), cfg.namespace.as_str()), ("echo-1", "ns"));
        assert_eq!(cfg.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    }

    #[test]
    fn bad_flags_are_explained() {
        let cases: &[(&[&str], &str)] = &[
            (
                &[],
                "at least one of --http, --grpc or --tcp is required; see --help",
            ),
            (
                &["--http", "80", "--verbose"],
                "unknown flag --verbose; see --help",
            ),
            (
                &["--http", "65536"],
                r#"--http "65536": number too large to fit in target type"#,
            ),
            (
                &["--tcp", "1", "--bind", "localhost"],
                r#"--bind "localhost": invalid IP address syntax"#,
            ),
            (
                &["--tcp", "1", "--name", ""],
                r#"--name "": must not be empty"#,
            ),
            (&["--tcp"], "--tcp needs a value"),
            (&["8080"], r#"unexpected argument "8080"; see --help"#),
        ];
        for (args, want) in cases {
            let err = parse(args).expect_err("invalid flags");
            assert_eq!(err.to_string(), *want, "flags {args:?}");
        }
    }

    #[test]
    fn usage_errors_exit_2() {
        let args = ["--bogus".to_owned()];
        assert_eq!(server_main(&args), ExitCode::from(USAGE_EXIT_CODE));
    }
}

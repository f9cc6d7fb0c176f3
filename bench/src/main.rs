//! `meshbench`: load generator and sink for the whole-system benchmark.
//!
//! The server side (`meshbench server`) accepts connections whose first byte picks a mode:
//! `S` (sink: count bytes until EOF, answer with the count) or `R` (request/response with
//! 4-byte big-endian length prefixes). The client subcommands drive those modes directly or
//! through a SOCKS5 proxy and print one JSON line with the result as their last output line.
//! Every client run is bounded by `--seconds` plus fixed I/O timeouts.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, timeout, timeout_at};

mod policy;
mod xds;

const USAGE: &str = "\
meshbench: whole-system TCP benchmark (direct or through a SOCKS5 proxy)

USAGE:
  meshbench server --listen ADDR [--listen ADDR ...]
  meshbench throughput --target ADDR [--streams N] [COMMON]
  meshbench latency    --target ADDR [--size B] [COMMON]
  meshbench connrate   --target ADDR [--concurrency C] [--max-errors N | --expect denied]
                       [COMMON]
  meshbench rate       --target ADDR [--rps R] [--size B] [--connections K] [COMMON]
  meshbench http-rate  --target ADDR [--rps R] [--connections K] [--host H] [--path P] [COMMON]
  meshbench gen-mesh   --dir DIR [--pods N] [--services N] [--policies N] [--nodes N] [--namespaces N]
  meshbench xds-scale  --xds URL --dir DIR --expect-addresses N --expect-authorizations N
                       [--subscribers N] [--changes N]
  meshbench gen-policy-mesh --dir DIR --client-ip IP --server-ip IP [--port P] [--policies N]
                       [--applying K] [--pods N] [--services N] [--namespaces N] [--nodes N]

http-rate is rate with HTTP/1.1 GETs on keep-alive connections (Host H, default the target),
for any HTTP server; a response other than 2xx fails the run.

gen-mesh writes a mesh as Kubernetes YAML (defaults 10000 pods, 2000 services, 500 policies,
50 nodes, 50 namespaces) and prints the resource counts to expect. xds-scale connects delta
ADS subscribers to istiod-lite reading DIR, times the full initial push, then rewrites one
pod --changes times and times each change until every subscriber has it.

connrate opens a connection, sends a 1-byte request, reads the 1-byte response and closes,
--concurrency at a time; it reports connections/s and connect-to-response latency. With
--max-errors N it fails if more than N attempts failed; with --expect denied it succeeds only
if every attempt failed (a policy denying the connection), and reports how many.

gen-policy-mesh writes the mesh of bench/policy.sh (client and server pods in namespace bench,
a background mesh from gen-mesh; defaults 500 pods, 100 services, 50 namespaces, 10 nodes)
under DIR/mesh and one policy file per variant under DIR/variants (defaults --port 5201,
--policies 1000, --applying 10), and prints the variants as JSON.

COMMON:
  --seconds F     measurement duration in seconds (default 5, at most 3600)
  --socks ADDR    connect through this SOCKS5 proxy (no auth, CONNECT)
  --src IP        bind client sockets to this source address (port 0)

DEFAULTS: --streams 1, --size 1024, --concurrency 8, --rps 1000, --connections 10

The server runs until SIGTERM or SIGINT. Each client prints one JSON line as its last
line on stdout; progress goes to stderr. Addresses are ip:port.
";

/// Read buffer size for both sides; also the write chunk for `throughput`.
const BUF_SIZE: usize = 256 * 1024;
/// Largest request the server accepts in `R` mode.
const MAX_REQUEST: usize = 16 * 1024 * 1024;
/// At most this many latency samples are kept per run.
const MAX_SAMPLES: usize = 5_000_000;
const WARMUP: Duration = Duration::from_millis(500);
/// Bound for connecting, including the SOCKS5 handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace period after the measurement ends for in-flight I/O (final counts, last responses).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// One connect + request + response in `connrate`.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_PARALLEL: usize = 1024;

/// A command-line mistake: reported with a pointer to `--help` and exit status 2.
#[derive(Debug)]
struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (see `meshbench --help`)", self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage_err(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// `--flag value` pairs of one subcommand, checked against the flags it accepts.
struct Flags {
    cmd: String,
    pairs: Vec<(String, String)>,
}

impl Flags {
    fn parse(cmd: &str, args: &[String], allowed: &[&str], repeatable: &[&str]) -> Result<Self> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(usage_err(format!("`{cmd}`: unexpected argument {arg:?}")));
            };
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => {
                    let v = it.next().ok_or_else(|| {
                        usage_err(format!("`{cmd}`: flag --{flag} needs a value"))
                    })?;
                    (flag.to_owned(), v.clone())
                }
            };
            if !allowed.contains(&name.as_str()) {
                return Err(usage_err(format!("`{cmd}`: unknown flag --{name}")));
            }
            if !repeatable.contains(&name.as_str()) && pairs.iter().any(|(n, _)| *n == name) {
                return Err(usage_err(format!("`{cmd}`: flag --{name} given twice")));
            }
            pairs.push((name, value));
        }
        Ok(Self {
            cmd: cmd.to_owned(),
            pairs,
        })
    }

    fn parse_value<T: FromStr>(&self, name: &str, value: &str) -> Result<T>
    where
        T::Err: fmt::Display,
    {
        value.parse().map_err(|e| {
            usage_err(format!(
                "`{}`: invalid value {value:?} for --{name}: {e}",
                self.cmd
            ))
        })
    }

    fn all<T: FromStr>(&self, name: &str) -> Result<Vec<T>>
    where
        T::Err: fmt::Display,
    {
        self.pairs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| self.parse_value(name, v))
            .collect()
    }

    fn opt<T: FromStr>(&self, name: &str) -> Result<Option<T>>
    where
        T::Err: fmt::Display,
    {
        match self.pairs.iter().find(|(n, _)| n == name) {
            Some((_, v)) => self.parse_value(name, v).map(Some),
            None => Ok(None),
        }
    }

    fn required<T: FromStr>(&self, name: &str) -> Result<T>
    where
        T::Err: fmt::Display,
    {
        self.opt(name)?
            .ok_or_else(|| usage_err(format!("`{}`: missing required flag --{name}", self.cmd)))
    }

    /// An optional integer flag with a default, checked against an inclusive range.
    fn bounded(&self, name: &str, default: u64, min: u64, max: u64) -> Result<u64> {
        let v = self.opt(name)?.unwrap_or(default);
        if !(min..=max).contains(&v) {
            return Err(usage_err(format!(
                "`{}`: --{name} must be between {min} and {max}, got {v}",
                self.cmd
            )));
        }
        Ok(v)
    }
}

/// Where and how a client connects.
#[derive(Clone, Copy)]
struct Endpoint {
    target: SocketAddr,
    socks: Option<SocketAddr>,
    src: Option<IpAddr>,
}

struct Common {
    ep: Endpoint,
    seconds: f64,
    duration: Duration,
}

impl Common {
    fn from_flags(f: &Flags) -> Result<Self> {
        let seconds: f64 = f.opt("seconds")?.unwrap_or(5.0);
        if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
            return Err(usage_err(format!(
                "`{}`: --seconds must be in (0, 3600], got {seconds}",
                f.cmd
            )));
        }
        let ep = Endpoint {
            target: f.required("target")?,
            socks: f.opt("socks")?,
            src: f.opt("src")?,
        };
        Ok(Self {
            ep,
            seconds,
            duration: Duration::from_secs_f64(seconds),
        })
    }

    /// Fields every client result line carries.
    fn report(&self, mode: &str, elapsed: Duration, fields: Value) -> Value {
        let common = json!({
            "mode": mode,
            "target": self.ep.target.to_string(),
            "socks": self.ep.socks.map(|s| s.to_string()),
            "seconds": self.seconds,
            "elapsed": round(elapsed.as_secs_f64(), 3),
        });
        merge(common, fields)
    }
}

/// What `connrate` is told to expect of each attempt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Allowed,
    Denied,
}

impl FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allowed" => Ok(Self::Allowed),
            "denied" => Ok(Self::Denied),
            _ => Err("expected `allowed` or `denied`".into()),
        }
    }
}

/// When a `connrate` run counts as a success.
#[derive(Clone, Copy)]
enum Expect {
    /// Connections go through; more than `max_errors` failed attempts fail the run.
    Allowed { max_errors: u64 },
    /// Every attempt must fail (and there must be some).
    Denied,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshbench: {e:#}");
            if e.is::<UsageError>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    if args.first().is_none_or(|a| a == "help") || args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return Ok(());
    }
    const CLIENT: [&str; 4] = ["target", "seconds", "socks", "src"];
    let cmd = args[0].as_str();
    let rest = &args[1..];
    let client_flags = |extra: &[&str]| -> Result<(Flags, Common)> {
        let allowed: Vec<&str> = CLIENT.iter().chain(extra).copied().collect();
        let flags = Flags::parse(cmd, rest, &allowed, &[])?;
        let common = Common::from_flags(&flags)?;
        Ok((flags, common))
    };
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
    };
    let result = match cmd {
        "server" => {
            let flags = Flags::parse(cmd, rest, &["listen"], &["listen"])?;
            let addrs: Vec<SocketAddr> = flags.all("listen")?;
            if addrs.is_empty() {
                return Err(usage_err(
                    "`server`: at least one --listen ADDR is required",
                ));
            }
            return rt()?.block_on(server(addrs));
        }
        "throughput" => {
            let (f, c) = client_flags(&["streams"])?;
            let streams = f.bounded("streams", 1, 1, MAX_PARALLEL as u64)? as usize;
            rt()?.block_on(throughput(&c, streams))?
        }
        "latency" => {
            let (f, c) = client_flags(&["size"])?;
            let size = f.bounded("size", 1024, 1, MAX_REQUEST as u64)? as usize;
            rt()?.block_on(latency(&c, size))?
        }
        "connrate" => {
            let (f, c) = client_flags(&["concurrency", "max-errors", "expect"])?;
            let conc = f.bounded("concurrency", 8, 1, MAX_PARALLEL as u64)? as usize;
            let max_errors = f.opt::<u64>("max-errors")?;
            let expect = match f.opt::<Outcome>("expect")?.unwrap_or(Outcome::Allowed) {
                Outcome::Allowed => Expect::Allowed {
                    max_errors: max_errors.unwrap_or(u64::MAX),
                },
                Outcome::Denied if max_errors.is_some() => {
                    return Err(usage_err(
                        "`connrate`: --max-errors does not apply to --expect denied",
                    ));
                }
                Outcome::Denied => Expect::Denied,
            };
            rt()?.block_on(connrate(&c, conc, expect))?
        }
        "rate" => {
            let (f, c) = client_flags(&["rps", "size", "connections"])?;
            let rps = f.bounded("rps", 1000, 1, 10_000_000)?;
            let size = f.bounded("size", 1024, 1, MAX_REQUEST as u64)? as usize;
            let conns = f.bounded("connections", 10, 1, MAX_PARALLEL as u64)? as usize;
            rt()?.block_on(rate(&c, rps, conns, Exchange::Raw(size)))?
        }
        "http-rate" => {
            let (f, c) = client_flags(&["rps", "connections", "host", "path"])?;
            let rps = f.bounded("rps", 1000, 1, 10_000_000)?;
            let conns = f.bounded("connections", 10, 1, MAX_PARALLEL as u64)? as usize;
            let host: String = f.opt("host")?.unwrap_or_else(|| c.ep.target.to_string());
            let path: String = f.opt("path")?.unwrap_or_else(|| "/".to_owned());
            ensure!(
                path.starts_with('/') && !path.contains(char::is_whitespace),
                "`http-rate`: --path must start with '/' and have no spaces"
            );
            ensure!(
                !host.contains(char::is_whitespace),
                "`http-rate`: --host must have no spaces"
            );
            let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n");
            rt()?.block_on(rate(&c, rps, conns, Exchange::Http(req.into_bytes())))?
        }
        "gen-mesh" => {
            let f = Flags::parse(
                cmd,
                rest,
                &["dir", "pods", "services", "policies", "nodes", "namespaces"],
                &[],
            )?;
            let size = xds::MeshSize {
                pods: f.bounded("pods", 10_000, 1, 100_000)? as usize,
                services: f.bounded("services", 2_000, 1, 50_000)? as usize,
                policies: f.bounded("policies", 500, 0, 50_000)? as usize,
                nodes: f.bounded("nodes", 50, 1, 10_000)? as usize,
                namespaces: f.bounded("namespaces", 50, 1, 1_000)? as usize,
            };
            let dir: std::path::PathBuf = f.required("dir")?;
            xds::gen_mesh(&dir, &size)?
        }
        "xds-scale" => {
            let f = Flags::parse(
                cmd,
                rest,
                &[
                    "xds",
                    "dir",
                    "subscribers",
                    "changes",
                    "expect-addresses",
                    "expect-authorizations",
                ],
                &[],
            )?;
            let args = xds::ScaleArgs {
                xds: f.required("xds")?,
                dir: f.required("dir")?,
                subscribers: f.bounded("subscribers", 50, 1, 10_000)? as usize,
                changes: f.bounded("changes", 50, 1, 10_000)? as usize,
                expect_addresses: f.required("expect-addresses")?,
                expect_authorizations: f.required("expect-authorizations")?,
            };
            rt()?.block_on(xds::xds_scale(args))?
        }
        "gen-policy-mesh" => {
            let f = Flags::parse(
                cmd,
                rest,
                &[
                    "dir",
                    "client-ip",
                    "server-ip",
                    "port",
                    "policies",
                    "applying",
                    "pods",
                    "services",
                    "namespaces",
                    "nodes",
                ],
                &[],
            )?;
            let args = policy::PolicyMeshArgs {
                dir: f.required("dir")?,
                client_ip: f.required("client-ip")?,
                server_ip: f.required("server-ip")?,
                port: f.bounded("port", 5201, 1, u64::from(u16::MAX))? as u16,
                policies: f.bounded("policies", 1_000, 0, 50_000)? as usize,
                applying: f.bounded("applying", 10, 0, 1_000)? as usize,
                background: xds::MeshSize {
                    pods: f.bounded("pods", 500, 1, 60_000)? as usize,
                    services: f.bounded("services", 100, 1, 50_000)? as usize,
                    policies: 0,
                    nodes: f.bounded("nodes", 10, 1, 10_000)? as usize,
                    namespaces: f.bounded("namespaces", 50, 1, 1_000)? as usize,
                },
            };
            policy::gen_policy_mesh(&args)?
        }
        other => return Err(usage_err(format!("unknown subcommand {other:?}"))),
    };
    println!("{result}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Server

async fn server(addrs: Vec<SocketAddr>) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut tasks = JoinSet::new();
    for addr in addrs {
        let listener = listen(addr).with_context(|| format!("listening on {addr}"))?;
        eprintln!("meshbench: listening on {addr}");
        tasks.spawn(accept_loop(listener, addr));
    }
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    eprintln!("meshbench: signal received, stopping");
    Ok(())
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

async fn accept_loop(listener: TcpListener, addr: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(async move {
                    match serve_conn(stream).await {
                        Err(e) if !is_disconnect(&e) => {
                            eprintln!("meshbench: connection from {peer} on {addr}: {e}");
                        }
                        _ => {}
                    }
                });
            }
            Err(e) => {
                // Usually descriptor exhaustion; back off instead of spinning.
                eprintln!("meshbench: accept on {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

async fn serve_conn(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mode = match stream.read_u8().await {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; BUF_SIZE];
    match mode {
        b'S' => {
            let mut total: u64 = 0;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_u64(total).await?;
            stream.shutdown().await
        }
        b'R' => serve_requests(&mut stream, &mut buf).await,
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown mode byte 0x{other:02x}"),
        )),
    }
}

/// `R` mode. Reads go through `buf` so that a small request costs one read syscall;
/// `buf[start..end]` holds received bytes not yet consumed.
async fn serve_requests(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        // Length prefix.
        if end - start < 4 {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
            while end < 4 {
                let n = stream.read(&mut buf[end..]).await?;
                if n == 0 {
                    return Ok(()); // EOF between requests (or mid-prefix): done.
                }
                end += n;
            }
        }
        let len = u32::from_be_bytes([buf[start], buf[start + 1], buf[start + 2], buf[start + 3]])
            as usize;
        start += 4;
        if len > MAX_REQUEST {
            return Ok(());
        }
        // Body: consume what is buffered, then read (and discard) the rest.
        let mut remaining = len;
        let take = remaining.min(end - start);
        start += take;
        remaining -= take;
        while remaining > 0 {
            let n = stream.read(buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let take = remaining.min(n);
            (start, end) = (take, n);
            remaining -= take;
        }
        // Response: any content of the same length; the buffer is only read from here.
        let mut left = len;
        while left > 0 {
            let chunk = left.min(buf.len());
            stream.write_all(&buf[..chunk]).await?;
            left -= chunk;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client plumbing

/// Opens a connection to `ep.target`, through the SOCKS5 proxy if one is configured.
async fn connect(ep: &Endpoint) -> Result<TcpStream> {
    let hop = ep.socks.unwrap_or(ep.target);
    let what = match ep.socks {
        Some(p) => format!("connecting to {} via SOCKS5 proxy {p}", ep.target),
        None => format!("connecting to {}", ep.target),
    };
    timeout(CONNECT_TIMEOUT, async {
        let mut stream = tcp_connect(hop, ep.src).await?;
        if ep.socks.is_some() {
            socks5_connect(&mut stream, ep.target).await?;
        }
        Ok::<_, anyhow::Error>(stream)
    })
    .await
    .map_err(|_| anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
    .and_then(|r| r)
    .context(what)
}

async fn tcp_connect(addr: SocketAddr, src: Option<IpAddr>) -> Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = src {
        // Defer the port choice to connect(), so long connrate runs do not exhaust ports.
        mesh_core::sockets::set_bind_address_no_port(&sock)?;
        sock.bind(&SocketAddr::new(ip, 0).into())
            .with_context(|| format!("binding to source address {ip}"))?;
    }
    sock.set_nonblocking(true)?;
    let stream = TcpSocket::from_std_stream(sock.into())
        .connect(addr)
        .await
        .with_context(|| format!("TCP connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// RFC 1928 CONNECT without authentication.
async fn socks5_connect(stream: &mut TcpStream, target: SocketAddr) -> Result<()> {
    stream.write_all(&[5, 1, 0]).await?;
    let mut choice = [0u8; 2];
    stream
        .read_exact(&mut choice)
        .await
        .context("reading the SOCKS5 method choice")?;
    ensure!(
        choice[0] == 5,
        "not a SOCKS5 proxy (version byte {})",
        choice[0]
    );
    ensure!(choice[1] == 0, "SOCKS5 proxy refused 'no authentication'");

    let mut req = [0u8; 22];
    req[..3].copy_from_slice(&[5, 1, 0]);
    let len = match target.ip() {
        IpAddr::V4(ip) => {
            req[3] = 1;
            req[4..8].copy_from_slice(&ip.octets());
            8
        }
        IpAddr::V6(ip) => {
            req[3] = 4;
            req[4..20].copy_from_slice(&ip.octets());
            20
        }
    };
    req[len..len + 2].copy_from_slice(&target.port().to_be_bytes());
    stream.write_all(&req[..len + 2]).await?;

    let mut head = [0u8; 4];
    stream
        .read_exact(&mut head)
        .await
        .context("reading the SOCKS5 reply")?;
    ensure!(head[0] == 5, "bad SOCKS5 reply version {}", head[0]);
    if head[1] != 0 {
        bail!(
            "SOCKS5 proxy replied with code {} ({})",
            head[1],
            socks5_reply_name(head[1])
        );
    }
    let skip = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => stream.read_u8().await? as usize + 2,
        other => bail!("bad SOCKS5 reply address type {other}"),
    };
    let mut rest = [0u8; 257];
    stream
        .read_exact(&mut rest[..skip])
        .await
        .context("reading the SOCKS5 bound address")?;
    Ok(())
}

fn socks5_reply_name(code: u8) -> &'static str {
    match code {
        1 => "general failure",
        2 => "not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unassigned",
    }
}

/// Connects `n` connections in parallel and sends `mode` on each.
async fn open_all(ep: &Endpoint, n: usize, mode: Option<u8>) -> Result<Vec<TcpStream>> {
    let mut set = JoinSet::new();
    for i in 0..n {
        let ep = *ep;
        set.spawn(async move {
            let mut s = connect(&ep).await?;
            if let Some(mode) = mode {
                s.write_all(&[mode])
                    .await
                    .context("sending the mode byte")?;
            }
            Ok::<_, anyhow::Error>((i, s))
        });
    }
    let mut out: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, s) = r.context("connect task failed")??;
        out[i] = Some(s);
    }
    out.into_iter()
        .map(|s| s.context("connection missing"))
        .collect()
}

/// Builds an `R`-mode request: the length prefix followed by `size` bytes.
fn request(size: usize) -> Vec<u8> {
    let mut req = vec![0x5a; 4 + size];
    // `size` is at most MAX_REQUEST, so it fits in u32.
    req[..4].copy_from_slice(&(size as u32).to_be_bytes());
    req
}

/// Runs `io` until at most `DRAIN_TIMEOUT` past `deadline`; errors name `what`.
async fn bounded<T>(
    deadline: Instant,
    what: String,
    io: impl Future<Output = std::io::Result<T>>,
) -> Result<T> {
    match timeout_at(deadline + DRAIN_TIMEOUT, io).await {
        Ok(r) => r.context(what),
        Err(_) => bail!("{what}: stalled for {DRAIN_TIMEOUT:?} past the end of the run"),
    }
}

/// Writes `buf` over and over; returns only on error.
async fn write_forever(s: &mut TcpStream, buf: &[u8]) -> std::io::Error {
    loop {
        if let Err(e) = s.write_all(buf).await {
            return e;
        }
    }
}

async fn round_trip(s: &mut TcpStream, req: &[u8], resp: &mut [u8]) -> std::io::Result<()> {
    s.write_all(req).await?;
    s.read_exact(resp).await?;
    Ok(())
}

fn round(v: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

/// Nearest-rank percentiles of sorted nanosecond samples, in microseconds.
fn percentiles(sorted: &[u64]) -> Value {
    let pick = |q: f64| -> Value {
        if sorted.is_empty() {
            return Value::Null;
        }
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        json!(round(sorted[rank - 1] as f64 / 1000.0, 1))
    };
    json!({
        "p50_us": pick(0.50),
        "p90_us": pick(0.90),
        "p99_us": pick(0.99),
        "max_us": pick(1.0),
    })
}

fn merge(mut a: Value, mut b: Value) -> Value {
    if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object_mut()) {
        a.append(b);
    }
    a
}

// ---------------------------------------------------------------------------------------
// Client modes

async fn throughput(c: &Common, streams: usize) -> Result<Value> {
    let conns = open_all(&c.ep, streams, Some(b'S')).await?;
    eprintln!(
        "meshbench: {streams} stream(s) open, sending for {}s",
        c.seconds
    );
    let start = Instant::now();
    let deadline = start + c.duration;
    let mut set = JoinSet::new();
    for mut s in conns {
        let target = c.ep.target;
        set.spawn(async move {
            let buf = vec![0x5au8; BUF_SIZE];
            // The server's count is what gets reported, so a write cut short by the
            // deadline loses nothing.
            if let Ok(e) = timeout_at(deadline, write_forever(&mut s, &buf)).await {
                return Err(anyhow!(e).context(format!("sending to {target}")));
            }
            let what = format!("reading the byte count from {target}");
            bounded(deadline, what, async {
                s.shutdown().await?;
                s.read_u64().await
            })
            .await
        });
    }
    let mut bytes: u64 = 0;
    while let Some(r) = set.join_next().await {
        bytes += r.context("stream task failed")??;
    }
    let elapsed = start.elapsed();
    let gbps = bytes as f64 * 8.0 / 1e9 / elapsed.as_secs_f64();
    Ok(c.report(
        "throughput",
        elapsed,
        json!({"streams": streams, "bytes": bytes, "gbps": round(gbps, 3)}),
    ))
}

async fn latency(c: &Common, size: usize) -> Result<Value> {
    let mut s = open_all(&c.ep, 1, Some(b'R'))
        .await?
        .pop()
        .context("no connection")?;
    let warm_end = Instant::now() + WARMUP;
    let deadline = warm_end + c.duration;
    let what = format!("request/response with {}", c.ep.target);
    // Spawned so that it runs on a runtime worker, next to the I/O driver.
    let mut samples = tokio::spawn(bounded(deadline, what, async move {
        let req = request(size);
        let mut resp = vec![0u8; size];
        let mut samples: Vec<u64> = Vec::with_capacity(MAX_SAMPLES);
        while Instant::now() < warm_end {
            round_trip(&mut s, &req, &mut resp).await?;
        }
        while samples.len() < MAX_SAMPLES {
            let t0 = Instant::now();
            if t0 >= deadline {
                break;
            }
            round_trip(&mut s, &req, &mut resp).await?;
            samples.push(t0.elapsed().as_nanos() as u64);
        }
        Ok(samples)
    }))
    .await
    .context("latency task failed")??;
    let elapsed = warm_end.elapsed();
    samples.sort_unstable();
    let fields = json!({"size": size, "count": samples.len()});
    Ok(c.report("latency", elapsed, merge(fields, percentiles(&samples))))
}

async fn connrate(c: &Common, concurrency: usize, expect: Expect) -> Result<Value> {
    const PROBE: [u8; 6] = [b'R', 0, 0, 0, 1, 0x5a];
    let per_worker_cap = MAX_SAMPLES / concurrency;
    let start = Instant::now();
    let deadline = start + c.duration;
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let ep = c.ep;
        set.spawn(async move {
            let (mut ok, mut errors, mut first_err) = (0u64, 0u64, None::<String>);
            let mut lat: Vec<u64> = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let attempt = timeout(ATTEMPT_TIMEOUT, async {
                    let mut s = connect(&ep).await?;
                    let mut b = [0u8; 1];
                    round_trip(&mut s, &PROBE, &mut b)
                        .await
                        .with_context(|| format!("request/response with {}", ep.target))
                })
                .await;
                let attempt = attempt.unwrap_or_else(|_| {
                    Err(anyhow!(
                        "connection attempt to {} timed out after {ATTEMPT_TIMEOUT:?}",
                        ep.target
                    ))
                });
                match attempt {
                    // Connect to first response byte; the close is not timed.
                    Ok(()) => {
                        ok += 1;
                        if lat.len() < per_worker_cap {
                            lat.push(t0.elapsed().as_nanos() as u64);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        first_err.get_or_insert_with(|| format!("{e:#}"));
                        // Do not spin on an immediate failure such as a refused connection.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (ok, errors, first_err, lat)
        });
    }
    let (mut completed, mut errors, mut first_err) = (0u64, 0u64, None);
    let mut samples = Vec::new();
    while let Some(r) = set.join_next().await {
        let (ok, err, first, lat) = r.context("connrate worker failed")?;
        completed += ok;
        errors += err;
        first_err = first_err.or(first);
        samples.extend_from_slice(&lat);
    }
    let elapsed = start.elapsed();
    let first = first_err.as_deref().unwrap_or("none");
    match expect {
        Expect::Allowed { max_errors } => {
            if errors > 0 {
                eprintln!("meshbench: {errors} connection error(s); first: {first}");
            }
            ensure!(
                completed > 0,
                "no connection completed ({errors} errors; first: {first})"
            );
            ensure!(
                errors <= max_errors,
                "{errors} of {} connection attempts failed (at most {max_errors} allowed); \
                 first: {first}",
                errors + completed
            );
        }
        Expect::Denied => {
            ensure!(
                completed == 0,
                "{completed} connection(s) went through that should have been denied \
                 ({errors} denied)"
            );
            ensure!(errors > 0, "no connection attempt was made");
            eprintln!("meshbench: all {errors} attempts denied; first: {first}");
        }
    }
    samples.sort_unstable();
    let fields = json!({
        "concurrency": concurrency,
        "connections": completed,
        "errors": errors,
        "cps": round(completed as f64 / elapsed.as_secs_f64(), 1),
    });
    Ok(c.report("connrate", elapsed, merge(fields, percentiles(&samples))))
}

/// One request and its response in `rate` and `http-rate`.
#[derive(Clone)]
enum Exchange {
    /// `R` mode: a length-prefixed request of this size, answered by as many bytes.
    Raw(usize),
    /// This HTTP/1.1 request, answered by a response with a Content-Length.
    Http(Vec<u8>),
}

/// Largest HTTP response head read.
const MAX_HTTP_HEAD: usize = 16 * 1024;

impl Exchange {
    async fn run(&self, s: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Exchange::Raw(_) => round_trip(s, req, buf).await,
            Exchange::Http(_) => http_round_trip(s, req, buf).await,
        }
    }
}

/// Sends `req` and reads one whole response (head, then Content-Length bytes); a status other
/// than 2xx is an error.
async fn http_round_trip(s: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    s.write_all(req).await?;
    buf.clear();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HTTP_HEAD {
            return Err(Error::new(
                ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        return Err(Error::other(format!("HTTP status {status}")));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "response without content-length"))?;
    let mut have = buf.len() - head_end;
    while have < len {
        let mut chunk = [0u8; 4096];
        let want = (len - have).min(chunk.len());
        let n = s.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
    Ok(())
}

async fn rate(c: &Common, rps: u64, conns: usize, exchange: Exchange) -> Result<Value> {
    // Each connection sends every `period`; connections are staggered evenly within it.
    let period_ns = (conns as f64 * 1e9 / rps as f64).round() as u64;
    ensure!(
        period_ns > 0,
        "--rps {rps} is too high for {conns} connections"
    );
    let period = Duration::from_nanos(period_ns);
    let per_conn_cap = MAX_SAMPLES / conns;
    let streams = match exchange {
        Exchange::Raw(_) => open_all(&c.ep, conns, Some(b'R')).await?,
        Exchange::Http(_) => open_all(&c.ep, conns, None).await?,
    };
    eprintln!(
        "meshbench: {conns} connection(s) open, {rps} req/s for {}s",
        c.seconds
    );
    let start = Instant::now();
    let deadline = start + c.duration;
    let mut set = JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let target = c.ep.target;
        let first = start + period * i as u32 / conns as u32;
        // Ticks scheduled strictly before the deadline; a fixed count bounds the loop.
        let ticks = (deadline.saturating_duration_since(first).as_nanos())
            .div_ceil(u128::from(period_ns)) as usize;
        let cap = ticks.min(per_conn_cap);
        let exchange = exchange.clone();
        set.spawn(async move {
            let (req, mut resp) = match &exchange {
                Exchange::Raw(size) => (request(*size), vec![0u8; *size]),
                Exchange::Http(req) => (req.clone(), Vec::with_capacity(MAX_HTTP_HEAD)),
            };
            let mut lat: Vec<u64> = Vec::with_capacity(cap);
            let mut done = 0u64;
            let mut iv = tokio::time::interval_at(first, period);
            // Catch up after a slow response, keeping the aggregate rate at --rps.
            iv.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let what = format!("request/response with {target}");
            bounded(deadline, what, async {
                for _ in 0..ticks {
                    iv.tick().await;
                    let t0 = Instant::now();
                    exchange.run(&mut s, &req, &mut resp).await?;
                    if lat.len() < cap {
                        lat.push(t0.elapsed().as_nanos() as u64);
                    }
                    done += 1;
                }
                Ok(())
            })
            .await?;
            Ok::<_, anyhow::Error>((done, lat))
        });
    }
    let mut done = 0u64;
    let mut samples: Vec<u64> = Vec::new();
    while let Some(r) = set.join_next().await {
        let (n, lat) = r.context("rate worker failed")??;
        done += n;
        samples.extend_from_slice(&lat);
    }
    let elapsed = start.elapsed();
    samples.sort_unstable();
    let fields = json!({
        "rps_target": rps,
        "size": match exchange { Exchange::Raw(size) => json!(size), Exchange::Http(_) => Value::Null },
        "connections": conns,
        "requests": done,
        "rps": round(done as f64 / elapsed.as_secs_f64(), 1),
    });
    let mode = match exchange {
        Exchange::Raw(_) => "rate",
        Exchange::Http(_) => "http-rate",
    };
    Ok(c.report(mode, elapsed, merge(fields, percentiles(&samples))))
}

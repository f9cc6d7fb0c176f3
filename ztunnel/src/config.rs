//! The process configuration: built once at start-up from flags and environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

/// Name of the node this ztunnel serves; workloads whose `node` matches are local.
pub const NODE_NAME_ENV: &str = "NODE_NAME";
/// Path of the local mesh description (YAML) in standalone mode.
pub const LOCAL_CONFIG_ENV: &str = "LOCAL_XDS_PATH";
/// Directory holding the development CA's root (created on first use).
pub const DEV_CA_DIR_ENV: &str = "DEV_CA_DIR";
pub const DEFAULT_DEV_CA_DIR: &str = "/tmp/ambient-mesh/dev-ca";

pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
pub const DEFAULT_INBOUND_PLAINTEXT_ADDR: &str = "127.0.0.1:15006";
pub const DEFAULT_SOCKS5_ADDR: &str = "127.0.0.1:15080";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
/// SO_MARK on ztunnel's own sockets, so redirection rules leave them alone.
pub const DEFAULT_SOCKET_MARK: u32 = 0x539;

#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub local_config: PathBuf,
    pub dev_ca_dir: Option<PathBuf>,
    /// Where outbound traffic is redirected to (iptables/nftables REDIRECT).
    pub outbound_addr: Option<SocketAddr>,
    pub inbound_plaintext_addr: Option<SocketAddr>,
    pub socks5_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub readiness_addr: Option<SocketAddr>,
    /// Inbound HBONE: a listener on this port of every local workload address.
    pub hbone_port: u16,
    pub socket_mark: Option<u32>,
    pub config_poll: Duration,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub cert_ttl: Duration,
    /// How long in-flight connections may finish after a shutdown request.
    pub drain_timeout: Duration,
    /// Async worker threads; `None` is one per CPU.
    pub worker_threads: Option<usize>,
}

impl Config {
    /// Defaults suitable for running one ztunnel on a node.
    pub fn new(node_name: impl Into<String>, local_config: impl Into<PathBuf>) -> Self {
        let addr = |s: &str| Some(s.parse().expect("default addresses are valid"));
        Self {
            node_name: node_name.into(),
            local_config: local_config.into(),
            dev_ca_dir: Some(PathBuf::from(DEFAULT_DEV_CA_DIR)),
            outbound_addr: addr(DEFAULT_OUTBOUND_ADDR),
            inbound_plaintext_addr: addr(DEFAULT_INBOUND_PLAINTEXT_ADDR),
            socks5_addr: addr(DEFAULT_SOCKS5_ADDR),
            admin_addr: addr(DEFAULT_ADMIN_ADDR),
            metrics_addr: addr(DEFAULT_METRICS_ADDR),
            readiness_addr: addr(DEFAULT_READINESS_ADDR),
            hbone_port: mesh_core::hbone::HBONE_PORT,
            socket_mark: Some(DEFAULT_SOCKET_MARK),
            config_poll: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(300),
            cert_ttl: mesh_core::certs::DEFAULT_CERT_TTL,
            drain_timeout: Duration::from_secs(5),
            worker_threads: None,
        }
    }

    /// Reads flags (`--flag value`), falling back to environment variables, then defaults.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        let mut node = std::env::var(NODE_NAME_ENV).ok();
        let mut local = std::env::var(LOCAL_CONFIG_ENV).ok();
        let mut cfg = Self::new("", "");
        if let Ok(dir) = std::env::var(DEV_CA_DIR_ENV) {
            cfg.dev_ca_dir = Some(dir.into());
        }
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("flag {flag} needs a value"))
            };
            let addr = |v: String, flag: &str| -> anyhow::Result<Option<SocketAddr>> {
                if v == "off" {
                    return Ok(None);
                }
                v.parse()
                    .map(Some)
                    .with_context(|| format!("{flag}: {v:?} is not an ip:port (or \"off\")"))
            };
            match flag.as_str() {
                "--node" => node = Some(value()?),
                "--config" => local = Some(value()?),
                "--dev-ca-dir" => cfg.dev_ca_dir = Some(value()?.into()),
                "--outbound" => cfg.outbound_addr = addr(value()?, &flag)?,
                "--inbound-plaintext" => cfg.inbound_plaintext_addr = addr(value()?, &flag)?,
                "--socks5" => cfg.socks5_addr = addr(value()?, &flag)?,
                "--admin" => cfg.admin_addr = addr(value()?, &flag)?,
                "--metrics" => cfg.metrics_addr = addr(value()?, &flag)?,
                "--readiness" => cfg.readiness_addr = addr(value()?, &flag)?,
                "--hbone-port" => {
                    let v = value()?;
                    cfg.hbone_port = v
                        .parse()
                        .with_context(|| format!("--hbone-port: {v:?} is not a port"))?;
                }
                "--no-mark" => cfg.socket_mark = None,
                "--worker-threads" => {
                    let v = value()?;
                    let n: usize = v.parse().ok().filter(|n| *n > 0).with_context(|| {
                        format!("--worker-threads: {v:?} is not a positive number")
                    })?;
                    cfg.worker_threads = Some(n);
                }
                "-h" | "--help" => bail!("{}", USAGE),
                other => bail!("unknown flag {other:?}\n{USAGE}"),
            }
        }
        cfg.node_name =
            node.with_context(|| format!("no node name: pass --node NAME or set {NODE_NAME_ENV}"))?;
        cfg.local_config = local
            .with_context(|| {
                format!("no mesh config: pass --config FILE or set {LOCAL_CONFIG_ENV}")
            })?
            .into();
        Ok(cfg)
    }
}

pub const USAGE: &str = "usage: ztunnel --node NAME --config FILE [options]
  --dev-ca-dir DIR            development CA root (default /tmp/ambient-mesh/dev-ca)
  --outbound ADDR|off         redirected outbound listener (default 127.0.0.1:15001)
  --inbound-plaintext ADDR|off  redirected inbound plaintext (default 127.0.0.1:15006)
  --socks5 ADDR|off           SOCKS5 outbound (default 127.0.0.1:15080)
  --admin ADDR|off            admin, /config_dump (default 127.0.0.1:15000)
  --metrics ADDR|off          Prometheus /metrics (default 0.0.0.0:15020)
  --readiness ADDR|off        /healthz/ready (default 0.0.0.0:15021)
  --hbone-port PORT           inbound HBONE port on each local workload (default 15008)
  --no-mark                   do not set SO_MARK 0x539 on ztunnel's own sockets
  --worker-threads N          async worker threads (default: one per CPU)
Environment: NODE_NAME, LOCAL_XDS_PATH, DEV_CA_DIR, RUST_LOG, LOG_FORMAT=json";

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn flags_override_defaults() {
        let c = Config::from_args(args(
            "--node n1 --config /x.yaml --socks5 off --hbone-port 16008 --admin 127.0.0.1:1",
        ))
        .unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.socks5_addr, None);
        assert_eq!(c.hbone_port, 16008);
        assert_eq!(c.admin_addr, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(c.outbound_addr, Some("127.0.0.1:15001".parse().unwrap()));
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        let e = Config::from_args(args("--node n --config x --socks5 nope")).unwrap_err();
        assert!(e.to_string().contains("--socks5"), "{e}");
        let e = Config::from_args(args("--node n --config x --bogus")).unwrap_err();
        assert!(e.to_string().contains("--bogus"), "{e}");
    }
}

//! The process configuration: built once at start-up from flags and environment variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use http::Uri;

/// Name of the node this ztunnel serves; workloads whose `node` matches are local.
pub const NODE_NAME_ENV: &str = "NODE_NAME";
/// Path of the local mesh description (YAML) in standalone mode.
pub const LOCAL_CONFIG_ENV: &str = "LOCAL_XDS_PATH";
/// Directory holding the development CA's root (created on first use).
pub const DEV_CA_DIR_ENV: &str = "DEV_CA_DIR";
pub const DEFAULT_DEV_CA_DIR: &str = "/tmp/ambient-mesh/dev-ca";
/// istiod-lite's delta xDS address (`http://host:15010` or `https://host:15012`).
pub const XDS_ADDRESS_ENV: &str = "XDS_ADDRESS";
/// The CA's address; defaults to the xDS address.
pub const CA_ADDRESS_ENV: &str = "CA_ADDRESS";
/// PEM roots that istiod-lite's serving certificate must chain to (for `https://`).
pub const XDS_ROOT_CA_ENV: &str = "XDS_ROOT_CA";
/// A file holding the bearer token (service-account JWT) sent to istiod-lite.
pub const TOKEN_FILE_ENV: &str = "TOKEN_FILE";
/// The name istiod-lite's serving certificate is verified against, whatever host the address
/// names (an IP or a port-forward included): istiod's DNS SAN.
pub const XDS_SERVER_NAME: &str = "istiod.istio-system.svc";
/// Plaintext and TLS gRPC ports of istiod, used when an address names none.
pub const DEFAULT_XDS_PLAINTEXT_PORT: u16 = 15010;
pub const DEFAULT_XDS_TLS_PORT: u16 = 15012;
/// Namespace ztunnel runs in, as its xDS node id and metadata name it.
pub const ZTUNNEL_NAMESPACE: &str = "istio-system";
/// Sent as gRPC metadata `clusterid` on the xDS stream and to the CA.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
pub const DEFAULT_INBOUND_PLAINTEXT_ADDR: &str = "127.0.0.1:15006";
pub const DEFAULT_SOCKS5_ADDR: &str = "127.0.0.1:15080";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
/// SO_MARK on ztunnel's own sockets, so redirection rules leave them alone.
pub const DEFAULT_SOCKET_MARK: u32 = 0x539;

/// Where the mesh description comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshSource {
    /// Standalone: a YAML file, polled for changes.
    Local(PathBuf),
    /// istiod-lite, over delta xDS.
    Xds(ControlPlaneAddr),
}

/// A gRPC address of istiod-lite: `http://` (plaintext) or `https://` (TLS), host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneAddr {
    uri: Uri,
}

impl ControlPlaneAddr {
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    pub fn is_tls(&self) -> bool {
        self.uri.scheme_str() == Some("https")
    }

    /// `host:port` to connect to (brackets kept around an IPv6 host).
    pub fn authority(&self) -> &str {
        self.uri.authority().map(|a| a.as_str()).unwrap_or_default()
    }
}

impl FromStr for ControlPlaneAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|e| {
            format!("{s:?} is not a URL ({e}); expected http://host:port or https://host:port")
        })?;
        let default_port = match uri.scheme_str() {
            Some("http") => DEFAULT_XDS_PLAINTEXT_PORT,
            Some("https") => DEFAULT_XDS_TLS_PORT,
            _ => {
                return Err(format!(
                    "{s:?}: the scheme must be http:// (plaintext) or https:// (TLS)"
                ));
            }
        };
        let Some(authority) = uri.authority() else {
            return Err(format!("{s:?} names no host"));
        };
        if authority.host().is_empty() || authority.as_str().contains('@') {
            return Err(format!(
                "{s:?}: expected scheme://host[:port] and nothing else"
            ));
        }
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(format!("{s:?}: a gRPC address takes no path"));
        }
        let port = authority.port_u16().unwrap_or(default_port);
        let uri = Uri::builder()
            .scheme(uri.scheme_str().unwrap_or("http"))
            .authority(format!("{}:{port}", authority.host()))
            .path_and_query("/")
            .build()
            .map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Self { uri })
    }
}

impl fmt::Display for ControlPlaneAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}",
            self.uri.scheme_str().unwrap_or("http"),
            self.authority()
        )
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub mesh: MeshSource,
    /// The CA that signs workload certificates; `None` in standalone mode, where the
    /// development CA in `dev_ca_dir` signs them.
    pub ca_address: Option<ControlPlaneAddr>,
    /// PEM roots for istiod-lite's serving certificate (required for `https://` addresses).
    pub xds_root_cert: Option<PathBuf>,
    /// Bearer token for istiod-lite, re-read for every request; a missing file sends none.
    pub token_file: Option<PathBuf>,
    pub cluster_id: String,
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
    /// In-pod capture: the node agent's socket. Pods' listeners then live in their own
    /// network namespaces, and node-level outbound/inbound listeners are off unless asked for.
    pub inpod_socket: Option<PathBuf>,
}

impl Config {
    /// Defaults suitable for running one ztunnel on a node, standalone (a local mesh description
    /// and the development CA).
    pub fn new(node_name: impl Into<String>, local_config: impl Into<PathBuf>) -> Self {
        let addr = |s: &str| Some(s.parse().expect("default addresses are valid"));
        Self {
            node_name: node_name.into(),
            mesh: MeshSource::Local(local_config.into()),
            ca_address: None,
            xds_root_cert: None,
            token_file: None,
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
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
            inpod_socket: None,
        }
    }

    /// Defaults for a ztunnel that takes its config and certificates from istiod-lite at
    /// `xds` (also the CA).
    pub fn with_xds(node_name: impl Into<String>, xds: ControlPlaneAddr) -> Self {
        let mut cfg = Self::new(node_name, "");
        cfg.ca_address = Some(xds.clone());
        cfg.mesh = MeshSource::Xds(xds);
        cfg.dev_ca_dir = None;
        cfg
    }

    /// The local mesh description, in standalone mode.
    pub fn local_config(&self) -> Option<&std::path::Path> {
        match &self.mesh {
            MeshSource::Local(p) => Some(p),
            MeshSource::Xds(_) => None,
        }
    }

    /// Reads flags (`--flag value`), falling back to environment variables, then defaults.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        Self::from_args_and_env(args, |k| std::env::var(k).ok())
    }

    /// [`Config::from_args`] with the environment given as a lookup function.
    pub fn from_args_and_env(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let mut node = env(NODE_NAME_ENV);
        let mut local = env(LOCAL_CONFIG_ENV).map(|v| (v, LOCAL_CONFIG_ENV.to_owned()));
        let mut xds = env(XDS_ADDRESS_ENV).map(|v| (v, XDS_ADDRESS_ENV.to_owned()));
        let mut ca = env(CA_ADDRESS_ENV).map(|v| (v, CA_ADDRESS_ENV.to_owned()));
        let mut cfg = Self::new("", "");
        if let Some(dir) = env(DEV_CA_DIR_ENV) {
            cfg.dev_ca_dir = Some(dir.into());
        }
        cfg.xds_root_cert = env(XDS_ROOT_CA_ENV).map(PathBuf::from);
        cfg.token_file = env(TOKEN_FILE_ENV).map(PathBuf::from);
        let mut inpod = false;
        let mut node_listeners = false;
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("flag {flag} needs a value"))
            };
            let addr = |v: String, flag: &str| -> anyhow::Result<Option<SocketAddr>> {
                mesh_core::sockets::parse_listen_addr(flag, &v).map_err(anyhow::Error::msg)
            };
            match flag.as_str() {
                "--node" => node = Some(value()?),
                "--config" => local = Some((value()?, flag.clone())),
                "--xds-address" => xds = Some((value()?, flag.clone())),
                "--ca-address" => ca = Some((value()?, flag.clone())),
                "--xds-root-cert" => cfg.xds_root_cert = Some(value()?.into()),
                "--token-file" => cfg.token_file = Some(value()?.into()),
                "--dev-ca-dir" => cfg.dev_ca_dir = Some(value()?.into()),
                "--outbound" => {
                    cfg.outbound_addr = addr(value()?, &flag)?;
                    node_listeners = true;
                }
                "--inbound-plaintext" => {
                    cfg.inbound_plaintext_addr = addr(value()?, &flag)?;
                    node_listeners = true;
                }
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
                "--inpod-socket" => {
                    cfg.inpod_socket = Some(value()?.into());
                    inpod = true;
                }
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
        if inpod && !node_listeners {
            // Each captured pod gets these listeners in its own namespace instead.
            cfg.outbound_addr = None;
            cfg.inbound_plaintext_addr = None;
        }
        if inpod && cfg.socket_mark.is_none() {
            bail!(
                "--inpod-socket needs the socket mark: in-pod redirection rules recognise ztunnel's own traffic by it (drop --no-mark)"
            );
        }
        cfg.node_name =
            node.with_context(|| format!("no node name: pass --node NAME or set {NODE_NAME_ENV}"))?;
        let parse_addr = |(v, from): (String, String)| -> anyhow::Result<ControlPlaneAddr> {
            v.parse()
                .map_err(|e: String| anyhow::anyhow!("{from}: {e}"))
        };
        cfg.mesh = match (local, xds) {
            (Some((_, l)), Some((_, x))) => {
                bail!("both {l} (standalone mesh file) and {x} (istiod-lite) given; choose one")
            }
            (Some((path, _)), None) => MeshSource::Local(path.into()),
            (None, Some(x)) => MeshSource::Xds(parse_addr(x)?),
            (None, None) => bail!(
                "no mesh config: pass --xds-address URL (or set {XDS_ADDRESS_ENV}) to follow istiod-lite, or --config FILE (or set {LOCAL_CONFIG_ENV}) to run standalone"
            ),
        };
        cfg.ca_address = match (ca, &cfg.mesh) {
            (Some(c), _) => Some(parse_addr(c)?),
            (None, MeshSource::Xds(x)) => Some(x.clone()),
            (None, MeshSource::Local(_)) => None,
        };
        let tls_addr = match &cfg.mesh {
            MeshSource::Xds(x) if x.is_tls() => Some(x),
            _ => None,
        }
        .or(cfg.ca_address.as_ref().filter(|c| c.is_tls()));
        if let (Some(addr), None) = (tls_addr, &cfg.xds_root_cert) {
            bail!(
                "{addr} uses TLS: pass --xds-root-cert FILE (or set {XDS_ROOT_CA_ENV}) with the roots istiod-lite's certificate chains to"
            );
        }
        Ok(cfg)
    }
}

pub const USAGE: &str = "usage: ztunnel --node NAME (--xds-address URL | --config FILE) [options]
  --xds-address URL           follow istiod-lite: http://HOST:15010 (plaintext) or
                              https://HOST:15012 (TLS); config and certificates come from it
  --ca-address URL            the CA, if not at the xDS address
  --xds-root-cert FILE        PEM roots istiod-lite's certificate must chain to (needed for
                              https); its name is checked as istiod.istio-system.svc
  --token-file FILE           bearer token for istiod-lite, re-read for every request
  --config FILE               standalone: the mesh description (YAML), watched for changes
  --dev-ca-dir DIR            standalone: development CA root (default /tmp/ambient-mesh/dev-ca)
  --outbound ADDR|off         redirected outbound listener (default 127.0.0.1:15001)
  --inbound-plaintext ADDR|off  redirected inbound plaintext (default 127.0.0.1:15006)
  --socks5 ADDR|off           SOCKS5 outbound (default 127.0.0.1:15080)
  --admin ADDR|off            admin, /config_dump (default 127.0.0.1:15000)
  --metrics ADDR|off          Prometheus /metrics (default 0.0.0.0:15020)
  --readiness ADDR|off        /healthz/ready (default 0.0.0.0:15021)
  --hbone-port PORT           inbound HBONE port on each local workload (default 15008)
  --no-mark                   do not set SO_MARK 0x539 on ztunnel's own sockets
  --inpod-socket PATH         in-pod capture: follow the node agent at this unix socket; each
                              captured pod gets 15001/15006/15008 in its own namespace
  --worker-threads N          async worker threads (default: one per CPU)
Environment: NODE_NAME, XDS_ADDRESS, CA_ADDRESS, XDS_ROOT_CA, TOKEN_FILE, LOCAL_XDS_PATH,
  DEV_CA_DIR, RUST_LOG, LOG_FORMAT=json";

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

    fn with_env(a: &str, env: &[(&str, &str)]) -> anyhow::Result<Config> {
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_args_and_env(args(a), |k| env.get(k).cloned())
    }

    #[test]
    fn xds_address_replaces_the_mesh_file_and_is_the_default_ca() {
        let c = with_env("--node n1 --xds-address http://127.0.0.1", &[]).unwrap();
        let want: ControlPlaneAddr = "http://127.0.0.1:15010".parse().unwrap();
        assert_eq!(c.mesh, MeshSource::Xds(want.clone()));
        assert_eq!(c.ca_address, Some(want));
        assert_eq!(c.local_config(), None);

        let c = with_env(
            "--node n1 --ca-address http://10.0.0.1:9000",
            &[(XDS_ADDRESS_ENV, "http://istiod:15010")],
        )
        .unwrap();
        assert_eq!(c.ca_address.unwrap().to_string(), "http://10.0.0.1:9000");

        let c = with_env(
            "--node n --xds-address https://istiod --xds-root-cert /roots.pem",
            &[(TOKEN_FILE_ENV, "/token")],
        )
        .unwrap();
        let MeshSource::Xds(x) = &c.mesh else {
            panic!("not xDS")
        };
        assert!(x.is_tls());
        assert_eq!(x.authority(), "istiod:15012");
        assert_eq!(c.token_file, Some(PathBuf::from("/token")));

        let v6: ControlPlaneAddr = "http://[::1]".parse().unwrap();
        assert_eq!(v6.authority(), "[::1]:15010");
        assert_eq!(v6.to_string(), "http://[::1]:15010");
    }

    #[test]
    fn standalone_keeps_the_development_ca() {
        let c = with_env("--node n --config /m.yaml", &[]).unwrap();
        assert_eq!(c.local_config(), Some(std::path::Path::new("/m.yaml")));
        assert_eq!(c.ca_address, None);
        assert!(c.dev_ca_dir.is_some());
    }

    #[test]
    fn xds_config_errors_say_what_is_wrong() {
        let e = with_env("--node n --config x --xds-address http://a:1", &[]).unwrap_err();
        assert!(e.to_string().contains("choose one"), "{e}");
        let e = with_env(
            "--node n",
            &[(XDS_ADDRESS_ENV, "http://a"), (LOCAL_CONFIG_ENV, "x")],
        )
        .unwrap_err();
        assert!(e.to_string().contains("XDS_ADDRESS"), "{e}");
        let e = with_env("--node n", &[]).unwrap_err();
        assert!(e.to_string().contains("--xds-address"), "{e}");
        let e = with_env("--node n --xds-address https://istiod", &[]).unwrap_err();
        assert!(e.to_string().contains("--xds-root-cert"), "{e}");
        let e = with_env("--node n --xds-address grpc://istiod", &[]).unwrap_err();
        assert!(
            e.to_string().contains("--xds-address") && e.to_string().contains("scheme"),
            "{e}"
        );
        let e = with_env("--node n --xds-address http://istiod/x", &[]).unwrap_err();
        assert!(e.to_string().contains("path"), "{e}");
    }
}

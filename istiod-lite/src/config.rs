//! istiod-lite's configuration: built once at start-up from flags and environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::translate::MeshOptions;

/// Directory of Kubernetes YAML to read (the local mode).
pub const CONFIG_DIR_ENV: &str = "CONFIG_DIR";
/// Where the self-managed CA root and node bootstrap tokens are kept.
pub const STATE_DIR_ENV: &str = "STATE_DIR";
pub const DEFAULT_STATE_DIR: &str = "/tmp/ambient-mesh/istiod";
pub const DEFAULT_XDS_PLAINTEXT_ADDR: &str = "127.0.0.1:15010";
pub const DEFAULT_XDS_TLS_ADDR: &str = "0.0.0.0:15012";
pub const DEFAULT_DEBUG_ADDR: &str = "127.0.0.1:15014";

/// Where the desired state comes from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A directory of YAML, watched.
    Directory(PathBuf),
    /// The Kubernetes API server.
    Kubernetes(KubeSettings),
}

#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    /// `None`: in-cluster (service account token and CA of the pod).
    pub api_url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub state_dir: PathBuf,
    /// An operator-provided CA (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
    /// `cert-chain.pem`) instead of the self-managed root.
    pub plugged_ca_dir: Option<PathBuf>,
    pub xds_plaintext_addr: Option<SocketAddr>,
    pub xds_tls_addr: Option<SocketAddr>,
    pub debug_addr: Option<SocketAddr>,
    pub mesh: MeshOptions,
    pub debounce: Duration,
    pub max_push_delay: Duration,
    pub dir_poll: Duration,
    /// Resource bytes per xDS response before a push is split.
    pub max_response_bytes: usize,
    /// A TLS connection with no authenticated caller by then is closed.
    pub auth_deadline: Duration,
}

impl Config {
    pub fn new(source: SourceConfig) -> Self {
        let addr = |s: &str| Some(s.parse().expect("default addresses are valid"));
        Self {
            source,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            plugged_ca_dir: None,
            xds_plaintext_addr: addr(DEFAULT_XDS_PLAINTEXT_ADDR),
            xds_tls_addr: addr(DEFAULT_XDS_TLS_ADDR),
            debug_addr: addr(DEFAULT_DEBUG_ADDR),
            mesh: MeshOptions::default(),
            debounce: crate::xds::DEFAULT_DEBOUNCE,
            max_push_delay: crate::xds::DEFAULT_MAX_DELAY,
            dir_poll: crate::source::dir::DEFAULT_POLL,
            max_response_bytes: crate::xds::ads::MAX_RESPONSE_BYTES,
            auth_deadline: crate::server::AUTHENTICATION_DEADLINE,
        }
    }

    /// Reads flags (`--flag value`), falling back to environment variables, then defaults.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        let mut dir = std::env::var(CONFIG_DIR_ENV).ok().map(PathBuf::from);
        let mut kube: Option<KubeSettings> = None;
        let mut cfg = Self::new(SourceConfig::Directory(PathBuf::new()));
        if let Ok(d) = std::env::var(STATE_DIR_ENV) {
            cfg.state_dir = d.into();
        }
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
                "--config-dir" => dir = Some(value()?.into()),
                "--kubernetes" => {
                    kube.get_or_insert_with(KubeSettings::default);
                }
                "--kube-api" => {
                    kube.get_or_insert_with(KubeSettings::default).api_url = Some(value()?)
                }
                "--kube-token-file" => {
                    kube.get_or_insert_with(KubeSettings::default).token_file =
                        Some(value()?.into())
                }
                "--kube-ca-file" => {
                    kube.get_or_insert_with(KubeSettings::default).ca_file = Some(value()?.into())
                }
                "--state-dir" => cfg.state_dir = value()?.into(),
                "--ca-dir" => cfg.plugged_ca_dir = Some(value()?.into()),
                "--xds-plaintext" => cfg.xds_plaintext_addr = addr(value()?, &flag)?,
                "--xds-tls" => cfg.xds_tls_addr = addr(value()?, &flag)?,
                "--debug" => cfg.debug_addr = addr(value()?, &flag)?,
                "--trust-domain" => {
                    let td = value()?;
                    mesh_core::SpiffeId::new(&td, "ns", "sa").with_context(|| {
                        format!("--trust-domain: {td:?} is not a valid trust domain")
                    })?;
                    cfg.mesh.trust_domain = td;
                }
                "--cluster-id" => cfg.mesh.cluster_id = value()?,
                "--root-namespace" => cfg.mesh.root_namespace = value()?,
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown flag {other:?}\n{USAGE}"),
            }
        }
        cfg.source = match (dir, kube) {
            (Some(_), Some(_)) => bail!("give either --config-dir or --kubernetes, not both"),
            (Some(d), None) => SourceConfig::Directory(d),
            (None, Some(k)) => SourceConfig::Kubernetes(k),
            (None, None) => bail!(
                "no config source: pass --config-dir DIR (or set {CONFIG_DIR_ENV}), or --kubernetes\n{USAGE}"
            ),
        };
        Ok(cfg)
    }
}

pub const USAGE: &str = "usage: istiod-lite (--config-dir DIR | --kubernetes) [options]
       istiod-lite node-token --node NAME [--state-dir DIR] [--out FILE]
  --config-dir DIR          read Kubernetes YAML from DIR and watch it (env CONFIG_DIR)
  --kubernetes              watch the Kubernetes API (in-cluster credentials unless given:)
  --kube-api URL            API server URL
  --kube-token-file FILE    bearer token file
  --kube-ca-file FILE       API server CA bundle
  --state-dir DIR           CA root and node tokens (default /tmp/ambient-mesh/istiod; env STATE_DIR)
  --ca-dir DIR              operator-provided CA: ca-cert.pem ca-key.pem root-cert.pem [cert-chain.pem]
  --xds-plaintext ADDR|off  xDS + CA without TLS, for local use (default 127.0.0.1:15010)
  --xds-tls ADDR|off        xDS + CA over TLS (default 0.0.0.0:15012)
  --debug ADDR|off          debug endpoints and /metrics (default 127.0.0.1:15014)
  --trust-domain TD         (default cluster.local)
  --cluster-id ID           (default Kubernetes)
  --root-namespace NS       mesh-wide policies live here (default istio-system)
Environment: RUST_LOG, LOG_FORMAT=json";

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn flags() {
        let c =
            Config::from_args(args("--config-dir /x --xds-tls off --debug 127.0.0.1:1")).unwrap();
        assert!(matches!(c.source, SourceConfig::Directory(ref d) if d.as_os_str() == "/x"));
        assert_eq!(c.xds_tls_addr, None);
        assert_eq!(c.debug_addr, Some("127.0.0.1:1".parse().unwrap()));
        let e = Config::from_args(args("--config-dir /x --kubernetes")).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let e = Config::from_args(args("--config-dir /x --trust-domain 'A B'")).unwrap_err();
        assert!(e.to_string().contains("--trust-domain"), "{e}");
        let e = Config::from_args(args("--bogus")).unwrap_err();
        assert!(e.to_string().contains("--bogus"), "{e}");
    }
}

//! The waypoint's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_core::SpiffeId;
use ztunnel::config::ControlPlaneAddr;

pub const USAGE: &str = "\
usage: waypoint --name GATEWAY --namespace NS --node NODE --xds-address URL [options]

  --name GATEWAY            the waypoint's Gateway (class istio-waypoint)
  --namespace NS            its namespace
  --node NODE               the node it runs on (the name the CA knows)
  --service-account SA      its identity's service account (default: GATEWAY)
  --trust-domain TD         (default cluster.local)
  --xds-address URL         istiod-lite: https://host:15012 or http://host:15010
  --xds-root-cert PEM       roots for istiod-lite's certificate (required for https)
  --token-file PATH         bearer token for istiod-lite
  --cluster-id ID           (default Kubernetes)
  --hbone ADDR              HBONE listener (default 0.0.0.0:15008)
  --admin ADDR|off          /config_dump, /quitquitquit (default 127.0.0.1:15000)
  --metrics ADDR|off        /metrics (default 0.0.0.0:15020)
  --readiness ADDR|off      /healthz/ready (default 0.0.0.0:15021)
  --outlier-failures N      consecutive 5xx or connect failures that eject an endpoint (default 5)
  --outlier-ejection MS     first ejection time; doubles with each ejection (default 5000)
  --no-mark                 do not mark sockets (SO_MARK 0x539)
";

#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub identity: SpiffeId,
    pub xds: ControlPlaneAddr,
    pub xds_root_cert: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub cluster_id: String,
    pub hbone_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub readiness_addr: Option<SocketAddr>,
    pub outlier: OutlierConfig,
    pub socket_mark: Option<u32>,
    pub cert_ttl: Duration,
    /// How long to wait for a client to speak first before treating a stream as opaque TCP.
    pub detect_timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// SO_MARK of the mesh's own sockets, which capture rules leave alone.
pub const SOCKET_MARK: u32 = 0x539;

impl Config {
    pub fn from_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        let mut args = args.into_iter();
        let mut name = None;
        let mut namespace = None;
        let mut node = None;
        let mut sa = None;
        let mut td = "cluster.local".to_owned();
        let mut xds: Option<ControlPlaneAddr> = None;
        let mut xds_root_cert = None;
        let mut token_file = None;
        let mut cluster_id = "Kubernetes".to_owned();
        let mut hbone_addr: SocketAddr = ([0, 0, 0, 0], 15008).into();
        let mut admin_addr = Some(([127, 0, 0, 1], 15000).into());
        let mut metrics_addr = Some(([0, 0, 0, 0], 15020).into());
        let mut readiness_addr = Some(([0, 0, 0, 0], 15021).into());
        let mut outlier = OutlierConfig::default();
        let mut socket_mark = Some(SOCKET_MARK);
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{flag} needs a value\n\n{USAGE}"))
            };
            let optional = |flag: &str, v: String| -> anyhow::Result<Option<SocketAddr>> {
                mesh_core::sockets::parse_listen_addr(flag, &v).map_err(anyhow::Error::msg)
            };
            match flag.as_str() {
                "--name" => name = Some(value()?),
                "--namespace" => namespace = Some(value()?),
                "--node" => node = Some(value()?),
                "--service-account" => sa = Some(value()?),
                "--trust-domain" => td = value()?,
                "--xds-address" => {
                    let v = value()?;
                    xds = Some(
                        v.parse()
                            .map_err(|e: String| anyhow::anyhow!("--xds-address: {e}"))?,
                    );
                }
                "--xds-root-cert" => xds_root_cert = Some(PathBuf::from(value()?)),
                "--token-file" => token_file = Some(PathBuf::from(value()?)),
                "--cluster-id" => cluster_id = value()?,
                "--hbone" => {
                    let v = value()?;
                    hbone_addr = v
                        .parse()
                        .with_context(|| format!("--hbone: {v:?} is not an address:port"))?;
                }
                "--admin" => admin_addr = optional("--admin", value()?)?,
                "--metrics" => metrics_addr = optional("--metrics", value()?)?,
                "--readiness" => readiness_addr = optional("--readiness", value()?)?,
                "--outlier-failures" => {
                    let v = value()?;
                    outlier.consecutive_failures =
                        v.parse().ok().filter(|n| *n > 0).with_context(|| {
                            format!("--outlier-failures: {v:?} is not a positive number")
                        })?;
                }
                "--outlier-ejection" => {
                    let v = value()?;
                    let ms: u64 = v.parse().ok().filter(|n| *n > 0).with_context(|| {
                        format!("--outlier-ejection: {v:?} is not a positive number of ms")
                    })?;
                    outlier.base_ejection = Duration::from_millis(ms);
                }
                "--no-mark" => socket_mark = None,
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown flag {other:?}\n\n{USAGE}"),
            }
        }
        let name = name.with_context(|| format!("--name is required\n\n{USAGE}"))?;
        let namespace = namespace.with_context(|| format!("--namespace is required\n\n{USAGE}"))?;
        let node = node.with_context(|| format!("--node is required\n\n{USAGE}"))?;
        let xds = xds.with_context(|| format!("--xds-address is required\n\n{USAGE}"))?;
        if xds.is_tls() && xds_root_cert.is_none() {
            bail!("--xds-address {xds} is TLS: --xds-root-cert is required");
        }
        let sa = sa.unwrap_or_else(|| name.clone());
        let identity = SpiffeId::new(&td, &namespace, &sa)
            .map_err(|e| anyhow::anyhow!("the waypoint's identity: {e}"))?;
        Ok(Self {
            name,
            namespace,
            node,
            identity,
            xds,
            xds_root_cert,
            token_file,
            cluster_id,
            hbone_addr,
            admin_addr,
            metrics_addr,
            readiness_addr,
            outlier,
            socket_mark,
            cert_ttl: Duration::from_secs(24 * 3600),
            detect_timeout: Duration::from_millis(300),
        })
    }

    /// The hostname of the waypoint's own Service, which bound Services name.
    pub fn service_hostname_prefix(&self) -> String {
        format!("{}.{}.svc.", self.name, self.namespace)
    }

    /// `gateway:<namespace>/<name>`: how a policy targets this waypoint.
    pub fn gateway_target(&self) -> String {
        format!("gateway:{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn defaults_and_required_flags() {
        let c = Config::from_args(args(
            "--name wp --namespace shop --node n1 --xds-address http://10.0.0.1:15010",
        ))
        .unwrap();
        assert_eq!(
            c.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/wp"
        );
        assert_eq!(c.hbone_addr.port(), 15008);
        assert_eq!(c.gateway_target(), "gateway:shop/wp");
        assert_eq!(c.service_hostname_prefix(), "wp.shop.svc.");
        for missing in ["--name", "--namespace", "--node", "--xds-address"] {
            let line = "--name wp --namespace shop --node n1 --xds-address http://x:1";
            let without: Vec<String> = {
                let a = args(line);
                let i = a.iter().position(|x| x == missing).unwrap();
                a.iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i && *j != i + 1)
                    .map(|(_, x)| x.clone())
                    .collect()
            };
            let e = Config::from_args(without).unwrap_err().to_string();
            assert!(e.contains(missing), "{e}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let base = "--name wp --namespace shop --node n1 --xds-address http://x:1";
        for (extra, named) in [
            ("--hbone nope", "--hbone"),
            ("--outlier-failures 0", "--outlier-failures"),
            ("--admin 1.2.3", "--admin"),
            ("--bogus", "--bogus"),
        ] {
            let e = Config::from_args(args(&format!("{base} {extra}")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{extra}: {e}");
        }
        let e = Config::from_args(args(
            "--name wp --namespace shop --node n1 --xds-address https://x:1",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("--xds-root-cert"), "{e}");
    }
}

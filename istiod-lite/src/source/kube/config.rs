//! Where the API server is and how to reach it: a URL, a bearer token file, a CA bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::KubeError;

/// Environment variables the kubelet sets in every pod.
pub const SERVICE_HOST_ENV: &str = "KUBERNETES_SERVICE_HOST";
pub const SERVICE_PORT_ENV: &str = "KUBERNETES_SERVICE_PORT";
/// Where the kubelet mounts the pod's service account token and the cluster CA.
pub const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// Bound on a whole non-watch request: connect, TLS, headers and body.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the API server is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    pub(super) base_url: String,
    pub(super) token_file: Option<PathBuf>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) request_timeout: Duration,
}

impl KubeConfig {
    /// An API server at `base_url` (`https://10.96.0.1:443`, `http://127.0.0.1:8001`), with no
    /// token and no CA yet.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            token_file: None,
            ca_file: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The API server of the cluster this pod runs in, with the pod's service account.
    pub fn in_cluster() -> Result<Self, KubeError> {
        Self::from_env(|name| std::env::var(name).ok())
    }

    fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, KubeError> {
        let host = env(SERVICE_HOST_ENV)
            .filter(|h| !h.is_empty())
            .ok_or(KubeError::NotInCluster(SERVICE_HOST_ENV))?;
        let port = env(SERVICE_PORT_ENV)
            .filter(|p| !p.is_empty())
            .ok_or(KubeError::NotInCluster(SERVICE_PORT_ENV))?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(Self::new(format!("https://{host}:{port}"))
            .with_token_file(TOKEN_PATH)
            .with_ca_file(CA_PATH))
    }

    /// Sends the token in `path` as a bearer token, read afresh for every request.
    pub fn with_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    /// Verifies an https API server against the PEM certificates in `path`.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Bounds each non-watch request, and the wait for a watch's response headers.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }
}

pub(super) fn tls_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, KubeError> {
    let err = |reason: String| KubeError::Ca {
        path: ca.to_owned(),
        reason,
    };
    let pem = std::fs::read_to_string(ca).map_err(|e| err(e.to_string()))?;
    let certs = mesh_core::tls::parse_pem_certs(&pem)
        .map_err(|e| err(format!("{e}; expected PEM certificates")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| err(format!("not a usable CA certificate: {e}")))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(mesh_core::crypto::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_cluster_config_reads_the_service_env() {
        let env = |host: &'static str| {
            move |name: &str| match name {
                SERVICE_HOST_ENV => Some(host.to_owned()),
                SERVICE_PORT_ENV => Some("443".to_owned()),
                _ => None,
            }
        };
        let c = KubeConfig::from_env(env("10.96.0.1")).unwrap();
        assert_eq!(c.base_url(), "https://10.96.0.1:443");
        assert_eq!(c.token_file.as_deref(), Some(Path::new(TOKEN_PATH)));
        assert_eq!(c.ca_file.as_deref(), Some(Path::new(CA_PATH)));
        let c = KubeConfig::from_env(env("fd00::1")).unwrap();
        assert_eq!(c.base_url(), "https://[fd00::1]:443");
        let e = KubeConfig::from_env(|_| None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("KUBERNETES_SERVICE_HOST is not set"),
            "{e}"
        );
    }
}

//! Who is asking: turns the bearer token on a request into a [`Requester`].
//!
//! Locally each node has a bootstrap token (`istiod-lite node-token --node NAME`), a random
//! secret kept in the state directory. On Kubernetes the token is a projected service-account
//! token checked with the API server's TokenReview.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    /// A node proxy identified by its bootstrap token.
    Node(String),
    /// A pod, identified by a service-account token bound to it.
    Pod {
        namespace: String,
        name: String,
        service_account: String,
    },
    /// A service account not bound to a pod.
    ServiceAccount {
        namespace: String,
        service_account: String,
    },
}

impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requester::Node(n) => write!(f, "node {n}"),
            Requester::Pod {
                namespace, name, ..
            } => write!(f, "pod {namespace}/{name}"),
            Requester::ServiceAccount {
                namespace,
                service_account,
            } => write!(f, "service account {namespace}/{service_account}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token in the `authorization` metadata; pass --token-file to the proxy")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("cannot check the token right now: {0}")]
    Unavailable(String),
}

pub type AuthFuture = Pin<Box<dyn Future<Output = Result<Requester, AuthError>> + Send>>;

pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, token: &str) -> AuthFuture;
}

/// Reads `authorization: Bearer <token>` from gRPC metadata.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, AuthError> {
    let v = metadata
        .get("authorization")
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Invalid("the authorization header is not ASCII".into()))?;
    v.strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AuthError::Invalid("expected `Bearer <token>`".into()))
}

const TOKEN_PREFIX: &str = "node:";
const TOKEN_DIR: &str = "node-tokens";

/// Per-node bootstrap tokens: `node:<name>:<64 hex digits>`, the secret part kept in
/// `<state>/node-tokens/<name>` (mode 0600).
#[derive(Debug, Clone)]
pub struct NodeTokens {
    dir: PathBuf,
}

impl NodeTokens {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join(TOKEN_DIR),
        }
    }

    /// The token of `node`, created on first use.
    pub fn token_for(&self, node: &str) -> anyhow::Result<String> {
        anyhow::ensure!(
            is_node_name(node),
            "{node:?} is not a valid node name (lower-case letters, digits, '-', '.')"
        );
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", self.dir.display()))?;
        let path = self.dir.join(node);
        let secret = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: String = (0..4)
                    .map(|_| format!("{:016x}", fastrand::u64(..)))
                    .collect();
                write_secret(&path, &secret)?;
                // Another process may have won the race: use whatever is on disk.
                std::fs::read_to_string(&path)?.trim().to_owned()
            }
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        Ok(format!("{TOKEN_PREFIX}{node}:{secret}"))
    }

    fn verify(&self, token: &str) -> Result<String, AuthError> {
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| AuthError::Invalid("not a node bootstrap token".into()))?;
        let (node, secret) = rest
            .split_once(':')
            .ok_or_else(|| AuthError::Invalid("malformed node token".into()))?;
        if !is_node_name(node) {
            return Err(AuthError::Invalid("malformed node token".into()));
        }
        let want = std::fs::read_to_string(self.dir.join(node)).map_err(|_| {
            AuthError::Invalid(format!("no bootstrap token was issued for node {node}"))
        })?;
        if constant_time_eq(want.trim().as_bytes(), secret.as_bytes()) {
            Ok(node.to_owned())
        } else {
            Err(AuthError::Invalid(format!(
                "wrong bootstrap token for node {node}"
            )))
        }
    }
}

impl Authenticator for NodeTokens {
    fn authenticate(&self, token: &str) -> AuthFuture {
        let r = self.verify(token).map(Requester::Node);
        Box::pin(async move { r })
    }
}

impl<T: Authenticator> Authenticator for Arc<T> {
    fn authenticate(&self, token: &str) -> AuthFuture {
        (**self).authenticate(token)
    }
}

fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => Ok(f.write_all(secret.as_bytes())?),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => anyhow::bail!("writing {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn node_tokens_round_trip_and_refuse_forgeries() {
        let dir = std::env::temp_dir().join(format!("istiod-auth-{}", fastrand::u64(..)));
        let tokens = NodeTokens::new(&dir);
        let t = tokens.token_for("node-a").unwrap();
        assert_eq!(t, tokens.token_for("node-a").unwrap(), "stable");
        assert_eq!(
            tokens.authenticate(&t).await.unwrap(),
            Requester::Node("node-a".into())
        );
        let forged = t.replace("node:node-a:", "node:node-b:");
        assert!(tokens.authenticate(&forged).await.is_err());
        let mut wrong = t.clone();
        wrong.pop();
        wrong.push('x');
        assert_eq!(
            tokens.authenticate(&wrong).await.unwrap_err(),
            AuthError::Invalid("wrong bootstrap token for node node-a".into())
        );
        assert!(tokens.authenticate("node:../etc:x").await.is_err());
        assert!(tokens.token_for("../x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

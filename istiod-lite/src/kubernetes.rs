//! Running against a Kubernetes API server: the watch source, service-account token review for
//! callers, and status written back to Gateways, routes and policies.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::auth::{AuthError, AuthFuture, Authenticator, Requester};
use crate::config::KubeSettings;
use crate::model::ObjectKey;
use crate::source::Source;
use crate::source::kube::{InitialSync, KubeClient, KubeConfig, KubeError, KubeSource};
use crate::xds::Snapshot;

/// The audience proxies put in the tokens they send (Istio's CA audience).
pub const TOKEN_AUDIENCE: &str = "istio-ca";

pub fn client(k: &KubeSettings) -> anyhow::Result<KubeClient> {
    let mut cfg = match &k.api_url {
        Some(url) => KubeConfig::new(url.clone()),
        None => KubeConfig::in_cluster()?,
    };
    if let Some(t) = &k.token_file {
        cfg = cfg.with_token_file(t.clone());
    }
    if let Some(c) = &k.ca_file {
        cfg = cfg.with_ca_file(c.clone());
    }
    Ok(KubeClient::new(cfg)?)
}

/// The watch source, and what tells when it has listed everything once.
pub fn source(client: &KubeClient) -> (Box<dyn Source>, InitialSync) {
    let src = KubeSource::new(client.clone());
    let synced = src.initial_sync();
    (Box::new(src), synced)
}

/// Checks bearer tokens with the API server's TokenReview.
pub struct TokenReviewer {
    client: KubeClient,
    audiences: Vec<String>,
}

impl TokenReviewer {
    pub fn new(client: KubeClient) -> Self {
        Self {
            client,
            audiences: vec![TOKEN_AUDIENCE.to_owned()],
        }
    }
}

impl Authenticator for TokenReviewer {
    fn authenticate(&self, token: &str) -> AuthFuture {
        let client = self.client.clone();
        let audiences = self.audiences.clone();
        let token = token.to_owned();
        Box::pin(async move {
            let r = client
                .token_review(&token, &audiences)
                .await
                .map_err(|e: KubeError| AuthError::Unavailable(e.to_string()))?;
            if !r.authenticated {
                return Err(AuthError::Invalid(
                    r.error
                        .clone()
                        .unwrap_or_else(|| "rejected by TokenReview".into()),
                ));
            }
            let Some((ns, sa)) = r.service_account() else {
                return Err(AuthError::Invalid(format!(
                    "{} is not a service account",
                    r.username
                )));
            };
            Ok(match &r.pod_name {
                Some(pod) => Requester::Pod {
                    namespace: ns.to_owned(),
                    name: pod.clone(),
                    service_account: sa.to_owned(),
                },
                None => Requester::ServiceAccount {
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                },
            })
        })
    }
}

/// Writes computed status to each object whose status changed, after every snapshot. A failed
/// write is retried with the next snapshot.
pub async fn write_status(client: KubeClient, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    let mut written: HashMap<ObjectKey, Value> = HashMap::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        // Forget objects that left: a re-created object gets its status written again.
        let present: std::collections::HashSet<(crate::model::Kind, &str, &str)> = snap
            .statuses
            .iter()
            .map(|s| (s.kind, s.namespace.as_str(), s.name.as_str()))
            .collect();
        written.retain(|k, _| present.contains(&(k.kind, k.namespace.as_str(), k.name.as_str())));
        for s in &snap.statuses {
            let key = ObjectKey {
                kind: s.kind,
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            };
            if written.get(&key) == Some(&s.status) {
                continue;
            }
            match client.patch_status(&key, s.status.clone()).await {
                Ok(()) => {
                    debug!(object = %key, "status written");
                    written.insert(key, s.status.clone());
                }
                Err(e) => {
                    warn!(object = %key, error = %e, "writing status failed; will retry");
                    written.remove(&key);
                }
            }
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

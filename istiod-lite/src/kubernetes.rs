//! Running against a Kubernetes API server: the watch source, service-account token review for
//! callers, and status written back to Gateways, routes and policies.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::auth::{AuthError, AuthFuture, Authenticator, Requester};
use crate::config::KubeSettings;
use crate::model::{Kind, ObjectKey};
use crate::source::Source;
use crate::source::kube::{InitialSync, KubeClient, KubeConfig, KubeError, KubeSource};
use crate::translate::status::CONTROLLER_NAME;
use crate::xds::Snapshot;

/// How soon a failed status write is tried again when nothing else changes.
pub const STATUS_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

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

/// Checks bearer tokens with the API server's TokenReview, remembering answers for a minute
/// so reconnect and certificate storms do not become TokenReview storms.
pub struct TokenReviewer {
    client: KubeClient,
    audiences: Vec<String>,
    cache: Arc<std::sync::Mutex<HashMap<u64, (std::time::Instant, Requester)>>>,
}

/// How long a positive TokenReview answer is reused.
const REVIEW_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// Tokens remembered at most; the cache is emptied when full.
const REVIEW_CACHE_SIZE: usize = 10_000;

impl TokenReviewer {
    pub fn new(client: KubeClient) -> Self {
        Self {
            client,
            audiences: vec![TOKEN_AUDIENCE.to_owned()],
            cache: Default::default(),
        }
    }
}

/// Tokens are cached by a keyed hash, never stored.
fn token_key(token: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = KEYS.get_or_init(Default::default).build_hasher();
    h.write(token.as_bytes());
    h.finish()
}

impl Authenticator for TokenReviewer {
    fn authenticate(&self, token: &str) -> AuthFuture {
        let key = token_key(token);
        {
            let c = self.cache.lock().expect("review cache lock poisoned");
            if let Some((at, who)) = c.get(&key)
                && at.elapsed() < REVIEW_CACHE_TTL
            {
                let who = who.clone();
                return Box::pin(async move { Ok(who) });
            }
        }
        let cache = self.cache.clone();
        let client = self.client.clone();
        let audiences = self.audiences.clone();
        let token = token.to_owned();
        let review = async move {
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
        };
        Box::pin(async move {
            let who = review.await?;
            let mut c = cache.lock().expect("review cache lock poisoned");
            if c.len() >= REVIEW_CACHE_SIZE {
                c.clear();
            }
            c.insert(key, (std::time::Instant::now(), who.clone()));
            Ok(who)
        })
    }
}

/// A route's `status.parents` is shared with other controllers (one entry per parent and
/// controller), and a merge patch replaces a list whole: read it, keep the others' entries,
/// replace ours, and write only if nobody wrote in between.
async fn write_route_parents(
    client: &KubeClient,
    key: &ObjectKey,
    ours: &Value,
) -> Result<(), KubeError> {
    let current = client.get(key).await?;
    let rv = current["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_owned);
    let mut parents: Vec<Value> = current["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] != CONTROLLER_NAME)
        .cloned()
        .collect();
    parents.extend(ours["parents"].as_array().into_iter().flatten().cloned());
    client
        .patch_status_at(key, json!({ "parents": parents }), rv.as_deref())
        .await
}

/// Writes computed status to each object whose status changed, after every snapshot. Failed
/// writes are retried after [`STATUS_RETRY`] (or sooner, with the next snapshot).
pub async fn write_status(client: KubeClient, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    let mut written: HashMap<ObjectKey, Value> = HashMap::new();
    loop {
        let mut failed = false;
        let snap = snapshots.borrow_and_update().clone();
        // Forget objects that left: a re-created object gets its status written again.
        let present: std::collections::HashSet<(Kind, &str, &str)> = snap
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
            let result = if matches!(key.kind, Kind::HTTPRoute | Kind::GRPCRoute) {
                write_route_parents(&client, &key, &s.status).await
            } else {
                client.patch_status(&key, s.status.clone()).await
            };
            match result {
                Ok(()) => {
                    debug!(object = %key, "status written");
                    written.insert(key, s.status.clone());
                }
                Err(e) => {
                    warn!(object = %key, error = %e, "writing status failed; will retry");
                    written.remove(&key);
                    failed = true;
                }
            }
        }
        if failed {
            match tokio::time::timeout(STATUS_RETRY, snapshots.changed()).await {
                Ok(Err(_)) => return,
                Ok(Ok(())) | Err(_) => continue,
            }
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

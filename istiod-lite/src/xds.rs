//! Incremental xDS: the current resources as an immutable [`Snapshot`], rebuilt (debounced)
//! after each change of the desired state, and the delta ADS streams that send each proxy only
//! what it does not have yet.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::store::Store;
use crate::translate::{MeshOptions, ObjectStatus};

pub mod ads;
pub mod builder;
pub mod registry;

pub use ads::AdsService;
pub use builder::SnapshotBuilder;
pub use registry::{Registry, SubscriberStatus};

/// The type URLs served, in the order a new subscriber is sent them. Each proxy subscribes to
/// the ones it understands (ztunnel: addresses and authorizations; waypoints: addresses,
/// routes and waypoint policies) and is sent only those.
pub const TYPE_URLS: [&str; 4] = [
    mesh_proto::ADDRESS_TYPE_URL,
    mesh_proto::AUTHORIZATION_TYPE_URL,
    mesh_proto::ROUTE_TYPE_URL,
    mesh_proto::WAYPOINT_POLICY_TYPE_URL,
];

/// A change is pushed once the state has been quiet this long…
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(5);
/// …or this long after the first change, whichever comes first.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(100);

/// One encoded resource. Shared between snapshots while it does not change.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    /// A hash of the encoding: equal versions mean equal bytes.
    pub version: String,
    /// The same hash as a number, for cheap comparison.
    pub hash: u64,
    pub body: Vec<u8>,
}

/// What changed in one type since the previous snapshot.
#[derive(Debug, Default)]
pub struct Delta {
    pub changed: Vec<Arc<Resource>>,
    pub removed: Vec<String>,
}

/// Everything every proxy should hold, by type URL and name.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one per rebuilt snapshot.
    pub version: u64,
    pub resources: BTreeMap<&'static str, BTreeMap<String, Arc<Resource>>>,
    /// Per type, the change from snapshot `version - 1`: a proxy that holds that one is sent
    /// only this, without comparing everything.
    pub deltas: BTreeMap<&'static str, Delta>,
    /// Status of Gateways, routes and policies computed with this config.
    pub statuses: Vec<ObjectStatus>,
    pub warnings: Vec<String>,
    pub built_at: Option<Instant>,
}

impl Snapshot {
    pub fn of_type(&self, type_url: &str) -> Option<&BTreeMap<String, Arc<Resource>>> {
        self.resources.get(type_url)
    }
}

impl Resource {
    /// The resource `name` with encoding `body`: `prev`'s version of it when the bytes are the
    /// same (shared, not hashed again), else a new one versioned by a hash of the bytes.
    pub fn encode(
        name: String,
        body: Vec<u8>,
        prev: Option<&BTreeMap<String, Arc<Resource>>>,
    ) -> Arc<Resource> {
        match prev.and_then(|p| p.get(&name)) {
            Some(r) if r.body == body => r.clone(),
            _ => {
                let hash = fnv1a(&body);
                Arc::new(Resource {
                    name,
                    version: format!("{hash:016x}"),
                    hash,
                    body,
                })
            }
        }
    }
}

/// 64-bit FNV-1a: stable across runs and releases, so versions survive a restart and a
/// reconnecting proxy is not sent what it already has.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Rebuilds the snapshot after store changes: waits for `debounce` of quiet (at most
/// `max_delay` after the first change), translates off the async threads, publishes.
pub async fn run_builder(
    store: Store,
    opts: MeshOptions,
    initial: SnapshotBuilder,
    publish: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    debounce: Duration,
    max_delay: Duration,
) {
    let mut changes = store.subscribe();
    let mut builder = Some(initial);
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        let first = tokio::time::Instant::now();
        loop {
            let deadline = (first + max_delay).min(tokio::time::Instant::now() + debounce);
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) if tokio::time::Instant::now() < first + max_delay => continue,
                _ => break,
            }
        }
        changes.mark_unchanged();
        let state = store.state();
        let errors = store.errors().len();
        let prev = publish.borrow().clone();
        let started = Instant::now();
        let Some(mut b) = builder.take() else {
            return;
        };
        let built = tokio::task::spawn_blocking(move || {
            let next = b.build(&state, &prev);
            (b, next)
        })
        .await;
        let Ok((b, next)) = built else {
            // Translation never panics on input; if it did, start over from scratch.
            tracing::error!("translation failed; keeping the previous config");
            builder = Some(SnapshotBuilder::new(opts.clone()));
            continue;
        };
        builder = Some(b);
        metrics.config_errors.set(errors as i64);
        metrics
            .translate_seconds
            .observe(started.elapsed().as_secs_f64());
        let counts: Vec<usize> = TYPE_URLS
            .iter()
            .map(|t| next.of_type(t).map_or(0, BTreeMap::len))
            .collect();
        debug!(
            version = next.version,
            addresses = counts[0],
            authorizations = counts[1],
            routes = counts[2],
            waypoint_policies = counts[3],
            took_ms = started.elapsed().as_millis() as u64,
            "config translated"
        );
        if next.version == 1 {
            info!(
                addresses = counts[0],
                authorizations = counts[1],
                routes = counts[2],
                waypoint_policies = counts[3],
                "initial config translated"
            );
        }
        let old = publish.send_replace(Arc::new(next));
        // Freeing a large snapshot takes a while: not on an async worker.
        tokio::task::spawn_blocking(move || drop(old));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_resources_are_shared_and_keep_their_version() {
        let st = crate::store::State::from_objects([crate::model::Object::parse(
            serde_json::json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "a", "namespace": "ns"}, "spec": {}}),
        )
        .unwrap()]);
        let mut b = SnapshotBuilder::new(MeshOptions::default());
        let s1 = b.build(&st, &Snapshot::default());
        // A builder that has forgotten everything still reuses the previous snapshot's bytes.
        let s2 = SnapshotBuilder::new(MeshOptions::default()).build(&st, &s1);
        let a1 = &s1.of_type(mesh_proto::AUTHORIZATION_TYPE_URL).unwrap()["ns/a"];
        let a2 = &s2.of_type(mesh_proto::AUTHORIZATION_TYPE_URL).unwrap()["ns/a"];
        assert!(Arc::ptr_eq(a1, a2));
        assert_eq!(s2.version, 2);
    }
}

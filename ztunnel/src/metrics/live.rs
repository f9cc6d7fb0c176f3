//! The connections being proxied right now and the last refusals by policy, for
//! `/config_dump` (and so `ambient ztunnel-config connections` and the "why was I denied"
//! view). Touched once when a connection opens and once when it closes, never per byte;
//! sharded so concurrent opens rarely meet on a lock.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::state::Workload;

const SHARDS: usize = 16;
/// Refusals kept for explaining them later; older ones are dropped.
pub const RECENT_DENIALS: usize = 64;

/// One open connection, as recorded when it opened.
#[derive(Debug, Clone)]
pub struct LiveConnection {
    pub direction: &'static str,
    /// The local workload it belongs to (the destination inbound, the source outbound).
    pub workload: Option<Arc<Workload>>,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub mtls: bool,
    /// The identity of the other side: proven (inbound) or expected (outbound).
    pub peer_identity: Option<String>,
    pub started: Instant,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionView<'a> {
    direction: &'static str,
    workload: Option<String>,
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    protocol: &'static str,
    peer_identity: Option<&'a str>,
    age_ms: u64,
}

/// A connection refused by an authorization policy, or by the waypoint rule (then `policy` is
/// `waypoint namespace/name`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Denial {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub direction: &'static str,
    /// `namespace/name` of the workload that was being reached.
    pub workload: Option<String>,
    pub source: Option<SocketAddr>,
    pub source_workload: Option<String>,
    pub source_identity: Option<String>,
    pub destination: Option<SocketAddr>,
    pub policy: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Live {
    next: AtomicU64,
    shards: [Mutex<HashMap<u64, LiveConnection>>; SHARDS],
    denials: Mutex<VecDeque<Denial>>,
}

impl Live {
    pub fn open(&self, conn: LiveConnection) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(id).insert(id, conn);
        id
    }

    pub fn close(&self, id: u64) {
        self.shard(id).remove(&id);
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, LiveConnection>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .expect("live connection shard lock poisoned")
    }

    pub fn denied(&self, denial: Denial) {
        let mut d = self.denials.lock().expect("denial list lock poisoned");
        if d.len() == RECENT_DENIALS {
            d.pop_front();
        }
        d.push_back(denial);
    }

    /// Open connections, oldest first.
    pub fn connections(&self) -> serde_json::Value {
        let now = Instant::now();
        let mut all: Vec<LiveConnection> = Vec::new();
        for shard in &self.shards {
            all.extend(
                shard
                    .lock()
                    .expect("live connection shard lock poisoned")
                    .values()
                    .cloned(),
            );
        }
        all.sort_by_key(|c| c.started);
        let views: Vec<ConnectionView<'_>> = all
            .iter()
            .map(|c| ConnectionView {
                direction: c.direction,
                workload: c
                    .workload
                    .as_ref()
                    .map(|w| format!("{}/{}", w.namespace, w.name)),
                source: c.source,
                destination: c.destination,
                protocol: if c.mtls { "HBONE" } else { "TCP" },
                peer_identity: c.peer_identity.as_deref(),
                age_ms: now.duration_since(c.started).as_millis() as u64,
            })
            .collect();
        serde_json::to_value(views).unwrap_or_default()
    }

    /// The last refusals by policy, oldest first.
    pub fn denials(&self) -> Vec<Denial> {
        self.denials
            .lock()
            .expect("denial list lock poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

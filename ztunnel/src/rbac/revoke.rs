//! Connections a changed policy (or waypoint) no longer allows are closed: every allowed
//! inbound connection is registered with what its verdict was decided on, and after each
//! config change all of them are evaluated again (the waypoint rule, then the policies). Registration costs one sharded map insert per connection; the
//! re-check runs off the data path, once per change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::info;

use super::{Connection, Verdict, authorize};
use crate::state::Snapshot;

const SHARDS: usize = 16;

/// Why a connection was closed: the policy (or `waypoint namespace/name`) now denying it and
/// the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub policy: String,
    pub reason: String,
}

struct Entry {
    /// The destination workload's uid.
    dst: String,
    conn: Connection,
    tx: oneshot::Sender<Revoked>,
}

/// The allowed inbound connections still open.
#[derive(Default)]
pub struct Authorized {
    next: AtomicU64,
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
}

/// Held by an open connection; deregisters it when dropped.
pub struct Registration {
    owner: Arc<Authorized>,
    id: u64,
    /// Resolves when a config change denies the connection.
    pub revoked: oneshot::Receiver<Revoked>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.owner.shard(self.id).remove(&self.id);
    }
}

impl Authorized {
    pub fn register(self: &Arc<Self>, dst_uid: &str, conn: Connection) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shard(id).insert(
            id,
            Entry {
                dst: dst_uid.to_owned(),
                conn,
                tx,
            },
        );
        Registration {
            owner: self.clone(),
            id,
            revoked: rx,
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .expect("authorized connection shard lock poisoned")
    }

    /// Evaluates every open connection against `snapshot`; those now denied (or whose
    /// destination workload is gone) are told to close. Returns how many.
    pub fn recheck(&self, snapshot: &Snapshot) -> usize {
        let mut closed = 0;
        for shard in &self.shards {
            let mut map = shard
                .lock()
                .expect("authorized connection shard lock poisoned");
            let denied: Vec<(u64, Revoked)> = map
                .iter()
                .filter_map(|(id, e)| {
                    let verdict = match snapshot.workload_by_uid(&e.dst) {
                        Some(w) => authorize(snapshot, w, &e.conn),
                        None => return None,
                    };
                    match verdict {
                        Verdict::Allow => None,
                        Verdict::Deny { policy, reason } => Some((*id, Revoked { policy, reason })),
                    }
                })
                .collect();
            for (id, why) in denied {
                if let Some(e) = map.remove(&id) {
                    info!(src = %e.conn.src_ip, dst = %e.conn.dst_ip, port = e.conn.dst_port, policy = %why.policy, "closing a connection the changed config denies");
                    let _ = e.tx.send(why);
                    closed += 1;
                }
            }
        }
        closed
    }
}

//! Who is connected and what each has acknowledged: the basis of `/debug/connections` and of
//! `ambient status`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

/// What one proxy has been sent and has acknowledged, for one resource type.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Snapshot version of the last response sent.
    pub sent_version: u64,
    /// Snapshot version the proxy last acknowledged (0: nothing yet).
    pub acked_version: u64,
    #[serde(with = "time_opt")]
    pub acked_at: Option<SystemTime>,
    /// Resources the proxy holds, as far as the server knows.
    pub resources: usize,
    /// A response sent and not yet answered.
    pub pending_nonce: Option<String>,
    pub nacks: u64,
    /// The proxy's reason for its last rejection.
    pub last_nack: Option<String>,
}

/// One connected proxy.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberStatus {
    pub id: u64,
    pub node_id: String,
    pub node_name: String,
    pub peer: Option<SocketAddr>,
    /// Who the proxy authenticated as, if it had to.
    pub authenticated_as: Option<String>,
    #[serde(with = "time_opt")]
    pub connected_at: Option<SystemTime>,
    pub types: BTreeMap<String, TypeStatus>,
}

/// All connected proxies.
#[derive(Default)]
pub struct Registry {
    next_id: Mutex<u64>,
    subscribers: Mutex<BTreeMap<u64, Arc<Mutex<SubscriberStatus>>>>,
}

impl Registry {
    pub fn add(
        &self,
        peer: Option<SocketAddr>,
        authenticated_as: Option<String>,
    ) -> Arc<Mutex<SubscriberStatus>> {
        let id = {
            let mut n = self.next_id.lock().expect("registry lock poisoned");
            *n += 1;
            *n
        };
        let s = Arc::new(Mutex::new(SubscriberStatus {
            id,
            node_id: String::new(),
            node_name: String::new(),
            peer,
            authenticated_as,
            connected_at: Some(SystemTime::now()),
            types: BTreeMap::new(),
        }));
        self.subscribers
            .lock()
            .expect("registry lock poisoned")
            .insert(id, s.clone());
        s
    }

    pub fn remove(&self, id: u64) {
        self.subscribers
            .lock()
            .expect("registry lock poisoned")
            .remove(&id);
    }

    /// A copy of every subscriber's status, oldest connection first.
    pub fn list(&self) -> Vec<SubscriberStatus> {
        let subs: Vec<_> = self
            .subscribers
            .lock()
            .expect("registry lock poisoned")
            .values()
            .cloned()
            .collect();
        subs.iter()
            .map(|s| s.lock().expect("subscriber lock poisoned").clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.subscribers
            .lock()
            .expect("registry lock poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

mod time_opt {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            None => s.serialize_none(),
            Some(t) => {
                let secs = t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                s.serialize_f64((secs * 1000.0).round() / 1000.0)
            }
        }
    }
}

//! The node agent (the part Istio's CNI agent plays): for each node, it hands the node's
//! enrolled pods to that node's ztunnel over a unix socket and applies their redirection
//! rules, in the order that never leaves a pod half-captured:
//!
//! - enrol: ztunnel takes the pod (listeners open in its namespace) → rules applied;
//! - release: rules removed → ztunnel lets the pod go (connections in flight finish).
//!
//! While ztunnel is away (a restart) captured pods keep their rules, so their traffic fails
//! closed rather than leaving the mesh; when it reconnects it is sent every pod again.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::Socket;
use tracing::{info, warn};
use ztunnel::inpod::wire::{self, PodInfo, Reply, Request};

use crate::netns;
use crate::testbed::{PodPlan, RELEASE_RULES, capture_rules};

/// How long ztunnel may take to answer one request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent of one node has done, for `ambient status` and start-up.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub ztunnel_connected: bool,
    /// Pods whose traffic ztunnel has (by uid).
    pub captured: BTreeSet<String>,
    /// Enrolled pods ztunnel could not take, with why.
    pub failed: BTreeMap<String, String>,
    /// Enrolled pods waiting for ztunnel.
    pub pending: BTreeSet<String>,
    /// The agent stopped after an internal error: nothing it shows changes any more.
    pub stopped: bool,
}

enum Event {
    Connected(Socket),
    Desired(BTreeMap<String, PodPlan>),
}

/// One node's agent.
pub struct NodeAgent {
    pub node: String,
    pub socket: PathBuf,
    tx: mpsc::Sender<Event>,
    status: Arc<Mutex<AgentStatus>>,
}

impl NodeAgent {
    /// Listens at `socket` and starts serving in the background.
    pub fn start(node: &str, socket: PathBuf, mark: u32) -> anyhow::Result<Self> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = wire::listen(&socket)
            .map_err(|e| anyhow::anyhow!("listening on {}: {e}", socket.display()))?;
        let (tx, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(AgentStatus::default()));
        {
            let tx = tx.clone();
            let node = node.to_owned();
            std::thread::spawn(move || {
                loop {
                    match listener.accept() {
                        Ok((sock, _)) => {
                            if tx.send(Event::Connected(sock)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(node, error = %e, "node agent: accept failed");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            });
        }
        let worker = Worker {
            node: node.to_owned(),
            mark,
            desired: BTreeMap::new(),
            captured: BTreeMap::new(),
            conn: None,
            status: status.clone(),
        };
        let watch = status.clone();
        let who = node.to_owned();
        std::thread::spawn(move || {
            // A bug here must not go unnoticed: capture changes would silently stop.
            let run = std::panic::AssertUnwindSafe(|| worker.run(rx));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!(node = %who, "node agent stopped after an internal error; restart the mesh");
                if let Ok(mut s) = watch.lock() {
                    s.stopped = true;
                }
            }
        });
        Ok(Self {
            node: node.to_owned(),
            socket,
            tx,
            status,
        })
    }

    /// The pods of this node that should be captured now.
    pub fn set_enrolled(&self, pods: Vec<PodPlan>) {
        let map: BTreeMap<String, PodPlan> = pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
        {
            // Pending from now on, not from when the worker gets to it: whoever waits for
            // the capture must not see an empty list in between.
            let mut s = self.status.lock().expect("agent status lock poisoned");
            let pending = map
                .keys()
                .filter(|uid| !s.captured.contains(*uid) && !s.failed.contains_key(*uid))
                .cloned()
                .collect();
            s.pending = pending;
        }
        let _ = self.tx.send(Event::Desired(map));
    }

    pub fn status(&self) -> AgentStatus {
        self.status
            .lock()
            .expect("agent status lock poisoned")
            .clone()
    }
}

struct Worker {
    node: String,
    mark: u32,
    desired: BTreeMap<String, PodPlan>,
    /// Pods with rules in place.
    captured: BTreeMap<String, PodPlan>,
    conn: Option<Socket>,
    status: Arc<Mutex<AgentStatus>>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Event>) {
        while let Ok(event) = rx.recv() {
            match event {
                Event::Connected(sock) => {
                    info!(node = %self.node, "node agent: ztunnel connected; sending its pods");
                    let _ = sock.set_read_timeout(Some(REPLY_TIMEOUT));
                    self.conn = Some(sock);
                    self.snapshot();
                }
                Event::Desired(d) => {
                    self.desired = d;
                    self.reconcile();
                }
            }
            self.publish();
        }
    }

    /// A (re)connected ztunnel: every enrolled pod, then the end-of-snapshot marker.
    fn snapshot(&mut self) {
        let mut failed = BTreeMap::new();
        let pods: Vec<PodPlan> = self.desired.values().cloned().collect();
        for pod in pods {
            match self.add(&pod) {
                Ok(()) => {}
                Err(Failure::Pod(e)) => {
                    failed.insert(pod.uid.clone(), e);
                }
                Err(Failure::Connection(e)) => return self.lost(e),
            }
        }
        if let Err(e) = self.request(&Request::SnapshotSent, None) {
            self.lost(e);
        }
        self.status
            .lock()
            .expect("agent status lock poisoned")
            .failed = failed;
    }

    fn reconcile(&mut self) {
        let gone: Vec<String> = self
            .captured
            .keys()
            .filter(|uid| !self.desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(pod) = self.captured.remove(&uid) {
                if let Err(e) = netns::nft(&pod.netns, RELEASE_RULES) {
                    warn!(node = %self.node, pod = %pod.name, error = %e, "node agent: cannot remove capture rules");
                }
                info!(node = %self.node, pod = %format!("{}/{}", pod.namespace, pod.name), "pod released");
                if self.conn.is_some()
                    && let Err(e) = self.request(&Request::Del { uid }, None)
                {
                    self.lost(e);
                }
            }
        }
        let mut failed = self
            .status
            .lock()
            .expect("agent status lock poisoned")
            .failed
            .clone();
        failed.retain(|uid, _| self.desired.contains_key(uid));
        let new: Vec<PodPlan> = self
            .desired
            .values()
            .filter(|p| !self.captured.contains_key(&p.uid))
            .cloned()
            .collect();
        for pod in new {
            if self.conn.is_none() {
                break;
            }
            match self.add(&pod) {
                Ok(()) => {
                    failed.remove(&pod.uid);
                }
                Err(Failure::Pod(e)) => {
                    failed.insert(pod.uid.clone(), e);
                }
                Err(Failure::Connection(e)) => self.lost(e),
            }
        }
        self.status
            .lock()
            .expect("agent status lock poisoned")
            .failed = failed;
    }

    /// ztunnel went away: wait for it to connect again (captured pods keep their rules).
    fn lost(&mut self, error: impl std::fmt::Display) {
        warn!(node = %self.node, %error, "node agent: ztunnel connection lost");
        self.conn = None;
    }

    /// Hands a pod to ztunnel and, once it has taken it, redirects the pod's traffic.
    fn add(&mut self, pod: &PodPlan) -> Result<(), Failure> {
        let ns = std::fs::File::open(netns::path(&pod.netns))
            .map_err(|e| Failure::Pod(format!("opening {}: {e}", netns::path(&pod.netns))))?;
        let info = PodInfo {
            uid: pod.uid.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ips: vec![pod.ip],
        };
        let reply = self
            .request(&Request::Add { pod: info }, Some(ns.as_fd()))
            .map_err(|e| Failure::Connection(e.to_string()))?;
        if let Some(e) = reply.error {
            warn!(node = %self.node, pod = %pod.name, error = %e, "ztunnel could not take the pod; it stays uncaptured");
            return Err(Failure::Pod(format!("ztunnel: {e}")));
        }
        if !self.captured.contains_key(&pod.uid) {
            netns::nft(&pod.netns, &capture_rules(self.mark))
                .map_err(|e| Failure::Pod(format!("{e:#}")))?;
            info!(node = %self.node, pod = %format!("{}/{}", pod.namespace, pod.name), "pod captured");
            self.captured.insert(pod.uid.clone(), pod.clone());
        }
        Ok(())
    }

    fn request(
        &mut self,
        req: &Request,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> std::io::Result<Reply> {
        let Some(sock) = &self.conn else {
            return Err(std::io::Error::other("ztunnel is not connected"));
        };
        wire::send(sock, req, fd)?;
        match wire::recv::<Reply>(sock)? {
            Some((reply, _)) => Ok(reply),
            None => Err(std::io::Error::other("ztunnel closed the connection")),
        }
    }

    fn publish(&self) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.ztunnel_connected = self.conn.is_some();
        s.captured = self.captured.keys().cloned().collect();
        s.pending = self
            .desired
            .keys()
            .filter(|uid| !self.captured.contains_key(*uid) && !s.failed.contains_key(*uid))
            .cloned()
            .collect();
    }
}

enum Failure {
    /// This pod cannot be captured; others can.
    Pod(String),
    /// ztunnel is gone.
    Connection(String),
}

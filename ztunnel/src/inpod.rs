//! In-pod capture: the node agent hands ztunnel each captured pod's network namespace over a
//! unix socket ([`wire`]); ztunnel opens the pod's listeners inside it (15001 outbound, 15006
//! inbound plaintext, 15008 inbound HBONE) and makes the pod's outgoing sockets there too, so
//! traffic leaves through the pod's own interface with its own address. The agent applies the
//! pod's redirection rules only after ztunnel acknowledged the pod, so a pod is never
//! redirected to listeners that do not exist.

pub mod netns;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use mesh_core::hbone::SocketMaker;
use serde::Serialize;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use self::netns::Netns;
use self::wire::{PodInfo, Reply, Request};
use crate::proxy::{self, ProxyState, accept_loop};

/// Ports ztunnel listens on inside every captured pod, as Istio's in-pod mode does.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// Captured pods' namespaces by address, for the dialer. Read per connection, written when a
/// pod comes or goes.
#[derive(Debug, Default)]
pub struct PodNetworks {
    by_ip: RwLock<HashMap<IpAddr, Arc<Netns>>>,
}

impl PodNetworks {
    fn get(&self, ip: IpAddr) -> Option<Arc<Netns>> {
        self.by_ip
            .read()
            .expect("pod network map lock poisoned")
            .get(&ip)
            .cloned()
    }
}

impl SocketMaker for PodNetworks {
    fn tcp_for(&self, owner: IpAddr, v6: bool) -> std::io::Result<Option<TcpSocket>> {
        let Some(ns) = self.get(owner) else {
            return Ok(None);
        };
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let socket = ns.run(|| Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None))?;
        Ok(Some(TcpSocket::from_std_stream(socket.into())))
    }
}

/// A pod as `/config_dump` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub state: &'static str,
    pub error: Option<String>,
}

struct Pod {
    info: PodInfo,
    netns: Arc<Netns>,
    listeners: Vec<AbortHandle>,
}

/// The pods this ztunnel captures, and its link to the node agent.
pub struct InPod {
    state: Arc<ProxyState>,
    nets: Arc<PodNetworks>,
    runtime: Handle,
    pods: Mutex<HashMap<String, Pod>>,
    /// The last refusals, by uid: a pod the agent offered that could not be captured.
    failed: Mutex<HashMap<String, PodStatus>>,
    /// The agent's first full snapshot has been applied.
    synced: AtomicBool,
    connected: AtomicBool,
    stop: AtomicBool,
    current: Mutex<Option<Socket>>,
}

impl InPod {
    pub fn new(state: Arc<ProxyState>, nets: Arc<PodNetworks>, runtime: Handle) -> Arc<Self> {
        Arc::new(Self {
            state,
            nets,
            runtime,
            pods: Mutex::default(),
            failed: Mutex::default(),
            synced: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            current: Mutex::default(),
        })
    }

    /// Whether the agent's pods have been taken over at least once (part of readiness).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Captured and failed pods, sorted by uid.
    pub fn status(&self) -> Vec<PodStatus> {
        let mut out: Vec<PodStatus> = self
            .pods
            .lock()
            .expect("pod map lock poisoned")
            .values()
            .map(|p| PodStatus {
                uid: p.info.uid.clone(),
                namespace: p.info.namespace.clone(),
                name: p.info.name.clone(),
                ips: p.info.ips.clone(),
                state: "captured",
                error: None,
            })
            .collect();
        out.extend(
            self.failed
                .lock()
                .expect("failure map lock poisoned")
                .values()
                .cloned(),
        );
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    /// Takes over a pod: opens its listeners in its namespace. Adding a pod already held in
    /// the same namespace changes nothing (the agent resends every pod when it reconnects).
    pub fn add(&self, info: PodInfo, fd: OwnedFd) -> Result<(), String> {
        let netns = Netns::new(fd).map_err(|e| format!("reading the pod's namespace: {e}"))?;
        let mut pods = self.pods.lock().expect("pod map lock poisoned");
        if let Some(held) = pods.get(&info.uid)
            && held.netns.inode == netns.inode
            && held.info == info
        {
            return Ok(());
        }
        if let Some(old) = pods.remove(&info.uid) {
            self.release(old);
        }
        let result = self.open(&info, netns);
        let mut failed = self.failed.lock().expect("failure map lock poisoned");
        match result {
            Ok(pod) => {
                failed.remove(&info.uid);
                info!(pod = %format!("{}/{}", info.namespace, info.name), ips = ?info.ips, component = "inpod", "pod captured");
                pods.insert(info.uid.clone(), pod);
                Ok(())
            }
            Err(e) => {
                warn!(pod = %format!("{}/{}", info.namespace, info.name), error = %e, component = "inpod", "cannot capture pod");
                failed.insert(
                    info.uid.clone(),
                    PodStatus {
                        uid: info.uid.clone(),
                        namespace: info.namespace.clone(),
                        name: info.name.clone(),
                        ips: info.ips.clone(),
                        state: "failed",
                        error: Some(e.clone()),
                    },
                );
                Err(e)
            }
        }
    }

    fn open(&self, info: &PodInfo, netns: Netns) -> Result<Pod, String> {
        if info.ips.is_empty() {
            return Err("the pod has no address".into());
        }
        let netns = Arc::new(netns);
        let v6 = info.ips.iter().any(IpAddr::is_ipv6);
        let any = |port| {
            if v6 {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
            } else {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
            }
        };
        let _rt = self.runtime.enter();
        let mut listeners = Vec::new();
        let listen = |addr: SocketAddr, what: &'static str| -> Result<TcpListener, String> {
            listen_in(&netns, addr, v6).map_err(|e| format!("listening on {addr} ({what}): {e}"))
        };
        let outbound = listen(any(OUTBOUND_PORT), "outbound")?;
        let plaintext = listen(any(INBOUND_PLAINTEXT_PORT), "inbound plaintext")?;
        let hbone = listen(any(self.state.cfg.hbone_port), "inbound HBONE")?;
        let state = &self.state;
        listeners.push(
            self.runtime
                .spawn(accept_loop(
                    outbound,
                    "outbound",
                    state.clone(),
                    proxy::outbound::serve_redirected,
                ))
                .abort_handle(),
        );
        listeners.push(
            self.runtime
                .spawn(accept_loop(
                    plaintext,
                    "inbound_plaintext",
                    state.clone(),
                    proxy::inbound_plaintext::serve,
                ))
                .abort_handle(),
        );
        listeners.push(
            self.runtime
                .spawn(accept_loop(
                    hbone,
                    "inbound",
                    state.clone(),
                    proxy::inbound::serve,
                ))
                .abort_handle(),
        );
        let mut by_ip = self
            .nets
            .by_ip
            .write()
            .expect("pod network map lock poisoned");
        for ip in &info.ips {
            by_ip.insert(*ip, netns.clone());
        }
        Ok(Pod {
            info: info.clone(),
            netns,
            listeners,
        })
    }

    /// Stops capturing a pod: no new connections are accepted for it; those in flight finish.
    pub fn del(&self, uid: &str) {
        self.failed
            .lock()
            .expect("failure map lock poisoned")
            .remove(uid);
        let pod = self.pods.lock().expect("pod map lock poisoned").remove(uid);
        if let Some(pod) = pod {
            info!(pod = %format!("{}/{}", pod.info.namespace, pod.info.name), component = "inpod", "pod released");
            self.release(pod);
        }
    }

    fn release(&self, pod: Pod) {
        for l in &pod.listeners {
            l.abort();
        }
        let mut by_ip = self
            .nets
            .by_ip
            .write()
            .expect("pod network map lock poisoned");
        for ip in &pod.info.ips {
            if by_ip.get(ip).is_some_and(|ns| Arc::ptr_eq(ns, &pod.netns)) {
                by_ip.remove(ip);
            }
        }
    }

    /// After the agent's snapshot: pods it no longer has are released.
    fn retain(&self, seen: &HashSet<String>) {
        let gone: Vec<String> = self
            .pods
            .lock()
            .expect("pod map lock poisoned")
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.del(&uid);
        }
        self.failed
            .lock()
            .expect("failure map lock poisoned")
            .retain(|uid, _| seen.contains(uid));
    }

    /// Follows the node agent at `path` on a thread of its own: connects (again and again,
    /// with backoff, while it is not there) and applies what it sends.
    pub fn follow_agent(self: &Arc<Self>, path: PathBuf) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("inpod-agent".into())
            .spawn(move || me.agent_loop(&path))
            .expect("spawning the agent thread")
    }

    /// Stops following the agent (at shutdown) and releases every pod.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.current.lock().expect("socket lock poisoned").as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let uids: Vec<String> = self
            .pods
            .lock()
            .expect("pod map lock poisoned")
            .keys()
            .cloned()
            .collect();
        for uid in uids {
            self.del(&uid);
        }
    }

    fn agent_loop(&self, path: &std::path::Path) {
        let mut backoff = Duration::from_millis(50);
        let mut reported = false;
        while !self.stop.load(Ordering::Relaxed) {
            match wire::connect(path) {
                Ok(sock) => {
                    info!(path = %path.display(), component = "inpod", "connected to the node agent");
                    reported = false;
                    backoff = Duration::from_millis(50);
                    match sock.try_clone() {
                        Ok(c) => *self.current.lock().expect("socket lock poisoned") = Some(c),
                        Err(e) => {
                            warn!(error = %e, component = "inpod", "cannot keep a handle on the agent socket")
                        }
                    }
                    self.connected.store(true, Ordering::Relaxed);
                    let end = self.session(&sock);
                    self.connected.store(false, Ordering::Relaxed);
                    *self.current.lock().expect("socket lock poisoned") = None;
                    match end {
                        Ok(()) => info!(
                            component = "inpod",
                            "the node agent closed the connection; reconnecting"
                        ),
                        Err(e) => {
                            warn!(error = %e, component = "inpod", "node agent connection failed; reconnecting")
                        }
                    }
                }
                Err(e) if !reported => {
                    warn!(path = %path.display(), error = %e, component = "inpod", "node agent not reachable; retrying");
                    reported = true;
                }
                Err(e) => debug!(error = %e, component = "inpod", "node agent not reachable"),
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One connection to the agent: until it closes.
    fn session(&self, sock: &Socket) -> std::io::Result<()> {
        let mut seen = HashSet::new();
        let mut in_snapshot = true;
        loop {
            let Some((request, fd)) = wire::recv::<Request>(sock)? else {
                return Ok(());
            };
            let error = match request {
                Request::Add { pod } => {
                    let uid = pod.uid.clone();
                    let r = match fd {
                        Some(fd) => self.add(pod, fd),
                        None => Err("no network namespace came with the pod".into()),
                    };
                    if in_snapshot {
                        seen.insert(uid);
                    }
                    r.err()
                }
                Request::Del { uid } => {
                    self.del(&uid);
                    None
                }
                Request::SnapshotSent => {
                    if in_snapshot {
                        self.retain(&seen);
                        in_snapshot = false;
                        self.synced.store(true, Ordering::Relaxed);
                        info!(
                            pods = seen.len(),
                            component = "inpod",
                            "node agent snapshot applied"
                        );
                    }
                    None
                }
            };
            wire::send(sock, &Reply { error }, None)?;
        }
    }
}

/// A listener bound inside `netns`.
fn listen_in(netns: &Netns, addr: SocketAddr, v6: bool) -> std::io::Result<TcpListener> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = netns.run(|| Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None))?;
    socket.set_reuse_address(true)?;
    if v6 {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

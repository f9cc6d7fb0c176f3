//! `ambient up`: the whole local mesh from a YAML directory, and `ambient down`.
//!
//! One supervising process owns everything: it builds the testbed, starts istiod-lite (in
//! the fabric namespace, TLS on 198.19.0.254:15012), one ztunnel per node (in the node's
//! namespace, in-pod capture), a node agent per node (threads of the supervisor), each
//! waypoint in its own pod, and the pods' apps once their capture is in place. It restarts a
//! process that dies (as a DaemonSet or Deployment would, backing off while it keeps dying),
//! follows label changes in the YAML (enrolment and release of running pods), tells
//! istiod-lite whether each waypoint pod is ready (as a kubelet's readiness probe would), and
//! on Ctrl-C/SIGTERM takes it all apart. Its state file lets `status`, `exec`,
//! `ztunnel-config` and `down` find the mesh.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use istiod_lite::source::Source;
use istiod_lite::source::dir::DirSource;
use istiod_lite::store::Store;
use istiod_lite::translate::{MeshOptions, enrolment};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::agent::{AgentStatus, NodeAgent};
use crate::netns;
use crate::testbed::{self, CONTROL_PLANE_IP, FABRIC, Plan};
use crate::waypoints::WaypointPlan;

mod waypoint;

pub use waypoint::{probe_ready, waypoint_ready_addr};

/// Where the running mesh keeps its state file, logs and certificates.
pub fn state_dir() -> PathBuf {
    std::env::var_os("AMBIENT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ambient"))
}

pub const SOCKET_MARK: u32 = 0x539;
pub const ISTIOD_DEBUG: &str = "198.19.0.254:15014";
pub const ZTUNNEL_ADMIN: &str = "127.0.0.1:15000";
pub const ZTUNNEL_READY: &str = "127.0.0.1:15021";
/// A waypoint's admin endpoint, inside its pod.
pub const WAYPOINT_ADMIN: &str = "127.0.0.1:15000";
/// A process that ran this long before it exited is restarted without delay.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// The longest wait before restarting a process that keeps exiting.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// What `status` and friends read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshState {
    pub config_dir: PathBuf,
    pub supervisor: u32,
    pub ready: bool,
    pub plan: Plan,
    /// Running processes by role (`istiod-lite`, `ztunnel/<node>`, `waypoint/<ns>/<gw>`,
    /// `app/<ns>/<pod>`).
    pub processes: BTreeMap<String, u32>,
    /// Per node, what its agent has done.
    pub agents: BTreeMap<String, AgentStatusView>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatusView {
    pub ztunnel_connected: bool,
    pub captured: Vec<String>,
    pub failed: BTreeMap<String, String>,
    pub pending: Vec<String>,
    #[serde(default)]
    pub stopped: bool,
}

impl From<AgentStatus> for AgentStatusView {
    fn from(s: AgentStatus) -> Self {
        Self {
            ztunnel_connected: s.ztunnel_connected,
            captured: s.captured.into_iter().collect(),
            failed: s.failed,
            pending: s.pending.into_iter().collect(),
            stopped: s.stopped,
        }
    }
}

impl MeshState {
    pub fn path() -> PathBuf {
        state_dir().join("state.json")
    }

    /// The running mesh, or a clear error when there is none.
    pub fn load() -> anyhow::Result<Self> {
        let path = Self::path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "no mesh is running (no {}); start one with `ambient up DIR`",
                    path.display()
                )
            } else {
                anyhow::anyhow!("reading {}: {e}", path.display())
            }
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = Self::path();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }
}

/// The binaries `up` starts: next to this one, or in `$AMBIENT_BIN_DIR`.
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("AMBIENT_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()
            .context("finding the ambient binary")?
            .parent()
            .context("the ambient binary has no directory")?
            .to_owned(),
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found; build it (cargo build -p {name}) or point AMBIENT_BIN_DIR at it",
            path.display()
        );
    }
    Ok(path)
}

pub fn require_root() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        bail!(
            "the local testbed needs root (it creates network namespaces and nftables rules).\n\
             Without root, scripts/run-loopback.sh runs the mesh on loopback addresses with SOCKS5 capture instead."
        );
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            bail!("`{tool}` is missing; scripts/setup.sh installs iproute2 and nftables");
        }
    }
    Ok(())
}

/// Progress lines for the person at the terminal.
fn step(msg: impl std::fmt::Display) {
    eprintln!("ambient: {msg}");
}

struct Supervisor {
    dir: PathBuf,
    state_dir: PathBuf,
    plan: Plan,
    children: BTreeMap<String, Spawned>,
    agents: BTreeMap<String, NodeAgent>,
    state: MeshState,
    /// Each waypoint's readiness as istiod-lite was last told it (by [`WaypointPlan::key`]).
    waypoint_ready: BTreeMap<String, bool>,
    probe: Option<waypoint::ReadinessProbe>,
}

struct Spawned {
    child: Child,
    spec: Spec,
    started: Instant,
    /// When it was seen to have exited, and how.
    exited: Option<(Instant, ExitStatus)>,
    /// Exits in a row, each soon after its start; they lengthen the wait before a restart.
    quick_exits: u32,
}

#[derive(Clone)]
struct Spec {
    netns: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Spec {
    fn spawn(&self) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Ctrl-C reaches only the supervisor, which stops
            // everything in order.
            .process_group(0);
        cmd.spawn()
            .with_context(|| format!("starting {}", self.program.display()))
    }
}

/// Runs the mesh in the foreground until Ctrl-C or SIGTERM.
pub fn up(dir: &Path) -> anyhow::Result<()> {
    require_root()?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("config directory {}", dir.display()))?;
    let state_dir = state_dir();
    if let Ok(old) = MeshState::load()
        && pid_alive(old.supervisor)
    {
        bail!(
            "a mesh is already running (pid {}, from {}); `ambient down` stops it",
            old.supervisor,
            old.config_dir.display()
        );
    }
    std::fs::create_dir_all(state_dir.join("logs"))
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let store = Store::new();
    step(format!("reading {}", dir.display()));
    DirSource::new(&dir).load(&store)?;
    let errors = store.errors();
    for e in &errors {
        step(format!("config error: {e}"));
    }
    let plan = Plan::from_state(&store.state())?;
    step(format!(
        "testbed: {} nodes, {} pods{}",
        plan.nodes.len(),
        plan.pods.len(),
        match plan.waypoints.len() {
            0 => String::new(),
            1 => " (one of them a waypoint)".to_owned(),
            n => format!(" ({n} of them waypoints)"),
        }
    ));
    let removed = testbed::destroy()?;
    if removed > 0 {
        step(format!(
            "removed {removed} namespaces left by an earlier run"
        ));
    }
    let mut sup = Supervisor {
        dir: dir.clone(),
        state_dir: state_dir.clone(),
        plan: plan.clone(),
        children: BTreeMap::new(),
        agents: BTreeMap::new(),
        state: MeshState {
            config_dir: dir.clone(),
            supervisor: std::process::id(),
            plan: plan.clone(),
            ..Default::default()
        },
        waypoint_ready: BTreeMap::new(),
        probe: None,
    };
    sup.state.save()?;
    let result = rt.block_on(sup.run(store));
    step("stopping");
    sup.teardown();
    result
}

impl Supervisor {
    async fn run(&mut self, store: Store) -> anyhow::Result<()> {
        testbed::create(&self.plan).context("building the testbed")?;
        step("network namespaces and links up");
        self.start_istiod()?;
        self.wait(
            FABRIC,
            ISTIOD_DEBUG,
            "/ready",
            "istiod-lite",
            Duration::from_secs(30),
        )?;
        step(format!(
            "istiod-lite ready on {CONTROL_PLANE_IP} (xDS+CA 15012, debug 15014)"
        ));
        let nodes = self.plan.nodes.clone();
        for node in &nodes {
            let sock = self
                .state_dir
                .join("agents")
                .join(format!("{}.sock", node.name));
            let agent = NodeAgent::start(&node.name, sock, SOCKET_MARK)?;
            self.agents.insert(node.name.clone(), agent);
            self.start_ztunnel(&node.name)?;
        }
        let opts = MeshOptions::default();
        self.apply_enrolment(&enrolment(&store.state(), &opts));
        // Waypoints need their node's token, which starting its ztunnel wrote.
        for w in self.plan.waypoints.clone() {
            self.start_waypoint(&w)?;
        }
        for node in &nodes {
            self.wait(
                &node.netns,
                ZTUNNEL_READY,
                "/healthz/ready",
                &format!("ztunnel on {}", node.name),
                Duration::from_secs(30),
            )?;
        }
        step("ztunnels ready");
        self.wait_captured(Duration::from_secs(20));
        for pod in self.plan.pods.clone() {
            if !pod.app.is_empty() {
                self.start_app(&pod)?;
            }
        }
        self.wait_apps(Duration::from_secs(20));
        self.wait_waypoints(waypoint::READY_LIMIT);
        self.probe = Some(waypoint::ReadinessProbe::start(&self.plan));
        self.state.ready = true;
        self.refresh_state();
        self.summary();

        // Follow the directory: enrolment changes apply to running pods.
        let source = Box::new(DirSource::new(&self.dir));
        let watch_store = store.clone();
        let mut changes = store.subscribe();
        let follow = tokio::spawn(async move { source.run(watch_store).await });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let state = store.state();
                    match Plan::from_state(&state) {
                        Ok(p) => self.report_layout_changes(&p),
                        Err(e) => warn!(error = %format!("{e:#}"), "the YAML no longer lays out as a testbed; keeping the current one"),
                    }
                    self.sync_mirror();
                    self.apply_enrolment(&enrolment(&state, &opts));
                }
                _ = tick.tick() => {
                    self.restart_exited();
                    self.follow_waypoint_readiness();
                    self.refresh_state();
                }
            }
        }
        follow.abort();
        Ok(())
    }

    /// Pods and waypoints are laid out once: changes to them wait for the next `up`.
    fn report_layout_changes(&self, new: &Plan) {
        let pods = |plan: &Plan| -> Vec<(String, std::net::IpAddr, String)> {
            plan.pods
                .iter()
                .filter(|p| p.waypoint.is_none())
                .map(|p| (p.uid.clone(), p.ip, p.node.clone()))
                .collect()
        };
        if pods(new) != pods(&self.plan) {
            warn!(
                "pods were added, removed or moved in the YAML; the testbed keeps its pods until `ambient down` and `ambient up` again"
            );
        }
        let gateways =
            |plan: &Plan| -> Vec<String> { plan.waypoints.iter().map(WaypointPlan::key).collect() };
        if gateways(new) != gateways(&self.plan) {
            warn!(
                running = %gateways(&self.plan).join(", "),
                "waypoint Gateways were added or removed in the YAML; the testbed keeps the waypoints it runs until `ambient down` and `ambient up` again"
            );
        }
    }

    fn apply_enrolment(&self, enrolled: &BTreeMap<(String, String), bool>) {
        for (node, agent) in &self.agents {
            let pods = self
                .plan
                .pods
                .iter()
                .filter(|p| &p.node == node)
                // A waypoint speaks HBONE itself: its pod is never redirected.
                .filter(|p| p.waypoint.is_none())
                .filter(|p| enrolled.get(&(p.namespace.clone(), p.name.clone())) == Some(&true))
                .cloned()
                .collect();
            agent.set_enrolled(pods);
        }
    }

    /// Waits until every agent has no pod pending (captured or failed), up to `limit`.
    fn wait_captured(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let statuses: Vec<AgentStatus> = self.agents.values().map(NodeAgent::status).collect();
            let pending: usize = statuses.iter().map(|s| s.pending.len()).sum();
            if pending == 0 {
                let captured: usize = statuses.iter().map(|s| s.captured.len()).sum();
                step(format!("{captured} pods captured"));
                for s in &statuses {
                    for (uid, e) in &s.failed {
                        step(format!("could not capture {uid}: {e}"));
                    }
                }
                return;
            }
            if Instant::now() > deadline {
                step(format!(
                    "{pending} pods still waiting for their ztunnel; see `ambient status`"
                ));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every app listens on its ports (checked from inside its pod, where the
    /// pod's own address is not redirected), up to `limit`.
    fn wait_apps(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for pod in &self.plan.pods {
            let ports: Vec<u16> = [&pod.app.http, &pod.app.grpc, &pod.app.tcp]
                .into_iter()
                .flatten()
                .copied()
                .collect();
            for port in ports {
                let addr = std::net::SocketAddr::new(pod.ip, port);
                loop {
                    let up = netns::within(&pod.netns, move || {
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                            .is_ok()
                    })
                    .unwrap_or(false);
                    if up {
                        break;
                    }
                    if Instant::now() > deadline {
                        step(format!(
                            "{}/{} does not listen on {port} yet; see its log",
                            pod.namespace, pod.name
                        ));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// What istiod-lite reads: the user's directory with allocated pod addresses filled in.
    fn mirror_dir(&self) -> PathBuf {
        self.state_dir.join("config")
    }

    /// The objects the testbed makes for istiod-lite: the waypoints' pods, Services and
    /// ServiceAccounts, each pod ready as last probed.
    fn generated(&self) -> String {
        crate::waypoints::manifests(&self.plan, |w| {
            self.waypoint_ready.get(&w.key()).copied().unwrap_or(false)
        })
    }

    fn sync_mirror(&self) {
        if let Err(e) = crate::mirror::sync(
            &self.dir,
            &self.mirror_dir(),
            &self.plan.allocated(),
            &self.generated(),
        ) {
            warn!(error = %format!("{e:#}"), "cannot copy the YAML for istiod-lite; it keeps the last copy");
        }
    }

    fn start_istiod(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(self.mirror_dir());
        crate::mirror::sync(
            &self.dir,
            &self.mirror_dir(),
            &self.plan.allocated(),
            &self.generated(),
        )?;
        let bin = binary("istiod-lite")?;
        let istiod_state = self.state_dir.join("istiod");
        let spec = Spec {
            netns: FABRIC.into(),
            program: bin,
            args: vec![
                "--config-dir".into(),
                self.mirror_dir().display().to_string(),
                "--state-dir".into(),
                istiod_state.display().to_string(),
                "--xds-plaintext".into(),
                "off".into(),
                "--xds-tls".into(),
                format!("{CONTROL_PLANE_IP}:15012"),
                "--debug".into(),
                ISTIOD_DEBUG.into(),
            ],
            env: vec![],
            log: self.state_dir.join("logs/istiod-lite.log"),
        };
        self.spawn("istiod-lite", spec)
    }

    fn start_ztunnel(&mut self, node: &str) -> anyhow::Result<()> {
        let istiod = binary("istiod-lite")?;
        let istiod_state = self.state_dir.join("istiod");
        let token = self.state_dir.join(format!("{node}.token"));
        netns::run(
            &istiod.display().to_string(),
            &[
                "node-token",
                "--node",
                node,
                "--state-dir",
                &istiod_state.display().to_string(),
                "--out",
                &token.display().to_string(),
            ],
        )?;
        let plan = self.plan.node(node).context("unknown node")?.clone();
        let agent = self.agents.get(node).context("no agent for the node")?;
        let spec = Spec {
            netns: plan.netns.clone(),
            program: binary("ztunnel")?,
            args: vec![
                "--node".into(),
                node.into(),
                "--xds-address".into(),
                format!("https://{CONTROL_PLANE_IP}:15012"),
                "--xds-root-cert".into(),
                istiod_state.join("ca/root-cert.pem").display().to_string(),
                "--token-file".into(),
                token.display().to_string(),
                "--inpod-socket".into(),
                agent.socket.display().to_string(),
                "--socks5".into(),
                "off".into(),
                "--admin".into(),
                ZTUNNEL_ADMIN.into(),
                "--readiness".into(),
                "0.0.0.0:15021".into(),
            ],
            env: vec![],
            log: self.state_dir.join(format!("logs/ztunnel-{node}.log")),
        };
        self.spawn(&format!("ztunnel/{node}"), spec)
    }

    fn start_app(&mut self, pod: &testbed::PodPlan) -> anyhow::Result<()> {
        let mut args = vec!["echo-server".to_owned()];
        for (flag, ports) in [
            ("--http", &pod.app.http),
            ("--grpc", &pod.app.grpc),
            ("--tcp", &pod.app.tcp),
        ] {
            for p in ports {
                args.push(flag.into());
                args.push(p.to_string());
            }
        }
        let spec = Spec {
            netns: pod.netns.clone(),
            program: binary("ambient")?,
            args,
            env: vec![
                ("POD_NAME".into(), pod.name.clone()),
                ("POD_NAMESPACE".into(), pod.namespace.clone()),
            ],
            log: self
                .state_dir
                .join(format!("logs/app-{}.{}.log", pod.namespace, pod.name)),
        };
        self.spawn(&format!("app/{}/{}", pod.namespace, pod.name), spec)
    }

    fn spawn(&mut self, role: &str, spec: Spec) -> anyhow::Result<()> {
        let child = spec.spawn()?;
        info!(role, pid = child.id(), "started");
        self.state.processes.insert(role.to_owned(), child.id());
        self.children.insert(
            role.to_owned(),
            Spawned {
                child,
                spec,
                started: Instant::now(),
                exited: None,
                quick_exits: 0,
            },
        );
        Ok(())
    }

    /// A process that died is started again, as Kubernetes would: at once if it had run a
    /// while, else after a wait that doubles with each quick exit (see [`restart_delay`]).
    fn restart_exited(&mut self) {
        let roles: Vec<String> = self.children.keys().cloned().collect();
        for role in roles {
            let Some(s) = self.children.get_mut(&role) else {
                continue;
            };
            if s.exited.is_none() {
                let Ok(Some(status)) = s.child.try_wait() else {
                    continue;
                };
                s.quick_exits = if s.started.elapsed() >= STABLE_RUN {
                    0
                } else {
                    s.quick_exits + 1
                };
                s.exited = Some((Instant::now(), status));
            }
            let Some((at, status)) = s.exited else {
                continue;
            };
            if at.elapsed() < restart_delay(s.quick_exits) {
                continue;
            }
            step(format!(
                "{role} exited ({status}); starting it again (log: {})",
                s.spec.log.display()
            ));
            let spec = s.spec.clone();
            let quick_exits = s.quick_exits;
            match spec.spawn() {
                Ok(child) => {
                    self.state.processes.insert(role.clone(), child.id());
                    self.children.insert(
                        role,
                        Spawned {
                            child,
                            spec,
                            started: Instant::now(),
                            exited: None,
                            quick_exits,
                        },
                    );
                }
                Err(e) => {
                    step(format!("cannot restart {role}: {e:#}"));
                    // Try again after the next delay, not on every tick.
                    s.quick_exits += 1;
                    s.exited = Some((Instant::now(), status));
                }
            }
        }
    }

    fn refresh_state(&mut self) {
        self.state.agents = self
            .agents
            .iter()
            .map(|(n, a)| (n.clone(), a.status().into()))
            .collect();
        if let Err(e) = self.state.save() {
            warn!(error = %format!("{e:#}"), "cannot write the state file");
        }
    }

    fn wait(
        &self,
        ns: &str,
        addr: &str,
        path: &str,
        what: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let last = match netns::http_get(ns, addr, path) {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "{what} not ready after {}s ({last}); see {}",
                    limit.as_secs(),
                    self.state_dir.join("logs").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn summary(&self) {
        let logs = self.state_dir.join("logs");
        eprintln!();
        eprintln!(
            "The mesh is up: {} nodes, {} pods, from {}.",
            self.plan.nodes.len(),
            self.plan.pods.len(),
            self.dir.display()
        );
        for w in &self.plan.waypoints {
            if let Some(pod) = self.plan.waypoint_pod(w) {
                eprintln!(
                    "Waypoint {}: pod {} on {} at {}, Service {} at {}{}.",
                    w.key(),
                    pod.name,
                    pod.node,
                    pod.ip,
                    w.name,
                    w.service_ip,
                    if self.waypoint_ready.get(&w.key()) == Some(&true) {
                        ""
                    } else {
                        " (NOT READY yet)"
                    }
                );
            }
        }
        eprintln!("Where to look next:");
        eprintln!(
            "  ambient status                          enrolled namespaces, pods, ztunnels, certificates, problems"
        );
        eprintln!(
            "  ambient ztunnel-config workloads        what each ztunnel knows (also services, policies, certificates, connections)"
        );
        // A pod without an app of its own, preferably a captured one, to try things from.
        let captured: Vec<String> = self
            .agents
            .values()
            .flat_map(|a| a.status().captured)
            .collect();
        let mut clients: Vec<_> = self
            .plan
            .pods
            .iter()
            .filter(|p| p.app.is_empty() && p.waypoint.is_none())
            .collect();
        clients.sort_by_key(|p| !captured.contains(&p.uid));
        let app_service = self
            .plan
            .hosts
            .iter()
            .find(|(ip, _)| !self.plan.waypoints.iter().any(|w| w.service_ip == *ip));
        if let Some(client) = clients.first()
            && let Some((_, names)) = app_service
        {
            let host = names.split_whitespace().next().unwrap_or_default();
            eprintln!(
                "  ambient exec {}/{} -- curl -s http://{host}/",
                client.namespace, client.name
            );
        }
        eprintln!("  logs: {}", logs.display());
        eprintln!(
            "  edit the YAML in {} (e.g. a namespace's istio.io/dataplane-mode label): the mesh follows.",
            self.dir.display()
        );
        eprintln!("Ctrl-C (or `ambient down`) stops everything.");
    }

    fn teardown(&mut self) {
        if let Some(probe) = self.probe.take() {
            probe.stop();
        }
        // Apps first, then the proxies (waypoints before ztunnels), then the control plane.
        let order = |role: &str| {
            if role.starts_with("app/") {
                0
            } else if role.starts_with("waypoint/") {
                1
            } else if role.starts_with("ztunnel/") {
                2
            } else {
                3
            }
        };
        let mut roles: Vec<String> = self.children.keys().cloned().collect();
        roles.sort_by_key(|r| order(r));
        for role in roles {
            if let Some(mut s) = self.children.remove(&role) {
                terminate(&mut s.child, Duration::from_secs(3));
            }
        }
        if let Err(e) = testbed::destroy() {
            step(format!("cleanup: {e:#}"));
        }
        let _ = std::fs::remove_file(MeshState::path());
    }
}

/// How long to wait before restarting a process that exited soon after its start, for the
/// `quick_exits`-th time in a row: 1 s, doubling up to [`MAX_RESTART_DELAY`]; none after
/// a process that had run a while.
fn restart_delay(quick_exits: u32) -> Duration {
    match quick_exits {
        0 => Duration::ZERO,
        n => Duration::from_secs(1)
            .saturating_mul(1 << (n - 1).min(16))
            .min(MAX_RESTART_DELAY),
    }
}

/// SIGTERM, then SIGKILL after `grace`.
fn terminate(child: &mut Child, grace: Duration) {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).output();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `ambient up --detach`: starts the supervisor in the background, waits until the mesh is
/// ready (or failed), and says where it is.
pub fn up_detached(dir: &Path) -> anyhow::Result<()> {
    require_root()?;
    let state_dir = state_dir();
    std::fs::create_dir_all(state_dir.join("logs"))?;
    let log_path = state_dir.join("logs/ambient.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let _ = std::fs::remove_file(MeshState::path());
    let mut child = Command::new(std::env::current_exe()?)
        .arg("up")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the mesh in the background")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = MeshState::load()
            && s.ready
        {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            eprint!("{text}");
            eprintln!(
                "(running in the background, pid {}; `ambient down` stops it)",
                child.id()
            );
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the mesh did not start ({status}):\n{text}");
        }
        if Instant::now() > deadline {
            bail!(
                "the mesh was not ready after 2 minutes; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ambient down`: stops a running mesh and removes whatever a crash may have left.
pub fn down() -> anyhow::Result<()> {
    let mut stopped = false;
    if let Ok(state) = MeshState::load() {
        if pid_alive(state.supervisor) {
            let _ = Command::new("kill")
                .args(["-TERM", &state.supervisor.to_string()])
                .output();
            let deadline = Instant::now() + Duration::from_secs(15);
            while pid_alive(state.supervisor) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            stopped = true;
        }
        for pid in state.processes.values() {
            if pid_alive(*pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .output();
            }
        }
    }
    let removed = testbed::destroy()?;
    let _ = std::fs::remove_file(MeshState::path());
    match (stopped, removed) {
        (false, 0) => eprintln!("ambient: nothing to tear down"),
        (true, 0) => eprintln!("ambient: mesh stopped"),
        (_, n) => eprintln!("ambient: mesh stopped; removed {n} leftover network namespaces"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_while_a_process_keeps_exiting() {
        let secs = |n| restart_delay(n).as_secs();
        assert_eq!(
            (0..8).map(secs).collect::<Vec<_>>(),
            [0, 1, 2, 4, 8, 16, 30, 30]
        );
        assert_eq!(restart_delay(u32::MAX), MAX_RESTART_DELAY);
    }
}

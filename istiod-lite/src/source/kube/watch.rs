//! One kind's reflector: list it, then watch it, keeping the store in step.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::client::{KubeClient, KubeError};
use crate::model::{Kind, Object, ObjectError, ObjectKey};
use crate::store::{ConfigError, Store};

/// Objects asked for per list page.
const PAGE_SIZE: usize = 500;
/// Retry delays after a failure: doubling from the start up to the cap, with jitter.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a kind the server does not serve (a CRD not installed) is asked for again.
const MISSING_KIND_RETRY: Duration = Duration::from_secs(30);
/// The server ends each watch after this long plus up to a minute of jitter, so that watches
/// of every kind do not reconnect together.
const WATCH_TIMEOUT: Duration = Duration::from_secs(290);
/// Silence beyond the watch timeout after which the connection is presumed dead (bookmarks
/// arrive about once a minute on a healthy watch).
const WATCH_IDLE_MARGIN: Duration = Duration::from_secs(30);
/// A watch that lasted this long was healthy: the next failure starts backing off afresh.
const HEALTHY: Duration = Duration::from_secs(10);

pub(crate) struct Reflector {
    client: KubeClient,
    store: Store,
    kind: Kind,
    /// `kubernetes/Pod`: where this kind's objects live in the store.
    origin: String,
    /// `v1`, `gateway.networking.k8s.io/v1`: filled into list items, which omit it.
    api_version: String,
    /// The last version seen; the next watch starts after it.
    resource_version: String,
    /// Per-object error origins this reflector has set in the store.
    errored: BTreeSet<String>,
    /// Whether "not served" was already logged at warn.
    missing_reported: bool,
}

/// Why a watch ended.
#[derive(Debug)]
enum WatchEnd {
    /// The server closed it normally (its timeout), after this many events.
    Closed {
        events: usize,
    },
    /// The version is too old (410), or the kind is gone (404, a CRD removed): list again.
    Relist(String),
    Failed(KubeError),
}

/// Exponential backoff with jitter: each delay is between half and all of the current step.
#[derive(Debug)]
struct Backoff {
    step: Duration,
}

impl Reflector {
    pub(crate) fn new(client: KubeClient, store: Store, kind: Kind) -> Self {
        let version = kind.versions().first().copied().unwrap_or("v1");
        let api_version = if kind.group().is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", kind.group())
        };
        Self {
            client,
            store,
            kind,
            origin: super::KubeSource::origin(kind),
            api_version,
            resource_version: String::new(),
            errored: BTreeSet::new(),
            missing_reported: false,
        }
    }

    /// Lists, then watches until a fresh list is needed, then lists again; forever.
    pub(crate) async fn run(mut self, synced: super::InitialSync) {
        let mut relist = Backoff::new();
        loop {
            self.list_until_done(&synced).await;
            let started = Instant::now();
            let reason = self.watch_until_relist().await;
            info!(kind = %self.kind, reason = %reason, "watch cannot resume; listing again");
            if started.elapsed() >= HEALTHY {
                relist.reset();
            } else {
                tokio::time::sleep(relist.next_delay()).await;
            }
        }
    }

    async fn list_until_done(&mut self, synced: &super::InitialSync) {
        let mut backoff = Backoff::new();
        loop {
            match self.list().await {
                Ok(objects) => {
                    synced.listed(self.kind);
                    if self.missing_reported {
                        info!(kind = %self.kind, "kind now served by the API server");
                        self.missing_reported = false;
                    }
                    info!(kind = %self.kind, objects, resource_version = %self.resource_version, "listed");
                    return;
                }
                Err(e @ KubeError::NotFound { .. }) => {
                    // Not installed: there is nothing to wait for.
                    synced.listed(self.kind);
                    if self.missing_reported {
                        debug!(kind = %self.kind, "kind still not served");
                    } else {
                        warn!(kind = %self.kind, error = %e, retry_secs = MISSING_KIND_RETRY.as_secs(), "kind not served by the API server; retrying slowly");
                        self.missing_reported = true;
                    }
                    tokio::time::sleep(MISSING_KIND_RETRY).await;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(kind = %self.kind, error = %e, retry_ms = delay.as_millis() as u64, "list failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Lists every page and replaces what the store holds for this kind. Returns how many
    /// objects were read.
    async fn list(&mut self) -> Result<usize, KubeError> {
        let mut objects = Vec::new();
        let mut keep = Vec::new();
        let mut errors = BTreeMap::new();
        let mut token: Option<String> = None;
        let resource_version = loop {
            let mut page = self
                .client
                .list_page(self.kind, PAGE_SIZE, token.as_deref())
                .await?;
            let items = match page.get_mut("items").map(Value::take) {
                Some(Value::Array(items)) => items,
                None | Some(Value::Null) => Vec::new(),
                Some(_) => return Err(self.malformed("items is not a list")),
            };
            for mut item in items {
                self.fill_type(&mut item);
                let key = ObjectKey::from_metadata(self.kind, &item);
                match self.parse(item) {
                    Ok(o) => objects.push(o),
                    Err(e) => {
                        errors.insert(error_origin(self.kind, key.as_ref()), e);
                        keep.extend(key);
                    }
                }
            }
            let next = str_at(&page, "/metadata/continue").filter(|t| !t.is_empty());
            if next.is_some() && next == token {
                return Err(self.malformed("the same continue token twice"));
            }
            match next {
                Some(next) => token = Some(next),
                None => break str_at(&page, "/metadata/resourceVersion").unwrap_or_default(),
            }
        };
        let count = objects.len() + errors.len();
        self.store
            .replace_origin(&self.origin, objects, &keep, vec![]);
        let now: BTreeSet<String> = errors.keys().cloned().collect();
        for fixed in self.errored.difference(&now) {
            self.store.set_errors(fixed, vec![]);
        }
        for (origin, error) in errors {
            self.store.set_errors(
                &origin,
                vec![ConfigError {
                    origin: origin.clone(),
                    error,
                }],
            );
        }
        self.errored = now;
        self.resource_version = resource_version;
        Ok(count)
    }

    /// Watches, reconnecting from the last version seen, until the server says that version
    /// has expired or the kind is gone. Returns why.
    async fn watch_until_relist(&mut self) -> String {
        let mut backoff = Backoff::new();
        loop {
            let started = Instant::now();
            let end = self.watch_once().await;
            if started.elapsed() >= HEALTHY {
                backoff.reset();
            }
            let delay = match end {
                WatchEnd::Relist(reason) => return reason,
                WatchEnd::Closed { events } if events > 0 => {
                    debug!(kind = %self.kind, events, "watch ended; resuming");
                    continue;
                }
                WatchEnd::Closed { .. } => {
                    let delay = backoff.next_delay();
                    debug!(kind = %self.kind, retry_ms = delay.as_millis() as u64, "watch ended without events; resuming");
                    delay
                }
                WatchEnd::Failed(e) => {
                    let delay = backoff.next_delay();
                    warn!(kind = %self.kind, error = %e, resource_version = %self.resource_version, retry_ms = delay.as_millis() as u64, "watch failed; resuming");
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    async fn watch_once(&mut self) -> WatchEnd {
        let timeout = WATCH_TIMEOUT + Duration::from_secs(fastrand::u64(0..60));
        let idle = timeout + WATCH_IDLE_MARGIN;
        let watch = self
            .client
            .watch(self.kind, &self.resource_version, timeout, idle)
            .await;
        let mut stream = match watch {
            Ok(s) => s,
            Err(KubeError::Gone { message, .. }) => return WatchEnd::Relist(message),
            Err(e @ KubeError::NotFound { .. }) => return WatchEnd::Relist(e.to_string()),
            Err(e) => return WatchEnd::Failed(e),
        };
        debug!(kind = %self.kind, resource_version = %self.resource_version, "watching");
        let mut events = 0;
        loop {
            match stream.next_line().await {
                Ok(Some(line)) => {
                    events += 1;
                    if let Some(end) = self.apply_event(&line) {
                        return end;
                    }
                }
                Ok(None) => return WatchEnd::Closed { events },
                Err(e) => return WatchEnd::Failed(e),
            }
        }
    }

    /// Applies one watch event; returns why the watch must end, if it must.
    fn apply_event(&mut self, line: &[u8]) -> Option<WatchEnd> {
        let mut event: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                // Not an event at all; the API server never sends this. Its version is unknown,
                // so the watch cannot say where it is: skip it and carry on.
                warn!(kind = %self.kind, error = %e, "undecodable watch event skipped");
                return None;
            }
        };
        let object = event.get_mut("object").map(Value::take).unwrap_or_default();
        match event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
        {
            "ADDED" | "MODIFIED" => {
                self.note_version(&object);
                self.apply(object);
            }
            "DELETED" => {
                self.note_version(&object);
                self.delete(&object);
            }
            "BOOKMARK" => self.note_version(&object),
            "ERROR" => {
                let code = object.get("code").and_then(Value::as_u64).unwrap_or(0);
                let reason = object.get("reason").and_then(Value::as_str).unwrap_or("");
                let message = str_at(&object, "/message").unwrap_or_else(|| "no message".into());
                if code == 410 || matches!(reason, "Expired" | "Gone") {
                    return Some(WatchEnd::Relist(message));
                }
                return Some(WatchEnd::Failed(KubeError::Status {
                    code: u16::try_from(code).unwrap_or(0),
                    path: format!("the {} watch", self.kind),
                    message,
                }));
            }
            other => warn!(kind = %self.kind, event = other, "unknown watch event type skipped"),
        }
        None
    }

    fn apply(&mut self, mut value: Value) {
        self.fill_type(&mut value);
        let origin = error_origin(
            self.kind,
            ObjectKey::from_metadata(self.kind, &value).as_ref(),
        );
        match self.parse(value) {
            Ok(o) => {
                self.store.upsert(&self.origin, o);
                self.clear_error(&origin);
            }
            Err(error) => {
                // The last good version, if any, stays in the store.
                self.store.set_errors(
                    &origin,
                    vec![ConfigError {
                        origin: origin.clone(),
                        error,
                    }],
                );
                self.errored.insert(origin);
            }
        }
    }

    fn delete(&mut self, value: &Value) {
        let Some(key) = ObjectKey::from_metadata(self.kind, value) else {
            warn!(kind = %self.kind, "deletion of an unnamed object skipped");
            return;
        };
        self.store.remove(&self.origin, &key);
        self.clear_error(&error_origin(self.kind, Some(&key)));
    }

    fn clear_error(&mut self, origin: &str) {
        if self.errored.remove(origin) {
            self.store.set_errors(origin, vec![]);
        }
    }

    fn note_version(&mut self, object: &Value) {
        if let Some(rv) = str_at(object, "/metadata/resourceVersion").filter(|v| !v.is_empty()) {
            self.resource_version = rv;
        }
    }

    /// Reads an object, insisting it is of the kind being watched.
    fn parse(&self, value: Value) -> Result<Object, ObjectError> {
        let o = Object::parse(value)?;
        if o.kind() != self.kind {
            return Err(ObjectError {
                object: o.key().to_string(),
                field: "kind".into(),
                message: format!("a {} among the {}", o.kind(), self.kind.plural()),
            });
        }
        Ok(o)
    }

    /// List items carry no `kind` or `apiVersion`; the list says what they are.
    fn fill_type(&self, value: &mut Value) {
        if let Value::Object(m) = value {
            m.entry("kind")
                .or_insert_with(|| self.kind.to_string().into());
            m.entry("apiVersion")
                .or_insert_with(|| self.api_version.clone().into());
        }
    }

    fn malformed(&self, reason: &str) -> KubeError {
        KubeError::Decode {
            path: format!("the {} list", self.kind),
            reason: reason.to_owned(),
        }
    }
}

impl Backoff {
    fn new() -> Self {
        Self {
            step: BACKOFF_START,
        }
    }

    fn reset(&mut self) {
        self.step = BACKOFF_START;
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(BACKOFF_MAX);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Where one object's error is recorded: `kubernetes/Pod/apps/web-0`, `kubernetes/Namespace/apps`.
fn error_origin(kind: Kind, key: Option<&ObjectKey>) -> String {
    match key {
        Some(k) if k.namespace.is_empty() => format!("kubernetes/{kind}/{}", k.name),
        Some(k) => format!("kubernetes/{kind}/{}/{}", k.namespace, k.name),
        None => format!("kubernetes/{kind}/(unnamed)"),
    }
}

fn str_at(v: &Value, pointer: &str) -> Option<String> {
    v.pointer(pointer)?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new();
        let mut step = BACKOFF_START;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} for step {step:?}");
            step = (step * 2).min(BACKOFF_MAX);
        }
        assert_eq!(b.step, BACKOFF_MAX);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_START);
    }

    #[test]
    fn keys_and_error_origins() {
        let pod = json!({"metadata": {"name": "web-0", "namespace": "apps"}});
        let key = ObjectKey::from_metadata(Kind::Pod, &pod).unwrap();
        assert_eq!(
            error_origin(Kind::Pod, Some(&key)),
            "kubernetes/Pod/apps/web-0"
        );
        let ns = json!({"metadata": {"name": "apps", "namespace": "ignored"}});
        let key = ObjectKey::from_metadata(Kind::Namespace, &ns).unwrap();
        assert_eq!(
            error_origin(Kind::Namespace, Some(&key)),
            "kubernetes/Namespace/apps"
        );
        let bare = json!({"metadata": {"name": "p"}});
        assert_eq!(
            ObjectKey::from_metadata(Kind::Pod, &bare)
                .unwrap()
                .namespace,
            "default"
        );
        assert_eq!(
            ObjectKey::from_metadata(Kind::Pod, &json!({"metadata": 3})),
            None
        );
        assert_eq!(ObjectKey::from_metadata(Kind::Pod, &json!("junk")), None);
    }
}

//! A directory of ordinary Kubernetes YAML, the embedded default: every `*.yaml`/`*.yml`/`*.json`
//! file below it (hidden files skipped), each holding any number of `---`-separated objects or
//! `kind: List`s. Changes are noticed through inotify as they happen; a slow poll of file
//! metadata backs it up (and replaces it on filesystems without inotify). A burst of writes is
//! read once it has settled.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::Value;
use tracing::{debug, info};

use super::Source;
use crate::model::{Object, ObjectError, ObjectKey};
use crate::store::{ConfigError, Store};

/// How often the directory is scanned for changes inotify did not report.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// A changed file is read once it has not changed again for this long.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(5);

pub struct DirSource {
    dir: PathBuf,
    poll: Duration,
    settle: Duration,
    /// Started before the first read, so no change can slip in between.
    watching: std::sync::Mutex<Option<Watching>>,
    /// Directory scans after the first load: an idle directory should cost one per poll.
    scans: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

struct Watching {
    _watcher: Option<notify::RecommendedWatcher>,
    events: tokio::sync::mpsc::Receiver<()>,
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            poll: DEFAULT_POLL,
            settle: DEFAULT_SETTLE,
            watching: std::sync::Mutex::new(None),
            scans: Default::default(),
        }
    }

    /// Counts the scans made while following the directory.
    pub fn scan_counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.scans.clone()
    }

    /// Starts watching (once): before any read, so a change made during it is noticed.
    fn start_watching(&self) {
        let mut w = self.watching.lock().expect("watch lock poisoned");
        if w.is_none() {
            let (tx, events) = tokio::sync::mpsc::channel::<()>(1);
            *w = Some(Watching {
                _watcher: watch_events(&self.dir, tx),
                events,
            });
        }
    }

    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Reads every file once. Fails only if the directory itself cannot be read.
    pub fn load(&self, store: &Store) -> anyhow::Result<()> {
        self.start_watching();
        let files = scan(&self.dir)?;
        for path in files.keys() {
            load_file(path, store);
        }
        Ok(())
    }
}

impl Source for DirSource {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    fn run(
        self: Box<Self>,
        store: Store,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> {
        Box::pin(async move {
            self.start_watching();
            let Some(Watching {
                _watcher,
                mut events,
            }) = self.watching.lock().expect("watch lock poisoned").take()
            else {
                anyhow::bail!("the directory watch was not started");
            };
            let mut known = scan(&self.dir)?;
            let (store2, now2) = (store.clone(), known.clone());
            let mut conflicted = tokio::task::spawn_blocking(move || {
                let mut conflicted = std::collections::BTreeSet::new();
                apply_changes(&store2, &BTreeMap::new(), &now2, &mut conflicted);
                conflicted
            })
            .await
            .unwrap_or_default();
            info!(dir = %self.dir.display(), files = known.len(), "config directory loaded");
            loop {
                // Whichever comes first: an inotify event or the poll.
                let _ = tokio::time::timeout(self.poll, events.recv()).await;
                self.scans
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut now = match scan(&self.dir) {
                    Ok(n) => n,
                    Err(e) => {
                        // Keep serving what was read; the directory may be being replaced.
                        debug!(error = %e, "config directory unreadable; retrying");
                        continue;
                    }
                };
                if now == known {
                    continue;
                }
                // Let a burst of writes settle before reading.
                loop {
                    tokio::time::sleep(self.settle).await;
                    match scan(&self.dir) {
                        Ok(again) if again == now => break,
                        Ok(again) => now = again,
                        Err(_) => break,
                    }
                }
                // Reading and parsing is blocking work: off the async threads.
                let (store2, known2, now2) = (store.clone(), known.clone(), now.clone());
                let mut conflicted2 = std::mem::take(&mut conflicted);
                conflicted = tokio::task::spawn_blocking(move || {
                    apply_changes(&store2, &known2, &now2, &mut conflicted2);
                    conflicted2
                })
                .await
                .unwrap_or_default();
                known = now;
            }
        })
    }
}

/// Starts inotify on `dir`; each event wakes the watch loop. `None` (logged) if the
/// filesystem does not support it: polling alone then notices changes.
fn watch_events(
    dir: &Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let handler = move |event: notify::Result<notify::Event>| {
        // Reading the directory (as every scan does) raises open and close events of its
        // own: waking on those would rescan forever. Only changes, and a file closed after
        // writing, are news.
        use notify::event::{AccessKind, AccessMode, EventKind};
        if let Ok(e) = &event
            && matches!(e.kind, EventKind::Access(k) if k != AccessKind::Close(AccessMode::Write))
        {
            return;
        }
        // A full channel already holds a wake-up: nothing is lost.
        let _ = tx.try_send(());
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            info!(error = %e, "inotify unavailable; polling the config directory");
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::Recursive) {
        info!(error = %e, "cannot watch the config directory; polling it");
        return None;
    }
    Some(watcher)
}

fn scan(dir: &Path) -> anyhow::Result<BTreeMap<PathBuf, Stamp>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    let mut first = true;
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if first => {
                return Err(anyhow::anyhow!(
                    "reading config directory {}: {e}",
                    d.display()
                ));
            }
            Err(_) => continue,
        };
        first = false;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
            if meta.is_dir() {
                // Symlinked directories are not followed: a loop would never end.
                if !is_link {
                    stack.push(path);
                }
            } else if !meta.is_file() {
                // A FIFO or device would block the reader forever.
                continue;
            } else if [".yaml", ".yml", ".json"]
                .iter()
                .any(|ext| name.ends_with(ext))
            {
                out.insert(
                    path,
                    Stamp {
                        modified: meta.modified().ok(),
                        len: meta.len(),
                        ino: meta.ino(),
                    },
                );
            }
        }
    }
    Ok(out)
}

/// Applies one round of file changes: removals first, so a renamed file's objects are not
/// refused as duplicates of the file they came from; then changed files; then files whose
/// objects were refused because another file held them (they may be free now).
fn apply_changes(
    store: &Store,
    known: &BTreeMap<PathBuf, Stamp>,
    now: &BTreeMap<PathBuf, Stamp>,
    conflicted: &mut std::collections::BTreeSet<PathBuf>,
) {
    for path in known.keys().filter(|p| !now.contains_key(*p)) {
        info!(file = %path.display(), "config file removed");
        store.replace_origin(&path.display().to_string(), vec![], &[], vec![]);
        conflicted.remove(path);
    }
    for (path, stamp) in now {
        if known.get(path) != Some(stamp) {
            set_conflicted(conflicted, path, load_file(path, store));
        }
    }
    let retry: Vec<PathBuf> = conflicted.iter().cloned().collect();
    for path in retry {
        set_conflicted(conflicted, &path, load_file(&path, store));
    }
}

fn set_conflicted(set: &mut std::collections::BTreeSet<PathBuf>, path: &Path, refused: usize) {
    if refused > 0 {
        set.insert(path.to_owned());
    } else {
        set.remove(path);
    }
}

/// Reads one file into the store. Objects that fail to parse keep their previous version; a
/// file that cannot be read or is not YAML at all keeps everything it had. Returns how many
/// objects were refused because another file defines them.
fn load_file(path: &Path, store: &Store) -> usize {
    let origin = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            store.set_errors(&origin, vec![file_error(&origin, "reading", e.to_string())]);
            return 0;
        }
    };
    let docs = match split_documents(&text) {
        Ok(d) => d,
        Err(message) => {
            store.set_errors(&origin, vec![file_error(&origin, "YAML", message)]);
            return 0;
        }
    };
    let mut objects = Vec::new();
    let mut keep = Vec::new();
    let mut errors = Vec::new();
    for (doc, value) in docs {
        match Object::parse(value.clone()) {
            Ok(o) => objects.push(o),
            Err(error) => {
                if let Some(key) = ObjectKey::of_raw(&value) {
                    keep.push(key);
                }
                errors.push(ConfigError {
                    origin: format!("{origin} (document {doc})"),
                    error,
                });
            }
        }
    }
    debug!(file = %origin, objects = objects.len(), errors = errors.len(), "config file read");
    store.replace_origin(&origin, objects, &keep, errors)
}

fn file_error(origin: &str, field: &str, message: String) -> ConfigError {
    ConfigError {
        origin: origin.to_owned(),
        error: ObjectError {
            object: "file".into(),
            field: field.into(),
            message,
        },
    }
}

/// Splits a multi-document file into objects, numbering documents from 1 and expanding
/// `kind: List`. Any syntax error fails the whole file, since what it holds is then unknown.
fn split_documents(text: &str) -> Result<Vec<(usize, Value)>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        match value {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                let items = m
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                out.extend(items.into_iter().map(|v| (i + 1, v)));
            }
            v => out.push((i + 1, v)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Kind;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("istiod-dir-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const GOOD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: apps}\nspec: {nodeName: n1}\nstatus: {podIP: 198.18.0.1}\n";

    #[test]
    fn a_broken_object_keeps_its_last_good_state_and_the_rest_applies() {
        let d = tmpdir();
        let f = d.join("mesh.yaml");
        std::fs::write(&f, GOOD).unwrap();
        let store = Store::new();
        DirSource::new(&d).load(&store).unwrap();
        assert_eq!(store.state().objects.len(), 2);

        // The pod gets a bad IP, the namespace loses its label, a Widget appears.
        let edited = GOOD
            .replace("198.18.0.1", "not-an-ip")
            .replace("labels: {istio.io/dataplane-mode: ambient}", "labels: {}")
            + "---\napiVersion: v1\nkind: Widget\nmetadata: {name: w}\n";
        std::fs::write(&f, edited).unwrap();
        load_file(&f, &store);
        let st = store.state();
        let pod = st.of_kind(Kind::Pod).next().unwrap();
        let Object::Pod(p) = &**pod else { panic!() };
        assert_eq!(
            p.ips(),
            vec!["198.18.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        let ns = st.of_kind(Kind::Namespace).next().unwrap();
        assert!(ns.metadata().labels.is_empty(), "the good edit applied");
        let errors: Vec<String> = store.errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].ends_with(
                "mesh.yaml (document 2): Pod apps/a: field status.podIP: invalid IP address syntax"
            ),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("(document 3): Widget w: field kind: unknown kind"),
            "{errors:?}"
        );

        // Unparsable YAML keeps the whole file as it was.
        std::fs::write(&f, "kind: [unclosed").unwrap();
        load_file(&f, &store);
        assert_eq!(store.state().objects.len(), 2);
        let errors = store.errors();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .contains("mesh.yaml: file: field YAML: document 1:"),
            "{}",
            errors[0]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn edits_and_removals_are_picked_up() {
        let d = tmpdir();
        std::fs::write(d.join("a.yaml"), GOOD).unwrap();
        let store = Store::new();
        let rx = store.subscribe();
        let task = tokio::spawn(
            Box::new(DirSource::new(&d).with_poll(Duration::from_millis(10))).run(store.clone()),
        );
        let wait = |n: usize, store: Store| async move {
            for _ in 0..200 {
                if store.state().objects.len() == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("store never reached {n} objects");
        };
        wait(2, store.clone()).await;
        std::fs::write(
            d.join("b.yml"),
            "{apiVersion: v1, kind: List, items: [{apiVersion: v1, kind: ServiceAccount, metadata: {name: sa}}]}",
        )
        .unwrap();
        wait(3, store.clone()).await;
        std::fs::remove_file(d.join("a.yaml")).unwrap();
        wait(1, store.clone()).await;
        assert!(rx.has_changed().unwrap());
        task.abort();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn an_idle_directory_is_not_rescanned_over_and_over() {
        // Scanning opens the directory, which inotify reports: those events must not wake
        // the loop, or it scans without end.
        let d = tmpdir();
        std::fs::write(d.join("a.yaml"), GOOD).unwrap();
        let store = Store::new();
        let source = DirSource::new(&d).with_poll(Duration::from_millis(500));
        let scans = source.scan_counter();
        let task = tokio::spawn(Box::new(source).run(store.clone()));
        for _ in 0..200 {
            if store.state().objects.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = scans.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let idle = scans.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(idle <= 3, "{idle} scans in a second of nothing happening");
        task.abort();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn renaming_a_file_or_moving_objects_between_files_loses_nothing() {
        let d = tmpdir();
        let ns = |n: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n");
        std::fs::write(d.join("b.yaml"), format!("{}---\n{}", ns("one"), ns("two"))).unwrap();
        std::fs::write(d.join("z.yaml"), ns("three")).unwrap();
        let store = Store::new();
        let task = tokio::spawn(
            Box::new(DirSource::new(&d).with_poll(Duration::from_millis(10))).run(store.clone()),
        );
        let names = |store: &Store| {
            store
                .state()
                .of_kind(Kind::Namespace)
                .map(|o| o.metadata().name.clone())
                .collect::<Vec<_>>()
        };
        let settle = |store: Store, want: Vec<&'static str>| async move {
            for _ in 0..300 {
                if names(&store) == want && store.errors().is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!(
                "wanted {want:?}, have {:?}, errors {:?}",
                names(&store),
                store.errors()
            );
        };
        settle(store.clone(), vec!["one", "three", "two"]).await;
        // A rename: the new name sorts before the old one's removal is seen.
        std::fs::rename(d.join("b.yaml"), d.join("a.yaml")).unwrap();
        settle(store.clone(), vec!["one", "three", "two"]).await;
        // An object moves from the last file to the first, in one go.
        std::fs::write(
            d.join("a.yaml"),
            format!("{}---\n{}---\n{}", ns("one"), ns("two"), ns("three")),
        )
        .unwrap();
        std::fs::write(d.join("z.yaml"), "").unwrap();
        settle(store.clone(), vec!["one", "three", "two"]).await;
        task.abort();
        std::fs::remove_dir_all(&d).unwrap();
    }
}

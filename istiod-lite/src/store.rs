//! The desired state: every object from every source, in one place, with the errors that kept
//! objects out.
//!
//! Each source writes under its own *origins* (a file path, or `kubernetes/Pod`), so one source
//! replacing what it holds never disturbs another. Translation reads an immutable [`State`]
//! snapshot, taken after each change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::warn;

use crate::model::{Object, ObjectError, ObjectKey};

/// A snapshot of the desired state.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub objects: BTreeMap<ObjectKey, Arc<Object>>,
}

impl State {
    pub fn of_kind(&self, kind: crate::model::Kind) -> impl Iterator<Item = &Arc<Object>> {
        let lo = ObjectKey {
            kind,
            namespace: String::new(),
            name: String::new(),
        };
        self.objects
            .range(lo..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, v)| v)
    }

    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        Self {
            objects: objects
                .into_iter()
                .map(|o| (o.key(), Arc::new(o)))
                .collect(),
        }
    }
}

/// A problem with the config, shown on the debug endpoint and counted in metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    /// Where the object came from: a file path or `kubernetes`.
    pub origin: String,
    #[serde(flatten)]
    pub error: ObjectError,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.origin, self.error)
    }
}

#[derive(Default)]
struct Inner {
    state: State,
    /// Which origin wrote each object.
    owner: BTreeMap<ObjectKey, Arc<str>>,
    by_origin: BTreeMap<Arc<str>, BTreeSet<ObjectKey>>,
    errors: BTreeMap<Arc<str>, Vec<ConfigError>>,
}

/// Shared handle to the desired state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            inner: Default::default(),
            changed: watch::Sender::new(0),
        }
    }

    /// Ticks after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn state(&self) -> State {
        self.inner
            .lock()
            .expect("store lock poisoned")
            .state
            .clone()
    }

    /// Runs `f` on the current state without copying it; keep `f` short, it holds the lock.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.inner.lock().expect("store lock poisoned").state)
    }

    pub fn errors(&self) -> Vec<ConfigError> {
        let inner = self.inner.lock().expect("store lock poisoned");
        inner.errors.values().flatten().cloned().collect()
    }

    /// Replaces everything `origin` holds with `objects`. Objects named in `keep` (their new
    /// version was rejected) keep the version this origin had. An object another origin already
    /// holds is refused with an error naming both; returns how many were refused that way.
    pub fn replace_origin(
        &self,
        origin: &str,
        objects: Vec<Object>,
        keep: &[ObjectKey],
        mut errors: Vec<ConfigError>,
    ) -> usize {
        let mut refused = 0;
        let origin: Arc<str> = origin.into();
        let mut inner = self.inner.lock().expect("store lock poisoned");
        let old = inner.by_origin.remove(&origin).unwrap_or_default();
        let mut now = BTreeSet::new();
        for key in keep {
            if old.contains(key) {
                now.insert(key.clone());
            }
        }
        let mut next: Vec<(ObjectKey, Arc<Object>)> = Vec::with_capacity(objects.len());
        for o in objects {
            let key = o.key();
            if let Some(other) = inner.owner.get(&key).filter(|o| **o != origin) {
                refused += 1;
                errors.push(ConfigError {
                    origin: origin.to_string(),
                    error: ObjectError {
                        object: key.to_string(),
                        field: "metadata.name".into(),
                        message: format!("already defined in {other}; this copy is ignored"),
                    },
                });
                continue;
            }
            if !now.insert(key.clone()) {
                errors.push(ConfigError {
                    origin: origin.to_string(),
                    error: ObjectError {
                        object: key.to_string(),
                        field: "metadata.name".into(),
                        message: "defined twice; the first is used".into(),
                    },
                });
                continue;
            }
            next.push((key, Arc::new(o)));
        }
        let mut changed = false;
        for key in old.difference(&now) {
            inner.owner.remove(key);
            inner.state.objects.remove(key);
            changed = true;
        }
        for (key, o) in next {
            inner.owner.insert(key.clone(), origin.clone());
            let same = inner.state.objects.get(&key).is_some_and(|cur| **cur == *o);
            if !same {
                inner.state.objects.insert(key, o);
                changed = true;
            }
        }
        if !now.is_empty() {
            inner.by_origin.insert(origin.clone(), now);
        }
        for e in &errors {
            warn!(error = %e, "config object rejected");
        }
        let had_errors = inner.errors.contains_key(&origin);
        if errors.is_empty() {
            inner.errors.remove(&origin);
        } else {
            inner.errors.insert(origin, errors);
        }
        drop(inner);
        if changed || had_errors {
            self.changed.send_modify(|g| *g += 1);
        }
        refused
    }

    /// Adds or replaces one object under `origin`.
    pub fn upsert(&self, origin: &str, object: Object) {
        let key = object.key();
        let origin: Arc<str> = origin.into();
        let mut inner = self.inner.lock().expect("store lock poisoned");
        if let Some(other) = inner.owner.get(&key).filter(|o| **o != origin) {
            warn!(object = %key, origin = %origin, other = %other, "object already defined elsewhere; ignored");
            return;
        }
        if inner
            .state
            .objects
            .get(&key)
            .is_some_and(|cur| **cur == object)
        {
            return;
        }
        inner.owner.insert(key.clone(), origin.clone());
        inner
            .by_origin
            .entry(origin)
            .or_default()
            .insert(key.clone());
        inner.state.objects.insert(key, Arc::new(object));
        drop(inner);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Removes one object held by `origin`.
    pub fn remove(&self, origin: &str, key: &ObjectKey) {
        let mut inner = self.inner.lock().expect("store lock poisoned");
        if inner.owner.get(key).is_none_or(|o| **o != *origin) {
            return;
        }
        inner.owner.remove(key);
        inner.state.objects.remove(key);
        if let Some(set) = inner.by_origin.get_mut(origin) {
            set.remove(key);
        }
        drop(inner);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Records (or, with an empty list, clears) errors for `origin` without touching objects.
    pub fn set_errors(&self, origin: &str, errors: Vec<ConfigError>) {
        let mut inner = self.inner.lock().expect("store lock poisoned");
        let changed = if errors.is_empty() {
            inner.errors.remove(origin).is_some()
        } else {
            for e in &errors {
                warn!(error = %e, "config rejected");
            }
            inner.errors.insert(origin.into(), errors);
            true
        };
        drop(inner);
        if changed {
            self.changed.send_modify(|g| *g += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::Kind;

    fn ns(name: &str, label: &str) -> Object {
        Object::parse(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"l": label}}}))
        .unwrap()
    }

    #[test]
    fn origins_replace_only_their_own_objects() {
        let s = Store::new();
        let mut rx = s.subscribe();
        s.replace_origin("a.yaml", vec![ns("a", "1")], &[], vec![]);
        s.replace_origin("b.yaml", vec![ns("b", "1"), ns("a", "2")], &[], vec![]);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        let st = s.state();
        assert_eq!(st.of_kind(Kind::Namespace).count(), 2);
        let errs = s.errors();
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].to_string().contains("already defined in a.yaml"),
            "{}",
            errs[0]
        );

        // Rejecting the new version of `a` keeps the old one.
        s.replace_origin("a.yaml", vec![], &[ns("a", "x").key()], vec![]);
        assert_eq!(s.state().of_kind(Kind::Namespace).count(), 2);
        assert!(!rx.has_changed().unwrap(), "nothing changed");
        s.replace_origin("a.yaml", vec![], &[], vec![]);
        let names: Vec<_> = s
            .state()
            .of_kind(Kind::Namespace)
            .map(|o| o.metadata().name.clone())
            .collect();
        assert_eq!(names, vec!["b"]);
    }
}

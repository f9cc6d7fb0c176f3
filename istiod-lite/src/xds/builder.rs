//! Builds snapshots incrementally, one namespace at a time.
//!
//! Almost everything a namespace's resources depend on lives in that namespace; the rest (the
//! root namespace's policies, PeerAuthentications, Gateways, EndpointSlices naming pods
//! elsewhere) is the *shared* input. Gateway and route status, which may refer across
//! namespaces, is computed from the whole state each time (there are few of those objects). The store hands out the same `Arc` for an
//! object until it changes, so a namespace whose objects and the shared input are the same
//! pointers as last time reuses its previous resources without translating or encoding them
//! again. A single pod change therefore costs one namespace, not the mesh.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use prost::Message;

use super::{Delta, Resource, Snapshot};
use crate::model::{Kind, Object, ObjectKey};
use crate::store::State;
use crate::translate::{self, MeshOptions, ObjectStatus};

/// One namespace's translated and encoded output.
struct Entry {
    /// The objects it was translated from. Holding them keeps their allocations alive, so a
    /// pointer that compares equal really is the same version of the object.
    inputs: Vec<Arc<Object>>,
    addresses: Vec<Arc<Resource>>,
    authorizations: Vec<Arc<Resource>>,
    waypoint_policies: Vec<Arc<Resource>>,
    statuses: Vec<ObjectStatus>,
    warnings: Vec<String>,
}

pub struct SnapshotBuilder {
    opts: MeshOptions,
    cache: HashMap<String, Entry>,
    /// The shared input of the last build, held for the same reason as `Entry::inputs`.
    shared: Vec<Arc<Object>>,
}

impl SnapshotBuilder {
    pub fn new(opts: MeshOptions) -> Self {
        Self {
            opts,
            cache: HashMap::new(),
            shared: Vec::new(),
        }
    }

    /// The snapshot after `prev` for `state`.
    pub fn build(&mut self, state: &State, prev: &Snapshot) -> Snapshot {
        let root = self.opts.root_namespace.as_str();
        // Objects by namespace, and the shared input every namespace sees.
        let mut by_ns: BTreeMap<&str, Vec<(&ObjectKey, &Arc<Object>)>> = BTreeMap::new();
        let mut shared: Vec<(&ObjectKey, &Arc<Object>)> = Vec::new();
        // Services that EndpointSlices name for pods in other namespaces: those pods'
        // namespaces read them, so they are shared.
        let cross_services = cross_namespace_services(state);
        // The root namespace always has an entry: it carries the static strict policy even
        // when nothing else lives there.
        by_ns.entry(root).or_default();
        for (k, o) in &state.objects {
            let cross = k.kind == Kind::Service
                && cross_services.contains(&(k.namespace.as_str(), k.name.as_str()));
            if cross || is_shared(k, o, root) {
                shared.push((k, o));
            }
            if k.kind == Kind::Namespace {
                by_ns.entry(k.name.as_str()).or_default().push((k, o));
            } else {
                by_ns.entry(k.namespace.as_str()).or_default().push((k, o));
            }
        }
        // The root namespace's resources depend on PeerAuthentications anywhere (the static
        // strict policy exists when any does), which are shared.
        let shared_same = same(&self.shared, shared.iter().map(|(_, o)| *o));
        if !shared_same {
            self.shared = shared.iter().map(|(_, o)| Arc::clone(o)).collect();
        }

        let mut next_cache = HashMap::with_capacity(by_ns.len());
        for (ns, objects) in &by_ns {
            let entry = match self.cache.remove(*ns) {
                Some(e) if shared_same && same(&e.inputs, objects.iter().map(|(_, o)| *o)) => e,
                _ => self.translate_namespace(ns, objects, &shared, prev),
            };
            next_cache.insert((*ns).to_owned(), entry);
        }
        self.cache = next_cache;

        let mut resources: BTreeMap<&'static str, BTreeMap<String, Arc<Resource>>> =
            super::TYPE_URLS
                .iter()
                .map(|t| (*t, BTreeMap::new()))
                .collect();
        let mut statuses = Vec::new();
        let mut warnings = Vec::new();
        let mut add = |type_url: &'static str, list: &[Arc<Resource>]| {
            let map = resources.entry(type_url).or_default();
            for r in list {
                map.insert(r.name.clone(), r.clone());
            }
        };
        for e in self.cache.values() {
            add(mesh_proto::ADDRESS_TYPE_URL, &e.addresses);
            add(mesh_proto::AUTHORIZATION_TYPE_URL, &e.authorizations);
            add(mesh_proto::WAYPOINT_POLICY_TYPE_URL, &e.waypoint_policies);
            statuses.extend(e.statuses.iter().cloned());
            warnings.extend(e.warnings.iter().cloned());
        }
        // Routes and Gateway status may refer across namespaces: from the whole state.
        let shared_out = translate::gateways_and_routes(state, &self.opts);
        let old_routes = prev.of_type(mesh_proto::ROUTE_TYPE_URL);
        let routes: Vec<Arc<Resource>> = shared_out
            .routes
            .iter()
            .map(|(n, r)| Resource::encode(n.clone(), r.encode_to_vec(), old_routes))
            .collect();
        add(mesh_proto::ROUTE_TYPE_URL, &routes);
        statuses.extend(shared_out.statuses);
        statuses
            .sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
        warnings.sort();

        let deltas = resources
            .iter()
            .map(|(type_url, now)| (*type_url, delta(prev.of_type(type_url), now)))
            .collect();
        Snapshot {
            version: prev.version + 1,
            resources,
            deltas,
            statuses,
            warnings,
            built_at: Some(std::time::Instant::now()),
        }
    }

    fn translate_namespace(
        &self,
        ns: &str,
        objects: &[(&ObjectKey, &Arc<Object>)],
        shared: &[(&ObjectKey, &Arc<Object>)],
        prev: &Snapshot,
    ) -> Entry {
        let mut sub = State::default();
        for (k, o) in shared.iter().chain(objects) {
            sub.objects.insert((*k).clone(), (*o).clone());
        }
        let out = translate::translate(&sub, &self.opts);
        let encode = |type_url: &str, items: Vec<(String, Vec<u8>)>| -> Vec<Arc<Resource>> {
            let old = prev.of_type(type_url);
            items
                .into_iter()
                .map(|(name, body)| Resource::encode(name, body, old))
                .collect()
        };
        // The sub-state holds shared objects from other namespaces: keep only what is ours.
        let addresses = encode(
            mesh_proto::ADDRESS_TYPE_URL,
            out.addresses
                .iter()
                .filter(|(_, a)| address_namespace(a) == Some(ns))
                .map(|(n, a)| (n.clone(), a.encode_to_vec()))
                .collect(),
        );
        let authorizations = encode(
            mesh_proto::AUTHORIZATION_TYPE_URL,
            out.authorizations
                .iter()
                .filter(|(_, a)| a.namespace == ns)
                .map(|(n, a)| (n.clone(), a.encode_to_vec()))
                .collect(),
        );
        let waypoint_policies = encode(
            mesh_proto::WAYPOINT_POLICY_TYPE_URL,
            out.waypoint_policies
                .iter()
                .filter(|(_, p)| p.namespace == ns)
                .map(|(n, p)| (n.clone(), p.encode_to_vec()))
                .collect(),
        );
        Entry {
            inputs: objects.iter().map(|(_, o)| Arc::clone(o)).collect(),
            addresses,
            authorizations,
            waypoint_policies,
            statuses: out
                .statuses
                .into_iter()
                .filter(|s| s.kind == Kind::AuthorizationPolicy && s.namespace == ns)
                .collect(),
            warnings: out.warnings,
        }
    }
}

fn address_namespace(a: &mesh_proto::workload::Address) -> Option<&str> {
    use mesh_proto::workload::address::Type;
    match a.r#type.as_ref()? {
        Type::Workload(w) => Some(&w.namespace),
        Type::Service(s) => Some(&s.namespace),
    }
}

/// Objects every namespace's translation may read.
fn is_shared(k: &ObjectKey, o: &Object, root: &str) -> bool {
    match k.kind {
        Kind::Gateway | Kind::PeerAuthentication => true,
        Kind::AuthorizationPolicy => k.namespace == root,
        Kind::EndpointSlice => match o {
            Object::EndpointSlice(s) => s.endpoints.iter().any(|e| {
                e.target_ref
                    .as_ref()
                    .is_some_and(|t| !t.namespace.is_empty() && t.namespace != k.namespace)
            }),
            _ => false,
        },
        _ => false,
    }
}

/// Whether `now` is exactly the objects held (same versions, same order).
fn same<'a>(held: &[Arc<Object>], now: impl ExactSizeIterator<Item = &'a Arc<Object>>) -> bool {
    held.len() == now.len() && held.iter().zip(now).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// `(namespace, name)` of Services whose EndpointSlices name pods in another namespace.
fn cross_namespace_services(state: &State) -> HashSet<(&str, &str)> {
    state
        .of_kind(Kind::EndpointSlice)
        .filter_map(|o| match &**o {
            Object::EndpointSlice(s) => Some(s),
            _ => None,
        })
        .filter(|s| {
            s.endpoints.iter().any(|e| {
                e.target_ref
                    .as_ref()
                    .is_some_and(|t| !t.namespace.is_empty() && t.namespace != s.metadata.namespace)
            })
        })
        .filter_map(|s| {
            let svc = s.metadata.labels.get(crate::model::SERVICE_NAME_LABEL)?;
            Some((s.metadata.namespace.as_str(), svc.as_str()))
        })
        .collect()
}

fn delta(
    old: Option<&BTreeMap<String, Arc<Resource>>>,
    now: &BTreeMap<String, Arc<Resource>>,
) -> Delta {
    let empty = BTreeMap::new();
    let old = old.unwrap_or(&empty);
    Delta {
        changed: now
            .iter()
            .filter(|(n, r)| old.get(*n).is_none_or(|o| !Arc::ptr_eq(o, r)))
            .map(|(_, r)| r.clone())
            .collect(),
        removed: old
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use serde::Deserialize;

    use super::*;

    fn state(yaml: &str) -> State {
        State::from_objects(
            serde_yaml::Deserializer::from_str(yaml)
                .map(|d| Object::parse(serde_json::Value::deserialize(d).unwrap()).unwrap()),
        )
    }

    const MESH: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: a, labels: {app: p}}
spec: {nodeName: n}
status: {podIP: 198.18.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: q, namespace: b}
spec: {nodeName: n}
status: {podIP: 198.18.0.2}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh, namespace: istio-system}
spec: {selector: {matchLabels: {app: p}}, rules: [{}]}
";

    /// The incremental result must equal translating everything from scratch.
    fn assert_same_as_full(snap: &Snapshot, st: &State) {
        let full = translate::translate(st, &MeshOptions::default());
        let encoded = |items: Vec<(String, Vec<u8>)>| -> Vec<(String, u64)> {
            items
                .into_iter()
                .map(|(n, body)| (n.clone(), Resource::encode(n, body, None).hash))
                .collect()
        };
        let full_by_type = [
            (
                mesh_proto::ADDRESS_TYPE_URL,
                encoded(
                    full.addresses
                        .iter()
                        .map(|(n, a)| (n.clone(), a.encode_to_vec()))
                        .collect(),
                ),
            ),
            (
                mesh_proto::AUTHORIZATION_TYPE_URL,
                encoded(
                    full.authorizations
                        .iter()
                        .map(|(n, a)| (n.clone(), a.encode_to_vec()))
                        .collect(),
                ),
            ),
        ];
        for (t, b) in full_by_type {
            let a: Vec<_> = snap
                .of_type(t)
                .unwrap()
                .iter()
                .map(|(n, r)| (n.clone(), r.hash))
                .collect();
            assert_eq!(a, b, "{t}");
        }
    }

    #[test]
    fn unchanged_namespaces_are_reused_and_results_match_a_full_translation() {
        let mut b = SnapshotBuilder::new(MeshOptions::default());
        let st1 = state(MESH);
        let s1 = b.build(&st1, &Snapshot::default());
        assert_same_as_full(&s1, &st1);

        // Change only namespace b: namespace a's resources are the same allocations.
        let mut st2 = st1.clone();
        let q = state(&MESH.replace("198.18.0.2", "198.18.0.3"));
        let key = q.objects.keys().find(|k| k.name == "q").unwrap().clone();
        st2.objects.insert(key.clone(), q.objects[&key].clone());
        let s2 = b.build(&st2, &s1);
        assert_same_as_full(&s2, &st2);
        let addr =
            |s: &Snapshot, n: &str| s.of_type(mesh_proto::ADDRESS_TYPE_URL).unwrap()[n].clone();
        assert!(Arc::ptr_eq(
            &addr(&s1, "Kubernetes//Pod/a/p"),
            &addr(&s2, "Kubernetes//Pod/a/p")
        ));
        let d = &s2.deltas[mesh_proto::ADDRESS_TYPE_URL];
        assert_eq!(d.changed.len(), 1);
        assert_eq!(d.changed[0].name, "Kubernetes//Pod/b/q");

        // A change in the root namespace (shared input) reaches every namespace.
        let st3 = state(&MESH.replace("matchLabels: {app: p}", "matchLabels: {app: x}"));
        let s3 = b.build(&st3, &s2);
        assert_same_as_full(&s3, &st3);
        let d = &s3.deltas[mesh_proto::ADDRESS_TYPE_URL];
        assert!(
            d.changed.iter().any(|r| r.name == "Kubernetes//Pod/a/p"),
            "policy list changed"
        );

        // Removing a namespace's last object removes its resources.
        let st4 = state(
            &MESH
                .split("---")
                .filter(|d| !d.contains("name: q"))
                .collect::<Vec<_>>()
                .join("---"),
        );
        let s4 = b.build(&st4, &s3);
        assert_same_as_full(&s4, &st4);
        assert_eq!(
            s4.deltas[mesh_proto::ADDRESS_TYPE_URL].removed,
            vec!["Kubernetes//Pod/b/q"]
        );
    }

    #[test]
    fn an_object_replaced_between_builds_is_never_mistaken_for_the_old_one() {
        // Freed and reallocated objects often land at the same address: each build must still
        // see the new version.
        let mut b = SnapshotBuilder::new(MeshOptions::default());
        let mut prev = Snapshot::default();
        for i in 0..100u8 {
            let ip = format!("198.18.1.{}", i + 1);
            let st = state(&MESH.replace("198.18.0.2", &ip));
            let next = b.build(&st, &prev);
            drop(st);
            let r = &next.of_type(mesh_proto::ADDRESS_TYPE_URL).unwrap()["Kubernetes//Pod/b/q"];
            let a = mesh_proto::workload::Address::decode(r.body.as_slice()).unwrap();
            let Some(mesh_proto::workload::address::Type::Workload(w)) = a.r#type else {
                panic!("not a workload")
            };
            assert_eq!(w.addresses, vec![vec![198, 18, 1, i + 1]], "build {i}");
            prev = next;
        }
    }

    #[test]
    fn cross_namespace_inputs_and_an_empty_root_namespace_match_a_full_translation() {
        let yaml = format!(
            "{}---
apiVersion: v1
kind: Service
metadata: {{name: ext, namespace: a}}
spec: {{clusterIP: 198.19.0.9, ports: [{{name: web, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: ext-1, namespace: a, labels: {{kubernetes.io/service-name: ext}}}}
endpoints: [{{addresses: [198.18.0.2], targetRef: {{kind: Pod, name: q, namespace: b}}}}]
ports: [{{name: web, port: 8080}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: strict, namespace: a}}
spec: {{mtls: {{mode: STRICT}}}}
",
            MESH.split("---")
                .filter(|d| !d.contains("istio-system"))
                .collect::<Vec<_>>()
                .join("---")
        );
        let st = state(&yaml);
        let mut b = SnapshotBuilder::new(MeshOptions::default());
        let s1 = b.build(&st, &Snapshot::default());
        assert_same_as_full(&s1, &st);
        assert!(
            s1.of_type(mesh_proto::AUTHORIZATION_TYPE_URL)
                .unwrap()
                .contains_key("istio-system/istio_converted_static_strict"),
            "the static strict policy exists with nothing in the root namespace"
        );
        // Changing the service in `a` reaches the pod in `b`.
        let st2 = state(&yaml.replace("port: 80}", "port: 81}"));
        let s2 = b.build(&st2, &s1);
        assert_same_as_full(&s2, &st2);
    }
}

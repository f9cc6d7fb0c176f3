//! The Kubernetes objects istiod-lite understands, typed down to the fields it uses.
//!
//! Every source (a YAML directory, the Kubernetes API) hands raw JSON-shaped objects to
//! [`Object::parse`], so the same object is read the same way wherever it comes from. Fields the
//! mesh does not use are ignored, as the API server's own clients do; fields it uses are checked,
//! and an error names the object and the field path (`spec.ports[0].targetPort`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

mod routes;
pub use routes::*;

/// The kinds istiod-lite reads. Order matters only for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Kind {
    Namespace,
    ServiceAccount,
    Pod,
    Service,
    EndpointSlice,
    Gateway,
    HTTPRoute,
    GRPCRoute,
    ReferenceGrant,
    AuthorizationPolicy,
    PeerAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Namespace,
        Kind::ServiceAccount,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Gateway,
        Kind::HTTPRoute,
        Kind::GRPCRoute,
        Kind::ReferenceGrant,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
    ];

    /// API group (empty for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::ServiceAccount | Kind::Pod | Kind::Service => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Gateway | Kind::HTTPRoute | Kind::GRPCRoute | Kind::ReferenceGrant => {
                "gateway.networking.k8s.io"
            }
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => "security.istio.io",
        }
    }

    /// Versions accepted in `apiVersion`; the first is the one watched on Kubernetes.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace | Kind::ServiceAccount | Kind::Pod | Kind::Service => &["v1"],
            Kind::EndpointSlice => &["v1"],
            Kind::Gateway | Kind::HTTPRoute => &["v1", "v1beta1"],
            Kind::GRPCRoute => &["v1", "v1alpha2"],
            Kind::ReferenceGrant => &["v1beta1", "v1"],
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => &["v1", "v1beta1"],
        }
    }

    /// Lower-case plural used in API paths.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Gateway => "gateways",
            Kind::HTTPRoute => "httproutes",
            Kind::GRPCRoute => "grpcroutes",
            Kind::ReferenceGrant => "referencegrants",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::PeerAuthentication => "peerauthentications",
        }
    }

    pub fn is_namespaced(self) -> bool {
        self != Kind::Namespace
    }

    fn from_name(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| format!("{k:?}") == kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies an object across sources: kind, namespace (empty for cluster-scoped) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// The key an object would have, read from its raw form without parsing the rest: how a
    /// rejected object is matched with the version it replaces.
    pub fn of_raw(v: &Value) -> Option<ObjectKey> {
        let kind = Kind::from_name(v.get("kind")?.as_str()?)?;
        Self::from_metadata(kind, v)
    }

    /// The key of a raw object known to be of `kind`, from its metadata alone.
    pub fn from_metadata(kind: Kind, v: &Value) -> Option<ObjectKey> {
        let meta = v.get("metadata")?;
        let name = meta
            .get("name")?
            .as_str()
            .filter(|n| !n.is_empty())?
            .to_owned();
        let namespace = if kind.is_namespaced() {
            meta.get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        Some(ObjectKey {
            kind,
            namespace,
            name,
        })
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Why an object cannot be used. `object` is `Kind ns/name` when that much could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{object}: field {field}: {message}")]
pub struct ObjectError {
    pub object: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub resource_version: String,
    #[serde(default)]
    pub generation: i64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    /// RFC 3339; hand-written YAML usually has none.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
}

/// An object of one of the understood kinds.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Gateway(Gateway),
    HTTPRoute(Route),
    GRPCRoute(Route),
    ReferenceGrant(ReferenceGrant),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Namespace {
    pub metadata: Metadata,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServiceAccount {
    pub metadata: Metadata,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Pod {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub service_account_name: String,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: String,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: String,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<IpAddr>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PodIp {
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

impl Pod {
    /// Every address of the pod, primary first, without repeats.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self.status.pod_ip.into_iter().collect();
        for p in &self.status.pod_ips {
            if !out.contains(&p.ip) {
                out.push(p.ip);
            }
        }
        out
    }

    /// Ready, or (for pods written by hand without conditions) running or phase unset.
    pub fn is_ready(&self) -> bool {
        if matches!(self.status.phase.as_str(), "Succeeded" | "Failed") {
            return false;
        }
        match self.status.conditions.iter().find(|c| c.type_ == "Ready") {
            Some(c) => c.status == "True",
            None => true,
        }
    }

    pub fn service_account(&self) -> &str {
        if self.spec.service_account_name.is_empty() {
            "default"
        } else {
            &self.spec.service_account_name
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Service {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: String,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// `None` for a service whose endpoints are managed by hand (EndpointSlices).
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

impl Service {
    /// Cluster IPs, parsed; "None" (headless) and empty give none.
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        let all = self.spec.cluster_ip.iter().chain(&self.spec.cluster_ips);
        for ip in all.filter_map(|s| s.parse::<IpAddr>().ok()) {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: Metadata,
    #[serde(default)]
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct EndpointConditions {
    #[serde(default)]
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

/// The label naming the service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Gateway {
    pub metadata: Metadata,
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default)]
    pub action: PolicyAction,
    #[serde(default)]
    pub provider: Option<Value>,
    /// `None` (no rules field) and `Some([])` differ: see the translation.
    #[serde(default)]
    pub rules: Option<Vec<PolicyRule>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<WhenCondition>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WhenCondition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PeerAuthentication {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl Object {
    /// Reads one object. An error names the object as precisely as it could be read.
    pub fn parse(value: Value) -> Result<Object, ObjectError> {
        let str_at = |v: &Value, path: &[&str]| -> Option<String> {
            let mut cur = v;
            for p in path {
                cur = cur.get(p)?;
            }
            cur.as_str().map(str::to_owned)
        };
        let kind_name = str_at(&value, &["kind"]).unwrap_or_default();
        let api_version = str_at(&value, &["apiVersion"]).unwrap_or_default();
        let name = str_at(&value, &["metadata", "name"]).unwrap_or_default();
        let namespace = str_at(&value, &["metadata", "namespace"]).unwrap_or_default();
        let describe = || {
            let kind = if kind_name.is_empty() {
                "object"
            } else {
                &kind_name
            };
            match (namespace.is_empty(), name.is_empty()) {
                (_, true) => format!("{kind} (unnamed)"),
                (true, false) => format!("{kind} {name}"),
                (false, false) => format!("{kind} {namespace}/{name}"),
            }
        };
        let err = |field: &str, message: String| ObjectError {
            object: describe(),
            field: field.to_owned(),
            message,
        };
        if !value.is_object() {
            return Err(err(".", "a Kubernetes object must be a mapping".into()));
        }
        if kind_name.is_empty() {
            return Err(err("kind", "missing".into()));
        }
        let Some(kind) = Kind::from_name(&kind_name) else {
            let known: Vec<String> = Kind::ALL.iter().map(|k| k.to_string()).collect();
            return Err(err(
                "kind",
                format!(
                    "unknown kind {kind_name:?}; istiod-lite reads {}",
                    known.join(", ")
                ),
            ));
        };
        let (group, version) = match api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version.as_str()),
        };
        if group != kind.group() || !kind.versions().contains(&version) {
            let want: Vec<String> = kind
                .versions()
                .iter()
                .map(|v| {
                    if kind.group().is_empty() {
                        v.to_string()
                    } else {
                        format!("{}/{v}", kind.group())
                    }
                })
                .collect();
            return Err(err(
                "apiVersion",
                format!(
                    "{api_version:?} is not a version of {kind}; use {}",
                    want.join(" or ")
                ),
            ));
        }
        if name.is_empty() {
            return Err(err("metadata.name", "missing".into()));
        }
        if !is_dns_label_or_subdomain(&name) {
            return Err(err(
                "metadata.name",
                format!("{name:?} is not a valid Kubernetes name"),
            ));
        }
        if !namespace.is_empty() && !is_dns_label(&namespace) {
            return Err(err(
                "metadata.namespace",
                format!("{namespace:?} is not a valid namespace name"),
            ));
        }

        fn typed<T: serde::de::DeserializeOwned>(
            v: Value,
            err: &dyn Fn(&str, String) -> ObjectError,
        ) -> Result<T, ObjectError> {
            serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                err(if path.is_empty() { "." } else { &path }, inner)
            })
        }
        let mut obj = match kind {
            Kind::Namespace => Object::Namespace(typed(value, &err)?),
            Kind::ServiceAccount => Object::ServiceAccount(typed(value, &err)?),
            Kind::Pod => Object::Pod(typed(value, &err)?),
            Kind::Service => Object::Service(typed(value, &err)?),
            Kind::EndpointSlice => Object::EndpointSlice(typed(value, &err)?),
            Kind::Gateway => Object::Gateway(typed(value, &err)?),
            Kind::HTTPRoute => Object::HTTPRoute(typed(value, &err)?),
            Kind::GRPCRoute => Object::GRPCRoute(typed(value, &err)?),
            Kind::AuthorizationPolicy => Object::AuthorizationPolicy(typed(value, &err)?),
            Kind::PeerAuthentication => Object::PeerAuthentication(typed(value, &err)?),
            Kind::ReferenceGrant => Object::ReferenceGrant(typed(value, &err)?),
        };
        // Namespaced objects written without a namespace live in "default", as kubectl does.
        if kind.is_namespaced() && obj.metadata().namespace.is_empty() {
            obj.metadata_mut().namespace = "default".into();
        }
        if !kind.is_namespaced() {
            obj.metadata_mut().namespace.clear();
        }
        obj.validate().map_err(|(field, message)| ObjectError {
            object: obj.key().to_string(),
            field,
            message,
        })?;
        Ok(obj)
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::ServiceAccount(_) => Kind::ServiceAccount,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Gateway(_) => Kind::Gateway,
            Object::HTTPRoute(_) => Kind::HTTPRoute,
            Object::GRPCRoute(_) => Kind::GRPCRoute,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::ReferenceGrant(_) => Kind::ReferenceGrant,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::HTTPRoute(o) | Object::GRPCRoute(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::ReferenceGrant(o) => &o.metadata,
        }
    }

    fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Object::Namespace(o) => &mut o.metadata,
            Object::ServiceAccount(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::Gateway(o) => &mut o.metadata,
            Object::HTTPRoute(o) | Object::GRPCRoute(o) => &mut o.metadata,
            Object::AuthorizationPolicy(o) => &mut o.metadata,
            Object::PeerAuthentication(o) => &mut o.metadata,
            Object::ReferenceGrant(o) => &mut o.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let m = self.metadata();
        ObjectKey {
            kind: self.kind(),
            namespace: m.namespace.clone(),
            name: m.name.clone(),
        }
    }

    /// Checks that need more than the types: value formats the mesh depends on.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: String, message: String| Err((field, message));
        match self {
            Object::Pod(p) => {
                if p.metadata
                    .labels
                    .get(DATAPLANE_MODE_LABEL)
                    .is_some_and(|v| v != DATAPLANE_MODE_AMBIENT && v != DATAPLANE_MODE_NONE)
                {
                    return bad(
                        format!("metadata.labels.{DATAPLANE_MODE_LABEL}"),
                        format!("must be {DATAPLANE_MODE_AMBIENT:?} or {DATAPLANE_MODE_NONE:?}"),
                    );
                }
                if !p.spec.service_account_name.is_empty()
                    && !is_dns_label_or_subdomain(&p.spec.service_account_name)
                {
                    return bad(
                        "spec.serviceAccountName".into(),
                        format!(
                            "{:?} is not a valid service account name",
                            p.spec.service_account_name
                        ),
                    );
                }
            }
            Object::Service(s) => {
                for (field, ip) in s
                    .spec
                    .cluster_ip
                    .iter()
                    .map(|ip| ("spec.clusterIP".to_string(), ip))
                    .chain(
                        s.spec
                            .cluster_ips
                            .iter()
                            .enumerate()
                            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
                    )
                {
                    if !ip.is_empty() && ip != "None" && ip.parse::<IpAddr>().is_err() {
                        return bad(field, format!("{ip:?} is not an IP address"));
                    }
                }
                for (i, p) in s.spec.ports.iter().enumerate() {
                    if p.port == 0 {
                        return bad(format!("spec.ports[{i}].port"), "must not be 0".into());
                    }
                    if p.target_port == Some(IntOrString::Int(0)) {
                        return bad(
                            format!("spec.ports[{i}].targetPort"),
                            "must not be 0".into(),
                        );
                    }
                    if matches!(&p.target_port, Some(IntOrString::String(n)) if n.is_empty()) {
                        return bad(
                            format!("spec.ports[{i}].targetPort"),
                            "must be a port number or a container port name".into(),
                        );
                    }
                }
            }
            Object::EndpointSlice(e) => {
                for (i, ep) in e.endpoints.iter().enumerate() {
                    for (j, a) in ep.addresses.iter().enumerate() {
                        if a.parse::<IpAddr>().is_err() {
                            return bad(
                                format!("endpoints[{i}].addresses[{j}]"),
                                format!("{a:?} is not an IP address"),
                            );
                        }
                    }
                }
            }
            Object::AuthorizationPolicy(ap) => {
                for (i, r) in ap.spec.rules.iter().flatten().enumerate() {
                    for (j, to) in r.to.iter().enumerate() {
                        let op = &to.operation;
                        for (what, ports) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                            for (k, p) in ports.iter().enumerate() {
                                if p.parse::<u16>().map_or(true, |p| p == 0) {
                                    return bad(
                                        format!("spec.rules[{i}].to[{j}].operation.{what}[{k}]"),
                                        format!("{p:?} is not a port number"),
                                    );
                                }
                            }
                        }
                    }
                    for (j, from) in r.from.iter().enumerate() {
                        let s = &from.source;
                        for (what, blocks) in [
                            ("ipBlocks", &s.ip_blocks),
                            ("notIpBlocks", &s.not_ip_blocks),
                            ("remoteIpBlocks", &s.remote_ip_blocks),
                            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                        ] {
                            for (k, b) in blocks.iter().enumerate() {
                                if parse_cidr(b).is_none() {
                                    return bad(
                                        format!("spec.rules[{i}].from[{j}].source.{what}[{k}]"),
                                        format!("{b:?} is not an IP address or CIDR block"),
                                    );
                                }
                            }
                        }
                    }
                }
            }
            Object::PeerAuthentication(pa) => {
                for port in pa.spec.port_level_mtls.keys() {
                    if port.parse::<u16>().map_or(true, |p| p == 0) {
                        return bad(
                            format!("spec.portLevelMtls.{port}"),
                            "the key must be a port number".into(),
                        );
                    }
                }
                if !pa.spec.port_level_mtls.is_empty() && pa.spec.selector.is_none() {
                    return bad(
                        "spec.portLevelMtls".into(),
                        "port-level settings need a workload selector".into(),
                    );
                }
            }
            Object::Gateway(g) => {
                for (i, l) in g.spec.listeners.iter().enumerate() {
                    if l.port == 0 {
                        return bad(format!("spec.listeners[{i}].port"), "must not be 0".into());
                    }
                }
            }
            Object::HTTPRoute(r) => routes::validate(r, false)?,
            Object::GRPCRoute(r) => routes::validate(r, true)?,
            Object::Namespace(_) | Object::ServiceAccount(_) | Object::ReferenceGrant(_) => {}
        }
        Ok(())
    }
}

/// Namespace (or pod) label that enrols workloads in the mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Label on a namespace, service or pod naming the waypoint its traffic goes through.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Optional namespace of the waypoint named by [`USE_WAYPOINT_LABEL`].
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Label on a waypoint Gateway saying which traffic it accepts.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// Parses `1.2.3.4`, `1.2.3.0/24`, `fd00::/8` into an address and prefix length.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len.parse::<u8>().ok()?)),
        None => (s.parse::<IpAddr>().ok()?, None),
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((ip, len))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_label_or_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parses_a_pod_and_defaults_its_namespace() {
        let o = Object::parse(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "labels": {"app": "a"}},
            "spec": {"nodeName": "n1", "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": "198.18.0.1"}
        }))
        .unwrap();
        assert_eq!(o.key().to_string(), "Pod default/a");
        let Object::Pod(p) = o else { panic!() };
        assert_eq!(p.ips(), vec!["198.18.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.service_account(), "default");
        assert!(p.is_ready());
    }

    fn err(v: Value) -> String {
        Object::parse(v).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_object_and_the_field() {
        assert_eq!(
            err(
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "x"}, "status": {"podIP": "nope"}})
            ),
            "Pod x/a: field status.podIP: invalid IP address syntax"
        );
        let e = err(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"ports": [{"port": 80}, {"port": "eighty"}]}}),
        );
        assert!(e.starts_with("Service s: field spec.ports[1].port:"), "{e}");
        let e = err(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"clusterIP": "10.0.0.300", "ports": [{"port": 80}]}}),
        );
        assert_eq!(
            e,
            "Service default/s: field spec.clusterIP: \"10.0.0.300\" is not an IP address"
        );
        let e = err(json!({"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "w"}}));
        assert!(
            e.starts_with("Widget w: field kind: unknown kind \"Widget\""),
            "{e}"
        );
        let e = err(json!({"apiVersion": "v2", "kind": "Pod", "metadata": {"name": "w"}}));
        assert!(
            e.contains("field apiVersion: \"v2\" is not a version of Pod"),
            "{e}"
        );
        let e = err(
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}}),
        );
        assert_eq!(
            e,
            "AuthorizationPolicy ns/p: field spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port number"
        );
        let e = err(
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p"}, "spec": {"action": "MAYBE"}}),
        );
        assert!(
            e.starts_with("AuthorizationPolicy p: field spec.action: unknown variant"),
            "{e}"
        );
        let e =
            err(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "Bad_Name"}}));
        assert!(e.contains("field metadata.name"), "{e}");
        let e = err(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a",
            "labels": {"istio.io/dataplane-mode": "sidecar"}}}),
        );
        assert!(
            e.contains("field metadata.labels.istio.io/dataplane-mode"),
            "{e}"
        );
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Some(("10.0.0.0".parse().unwrap(), 8))
        );
        assert_eq!(parse_cidr("::1"), Some(("::1".parse().unwrap(), 128)));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("x/1"), None);
    }
}

/// Random damage to valid objects: parsing must reject or accept, never panic.
#[cfg(test)]
mod robustness {
    use serde_json::{Value, json};

    use super::Object;

    fn samples() -> Vec<Value> {
        vec![
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "n",
                "labels": {"app": "a", "istio.io/dataplane-mode": "ambient"},
                "ownerReferences": [{"kind": "ReplicaSet", "name": "a-1"}]},
                "spec": {"nodeName": "n1", "serviceAccountName": "sa",
                    "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"podIP": "198.18.0.1", "podIPs": [{"ip": "198.18.0.1"}],
                    "conditions": [{"type": "Ready", "status": "True"}]}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                "spec": {"clusterIP": "198.19.0.1", "selector": {"app": "a"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "p"}, "spec": {"action": "DENY",
                    "selector": {"matchLabels": {"app": "a"}},
                    "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"], "principals": ["*"]}}],
                        "to": [{"operation": {"ports": ["80"]}}],
                        "when": [{"key": "source.ip", "values": ["::1/128"]}]}]}}),
            json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"app": "a"}},
                    "mtls": {"mode": "STRICT"}, "portLevelMtls": {"80": {"mode": "PERMISSIVE"}}}}),
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "r"}, "spec": {"parentRefs": [{"kind": "Service", "name": "s"}],
                    "rules": [{"backendRefs": [{"name": "s", "port": 80}], "matches": []}]}}),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "e", "labels": {"kubernetes.io/service-name": "s"}},
                "endpoints": [{"addresses": ["198.18.0.1"], "targetRef": {"kind": "Pod", "name": "a"}}],
                "ports": [{"name": "http", "port": 8080}]}),
        ]
    }

    fn random_value(rng: &mut fastrand::Rng, depth: u32) -> Value {
        match rng.u8(..9) {
            0 => Value::Null,
            1 => Value::Bool(rng.bool()),
            2 => json!(rng.i64(..)),
            3 => json!(rng.f64() * 1e300),
            4 => json!(["-1", "65536", "0", "::", "1.2.3.4/99", "*", "", "STRICT"][rng.usize(..8)]),
            5 => Value::String((0..rng.usize(..40)).map(|_| rng.char(..)).collect()),
            6 if depth < 4 => Value::Array(
                (0..rng.usize(..4))
                    .map(|_| random_value(rng, depth + 1))
                    .collect(),
            ),
            7 if depth < 4 => Value::Object(
                (0..rng.usize(..4))
                    .map(|i| (format!("k{i}"), random_value(rng, depth + 1)))
                    .collect(),
            ),
            _ => json!(rng.u16(..)),
        }
    }

    /// Replaces one random node of `v` (or a random key's value) with a random value.
    fn mutate(rng: &mut fastrand::Rng, v: &mut Value) {
        match v {
            Value::Object(m) if !m.is_empty() && rng.u8(..4) != 0 => {
                let k = m
                    .keys()
                    .nth(rng.usize(..m.len()))
                    .cloned()
                    .unwrap_or_default();
                if let Some(child) = m.get_mut(&k) {
                    mutate(rng, child);
                }
            }
            Value::Array(a) if !a.is_empty() && rng.u8(..4) != 0 => {
                let i = rng.usize(..a.len());
                mutate(rng, &mut a[i]);
            }
            other => *other = random_value(rng, 0),
        }
    }

    #[test]
    fn damaged_objects_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x15710d);
        let samples = samples();
        for s in &samples {
            Object::parse(s.clone()).expect("samples are valid");
        }
        let mut batch = Vec::new();
        for i in 0..20_000 {
            let mut v = samples[rng.usize(..samples.len())].clone();
            for _ in 0..rng.usize(1..4) {
                mutate(&mut rng, &mut v);
            }
            if let Ok(o) = Object::parse(v) {
                batch.push(o);
            }
            // What parses must also translate, together with the valid objects it refers to.
            if i % 50 == 49 {
                let valid = samples.iter().map(|s| Object::parse(s.clone()).unwrap());
                let st = crate::store::State::from_objects(valid.chain(batch.drain(..)));
                crate::translate::translate(&st, &crate::translate::MeshOptions::default());
            }
        }
    }
}

//! The delta xDS state machine, without I/O: the resources held per type, what a response does
//! to them, and the ACK or NACK that answers it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource};
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, rpc, security, workload};
use prost::Message;

use super::convert::{AddressResource, ConvertError};
use crate::state::{Authorization, Snapshot};

/// The types ztunnel subscribes to, in the order it asks for them.
pub const TYPE_URLS: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// google.rpc.Code INVALID_ARGUMENT, sent in a NACK.
const INVALID_ARGUMENT: i32 = 3;
/// At most this many rejected resources are named in one NACK message.
const MAX_NAMED_REJECTIONS: usize = 20;

/// Everything received over xDS so far, by type and resource name.
#[derive(Debug, Default)]
pub struct Resources {
    /// Workloads by uid and services by `namespace/hostname`: one xDS type, one namespace of
    /// names, so a removal names either.
    addresses: Typed<AddressResource>,
    /// By `namespace/name`.
    authorizations: Typed<Authorization>,
}

/// The resources held of one type, by name, each with the version it came with.
#[derive(Debug)]
pub struct Typed<T> {
    held: BTreeMap<String, Held<T>>,
}

impl<T> Default for Typed<T> {
    fn default() -> Self {
        Self {
            held: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
struct Held<T> {
    version: String,
    value: T,
}

impl<T> Typed<T> {
    /// Name → version of every resource held.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.held
            .iter()
            .map(|(k, h)| (k.clone(), h.version.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.held.values().map(|h| &h.value)
    }

    /// Applies the removals and the resources of `resp` that `decode` accepts (it returns the
    /// name the value must be sent under); returns whether anything changed and `name: reason`
    /// for each resource rejected, which keeps its previous version.
    pub fn apply(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        decode: impl Fn(&Resource, &str) -> Result<(String, T), String>,
    ) -> (bool, Vec<String>) {
        apply_typed(&mut self.held, resp, decode)
    }
}

/// What applying one response did, and how to answer it.
#[derive(Debug)]
pub struct Applied {
    /// The ACK, or the NACK when anything was rejected.
    pub reply: DeltaDiscoveryRequest,
    /// Whether any resource was added, replaced or removed (the snapshot must be rebuilt).
    pub changed: bool,
    /// `name: reason` for each resource rejected; the rest were applied.
    pub rejected: Vec<String>,
}

impl Applied {
    pub fn is_ack(&self) -> bool {
        self.reply.error_detail.is_none()
    }

    /// The answer to `resp` of a subscribed type: an ACK, or a NACK naming what was rejected.
    pub fn answering(resp: &DeltaDiscoveryResponse, changed: bool, rejected: Vec<String>) -> Self {
        let message = (!rejected.is_empty()).then(|| nack_message(&rejected, resp.resources.len()));
        Self::reply(resp, changed, rejected, message)
    }

    /// The NACK of a response of a type that was never asked for.
    pub fn unsubscribed(resp: &DeltaDiscoveryResponse, subscribed: &[&str]) -> Self {
        let why = format!(
            "type {:?} was not subscribed to (only {})",
            resp.type_url,
            subscribed.join(" and ")
        );
        Self::reply(resp, false, vec![why.clone()], Some(why))
    }

    fn reply(
        resp: &DeltaDiscoveryResponse,
        changed: bool,
        rejected: Vec<String>,
        message: Option<String>,
    ) -> Self {
        Self {
            reply: DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: message.map(|message| rpc::Status {
                    code: INVALID_ARGUMENT,
                    message,
                    details: vec![],
                }),
                ..Default::default()
            },
            changed,
            rejected,
        }
    }
}

impl Resources {
    /// The first request for `type_url` on a stream: a wildcard subscription carrying what is
    /// already held, so the server sends only what changed and what was removed meanwhile.
    pub fn initial_request(&self, type_url: &str, node: &Node) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.to_owned(),
            initial_resource_versions: self.versions(type_url),
            ..Default::default()
        }
    }

    /// Name → version of every resource held of `type_url`.
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        match type_url {
            ADDRESS_TYPE_URL => self.addresses.versions(),
            AUTHORIZATION_TYPE_URL => self.authorizations.versions(),
            _ => BTreeMap::new(),
        }
    }

    /// How many resources of `type_url` are held.
    pub fn len(&self, type_url: &str) -> usize {
        match type_url {
            ADDRESS_TYPE_URL => self.addresses.len(),
            AUTHORIZATION_TYPE_URL => self.authorizations.len(),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.authorizations.is_empty()
    }

    /// Applies the valid part of `resp`: removals first, then each resource that converts
    /// cleanly. A rejected resource keeps its previous version, and the reply names it.
    pub fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Applied {
        match resp.type_url.as_str() {
            ADDRESS_TYPE_URL => {
                let (changed, rejected) = self.addresses.apply(resp, decode_address);
                Applied::answering(resp, changed, rejected)
            }
            AUTHORIZATION_TYPE_URL => {
                let (changed, rejected) = self.authorizations.apply(resp, decode_authorization);
                Applied::answering(resp, changed, rejected)
            }
            _ => Applied::unsubscribed(resp, &TYPE_URLS),
        }
    }

    /// The workloads and services held.
    pub fn addresses(&self) -> impl Iterator<Item = &AddressResource> {
        self.addresses.values()
    }

    /// The snapshot of everything held. A service's endpoints are the workloads whose
    /// `services` name it.
    pub fn snapshot(&self) -> Snapshot {
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for held in self.addresses.values() {
            match held {
                AddressResource::Workload(w) => workloads.push(w.clone()),
                AddressResource::Service(s) => services.push(s.clone()),
            }
        }
        let mut endpoints: HashMap<&str, Vec<String>> = HashMap::new();
        for w in &workloads {
            for key in w.services.keys() {
                endpoints.entry(key).or_default().push(w.uid.clone());
            }
        }
        for s in &mut services {
            s.endpoints = endpoints.remove(s.key().as_str()).unwrap_or_default();
        }
        let policies = self.authorizations.values().cloned().collect();
        Snapshot::with_policies(workloads, services, policies)
    }
}

fn apply_typed<T>(
    held: &mut BTreeMap<String, Held<T>>,
    resp: &DeltaDiscoveryResponse,
    decode: impl Fn(&Resource, &str) -> Result<(String, T), String>,
) -> (bool, Vec<String>) {
    let mut changed = false;
    let mut rejected = Vec::new();
    for name in &resp.removed_resources {
        changed |= held.remove(name).is_some();
    }
    for (i, r) in resp.resources.iter().enumerate() {
        let label = if r.name.is_empty() {
            format!("resources[{i}] (unnamed)")
        } else {
            r.name.clone()
        };
        match decode(r, &resp.type_url) {
            Ok((name, value)) if name == r.name => {
                held.insert(
                    name,
                    Held {
                        version: r.version.clone(),
                        value,
                    },
                );
                changed = true;
            }
            Ok((name, _)) => rejected.push(format!(
                "{label}: the resource describes {name:?}, so it must be sent under that name"
            )),
            Err(why) => rejected.push(format!("{label}: {why}")),
        }
    }
    (changed, rejected)
}

/// The encoded message of `r`, which must be of `type_url`.
pub fn body<'a>(r: &'a Resource, type_url: &str) -> Result<&'a [u8], String> {
    let any = r
        .resource
        .as_ref()
        .ok_or_else(|| "the resource has no body".to_owned())?;
    if any.type_url != type_url {
        return Err(format!(
            "the body is a {:?}, not a {type_url:?}",
            any.type_url
        ));
    }
    Ok(&any.value)
}

fn decode_address(r: &Resource, type_url: &str) -> Result<(String, AddressResource), String> {
    let msg = workload::Address::decode(body(r, type_url)?)
        .map_err(|e| format!("not a valid istio.workload.Address: {e}"))?;
    let a = AddressResource::try_from_xds(&msg).map_err(describe)?;
    Ok((a.resource_name(), a))
}

fn decode_authorization(r: &Resource, type_url: &str) -> Result<(String, Authorization), String> {
    let msg = security::Authorization::decode(body(r, type_url)?)
        .map_err(|e| format!("not a valid istio.security.Authorization: {e}"))?;
    let a = Authorization::try_from_xds(&msg).map_err(describe)?;
    Ok((format!("{}/{}", a.namespace, a.name), a))
}

fn describe(e: ConvertError) -> String {
    e.to_string()
}

fn nack_message(rejected: &[String], total: usize) -> String {
    let mut m = format!("rejected {} of {total} resources: ", rejected.len());
    for (i, r) in rejected.iter().take(MAX_NAMED_REJECTIONS).enumerate() {
        if i > 0 {
            m.push_str("; ");
        }
        m.push_str(r);
    }
    if rejected.len() > MAX_NAMED_REJECTIONS {
        let _ = write!(m, "; and {} more", rejected.len() - MAX_NAMED_REJECTIONS);
    }
    m
}

#[cfg(test)]
mod tests;

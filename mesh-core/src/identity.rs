//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The trust domain used when the control plane or config does not name one.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";

/// Why a string is not a workload SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    Scheme(String),
    #[error(
        "{0:?} is not a workload SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error("{0:?} has an empty or invalid {1}")]
    Segment(String, &'static str),
}

/// A workload identity. Cheap to clone; compared and hashed by its parts.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an identity from its parts, checking each is a valid path segment.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let whole = || format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        if !is_valid_trust_domain(trust_domain) {
            return Err(IdentityError::Segment(whole(), "trust domain"));
        }
        if !is_valid_segment(namespace) {
            return Err(IdentityError::Segment(whole(), "namespace"));
        }
        if !is_valid_segment(service_account) {
            return Err(IdentityError::Segment(whole(), "service account"));
        }
        Ok(Self(Arc::new(Parts {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })))
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(s.to_owned()))?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Self::new(td, ns, sa)
                .map_err(|e| match e {
                    IdentityError::Segment(_, what) => IdentityError::Segment(s.to_owned(), what),
                    other => other,
                }),
            _ => Err(IdentityError::Shape(s.to_owned())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn is_valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

fn is_valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "echo");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/echo");
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "cluster.local/ns/a/sa/b",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a b/sa/c",
        ] {
            assert!(
                bad.parse::<SpiffeId>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn error_names_the_bad_part() {
        let err = "spiffe://cluster.local/ns//sa/b"
            .parse::<SpiffeId>()
            .unwrap_err();
        assert!(err.to_string().contains("namespace"), "{err}");
    }
}

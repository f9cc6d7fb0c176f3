//! Protobuf messages spoken between istiod-lite, ztunnel and the waypoint.
//!
//! Package names, type URLs and field numbers match Istio's so each side can talk to Istio's
//! own components; the exception is the waypoint's configuration (`ambient.waypoint`), which is
//! the project's own design (Istio configures its waypoint with Envoy's types). Only the fields this project uses are declared; unknown fields from a newer
//! peer are skipped by the decoder, as protobuf intends. Modules nest as the proto packages do
//! (generated code refers across packages by relative path); the short names below are the ones
//! to use.

#![allow(clippy::all, missing_docs)]

pub mod google {
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

pub mod istio {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod v1 {
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

pub mod ambient {
    pub mod waypoint {
        include!(concat!(env!("OUT_DIR"), "/ambient.waypoint.rs"));
    }
}

pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

pub use ambient::waypoint;
pub use envoy::service::discovery::v3 as discovery;
pub use google::rpc;
pub use istio::security;
pub use istio::v1::auth as ca;
pub use istio::workload;

/// Type URL of `istio.workload.Address` resources in xDS.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of `istio.security.Authorization` resources in xDS.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// Type URL of the waypoint's `ambient.waypoint.Route` resources (HTTPRoutes and GRPCRoutes).
pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/ambient.waypoint.Route";
/// Type URL of the waypoint's `ambient.waypoint.Policy` resources (L7 authorization).
pub const WAYPOINT_POLICY_TYPE_URL: &str = "type.googleapis.com/ambient.waypoint.Policy";
/// Ends `system_version_info` of a delta xDS response that is not the last part of a push
/// split across several responses: a proxy should not count itself in sync on it.
pub const PARTIAL_PUSH_SUFFIX: &str = "+partial";
/// gRPC path of the certificate signing call.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// gRPC path of the delta aggregated discovery stream.
pub const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Field numbers are the contract with Istio: check a few on the wire.
    #[test]
    fn field_numbers_match_istio() {
        let w = workload::Workload {
            uid: "u".into(),
            services: [("ns/h".to_string(), workload::PortList::default())].into(),
            ..Default::default()
        };
        let bytes = w.encode_to_vec();
        // uid = 20, length-delimited: tag (20 << 3 | 2) = 162 = varint [0xa2, 0x01].
        assert_eq!(&bytes[..3], &[0xa2, 0x01, 1]);
        let a = security::Authorization {
            rules: vec![security::Rule {
                clauses: vec![security::Clause {
                    matches: vec![security::Match::default()],
                }],
            }],
            ..Default::default()
        };
        // rules = 5 (tag 0x2a) > clauses = 1 (0x0a) > matches = 2 (0x12), empty.
        assert_eq!(a.encode_to_vec(), vec![0x2a, 4, 0x0a, 2, 0x12, 0]);
        let r = ca::IstioCertificateRequest {
            validity_duration: 1,
            ..Default::default()
        };
        // validity_duration = 3, varint: tag 0x18.
        assert_eq!(r.encode_to_vec(), vec![0x18, 1]);
    }

    #[test]
    fn address_round_trips() {
        let a = workload::Address {
            r#type: Some(workload::address::Type::Service(workload::Service {
                name: "echo".into(),
                namespace: "default".into(),
                hostname: "echo.default.svc.cluster.local".into(),
                ..Default::default()
            })),
        };
        let back = workload::Address::decode(a.encode_to_vec().as_slice()).unwrap();
        assert_eq!(a, back);
    }
}

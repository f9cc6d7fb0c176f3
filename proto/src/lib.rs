//! Protobuf messages spoken between istiod-lite, ztunnel and the waypoint.
//!
//! Package names, type URLs and field numbers match Istio's so each side can talk to Istio's
//! own components. Only the fields this project uses are declared; unknown fields from a newer
//! peer are skipped by the decoder, as protobuf intends.

#![allow(clippy::all, missing_docs)]

pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));

    /// Type URL of [`Address`] resources in xDS.
    pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
}

pub mod security {
    include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));

    /// Type URL of [`Authorization`] resources in xDS.
    pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
}

pub mod ca {
    include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));

    /// gRPC path of the certificate signing call.
    pub const CREATE_CERTIFICATE_PATH: &str =
        "/istio.v1.auth.IstioCertificateService/CreateCertificate";
}

pub mod rpc {
    include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
}

pub mod discovery {
    include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));

    /// gRPC path of the delta aggregated discovery stream.
    pub const DELTA_ADS_PATH: &str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
}

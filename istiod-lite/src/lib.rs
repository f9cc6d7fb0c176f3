//! istiod-lite: reads the desired state (a YAML directory or a Kubernetes API server), turns it
//! into workload, service and policy resources, pushes them to every ztunnel as delta xDS, and
//! signs workload certificates.

pub mod app;
pub mod auth;
pub mod ca;
pub mod config;
pub mod debug;
pub mod kubernetes;
pub mod metrics;
pub mod model;
pub mod server;
pub mod source;
pub mod store;
pub mod translate;
pub mod xds;

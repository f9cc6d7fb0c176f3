//! istiod-lite: reads the desired state (a YAML directory or a Kubernetes API server), turns it
//! into workload, service and policy resources, pushes them to every ztunnel as delta xDS, and
//! signs workload certificates.

pub mod model;
pub mod source;
pub mod store;

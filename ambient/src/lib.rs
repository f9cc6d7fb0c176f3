//! The `ambient` CLI: a local mesh in network namespaces from a directory of Kubernetes YAML,
//! and views of what it is doing.

pub mod echo;
pub mod zconfig;

//! The `ambient` CLI: a local mesh in network namespaces from a directory of Kubernetes YAML,
//! and views of what it is doing.

pub mod agent;
pub mod echo;
pub mod exec;
pub mod explain;
pub mod mirror;
pub mod netns;
pub mod status;
pub mod testbed;
pub mod up;
pub mod waypoints;
pub mod zconfig;
pub mod zconfig_live;

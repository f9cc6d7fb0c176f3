//! The waypoint: the optional L7 proxy a namespace, service or workload opts into. It takes
//! HBONE from ztunnels, routes and authorizes each HTTP request by the Gateway API routes and
//! AuthorizationPolicies istiod-lite sends it, and forwards it over HBONE to an endpoint.

pub mod app;
pub mod authz;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod resources;
pub mod routes;
pub mod upstream;

pub use app::Waypoint;
pub use config::Config;

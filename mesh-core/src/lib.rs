//! What both mesh proxies need: SPIFFE identities, mTLS configs, certificates, and HBONE.

pub mod certs;
pub mod crypto;
pub mod devca;
pub mod hbone;
pub mod identity;
pub mod sockets;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

pub use identity::SpiffeId;

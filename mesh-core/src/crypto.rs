//! The one place the crypto provider is chosen.
//!
//! The default build uses `ring`; the `fips` feature swaps in aws-lc-rs in FIPS mode. Both are
//! limited to what HBONE speaks: TLS 1.3 with AES-GCM, and X25519 or NIST curves for key exchange
//! (X25519 is left out under FIPS, which does not approve it).

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

#[cfg(all(feature = "fips", feature = "ring"))]
compile_error!(
    "features `fips` and `ring` are exclusive: build with --no-default-features --features fips"
);
#[cfg(not(any(feature = "fips", feature = "ring")))]
compile_error!("choose a crypto provider: feature `ring` (the default) or `fips`");

#[cfg(all(feature = "fips", not(feature = "ring")))]
use rustls::crypto::aws_lc_rs as backend;
#[cfg(feature = "ring")]
use rustls::crypto::ring as backend;

/// The provider every TLS config in the mesh is built from.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let suites = vec![
                backend::cipher_suite::TLS13_AES_256_GCM_SHA384,
                backend::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ];
            #[cfg(feature = "ring")]
            let kx_groups = vec![
                backend::kx_group::X25519,
                backend::kx_group::SECP256R1,
                backend::kx_group::SECP384R1,
            ];
            #[cfg(all(feature = "fips", not(feature = "ring")))]
            let kx_groups = vec![backend::kx_group::SECP256R1, backend::kx_group::SECP384R1];
            Arc::new(CryptoProvider {
                cipher_suites: suites,
                kx_groups,
                ..backend::default_provider()
            })
        })
        .clone()
}

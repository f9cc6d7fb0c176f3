//! Helpers for tests and benches: certificates from a development CA and a raw HBONE client
//! that can send requests a well-behaved ztunnel never would.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::certs::new_key_and_csr;
use crate::devca::DevCa;
use crate::identity::SpiffeId;
use crate::tls::{self, WorkloadCert};

/// Issues a 1-hour certificate for `id`.
pub fn issue(ca: &DevCa, id: &SpiffeId) -> WorkloadCert {
    let (key, csr) = new_key_and_csr(id).expect("key generation works");
    let chain = ca
        .sign(id, &csr, std::time::Duration::from_secs(3600))
        .expect("the development CA signs a matching CSR");
    WorkloadCert::from_chain(id.clone(), key, &chain).expect("a fresh chain is valid")
}

/// Issues a certificate from `ca` that trusts `roots` instead of `ca`'s own root: a client
/// that accepts a server from another mesh while presenting its own mesh's certificate.
pub fn issue_trusting(ca: &DevCa, id: &SpiffeId, roots: &DevCa) -> WorkloadCert {
    let (key, csr) = new_key_and_csr(id).expect("key generation works");
    let chain = ca
        .sign(id, &csr, std::time::Duration::from_secs(3600))
        .expect("the development CA signs a matching CSR");
    let leaf = tls::parse_pem_certs(&chain[0]).expect("the CA returns PEM");
    WorkloadCert::new(id.clone(), key, leaf, roots.roots().clone()).expect("a fresh leaf is valid")
}

/// Opens mTLS + HTTP/2 to an HBONE server as `cert`, expecting the server to be `expected`.
pub async fn h2_connect(
    cert: &WorkloadCert,
    expected: SpiffeId,
    addr: SocketAddr,
) -> Result<h2::client::SendRequest<Bytes>, Box<dyn std::error::Error + Send + Sync>> {
    let cfg = cert.client_config(vec![expected])?;
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&cfg))
        .connect(tls::placeholder_server_name(), tcp)
        .await?;
    let (send, conn) = crate::hbone::h2_client_builder()
        .handshake::<_, Bytes>(tls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

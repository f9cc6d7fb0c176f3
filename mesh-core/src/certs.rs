//! Certificates for the workloads a proxy serves: fetched on first use, shared by every
//! connection, rotated in the background at half-life, never blocking the data path on rotation.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::identity::SpiffeId;
use crate::tls::{TrustRoots, WorkloadCert};

/// Default certificate lifetime requested from the CA.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// First retry delay after a failed fetch; doubles (with jitter) up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Never refresh more often than this, whatever lifetime the CA granted.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// A CA that has not answered by then is treated as failed.
const SIGN_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed fetch, callers within this time get the same failure instead of each making
/// a CSR of their own.
const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// A PEM chain (leaf first, roots last) or a reason the CA refused.
pub type SignFuture = Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send>>;

/// Somewhere that signs CSRs: the mesh CA, or the development CA in standalone mode.
pub trait CertSource: Send + Sync + 'static {
    fn sign(&self, identity: &SpiffeId, csr_pem: String, ttl: Duration) -> SignFuture;

    /// Roots configured out of band. When given, certificates trust these and a CA response
    /// cannot change what the proxy trusts; when `None`, the last certificate of the CA's
    /// chain is taken as the root (a CA reached over a channel that is itself trusted).
    fn trust_roots(&self) -> Option<TrustRoots> {
        None
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {identity}: {reason}")]
    Fetch { identity: SpiffeId, reason: String },
}

/// What `/config_dump` shows about one identity's certificate.
#[derive(Debug, Clone)]
pub struct CertStatus {
    pub identity: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub state: CertState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertState {
    Valid,
    Expired,
}

/// Holds one certificate per local workload identity.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn CertSource>,
    ttl: Duration,
    slots: Mutex<HashMap<SpiffeId, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<Arc<WorkloadCert>>>,
    last_failure: Mutex<Option<(std::time::Instant, CertError)>>,
    /// Serialises fetches for one identity: a burst of first connections makes one CSR.
    fetching: tokio::sync::Mutex<()>,
    refresher: Mutex<Option<AbortHandle>>,
}

impl Slot {
    fn valid(&self, now: SystemTime) -> Option<Arc<WorkloadCert>> {
        let cur = self.current.lock().expect("cert slot lock poisoned");
        cur.as_ref().filter(|c| !c.is_expired(now)).cloned()
    }

    fn store(&self, cert: Arc<WorkloadCert>) {
        *self.current.lock().expect("cert slot lock poisoned") = Some(cert);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(h) = self.refresher.get_mut().ok().and_then(|h| h.take()) {
            h.abort();
        }
    }
}

impl CertManager {
    pub fn new(source: Arc<dyn CertSource>, ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                ttl,
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The current certificate for `identity`, fetching one if there is none yet. Cheap when a
    /// certificate is held: one map lookup and a reference count.
    pub async fn fetch(&self, identity: &SpiffeId) -> Result<Arc<WorkloadCert>, CertError> {
        let slot = self.slot(identity);
        if let Some(c) = slot.valid(SystemTime::now()) {
            return Ok(c);
        }
        let _guard = slot.fetching.lock().await;
        if let Some(c) = slot.valid(SystemTime::now()) {
            return Ok(c);
        }
        if let Some((at, e)) = &*slot.last_failure.lock().expect("failure lock poisoned")
            && at.elapsed() < FAILURE_HOLD
        {
            return Err(e.clone());
        }
        let cert = match request(&self.inner, identity).await {
            Ok(c) => c,
            Err(e) => {
                *slot.last_failure.lock().expect("failure lock poisoned") =
                    Some((std::time::Instant::now(), e.clone()));
                return Err(e);
            }
        };
        *slot.last_failure.lock().expect("failure lock poisoned") = None;
        slot.store(cert.clone());
        self.ensure_refresher(identity, &slot, &cert);
        Ok(cert)
    }

    /// Forgets identities no local workload uses any more, stopping their rotation.
    pub fn retain(&self, mut keep: impl FnMut(&SpiffeId) -> bool) {
        let mut slots = self.inner.slots.lock().expect("cert map lock poisoned");
        slots.retain(|id, _| {
            let k = keep(id);
            if !k {
                debug!(identity = %id, "certificate released");
            }
            k
        });
    }

    /// Every held certificate, sorted by identity.
    pub fn status(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        let slots = self.inner.slots.lock().expect("cert map lock poisoned");
        let mut out: Vec<_> = slots
            .iter()
            .filter_map(|(id, slot)| {
                let cur = slot.current.lock().expect("cert slot lock poisoned");
                cur.as_ref().map(|c| CertStatus {
                    identity: id.clone(),
                    not_before: c.not_before(),
                    not_after: c.not_after(),
                    state: if c.is_expired(now) {
                        CertState::Expired
                    } else {
                        CertState::Valid
                    },
                })
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn slot(&self, identity: &SpiffeId) -> Arc<Slot> {
        let mut slots = self.inner.slots.lock().expect("cert map lock poisoned");
        slots.entry(identity.clone()).or_default().clone()
    }

    fn ensure_refresher(&self, identity: &SpiffeId, slot: &Arc<Slot>, first: &Arc<WorkloadCert>) {
        let mut refresher = slot.refresher.lock().expect("refresher lock poisoned");
        if refresher.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let weak_slot = Arc::downgrade(slot);
        let identity = identity.clone();
        let mut expiry = first.not_after();
        let handle = tokio::spawn(async move {
            loop {
                let wait = expiry
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    / 2;
                tokio::time::sleep(wait.max(MIN_REFRESH)).await;
                let mut backoff = INITIAL_BACKOFF;
                loop {
                    let (Some(inner), Some(slot)) = (inner.upgrade(), weak_slot.upgrade()) else {
                        return;
                    };
                    match request(&inner, &identity).await {
                        Ok(cert) => {
                            info!(identity = %identity, expiry = ?cert.not_after(), "certificate rotated");
                            expiry = cert.not_after();
                            slot.store(cert);
                            break;
                        }
                        Err(e) => {
                            // Keep serving the old certificate until it truly expires.
                            warn!(error = %e, retry_in = ?backoff, "certificate rotation failed");
                            let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
                            drop((inner, slot));
                            tokio::time::sleep(backoff + jitter).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
        });
        *refresher = Some(handle.abort_handle());
    }
}

async fn request(inner: &Inner, identity: &SpiffeId) -> Result<Arc<WorkloadCert>, CertError> {
    let fail = |reason: String| CertError::Fetch {
        identity: identity.clone(),
        reason,
    };
    let (key, csr) = new_key_and_csr(identity).map_err(|e| fail(e.to_string()))?;
    let chain = tokio::time::timeout(SIGN_TIMEOUT, inner.source.sign(identity, csr, inner.ttl))
        .await
        .map_err(|_| fail(format!("the CA did not answer within {SIGN_TIMEOUT:?}")))?
        .map_err(fail)?;
    let cert = match inner.source.trust_roots() {
        None => WorkloadCert::from_chain(identity.clone(), key, &chain),
        Some(roots) => {
            let mut certs = Vec::new();
            for pem in &chain {
                certs.extend(crate::tls::parse_pem_certs(pem).map_err(|e| fail(e.to_string()))?);
            }
            // The chain ends with the root; the pinned roots stand in for it.
            while certs.len() > 1 && certs.last().is_some_and(|c| roots.ders().contains(c)) {
                certs.pop();
            }
            WorkloadCert::new(identity.clone(), key, certs, roots)
        }
    }
    .map_err(|e| fail(e.to_string()))?;
    debug!(identity = %identity, expiry = ?cert.not_after(), "certificate issued");
    Ok(Arc::new(cert))
}

/// A fresh ECDSA P-256 key and a CSR with an empty subject and one URI SAN.
pub fn new_key_and_csr(
    identity: &SpiffeId,
) -> Result<(PrivateKeyDer<'static>, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((der, csr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devca::DevCa;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        ca: DevCa,
        calls: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl CertSource for Counting {
        fn sign(&self, identity: &SpiffeId, csr: String, ttl: Duration) -> SignFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Box::pin(async { Err("CA unavailable".to_string()) });
            }
            let r = self.ca.sign(identity, &csr, ttl).map_err(|e| e.to_string());
            Box::pin(async move {
                tokio::task::yield_now().await;
                r
            })
        }
    }

    fn counting() -> Arc<Counting> {
        Arc::new(Counting {
            ca: DevCa::generate().unwrap(),
            calls: AtomicUsize::new(0),
            fail: Default::default(),
        })
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[tokio::test]
    async fn a_burst_of_first_uses_makes_one_request() {
        let src = counting();
        let mgr = CertManager::new(src.clone(), DEFAULT_CERT_TTL);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let m = mgr.clone();
                tokio::spawn(async move { m.fetch(&id("a")).await.unwrap() })
            })
            .collect();
        for t in tasks {
            let c = t.await.unwrap();
            assert_eq!(c.identity(), &id("a"));
        }
        assert_eq!(src.calls.load(Ordering::SeqCst), 1);
        assert_eq!(mgr.status().len(), 1);
    }

    #[tokio::test]
    async fn rotates_before_expiry_and_keeps_old_cert_when_ca_fails() {
        let src = counting();
        // X.509 times have whole seconds, so a certificate may end up to 1 s early.
        let mgr = CertManager::new(src.clone(), Duration::from_secs(8));
        let first = mgr.fetch(&id("a")).await.unwrap();
        // Half the remaining life: the refresher replaces it after 3.5-4 s.
        tokio::time::sleep(Duration::from_millis(4500)).await;
        let second = mgr.fetch(&id("a")).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "certificate was not rotated");
        assert!(second.not_after() > first.not_after());
        // The CA goes away: the current certificate keeps being served.
        // The next rotation (about 3.5 s later) fails; the second certificate lasts until at
        // least 11 s.
        src.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(3800)).await;
        let third = mgr.fetch(&id("a")).await.unwrap();
        assert!(Arc::ptr_eq(&second, &third));
        assert!(src.calls.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test]
    async fn a_refusal_names_the_identity() {
        let src = counting();
        src.fail.store(true, Ordering::SeqCst);
        let mgr = CertManager::new(src, DEFAULT_CERT_TTL);
        let err = mgr.fetch(&id("a")).await.unwrap_err().to_string();
        assert!(
            err.contains("spiffe://cluster.local/ns/default/sa/a"),
            "{err}"
        );
        assert!(err.contains("CA unavailable"), "{err}");
    }

    /// A CA that signs correctly but claims another root: pinned roots win.
    struct Pinned {
        ca: DevCa,
        pinned: TrustRoots,
    }

    impl CertSource for Pinned {
        fn sign(&self, identity: &SpiffeId, csr: String, ttl: Duration) -> SignFuture {
            let mut chain = self.ca.sign(identity, &csr, ttl).map_err(|e| e.to_string());
            if let Ok(c) = &mut chain {
                let rogue = DevCa::generate().unwrap();
                *c.last_mut().unwrap() = rogue.roots_pem();
            }
            Box::pin(async move { chain })
        }

        fn trust_roots(&self) -> Option<TrustRoots> {
            Some(self.pinned.clone())
        }
    }

    #[tokio::test]
    async fn pinned_roots_are_trusted_not_the_roots_a_ca_sends() {
        let ca = DevCa::generate().unwrap();
        let pinned = ca.roots().clone();
        let m = CertManager::new(
            Arc::new(Pinned {
                ca,
                pinned: pinned.clone(),
            }),
            DEFAULT_CERT_TTL,
        );
        let cert = m.fetch(&id("a")).await.unwrap();
        assert_eq!(cert.roots().ders(), pinned.ders());
    }

    #[test]
    fn dev_ca_refuses_a_csr_for_another_identity() {
        let ca = DevCa::generate().unwrap();
        let (_, csr) = new_key_and_csr(&id("a")).unwrap();
        let err = ca.sign(&id("b"), &csr, DEFAULT_CERT_TTL).unwrap_err();
        assert!(err.to_string().contains("sa/b"), "{err}");
    }

    #[test]
    fn dev_ca_persists_its_root() {
        let dir = std::env::temp_dir().join(format!("devca-test-{}", fastrand::u64(..)));
        let a = DevCa::load_or_create(&dir).unwrap();
        let b = DevCa::load_or_create(&dir).unwrap();
        assert_eq!(a.roots().ders(), b.roots().ders());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

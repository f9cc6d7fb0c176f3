//! Giving memory back to the system after a burst of connections.
//!
//! glibc's allocator keeps freed memory in per-thread arenas, so after a thousand connections
//! close the process would stay at its peak size. Once many connections have closed since the
//! high-water mark, the allocator's free memory is handed back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::debug;

use crate::proxy::ProxyState;

const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Trim once this many connections have closed since the high-water mark.
const CLOSED_BEFORE_TRIM: usize = 128;

pub async fn trim_after_bursts(state: Arc<ProxyState>) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let active = state.active_connections();
        let peak = state.peak.load(Ordering::Relaxed);
        if peak >= active + CLOSED_BEFORE_TRIM {
            state.peak.store(active, Ordering::Relaxed);
            // Walking the heap can take a moment; keep it off the proxy's threads.
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    let released = unsafe { libc::malloc_trim(0) };
    debug!(
        released = released != 0,
        "returned free memory to the system"
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {
    debug!("no allocator trim on this platform");
}

//! Where the desired state comes from. Each source feeds the one [`Store`]; translation never
//! knows which source an object came from.

use std::future::Future;
use std::pin::Pin;

use crate::store::Store;

pub mod dir;
pub mod kube;

/// A running source of Kubernetes objects.
pub trait Source: Send + 'static {
    /// What to call the source in logs (`directory ./examples/mesh`).
    fn describe(&self) -> String;

    /// Loads the current state into `store`, then keeps it up to date until the future is
    /// dropped. Returns only on an error it cannot retry past.
    fn run(
        self: Box<Self>,
        store: Store,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
}

//! A live Kubernetes API server as a source: list, then watch, each kind.
//!
//! Written by hand over hyper rather than with kube-rs: it keeps the build small, and reading
//! each object on its own lets one broken object keep its last good version while every other
//! object is applied. Each kind in [`Kind::ALL`] is reflected by its own task:
//!
//! 1. list it page by page and replace everything held under `kubernetes/<Kind>`, so objects
//!    deleted while disconnected disappear;
//! 2. watch from the list's resource version, applying ADDED / MODIFIED / DELETED one object at
//!    a time and following BOOKMARKs;
//! 3. on a dropped connection, watch again from the last version seen (exponential backoff with
//!    jitter); on 410 Gone, list again.
//!
//! An object that does not parse is reported under its own origin
//! (`kubernetes/Pod/apps/web-0`), so fixing it clears only its error, and keeps the version it
//! had. A kind the server does not serve (a CRD not installed) is retried slowly without
//! holding up the others.

use std::future::Future;
use std::pin::Pin;

use bytes::{Buf, Bytes, BytesMut};
use tokio::task::JoinSet;
use tracing::{error, info};

use super::Source;
use crate::model::Kind;
use crate::store::Store;

mod client;
mod config;
mod review;
mod watch;

pub use client::{KubeClient, KubeError};
pub use config::{
    CA_PATH, DEFAULT_REQUEST_TIMEOUT, KubeConfig, SERVICE_HOST_ENV, SERVICE_PORT_ENV, TOKEN_PATH,
};
pub use review::ReviewedToken;

/// The longest watch event accepted. The API server caps objects at about 1.5 MiB of etcd
/// storage, so anything near this is not an API server speaking.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// Every understood kind from one API server, each listed then watched by its own task.
pub struct KubeSource {
    client: KubeClient,
    kinds: Vec<Kind>,
    synced: InitialSync,
}

/// Tells when every kind has been listed once (a kind the server does not serve counts as
/// listed, empty), so nothing is served from a partly filled store.
#[derive(Clone, Default)]
pub struct InitialSync {
    pending: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<Kind>>>,
    done: std::sync::Arc<tokio::sync::Notify>,
}

impl InitialSync {
    fn expect(&self, kinds: &[Kind]) {
        self.pending
            .lock()
            .expect("sync lock poisoned")
            .extend(kinds.iter().copied());
    }

    pub(crate) fn listed(&self, kind: Kind) {
        let mut p = self.pending.lock().expect("sync lock poisoned");
        if p.remove(&kind) && p.is_empty() {
            self.done.notify_waiters();
        }
    }

    /// Kinds not listed yet.
    pub fn pending(&self) -> Vec<Kind> {
        self.pending
            .lock()
            .expect("sync lock poisoned")
            .iter()
            .copied()
            .collect()
    }

    /// Resolves once every kind has been listed.
    pub async fn wait(&self) {
        loop {
            let notified = self.done.notified();
            if self.pending().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// Splits a byte stream into newline-terminated lines without holding more than a bounded
/// amount of a line that has not ended yet.
#[derive(Debug)]
pub(crate) struct LineFramer {
    buf: BytesMut,
    /// Bytes at the front of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
}

/// A line grew past the limit before its newline arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LineTooLong {
    pub(crate) limit: usize,
}

impl KubeSource {
    /// Reflects every kind in [`Kind::ALL`].
    pub fn new(client: KubeClient) -> Self {
        let synced = InitialSync::default();
        synced.expect(&Kind::ALL);
        Self {
            client,
            kinds: Kind::ALL.to_vec(),
            synced,
        }
    }

    /// Tracks the first list of every kind; take it before `run`.
    pub fn initial_sync(&self) -> InitialSync {
        self.synced.clone()
    }

    /// Reflects only `kinds`, for a deployment that gets the others elsewhere.
    pub fn with_kinds(mut self, kinds: &[Kind]) -> Self {
        self.kinds = kinds.to_vec();
        self.synced = InitialSync::default();
        self.synced.expect(kinds);
        self
    }

    /// The origin objects of `kind` are stored under.
    pub fn origin(kind: Kind) -> String {
        format!("kubernetes/{kind}")
    }
}

impl Source for KubeSource {
    fn describe(&self) -> String {
        format!("kubernetes API server {}", self.client.base_url())
    }

    fn run(
        self: Box<Self>,
        store: Store,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> {
        Box::pin(async move {
            info!(server = %self.client.base_url(), kinds = self.kinds.len(), "watching the Kubernetes API");
            // Dropping the set (the future being dropped) aborts every reflector.
            if self.kinds.is_empty() {
                anyhow::bail!("no Kubernetes kinds to watch");
            }
            let mut tasks = JoinSet::new();
            for kind in self.kinds {
                tasks.spawn(
                    watch::Reflector::new(self.client.clone(), store.clone(), kind)
                        .run(self.synced.clone()),
                );
            }
            while let Some(done) = tasks.join_next().await {
                // Reflectors loop forever; ending means a bug, so stop rather than serve a
                // silently frozen kind.
                if let Err(e) = done {
                    error!(error = %e, "a Kubernetes reflector stopped");
                    anyhow::bail!("a Kubernetes reflector stopped: {e}");
                }
            }
            Ok(())
        })
    }
}

impl LineFramer {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            max,
        }
    }

    /// Appends received bytes. Call [`LineFramer::next_line`] until it returns `None` after each.
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line without its `\n` (or `\r\n`); empty lines are skipped.
    pub(crate) fn next_line(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        loop {
            let Some(at) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max {
                    return Err(LineTooLong { limit: self.max });
                }
                return Ok(None);
            };
            let end = self.scanned + at;
            self.scanned = 0;
            if end > self.max {
                return Err(LineTooLong { limit: self.max });
            }
            let mut line = self.buf.split_to(end).freeze();
            self.buf.advance(1);
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
            if !line.is_empty() {
                return Ok(Some(line));
            }
        }
    }

    /// Whatever followed the last newline when the stream ended.
    pub(crate) fn rest(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        let rest = self.buf.split().freeze();
        (!rest.iter().all(u8::is_ascii_whitespace)).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(f: &mut LineFramer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(line) = f.next_line().unwrap() {
            out.push(String::from_utf8(line.to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn lines_split_across_chunks_are_joined() {
        let mut f = LineFramer::new(64);
        f.push(b"{\"type\":\"ADD");
        assert!(drain(&mut f).is_empty());
        f.push(b"ED\"}\n{\"type\":");
        assert_eq!(drain(&mut f), vec![r#"{"type":"ADDED"}"#]);
        f.push(b"\"BOOKMARK\"}\r\n\n{\"a\":1}\n{\"b\"");
        assert_eq!(drain(&mut f), vec![r#"{"type":"BOOKMARK"}"#, r#"{"a":1}"#]);
        assert_eq!(f.rest().as_deref(), Some(&b"{\"b\""[..]));
        assert_eq!(f.rest(), None);
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut f = LineFramer::new(64);
        let mut out = Vec::new();
        for b in b"one\ntwo\nthree\n" {
            f.push(&[*b]);
            out.extend(drain(&mut f));
        }
        assert_eq!(out, vec!["one", "two", "three"]);
        assert_eq!(f.rest(), None);
    }

    #[test]
    fn a_line_exactly_at_the_limit_is_accepted() {
        let mut f = LineFramer::new(4);
        f.push(b"abcd");
        assert_eq!(f.next_line(), Ok(None));
        f.push(b"\nxy\n");
        assert_eq!(drain(&mut f), vec!["abcd", "xy"]);
    }

    #[test]
    fn an_over_long_line_is_rejected_before_its_newline_arrives() {
        let mut f = LineFramer::new(8);
        f.push(b"ok\n12345");
        assert_eq!(f.next_line(), Ok(Some(Bytes::from_static(b"ok"))));
        assert_eq!(f.next_line(), Ok(None));
        f.push(b"6789");
        assert_eq!(f.next_line(), Err(LineTooLong { limit: 8 }));
    }

    #[test]
    fn an_over_long_line_arriving_whole_is_rejected() {
        let mut f = LineFramer::new(8);
        f.push(b"123456789\nok\n");
        assert_eq!(f.next_line(), Err(LineTooLong { limit: 8 }));
    }
}

//! RequestMirror: a copy of the request, body included, sent to another backend whose answer
//! is ignored. The original never waits for its copies: the body is teed frame by frame into
//! a small bounded queue per copy, and a copy that falls behind (or whose original ends early
//! or fails) is abandoned mid-body, so its backend sees a reset request, never a truncated one
//! passed off as whole.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::sync::mpsc;
use tracing::debug;
use ztunnel::state::Workload;

use crate::upstream::{self, Body, BoxError, Lease, Upstreams, Version};

/// Frames a copy may lag behind its original before it is abandoned.
const MIRROR_QUEUE_FRAMES: usize = 32;

/// A copy of a request, addressed and with its endpoint leased, waiting for its body.
pub(super) struct Mirror {
    pub(super) req: Request<()>,
    pub(super) workload: Arc<Workload>,
    pub(super) lease: Lease,
    pub(super) version: Version,
}

impl Mirror {
    /// Sends the copy with `body` in the background and ignores the answer (its status still
    /// counts for the endpoint's outlier detection).
    pub(super) fn send(self, upstreams: &Arc<Upstreams>, body: Body) {
        let Mirror {
            req,
            workload,
            lease,
            version,
        } = self;
        let req = req.map(|()| body);
        let upstreams = Arc::clone(upstreams);
        tokio::spawn(async move {
            let ok = match upstreams.send(&workload, lease.addr, version, req).await {
                Ok(resp) => {
                    let ok = resp.status().as_u16() < 500;
                    let _ = resp.into_body().collect().await;
                    ok
                }
                Err(e) => {
                    debug!(error = %e, "mirrored request failed");
                    false
                }
            };
            lease.done(ok);
        });
    }
}

/// Splits `body` into the original (to send upstream) and `n` copies of it.
pub(super) fn tee(body: Body, n: usize) -> (Body, Vec<Body>) {
    if body.is_end_stream() {
        // Nothing to copy, and nothing may ever poll the original.
        return (body, (0..n).map(|_| upstream::empty()).collect());
    }
    let mut senders = Vec::with_capacity(n);
    let mut copies = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mpsc::channel(MIRROR_QUEUE_FRAMES);
        let complete = Arc::new(AtomicBool::new(false));
        senders.push(CopySender {
            tx,
            complete: Arc::clone(&complete),
        });
        copies.push(
            MirrorBody {
                rx,
                complete,
                hint: body.size_hint(),
            }
            .boxed(),
        );
    }
    let original = Tee {
        inner: body,
        senders,
    }
    .boxed();
    (original, copies)
}

/// The original body, handing a copy of each frame to every copy still keeping up.
struct Tee {
    inner: Body,
    senders: Vec<CopySender>,
}

struct CopySender {
    tx: mpsc::Sender<Frame<Bytes>>,
    /// Set when the original has ended normally and this copy kept up to the end; a copy
    /// that sees its queue close without it was abandoned.
    complete: Arc<AtomicBool>,
}

impl Tee {
    fn finish(&mut self) {
        for s in self.senders.drain(..) {
            s.complete.store(true, Ordering::Release);
        }
    }
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let copy = || match (frame.data_ref(), frame.trailers_ref()) {
                    (Some(d), _) => Some(Frame::data(d.clone())),
                    (None, Some(t)) => Some(Frame::trailers(t.clone())),
                    (None, None) => None,
                };
                // A copy that cannot take the frame now is dropped, not waited for.
                self.senders
                    .retain(|s| copy().is_some_and(|f| s.tx.try_send(f).is_ok()));
                // A body that knows it is over may never be polled for its end.
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => self.senders.clear(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One copy of the body, fed by its [`Tee`].
struct MirrorBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
    complete: Arc<AtomicBool>,
    hint: SizeHint,
}

impl hyper::body::Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(f)) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) if self.complete.load(Ordering::Acquire) => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(
                "the mirrored request fell behind the original, or the original's body failed"
                    .into(),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn body_of(chunks: Vec<Result<&'static str, &'static str>>) -> Body {
        let frames = chunks.into_iter().map(|c| {
            c.map(|s| Frame::data(Bytes::from_static(s.as_bytes())))
                .map_err(BoxError::from)
        });
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn copies_get_every_frame_of_a_body_that_ends_well() {
        let (original, copies) = tee(body_of(vec![Ok("hello "), Ok("world")]), 2);
        let sent = original.collect().await.unwrap().to_bytes();
        assert_eq!(sent, "hello world");
        for c in copies {
            assert_eq!(c.collect().await.unwrap().to_bytes(), "hello world");
        }
    }

    #[tokio::test]
    async fn a_copy_of_a_failed_body_fails_rather_than_ending_short() {
        let (original, mut copies) = tee(body_of(vec![Ok("part"), Err("reset")]), 1);
        assert!(original.collect().await.is_err());
        assert!(copies.remove(0).collect().await.is_err());
    }

    #[tokio::test]
    async fn a_copy_that_falls_behind_is_abandoned_and_the_original_goes_on() {
        let chunks: Vec<Result<&str, &str>> =
            (0..MIRROR_QUEUE_FRAMES + 5).map(|_| Ok("x")).collect();
        let (original, mut copies) = tee(body_of(chunks), 1);
        // The original is read to its end before the copy reads anything.
        let sent = original.collect().await.unwrap().to_bytes();
        assert_eq!(sent.len(), MIRROR_QUEUE_FRAMES + 5);
        assert!(copies.remove(0).collect().await.is_err());
    }

    #[tokio::test]
    async fn a_body_that_says_it_is_over_completes_its_copies() {
        // hyper stops polling a body once `is_end_stream` says so: the copy must still end.
        let (mut original, mut copies) = tee(upstream::full(Bytes::from_static(b"all")), 1);
        let frame = original.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "all");
        assert!(original.is_end_stream());
        drop(original);
        assert_eq!(copies.remove(0).collect().await.unwrap().to_bytes(), "all");
        let (_, mut copies) = tee(upstream::empty(), 1);
        assert!(
            copies
                .remove(0)
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn an_original_dropped_before_its_end_abandons_its_copies() {
        let (original, mut copies) = tee(body_of(vec![Ok("a"), Ok("b")]), 1);
        drop(original);
        assert!(copies.remove(0).collect().await.is_err());
    }
}

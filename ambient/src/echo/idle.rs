//! Closes connections that sit idle: a stream wrapper whose reads and writes fail with
//! `TimedOut` once no byte has moved in either direction for the configured time.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep, sleep};

pub struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        IdleTimeout {
            inner,
            timeout,
            deadline: Box::pin(sleep(timeout)),
        }
    }

    /// Bytes moved: the connection is not idle, push the deadline out.
    fn touch(&mut self) {
        // A timeout too large to add to now never fires, which is what its caller asked for.
        if let Some(deadline) = Instant::now().checked_add(self.timeout) {
            self.deadline.as_mut().reset(deadline);
        }
    }

    /// Called when the inner stream is pending: registers for the deadline and fails once it
    /// has passed.
    fn poll_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connection idle for {:?}", self.timeout),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn settle<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.touch();
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_deadline(cx),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.settle(polled, cx)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.settle(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.settle(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.settle(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.settle(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    const IDLE: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn read_fails_after_idle_time() {
        let (near, _far) = duplex(64);
        let mut idle = IdleTimeout::new(near, IDLE);
        let started = Instant::now();
        let err = idle.read(&mut [0; 8]).await.expect_err("nothing was sent");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= IDLE);
    }

    #[tokio::test]
    async fn traffic_keeps_the_connection_open() {
        let (near, mut far) = duplex(64);
        let mut idle = IdleTimeout::new(near, IDLE);
        let started = Instant::now();
        // Each byte comes after 60% of the idle time, so only the reset keeps the reader alive.
        let writer = async {
            for _ in 0..4 {
                tokio::time::sleep(IDLE * 6 / 10).await;
                far.write_all(b"x").await.expect("peer writes");
            }
        };
        let reader = async {
            for _ in 0..4 {
                assert_eq!(idle.read(&mut [0; 8]).await.expect("byte arrives"), 1);
            }
        };
        tokio::join!(writer, reader);
        assert!(
            started.elapsed() > 2 * IDLE,
            "outlived two idle periods thanks to traffic"
        );
    }
}

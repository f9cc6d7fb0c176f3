//! A CONNECT stream as an ordinary byte stream (`AsyncRead + AsyncWrite`), for code that speaks
//! a protocol over the tunnel rather than copying it: the waypoint runs HTTP over it.
//!
//! Received data is handed out as it arrives and its flow-control capacity released once it has
//! been read, so a slow reader slows the sender. Writes reserve send capacity first and queue at
//! most what the peer's window allows. Shutting down the write side sends END_STREAM.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{H2Stream, is_graceful_reset};

/// The most queued in one write: large writes are split, so one caller cannot queue megabytes.
const MAX_WRITE: usize = 256 * 1024;

/// An HBONE stream read and written as bytes.
pub struct StreamIo {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    read_done: bool,
    write_done: bool,
    /// The pool slot of a pooled stream, freed when the stream goes.
    _slot: Option<super::pool::StreamSlot>,
}

impl StreamIo {
    pub fn new(stream: H2Stream) -> Self {
        Self {
            send: stream.send,
            recv: stream.recv,
            pending: Bytes::new(),
            read_done: false,
            write_done: false,
            _slot: None,
        }
    }

    pub(super) fn holding(stream: H2Stream, slot: super::pool::StreamSlot) -> Self {
        let mut io = Self::new(stream);
        io._slot = Some(slot);
        io
    }

    /// Gives back bytes already read (a protocol sniffer's peek): they are read again first.
    pub fn unread(&mut self, bytes: Bytes) {
        if self.pending.is_empty() {
            self.pending = bytes;
        } else {
            let mut joined = Vec::with_capacity(bytes.len() + self.pending.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.pending);
            self.pending = joined.into();
        }
    }

    /// Aborts the stream: the peer sees a reset, not a clean end.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::other("HTTP/2 I/O error"),
        }
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending.is_empty() && !this.read_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = this.recv.flow_control().release_capacity(chunk.len());
                    this.pending = chunk;
                }
                Some(Err(e)) if is_graceful_reset(&e) => this.read_done = true,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => this.read_done = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = buf.len().min(MAX_WRITE);
        this.send.reserve_capacity(want);
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(want);
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data is handed to the connection as it is written; the connection task sends it.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.write_done {
            this.write_done = true;
            if let Err(e) = this.send.send_data(Bytes::new(), true)
                && !is_graceful_reset(&e)
            {
                return Poll::Ready(Err(to_io(e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A client and server stream joined by an in-memory HTTP/2 connection.
    async fn pair() -> (StreamIo, StreamIo) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            StreamIo::new(H2Stream {
                send,
                recv: req.into_body(),
            })
        });
        let (client, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (resp, send) = client.send_request(req, false).unwrap();
        let server = server.await.unwrap();
        let recv = resp.await.unwrap().into_body();
        (StreamIo::new(H2Stream { send, recv }), server)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_shutdown_is_end_of_stream() {
        let (mut client, mut server) = pair().await;
        // More than one flow-control window's worth, so capacity must be released.
        let big = vec![7u8; 3 * 1024 * 1024];
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                client.write_all(&big).await.unwrap();
                client.shutdown().await.unwrap();
                client
            })
        };
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), big.len());
        assert!(got == big);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        let mut client = writer.await.unwrap();
        let mut back = String::new();
        client.read_to_string(&mut back).await.unwrap();
        assert_eq!(back, "done");
    }

    #[tokio::test]
    async fn unread_bytes_come_first() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"world").await.unwrap();
        client.shutdown().await.unwrap();
        let mut first = [0u8; 2];
        server.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"wo");
        server.unread(Bytes::from_static(b"hello "));
        let mut rest = String::new();
        server.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "hello rld");
    }

    #[tokio::test]
    async fn a_reset_is_an_error_unless_it_is_a_normal_close() {
        let mut buf = [0u8; 8];
        let (mut client, mut server) = pair().await;
        client.send.send_reset(h2::Reason::INTERNAL_ERROR);
        assert!(server.read(&mut buf).await.is_err());
        // CANCEL is how Istio's ztunnel ends a stream normally: it reads as the end.
        let (mut client, mut server) = pair().await;
        client.reset();
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }
}

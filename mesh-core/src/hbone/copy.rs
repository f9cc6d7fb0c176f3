//! Copying bytes between a TCP connection and an HBONE stream, both ways, with half-close.
//!
//! No buffer is held while a connection is idle: a read buffer is taken only once the socket is
//! readable, and HTTP/2 flow control bounds what is in flight the other way.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{H2Stream, is_graceful_reset};

/// Smallest and largest read from TCP; reads grow while they keep filling the buffer.
const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

/// Bytes moved so far, readable while the copy runs.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// From the TCP side into the tunnel.
    pub sent: AtomicU64,
    /// From the tunnel out to the TCP side.
    pub received: AtomicU64,
}

impl ByteCounters {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Why a copy ended early.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("TCP side: {0}")]
    Tcp(#[from] io::Error),
    #[error("tunnel side: {0}")]
    Tunnel(#[from] h2::Error),
}

/// Copies until both directions have finished. A FIN from TCP becomes END_STREAM, and
/// END_STREAM (or a NO_ERROR/CANCEL reset) becomes a FIN.
pub async fn copy_bidirectional(
    tcp: TcpStream,
    stream: H2Stream,
    counters: &ByteCounters,
) -> Result<(), CopyError> {
    let (r, w) = tcp.into_split();
    let H2Stream { mut send, recv } = stream;
    let up = tcp_to_tunnel(r, &mut send, &counters.sent);
    let down = tunnel_to_tcp(recv, w, &counters.received);
    let res = tokio::try_join!(up, down).map(|_| ());
    if res.is_err() {
        // Tell the peer this stream is over rather than leaving it half-open.
        send.send_reset(h2::Reason::CANCEL);
    }
    res
}

async fn tcp_to_tunnel(
    r: OwnedReadHalf,
    send: &mut h2::SendStream<Bytes>,
    n: &AtomicU64,
) -> Result<(), CopyError> {
    let mut want = MIN_READ;
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() < MIN_READ / 4 {
            buf = BytesMut::with_capacity(want);
        }
        let cap = buf.capacity();
        let read = match r.try_read_buf(&mut buf) {
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Idle: hold no buffer while waiting.
                buf = BytesMut::new();
                r.readable().await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if read == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        if read == cap {
            want = (want * 2).min(MAX_READ);
        }
        n.fetch_add(read as u64, Ordering::Relaxed);
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted?,
                None => return Err(h2::Error::from(h2::Reason::CANCEL).into()),
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            send.send_data(chunk, false)?;
        }
    }
}

async fn tunnel_to_tcp(
    mut recv: h2::RecvStream,
    mut w: OwnedWriteHalf,
    n: &AtomicU64,
) -> Result<(), CopyError> {
    loop {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let len = chunk.len();
                w.write_all(&chunk).await?;
                n.fetch_add(len as u64, Ordering::Relaxed);
                // Released only once written, so a slow reader slows the sender.
                let _ = recv.flow_control().release_capacity(len);
            }
            Some(Err(e)) if is_graceful_reset(&e) => break,
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    w.shutdown().await?;
    Ok(())
}

//! Copying bytes between a TCP connection and an HBONE stream, both ways, with half-close.
//!
//! - A FIN from TCP becomes END_STREAM; END_STREAM (or RST_STREAM with NO_ERROR or CANCEL,
//!   which Istio's ztunnel uses for a normal close) becomes a FIN.
//! - A failure on the TCP side is sent as RST_STREAM(CONNECT_ERROR) (RFC 9113 §8.5), and any
//!   other reset from the peer resets the local socket: a cut-off transfer never looks complete.
//! - No buffer is held while a connection is idle: a read buffer is taken only once the socket is
//!   readable. Small reads are copied out so a queued chunk never pins a large buffer, and
//!   HTTP/2 send capacity is reserved before data is queued.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::WriteHalf;

use super::{H2Stream, is_graceful_reset};

/// Smallest and largest read from TCP; reads grow while they fill the buffer and shrink
/// when they come back short.
const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Reads up to this size are copied into a buffer of their own.
const SMALL_READ: usize = 4 * 1024;

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
    #[error("peer reset the stream ({0:?})")]
    Reset(h2::Reason),
}

/// Copies until both directions have finished.
pub async fn copy_bidirectional(
    mut tcp: TcpStream,
    stream: H2Stream,
    counters: &ByteCounters,
) -> Result<(), CopyError> {
    // Borrowed halves: unlike owned ones, dropping the write half does not send a FIN, so an
    // aborted copy ends in a reset rather than in what looks like a clean close.
    let (r, w) = tcp.split();
    let H2Stream { mut send, recv } = stream;
    let up = tcp_to_tunnel(r.as_ref(), &mut send, &counters.sent);
    let down = tunnel_to_tcp(recv, w, &counters.received);
    let res = tokio::try_join!(up, down).map(|_| ());
    if let Err(e) = &res {
        if matches!(e, CopyError::Tcp(_)) {
            send.send_reset(h2::Reason::CONNECT_ERROR);
        } else {
            send.send_reset(h2::Reason::CANCEL);
            abort(&tcp);
        }
    }
    res
}

/// What ended a wait on the TCP socket.
enum Wake {
    Readable(io::Result<()>),
    Reset(Result<h2::Reason, h2::Error>),
}

async fn tcp_to_tunnel(
    r: &TcpStream,
    send: &mut h2::SendStream<Bytes>,
    n: &AtomicU64,
) -> Result<(), CopyError> {
    let mut want = MIN_READ;
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() < SMALL_READ {
            buf = BytesMut::with_capacity(want);
        }
        let cap = buf.capacity();
        let read = match r.try_read_buf(&mut buf) {
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Idle: hold no buffer, and notice if the peer gives up on the stream.
                buf = BytesMut::new();
                let wake = tokio::select! {
                    ready = r.readable() => Wake::Readable(ready),
                    reset = poll_fn(|cx| send.poll_reset(cx)) => Wake::Reset(reset),
                };
                match wake {
                    Wake::Readable(ready) => ready?,
                    Wake::Reset(reset) => {
                        return peer_reset(reset).inspect_err(|_| abort(r));
                    }
                }
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
        } else if read < cap / 4 {
            want = (want / 2).max(MIN_READ);
        }
        let mut data = if read <= SMALL_READ {
            let small = Bytes::copy_from_slice(&buf);
            buf.clear();
            small
        } else {
            buf.split().freeze()
        };
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted?,
                // The stream can no longer send: the peer reset it.
                None => {
                    let reset = poll_fn(|cx| send.poll_reset(cx)).await;
                    return peer_reset(reset).inspect_err(|_| abort(r));
                }
            };
            let chunk = data.split_to(granted.min(data.len()));
            let len = chunk.len() as u64;
            send.send_data(chunk, false)?;
            n.fetch_add(len, Ordering::Relaxed);
        }
    }
}

/// A reset from the peer: the end of this direction if graceful, an error otherwise.
fn peer_reset(reset: Result<h2::Reason, h2::Error>) -> Result<(), CopyError> {
    match reset {
        Ok(h2::Reason::NO_ERROR) | Ok(h2::Reason::CANCEL) => Ok(()),
        Ok(reason) => Err(CopyError::Reset(reason)),
        Err(e) if is_graceful_reset(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn tunnel_to_tcp(
    mut recv: h2::RecvStream,
    mut w: WriteHalf<'_>,
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
            Some(Err(e)) => {
                abort(w.as_ref());
                return Err(e.into());
            }
            None => break,
        }
    }
    w.shutdown().await?;
    Ok(())
}

/// Makes the local peer see a reset (RST) rather than a clean end when the socket closes: the
/// far side failed, so what it received may be cut short.
fn abort(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

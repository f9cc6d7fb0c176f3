//! Raw TCP echo: a greeting line naming the server and both ends of the connection, then every
//! byte back until the client half-closes.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::server::Conn;

/// Bytes copied per read; one buffer per connection, reused.
const BUF_LEN: usize = 16 * 1024;

/// Serves one connection; returns how many bytes were echoed.
pub async fn echo<S>(mut stream: S, conn: &Conn) -> io::Result<u64>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(greeting(conn).as_bytes()).await?;
    let mut buf = vec![0u8; BUF_LEN];
    let mut echoed = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).await?;
        echoed += n as u64;
    }
    stream.shutdown().await?;
    Ok(echoed)
}

/// `echo <namespace>/<pod> <localAddr> from <remoteAddr>`, newline-terminated.
pub fn greeting(conn: &Conn) -> String {
    format!(
        "echo {}/{} {} from {}\n",
        conn.identity.namespace, conn.identity.pod, conn.local, conn.remote
    )
}

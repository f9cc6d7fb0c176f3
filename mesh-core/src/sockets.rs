//! Socket options the standard library and socket2 do not cover.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

/// Parses a listen address flag: `ip:port`, or `off` for no listener.
pub fn parse_listen_addr(flag: &str, value: &str) -> Result<Option<SocketAddr>, String> {
    if value == "off" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| format!("{flag}: {value:?} is not an ip:port (or \"off\")"))
}

/// Binds `addr` if there is one; the error names the listener (`what`) and the address.
pub async fn bind_optional(
    addr: Option<SocketAddr>,
    what: &str,
) -> io::Result<Option<tokio::net::TcpListener>> {
    match addr {
        None => Ok(None),
        Some(a) => tokio::net::TcpListener::bind(a)
            .await
            .map(Some)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("binding the {what} listener on {a}: {e}"))
            }),
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: binding a source address then defers choosing the port to
/// `connect`, which can reuse a port for different destinations. Without it, every bind reserves
/// a port outright and busy clients run out of ports (or crawl searching for one) long before
/// the four-tuple space is used.
#[allow(unsafe_code)]
pub fn set_bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is valid for the lifetime of `socket`; `one` is a live c_int and its exact
    // size is passed, so the kernel reads only within it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

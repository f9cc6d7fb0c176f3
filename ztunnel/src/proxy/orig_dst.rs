//! The destination a connection had before netfilter redirected it to ztunnel.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST` share this number.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination a redirected connection was headed for; logs why and returns `None` when
/// there is none (the caller resets the connection).
pub fn redirected_dst(
    stream: &TcpStream,
    peer: SocketAddr,
    component: &'static str,
) -> Option<SocketAddr> {
    match original_dst(stream) {
        Ok(Some(dst)) => Some(dst),
        Ok(None) => {
            tracing::warn!(%peer, component, "connection was not redirected; no original destination");
            None
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, component, "reading original destination failed");
            None
        }
    }
}

/// The pre-redirection destination of `stream`, or `None` if it was not redirected.
pub fn original_dst(stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
    let local = stream.local_addr()?;
    let dst = match local {
        SocketAddr::V4(_) => getsockopt_v4(stream)?,
        SocketAddr::V6(_) => getsockopt_v6(stream)?,
    };
    Ok(dst.filter(|d| *d != local))
}

#[allow(unsafe_code)]
fn getsockopt_v4(stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
    // SAFETY: `addr` is a plain C struct for which all-zero bytes are a valid value, and `len`
    // tells the kernel its exact size, so it writes within it.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the fd is valid for the lifetime of `stream`; the pointers refer to live locals.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return not_redirected(io::Error::last_os_error());
    }
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(Some(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(addr.sin_port),
    ))))
}

#[allow(unsafe_code)]
fn getsockopt_v6(stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
    // SAFETY: as above, for sockaddr_in6.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: the fd is valid for the lifetime of `stream`; the pointers refer to live locals.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IPV6,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return not_redirected(io::Error::last_os_error());
    }
    let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
    Ok(Some(SocketAddr::V6(SocketAddrV6::new(
        ip,
        u16::from_be(addr.sin6_port),
        addr.sin6_flowinfo,
        addr.sin6_scope_id,
    ))))
}

/// ENOENT means no conntrack entry (the connection was not NATed); anything else is a real error.
fn not_redirected(e: io::Error) -> io::Result<Option<SocketAddr>> {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOPROTOOPT) => Ok(None),
        _ => Err(e),
    }
}

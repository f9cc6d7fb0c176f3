//! The node agent ↔ ztunnel protocol: JSON messages over a unix `SOCK_SEQPACKET` socket, one
//! message per packet, a pod's network namespace passed alongside as a descriptor
//! (`SCM_RIGHTS`). The agent listens; ztunnel connects, and on every (re)connection the agent
//! sends every pod it has captured, then `snapshotSent`. ztunnel answers each message with a
//! [`Reply`] once it has acted on it: for `add`, once the pod's listeners are open.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

/// Largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// A pod handed to ztunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodInfo {
    /// Istio's workload uid: `<cluster>//Pod/<namespace>/<name>`.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
}

/// Agent → ztunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", deny_unknown_fields)]
pub enum Request {
    /// Capture this pod; its network namespace travels with the message.
    Add { pod: PodInfo },
    /// Stop capturing this pod (its redirection rules are already gone).
    Del { uid: String },
    /// Every captured pod has been sent: pods ztunnel holds that were not are gone.
    SnapshotSent,
}

/// ztunnel → agent, one per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reply {
    /// Why the request failed; `None` when done.
    pub error: Option<String>,
}

/// A new `SOCK_SEQPACKET` unix socket.
pub fn seqpacket() -> io::Result<Socket> {
    Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
}

/// Connects to the agent's socket at `path`.
pub fn connect(path: &Path) -> io::Result<Socket> {
    let s = seqpacket()?;
    s.connect(&SockAddr::unix(path)?)?;
    Ok(s)
}

/// Listens at `path`, replacing a socket file left by an earlier run.
pub fn listen(path: &Path) -> io::Result<Socket> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let s = seqpacket()?;
    s.bind(&SockAddr::unix(path)?)?;
    s.listen(16)?;
    Ok(s)
}

/// Sends one message, with `fd` attached when given.
pub fn send<T: Serialize>(sock: &Socket, msg: &T, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(io::Error::other(format!(
            "message of {} bytes is over the {MAX_MESSAGE}-byte limit",
            bytes.len()
        )));
    }
    sendmsg(sock.as_raw_fd(), &bytes, fd.map(|f| f.as_raw_fd()))
}

/// Receives one message and the descriptor that came with it. `Ok(None)` when the peer
/// closed the connection.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: &Socket,
) -> io::Result<Option<(T, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let Some((n, fd)) = recvmsg(sock.as_raw_fd(), &mut buf)? else {
        return Ok(None);
    };
    let msg = serde_json::from_slice(&buf[..n]).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "malformed message ({e}): {}",
                String::from_utf8_lossy(&buf[..n.min(200)])
            ),
        )
    })?;
    Ok(Some((msg, fd)))
}

/// Room for one descriptor's control message (CMSG_SPACE(4) is 24 on 64-bit Linux).
const CONTROL_LEN: usize = 64;

#[allow(unsafe_code)]
fn sendmsg(sock: RawFd, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CONTROL_LEN / 8];
    // SAFETY: a zeroed msghdr is a valid empty message; every pointer set below outlives the
    // sendmsg call, and the control message is written inside `control`, whose size covers
    // CMSG_SPACE of one descriptor.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            let payload = std::mem::size_of::<RawFd>() as libc::c_uint;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(payload) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
        let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != bytes.len() {
            return Err(io::Error::other("message sent in part"));
        }
    }
    Ok(())
}

#[allow(unsafe_code)]
fn recvmsg(sock: RawFd, buf: &mut [u8]) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; CONTROL_LEN / 8];
    let mut fds = Vec::new();
    // SAFETY: as in `sendmsg`; the kernel fills at most `msg_controllen` bytes of `control`,
    // and the CMSG_* walk stays within what it reports. Each received descriptor is owned by
    // us from here on, so wrapping it in OwnedFd (closed on drop) is sound.
    let (n, flags) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = CONTROL_LEN as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        (n as usize, msg.msg_flags)
    };
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message or its descriptors truncated",
        ));
    }
    if fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} descriptors sent with one message; expected at most one",
                fds.len()
            ),
        ));
    }
    Ok(Some((n, fds.pop())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_a_socket_pair() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).expect("socketpair");
        let file = std::fs::File::open("/proc/self/ns/net").expect("own netns");
        let pod = PodInfo {
            uid: "Kubernetes//Pod/apps/a".into(),
            namespace: "apps".into(),
            name: "a".into(),
            ips: vec!["198.18.1.2".parse().expect("ip")],
        };
        send(
            &a,
            &Request::Add { pod: pod.clone() },
            Some(std::os::fd::AsFd::as_fd(&file)),
        )
        .expect("send");
        let (got, fd): (Request, _) = recv(&b).expect("recv").expect("a message");
        assert_eq!(got, Request::Add { pod });
        let fd = fd.expect("the descriptor came along");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::File::from(fd).metadata().expect("stat").ino(),
            file.metadata().expect("stat").ino()
        );
        send(&b, &Reply { error: None }, None).expect("reply");
        let (reply, fd): (Reply, _) = recv(&a).expect("recv").expect("a reply");
        assert_eq!(reply.error, None);
        assert!(fd.is_none());
        // Garbage is an error naming what came, not a panic; a closed peer is `None`.
        sendmsg(a.as_raw_fd(), b"{\"type\":\"explode\"}", None).expect("send");
        let err = recv::<Request>(&b).expect_err("malformed");
        assert!(err.to_string().contains("explode"), "{err}");
        drop(a);
        assert!(recv::<Request>(&b).expect("recv").is_none());
    }
}

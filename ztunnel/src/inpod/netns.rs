//! Network namespaces as file descriptors: entering one on the current thread just long
//! enough to make a socket there. A socket keeps the namespace it was made in, so everything
//! after `socket(2)` (bind, connect, accept, I/O) happens back in ztunnel's own namespace.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

/// The namespace ztunnel started in, opened once; every visit to a pod's namespace returns
/// here.
static HOME: OnceLock<std::io::Result<File>> = OnceLock::new();

fn home() -> std::io::Result<&'static File> {
    HOME.get_or_init(|| File::open("/proc/thread-self/ns/net"))
        .as_ref()
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("opening our own network namespace: {e}"))
        })
}

/// Opens the home namespace now, while the calling thread is still in it. Call once at start.
pub fn remember_home() -> std::io::Result<()> {
    home().map(|_| ())
}

/// A pod's network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    /// Inode of the namespace: two descriptors of the same pod compare equal.
    pub inode: u64,
}

impl Netns {
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let file = File::from(fd);
        let inode = file.metadata()?.ino();
        Ok(Self {
            fd: file.into(),
            inode,
        })
    }

    /// Runs `f` with the calling thread inside this namespace, then returns to ztunnel's own.
    /// `f` must not block or yield: it is meant for `socket(2)` and friends.
    pub fn run<T>(&self, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        let home = home()?;
        enter(self.fd.as_raw_fd())?;
        let result = f();
        if let Err(e) = enter(home.as_raw_fd()) {
            // A worker thread stuck in a pod's namespace would make every later socket there:
            // stopping is the only safe answer.
            eprintln!("ztunnel: cannot return to its own network namespace ({e}); aborting");
            std::process::abort();
        }
        result
    }
}

#[allow(unsafe_code)]
fn enter(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: setns with a namespace descriptor we hold changes only the calling thread's
    // network namespace; `Netns::run` always switches back before returning.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

//! ztunnel: the per-node zero-trust tunnel. It captures the TCP connections of the workloads
//! on its node and carries them to their destination's ztunnel inside HBONE.

pub mod admin;
pub mod app;
pub mod ca_client;
pub mod config;
pub mod grpc;
pub mod inpod;
pub mod local;
pub mod memory;
pub mod metrics;
pub mod proxy;
pub mod rbac;
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;
pub mod xds;

pub use app::Ztunnel;
pub use config::Config;

/// Raises the open-file soft limit to the hard limit: every proxied connection holds two
/// sockets, and the default soft limit (often 1024) is far too low for a node proxy.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    raise_nofile()
}

#[allow(unsafe_code)]
fn raise_nofile() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit struct with cur <= max.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Logs to stderr at `RUST_LOG` (default info), as JSON when `LOG_FORMAT=json`; colours only
/// for a terminal, so a log file holds plain text. For the proxies' `main`.
pub fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

//! Network namespaces and the commands that shape them (`ip`, `nft`), for the testbed.

use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{Context, bail};

/// Prefix of every namespace the testbed creates; `ambient down` removes all of them.
pub const PREFIX: &str = "amb-";

/// Runs a command to completion; an error carries its stderr.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| {
        format!("running {cmd} (is it installed? scripts/setup.sh installs it)")
    })?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], feeding `input` on stdin.
pub fn run_with_input(cmd: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn path(name: &str) -> String {
    format!("/run/netns/{name}")
}

pub fn exists(name: &str) -> bool {
    std::path::Path::new(&path(name)).exists()
}

/// Creates a namespace (replacing a leftover of the same name) with loopback up.
pub fn create(name: &str) -> anyhow::Result<()> {
    if exists(name) {
        delete(name)?;
    }
    run("ip", &["netns", "add", name])?;
    ip(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a namespace after killing what still runs in it. Missing is fine.
pub fn delete(name: &str) -> anyhow::Result<()> {
    if !exists(name) {
        return Ok(());
    }
    if let Ok(pids) = run("ip", &["netns", "pids", name]) {
        for pid in pids.split_whitespace() {
            let _ = run("kill", &["-KILL", pid]);
        }
    }
    run("ip", &["netns", "del", name])?;
    Ok(())
}

/// Namespaces whose names start with [`PREFIX`].
pub fn list_ours() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return vec![];
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    out.sort();
    out
}

/// `ip -n NAME ARGS…`
pub fn ip(name: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", name];
    all.extend_from_slice(args);
    run("ip", &all).map(|_| ())
}

/// Loads an nftables ruleset in a namespace, atomically.
pub fn nft(name: &str, ruleset: &str) -> anyhow::Result<()> {
    run_with_input("ip", &["netns", "exec", name, "nft", "-f", "-"], ruleset)
        .with_context(|| format!("loading nftables rules in {name}"))
}

/// Sets a sysctl under /proc/sys/net inside a namespace.
pub fn sysctl(name: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let file = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_owned();
    within(name, move || {
        std::fs::write(&file, &value).with_context(|| format!("writing {file}"))
    })?
}

/// Runs `f` on a thread inside the namespace and returns its result: sockets it opens belong
/// to the namespace.
pub fn within<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let file = std::fs::File::open(path(name))
        .with_context(|| format!("network namespace {name} does not exist (is the mesh up?)"))?;
    std::thread::spawn(move || {
        enter(&file)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a thread inside network namespace {name} panicked"))?
}

#[allow(unsafe_code)]
fn enter(file: &std::fs::File) -> anyhow::Result<()> {
    // SAFETY: setns changes only the calling thread's network namespace; `within` runs it on
    // a thread of its own that ends with the closure.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "entering a network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A blocking HTTP/1.1 GET from inside a namespace; returns (status, body).
pub fn http_get(name: &str, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    let what = format!("GET http://{addr}{path} in {name}");
    within(name, move || -> anyhow::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(
            &addr.parse().context("bad address")?,
            std::time::Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nhost: {addr}\r\n\r\n")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status line")?;
        Ok((status, body.to_owned()))
    })?
    .with_context(|| what)
}

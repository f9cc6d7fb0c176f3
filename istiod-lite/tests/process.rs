#![allow(clippy::unwrap_used)]
//! The istiod-lite binary as an operator runs it: clear errors and exit code 2 on bad input,
//! ready on a good directory, a clean exit on SIGTERM.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_istiod-lite");

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_and_sources_fail_with_a_clear_message() {
    let (code, err) = run(&["--bogus"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown flag \"--bogus\""), "{err}");
    let (code, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("no config source"), "{err}");
    let (code, err) = run(&[
        "--config-dir",
        "/nonexistent/mesh",
        "--xds-tls",
        "off",
        "--debug",
        "off",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("reading config directory /nonexistent/mesh: No such file"),
        "{err}"
    );
    let (code, err) = run(&["node-token"]);
    assert_eq!(code, 2);
    assert!(err.contains("--node"), "{err}");
}

fn get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn serves_a_directory_and_exits_cleanly_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("istiod-proc-{}", fastrand::u64(..)));
    std::fs::create_dir_all(dir.join("mesh")).unwrap();
    std::fs::write(
        dir.join("mesh/ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {istio.io/dataplane-mode: ambient}}\n",
    )
    .unwrap();
    // An address of its own in 127/8, so no other test or service holds these ports.
    let ip = format!(
        "127.{}.{}.{}",
        fastrand::u8(1..=250),
        fastrand::u8(..),
        fastrand::u8(1..=250)
    );
    let debug = format!("{ip}:15014");
    let mut child = Command::new(BIN)
        .args(["--config-dir", dir.join("mesh").to_str().unwrap()])
        .args(["--state-dir", dir.join("state").to_str().unwrap()])
        .args([
            "--xds-plaintext",
            &format!("{ip}:15010"),
            "--xds-tls",
            "off",
        ])
        .args(["--debug", &debug])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if get(&debug, "/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        if child.try_wait().unwrap().is_some() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("exited early:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cfg = get(&debug, "/debug/config").unwrap();
    assert!(cfg.contains("\"workloads\": []"), "{cfg}");
    assert!(dir.join("state/ca/root-cert.pem").exists());

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

//! istiod-lite: `istiod-lite --config-dir DIR` (local) or `istiod-lite --kubernetes`.

use std::path::PathBuf;

use anyhow::Context;
use istiod_lite::app::Istiod;
use istiod_lite::auth::NodeTokens;
use istiod_lite::config::{Config, DEFAULT_STATE_DIR, STATE_DIR_ENV, USAGE};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(args) {
        eprintln!("istiod-lite: {e:#}");
        std::process::exit(2);
    }
}

fn run(args: Vec<String>) -> anyhow::Result<()> {
    init_logging();
    if args.first().map(String::as_str) == Some("node-token") {
        return node_token(&args[1..]);
    }
    let cfg = Config::from_args(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let istiod = Istiod::start(cfg).await?;
        shutdown_signal().await;
        tracing::info!("shutting down");
        istiod.shutdown();
        Ok(())
    })
}

/// Prints the bootstrap token of a node (creating it on first use), or writes it to a file
/// (mode 0600, no trailing newline: some proxies send a token file's bytes as they are).
fn node_token(args: &[String]) -> anyhow::Result<()> {
    let mut node = None;
    let mut out: Option<PathBuf> = None;
    let mut state_dir = std::env::var(STATE_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(DEFAULT_STATE_DIR));
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--node" => node = it.next().cloned(),
            "--state-dir" => {
                state_dir = it.next().context("--state-dir needs a value")?.into();
            }
            "--out" => out = Some(it.next().context("--out needs a value")?.into()),
            other => anyhow::bail!("unknown flag {other:?}\n{USAGE}"),
        }
    }
    let node = node.context("node-token needs --node NAME")?;
    let token = NodeTokens::new(&state_dir).token_for(&node)?;
    match out {
        None => println!("{token}"),
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            f.write_all(token.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: a log file should hold plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

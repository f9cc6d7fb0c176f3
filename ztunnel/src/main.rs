use anyhow::Context;
use tracing::{info, warn};
use ztunnel::{Config, Ztunnel};

fn main() -> anyhow::Result<()> {
    let cfg = match Config::from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e:#}");
            std::process::exit(2);
        }
    };
    ztunnel::init_tracing();
    match ztunnel::raise_fd_limit() {
        Ok(n) => info!(limit = n, "open file limit"),
        Err(e) => warn!(error = %e, "could not raise the open file limit"),
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cfg.worker_threads {
        runtime.worker_threads(n);
    }
    runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cfg))
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let ca = ztunnel::app::cert_source(&cfg)?;
    let zt = Ztunnel::start(cfg, ca).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted; shutting down"),
        _ = term.recv() => info!("terminated; shutting down"),
        _ = zt.quit_requested() => info!("quit requested; shutting down"),
    }
    zt.shutdown().await;
    Ok(())
}

//! `ambient`: run a local mesh from a YAML directory and see what it is doing.

use std::process::ExitCode;

use ambient::{exec, status, up, zconfig};

const USAGE: &str = "usage: ambient COMMAND
  up DIR [--detach]        run the mesh described by the Kubernetes YAML in DIR: nodes and pods
                           as network namespaces, istiod-lite, a ztunnel per node with in-pod
                           capture, the pods' apps; foreground until Ctrl-C unless --detach
  down                     stop the mesh and remove everything it created (also after a crash)
  status                   namespaces, pods, ztunnels, certificates, and problems to look at
  exec POD -- CMD [ARGS]   run a command inside a pod (POD is NAMESPACE/NAME, or NAME if unique)
  explain POD              the last connection to or from the pod that a policy refused, and why
  ztunnel-config VIEW [--node NODE] [-o table|json|yaml]
                           what ztunnels hold: workloads, services, policies, certificates,
                           connections, pods, all
  echo-server ...          the built-in echo app (ambient echo-server --help)
  echo-client ...          its client (ambient echo-client --help)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    if cmd == "echo-client" {
        return ambient::echo::client_main(rest);
    }
    if cmd == "echo-server" {
        // One line per request, for the pod's log.
        init_logging("info");
        return ambient::echo::server_main(rest);
    }
    // Progress goes to the terminal as plain lines; logs only when something is wrong.
    init_logging("warn");
    let result = match cmd.as_str() {
        "up" => cmd_up(rest),
        "down" => up::down(),
        "status" => status::gather().map(|i| print!("{}", status::render(&i))),
        "exec" => exec::exec(rest),
        "explain" => ambient::explain::explain(rest).map(|t| print!("{t}")),
        "ztunnel-config" | "zc" => zconfig_cmd(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(anyhow::anyhow!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambient: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_up(args: &[String]) -> anyhow::Result<()> {
    let mut dir = None;
    let mut detach = false;
    for a in args {
        match a.as_str() {
            "--detach" | "-d" => detach = true,
            f if f.starts_with('-') => anyhow::bail!("unknown flag {f:?} for up\n{USAGE}"),
            d if dir.is_none() => dir = Some(std::path::PathBuf::from(d)),
            extra => anyhow::bail!("unexpected argument {extra:?}\n{USAGE}"),
        }
    }
    let dir = dir.ok_or_else(|| anyhow::anyhow!("up needs a directory of YAML\n{USAGE}"))?;
    if detach {
        up::up_detached(&dir)
    } else {
        up::up(&dir)
    }
}

fn zconfig_cmd(args: &[String]) -> anyhow::Result<()> {
    let mut view = None;
    let mut node = None;
    let mut format = zconfig::Format::Table;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--node" => {
                node = Some(
                    it.next()
                        .ok_or_else(|| anyhow::anyhow!("--node needs a value"))?
                        .clone(),
                )
            }
            "-o" | "--output" => {
                let v = it
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("-o needs a value"))?;
                format = v.parse().map_err(anyhow::Error::msg)?;
            }
            f if f.starts_with('-') => {
                anyhow::bail!("unknown flag {f:?} for ztunnel-config\n{USAGE}")
            }
            v if view.is_none() => {
                view = Some(v.parse::<zconfig::View>().map_err(anyhow::Error::msg)?)
            }
            extra => anyhow::bail!("unexpected argument {extra:?}"),
        }
    }
    let view = view.ok_or_else(|| anyhow::anyhow!("ztunnel-config needs a view\n{USAGE}"))?;
    print!(
        "{}",
        ambient::zconfig_live::show(view, format, node.as_deref())?
    );
    Ok(())
}

fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

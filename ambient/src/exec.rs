//! `ambient exec POD -- CMD`: a command inside a pod's network namespace, as the pod.

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::bail;

use crate::up::MeshState;

pub fn exec(args: &[String]) -> anyhow::Result<()> {
    let Some(pod) = args.first() else {
        bail!("exec needs a pod: ambient exec POD -- CMD [ARGS]");
    };
    let rest = &args[1..];
    let cmd = match rest.first().map(String::as_str) {
        Some("--") => &rest[1..],
        _ => rest,
    };
    if cmd.is_empty() {
        bail!("exec needs a command after the pod: ambient exec {pod} -- CMD [ARGS]");
    }
    let state = MeshState::load()?;
    let pod = state.plan.find_pod(pod)?;
    // `ambient` inside the pod is this binary, wherever it was run from (the README's examples
    // run `ambient echo-client` in pods without `ambient` on PATH).
    let program = match cmd[0].as_str() {
        "ambient" => std::env::current_exe()
            .map(|p| p.into_os_string())
            .unwrap_or_else(|_| cmd[0].clone().into()),
        _ => cmd[0].clone().into(),
    };
    let err = Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .arg(program)
        .args(&cmd[1..])
        .env("POD_NAME", &pod.name)
        .env("POD_NAMESPACE", &pod.namespace)
        .exec();
    bail!(
        "running {} in {}/{}: {err}",
        cmd[0],
        pod.namespace,
        pod.name
    )
}

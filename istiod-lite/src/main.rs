//! The control daemon is not built yet: ztunnels run standalone from a local mesh description
//! and a development CA. This binary refuses to run rather than pretend. See
//! docs/architecture.md.

fn main() {
    eprintln!(
        "istiod-lite: the control plane is not implemented yet; run ztunnel with --config (standalone mode) (see docs/architecture.md)"
    );
    std::process::exit(2);
}

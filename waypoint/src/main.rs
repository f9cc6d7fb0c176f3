//! The waypoint (L7 proxy) is not built yet. This binary exists so the workspace has its final
//! shape; it refuses to run rather than pretend. See docs/architecture.md.

fn main() {
    eprintln!(
        "waypoint: the L7 proxy is not implemented yet; traffic through the mesh is L4 only (see docs/architecture.md)"
    );
    std::process::exit(2);
}

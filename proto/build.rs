//! Compiles the .proto files with a pure-Rust compiler, so no system `protoc` is needed, and
//! generates the gRPC client and server stubs (without tonic's transport, which each binary
//! chooses for itself).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/istio/workload/workload.proto",
        "proto/istio/security/authorization.proto",
        "proto/istio/ca/ca.proto",
        "proto/envoy/discovery.proto",
        "proto/ambient/waypoint.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        // Ordered maps encode to the same bytes every time, so a resource's version (a hash of
        // its encoding) changes only when its content does.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}

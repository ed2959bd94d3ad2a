//! Generates the gRPC contract's Rust code from `proto/` with protox, a pure-Rust
//! protobuf compiler: the build needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/ztp/config/v1/config.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

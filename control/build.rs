//! Generates the etcd v3 client stubs (the subset of etcd's API in `proto/etcd/`) with
//! protox, a pure-Rust protobuf compiler: the build needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "proto/etcd";
    let files = ["etcdserverpb/rpc.proto", "mvccpb/kv.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={root}/{file}");
    }
    let fds = protox::compile(files, [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}

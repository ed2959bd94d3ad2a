//! `ztp-control`: see `--help` and README.md.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ztp_control::server::{self, GrpcOptions, Options};
use ztp_infra::trace::{self, LogFormat};

/// sysexits EX_USAGE: invalid command line or configuration.
const EX_USAGE: u8 = 64;

/// ZTP control plane: keeps services, users and groups, and serves the admin API.
#[derive(Debug, Parser)]
#[command(name = "ztp-control", version, about, max_term_width = 100)]
struct Args {
    /// Folder of the store (created if missing; mode 0700). On first start an admin
    /// token is written to DIR/admin-token (with --store etcd: by the one instance that
    /// initializes the store).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,

    /// Where the records live: sled in --data-dir, or an etcd cluster shared by any
    /// number of ztp-control instances.
    #[arg(long, default_value = "sled", value_parser = ["sled", "etcd"], value_name = "BACKEND")]
    store: String,

    /// With --store etcd: the cluster's client URLs (http:// or https://).
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,

    /// With --store etcd: CA certificates (PEM) etcd's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,

    /// With --store etcd: client certificate (PEM) presented to etcd.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,

    /// Key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,

    /// With --store etcd: every key ZTP writes is under this prefix.
    #[arg(long, default_value = "/ztp/", value_name = "PREFIX")]
    etcd_prefix: String,

    /// Address of the REST admin API (plain HTTP unless --api-cert is given).
    #[arg(long, default_value = "127.0.0.1:9780", value_name = "ADDR")]
    api_listen: SocketAddr,

    /// Certificate chain (PEM) to serve the admin API over HTTPS.
    #[arg(long, value_name = "FILE", requires = "api_key")]
    api_cert: Option<PathBuf>,

    /// Key (PEM) of --api-cert.
    #[arg(long, value_name = "FILE", requires = "api_cert")]
    api_key: Option<PathBuf>,

    /// Address of the gRPC config stream to data-plane nodes (mutual TLS). Needs
    /// --grpc-cert, --grpc-key and --node-ca; without them the stream is off.
    #[arg(long, default_value = "[::]:9781", value_name = "ADDR")]
    grpc_listen: SocketAddr,

    /// Certificate chain (PEM) of the gRPC port.
    #[arg(long, value_name = "FILE", requires_all = ["grpc_key", "node_ca"])]
    grpc_cert: Option<PathBuf>,

    /// Key (PEM) of --grpc-cert.
    #[arg(long, value_name = "FILE", requires = "grpc_cert")]
    grpc_key: Option<PathBuf>,

    /// CA certificates (PEM) that node certificates must chain to.
    #[arg(long, value_name = "FILE", requires = "grpc_cert")]
    node_ca: Option<PathBuf>,

    /// Trust domain of node identities (`spiffe://DOMAIN/node/ID`).
    #[arg(long, default_value = ztp_proto::names::DEFAULT_TRUST_DOMAIN, value_name = "DOMAIN")]
    trust_domain: String,

    /// Connection records kept in the audit trail; the oldest are dropped beyond it.
    #[arg(long, default_value_t = 1_000_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    audit_retention: u64,

    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], value_name = "FORMAT")]
    log_format: String,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind::*;
            let code = match e.kind() {
                DisplayHelp | DisplayVersion => 0,
                _ => EX_USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let format = if args.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    trace::init(format, "info");
    // Everything this process creates (store files, the token file) is private.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ztp-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztp-control: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let opts = Options {
        data_dir: args.data_dir.clone(),
        api_listen: args.api_listen,
        api_tls: args.api_cert.clone().zip(args.api_key.clone()),
        grpc: match (args.grpc_cert, args.grpc_key, args.node_ca) {
            (Some(cert), Some(key), Some(node_ca)) => Some(GrpcOptions {
                listen: args.grpc_listen,
                cert,
                key,
                node_ca,
                trust_domain: args.trust_domain,
            }),
            _ => None,
        },
        audit_retention: args.audit_retention,
    };
    let backend = match args.store.as_str() {
        "etcd" => {
            if args.etcd_endpoints.is_empty() {
                anyhow::bail!("--store etcd needs --etcd-endpoints URL[,URL...]");
            }
            let mut client = ztp_control::etcd::EtcdConfig::new(args.etcd_endpoints.clone());
            client.ca = args.etcd_ca.clone();
            client.cert = args.etcd_cert.clone();
            client.key = args.etcd_key.clone();
            server::StoreBackend::Etcd(ztp_control::store::etcd::EtcdOptions {
                client,
                prefix: args.etcd_prefix.clone(),
            })
        }
        _ => {
            if !args.etcd_endpoints.is_empty() || args.etcd_ca.is_some() || args.etcd_cert.is_some()
            {
                anyhow::bail!("--etcd-* options need --store etcd");
            }
            server::StoreBackend::Sled
        }
    };
    let store = server::open_store_on(&opts.data_dir, backend).await?;
    server::serve(store, &opts, async {
        let sig = ztp_infra::signal::stop().await;
        tracing::info!(signal = sig, "stopping");
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
}

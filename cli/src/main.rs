//! `ztpctl`: the operator's command line. See `ztpctl --help` and README.md.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod admin;
mod client;
mod connect;
mod pki;
mod settings;
mod table;
mod up;

/// Operate a ZTP gateway: services, users, groups, nodes, tokens.
#[derive(Debug, Parser)]
#[command(name = "ztpctl", version, about, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Where the control plane is; flags beat ZTP_SERVER/ZTP_TOKEN/ZTP_API_CA, which beat
/// ~/.config/ztp/config.toml.
#[derive(Debug, Args)]
struct Global {
    /// Control plane API, e.g. http://127.0.0.1:9780.
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// Admin token.
    #[arg(long, global = true, value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA (PEM) of an https:// server.
    #[arg(long, global = true, value_name = "FILE")]
    api_ca: Option<PathBuf>,
    /// Output: tables for people, json for scripts.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Services: what clients reach, by SNI name.
    #[command(subcommand)]
    Service(admin::ServiceCmd),
    /// Users: who clients are, by certificate identity.
    #[command(subcommand)]
    User(admin::UserCmd),
    /// Groups of users that services admit.
    #[command(subcommand)]
    Group(admin::GroupCmd),
    /// Data-plane replicas.
    #[command(subcommand)]
    Node(admin::NodeCmd),
    /// The whole configuration.
    #[command(subcommand)]
    Snapshot(admin::SnapshotCmd),
    /// Replace the whole configuration with a snapshot file (YAML or JSON).
    Import {
        /// The file; `-` reads standard input.
        file: PathBuf,
    },
    /// Admin tokens.
    #[command(subcommand)]
    Token(admin::TokenCmd),
    /// Connection records from every data plane, newest first.
    Audit(admin::AuditArgs),
    /// Reach a service through the gateway: stdin/stdout, a local TCP or UDP port.
    Connect(connect::ConnectArgs),
    /// Start a whole gateway on this machine: control plane, data plane, PKI, demo.
    Up(up::UpArgs),
    /// Certificates: a CA, the server's, users', nodes'.
    #[command(subcommand)]
    Pki(pki::PkiCmd),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            let code = match e.kind() {
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand => 0,
                _ => 64,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ztpctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // A blocking read of standard input may still be pending: do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztpctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `up` logs warnings and errors of the planes it runs (RUST_LOG for more).
fn init_tracing() {
    ztp_infra::trace::init(ztp_infra::trace::LogFormat::Text, "warn");
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cli = match cli.command {
        Command::Pki(pki::PkiCmd::Revoke { .. }) => cli,
        Command::Pki(c) => return pki::run(c),
        _ => cli,
    };
    if let Command::Up(args) = cli.command {
        init_tracing();
        return up::run(args).await;
    }
    let settings = settings::resolve(cli.global.server, cli.global.token, cli.global.api_ca)?;
    if let Command::Connect(args) = cli.command {
        return connect::run(args, &settings).await;
    }
    let client = client::Client::new(&settings.server, settings.token, settings.api_ca.as_deref())?;
    let out = cli.global.output;
    match cli.command {
        Command::Service(c) => admin::service(&client, c, out).await,
        Command::User(c) => admin::user(&client, c, out).await,
        Command::Group(c) => admin::group(&client, c, out).await,
        Command::Node(c) => admin::node(&client, c, out).await,
        Command::Snapshot(c) => admin::snapshot(&client, c, out).await,
        Command::Import { file } => admin::import(&client, &file, out).await,
        Command::Token(c) => admin::token(&client, c, out).await,
        Command::Audit(a) => admin::audit(&client, a, out).await,
        Command::Pki(pki::PkiCmd::Revoke { targets, crl }) => {
            let serials = pki::revocation_serials(&targets, crl.as_deref())?;
            admin::revoke(&client, &serials, out).await
        }
        Command::Pki(_) | Command::Connect(_) | Command::Up(_) => unreachable!("handled above"),
    }
}

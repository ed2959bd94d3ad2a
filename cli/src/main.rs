//! `ztpctl`: the operator's command line. See `ztpctl --help` and README.md.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod admin;
mod client;
mod clock;
mod connect;
mod connector;
mod pki;
mod settings;
mod table;
mod up;

/// Operate a ZTP gateway: services, users, groups, nodes, tokens.
#[derive(Debug, Parser)]
#[command(name = "ztpctl", version, about, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    top: TopApi,
    #[command(subcommand)]
    command: Command,
}

/// The control plane's flags before the command (`ztpctl -o json group list`); they
/// apply to the admin commands only, as [`Api`] does after it.
#[derive(Debug, Default, Args)]
struct TopApi {
    /// Control plane API, e.g. http://127.0.0.1:9780 (env ZTP_SERVER).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// Admin token (env ZTP_TOKEN).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// CA (PEM) of an https:// server (env ZTP_API_CA).
    #[arg(long, value_name = "FILE")]
    api_ca: Option<PathBuf>,
    /// Output: table, wide (more columns), json or yaml [default: table].
    #[arg(short, long, value_enum)]
    output: Option<Output>,
}

impl TopApi {
    fn is_empty(&self) -> bool {
        self.server.is_none()
            && self.token.is_none()
            && self.api_ca.is_none()
            && self.output.is_none()
    }
}

/// Where the control plane is, and how to print its answers: on the commands that talk
/// to it. Flags beat ZTP_SERVER/ZTP_TOKEN/ZTP_API_CA, which beat
/// ~/.config/ztp/config.toml.
#[derive(Debug, Default, Args)]
pub struct Api {
    /// Control plane API, e.g. http://127.0.0.1:9780 (env ZTP_SERVER).
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// Admin token (env ZTP_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// CA (PEM) of an https:// server (env ZTP_API_CA).
    #[arg(long, global = true, value_name = "FILE")]
    api_ca: Option<PathBuf>,
    /// Output: table, wide (more columns), json or yaml [default: table].
    #[arg(short, long, global = true, value_enum)]
    output: Option<Output>,
}

impl Api {
    /// These flags, filled in from the ones given before the command.
    fn or(self, top: TopApi) -> Api {
        Api {
            server: self.server.or(top.server),
            token: self.token.or(top.token),
            api_ca: self.api_ca.or(top.api_ca),
            output: self.output.or(top.output),
        }
    }
}

/// How answers are printed: tables for people, json or yaml for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    // More columns.
    Wide,
    // The API's values, as it sends them.
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Services: what clients reach, by SNI name.
    Service {
        #[command(flatten)]
        api: Api,
        #[command(subcommand)]
        cmd: admin::ServiceCmd,
    },
    /// Users: who clients are, by certificate identity.
    User {
        #[command(flatten)]
        api: Api,
        #[command(subcommand)]
        cmd: admin::UserCmd,
    },
    /// Groups of users that services admit.
    Group {
        #[command(flatten)]
        api: Api,
        #[command(subcommand)]
        cmd: admin::GroupCmd,
    },
    /// Data-plane replicas.
    Node {
        #[command(flatten)]
        api: Api,
        #[command(subcommand)]
        cmd: admin::NodeCmd,
    },
    /// The whole configuration.
    Snapshot {
        #[command(flatten)]
        api: Api,
        #[command(subcommand)]
        cmd: admin::SnapshotCmd,
    },
    /// Replace the whole configuration with a snapshot file (YAML or JSON).
    Import {
        /// The file; `-` reads standard input.
        file: PathBuf,
        #[command(flatten)]
        api: Api,
    },
    /// Admin tokens.
    Token {
        #[command(flatten)]
        api: Api,
        #[command(subcommand)]
        cmd: admin::TokenCmd,
    },
    /// Connectors: agents next to backends no data plane can reach, which serve them
    /// through tunnels to the data planes.
    #[command(subcommand)]
    Connector(ConnectorCmd),
    /// Connection records from every data plane, newest first.
    Audit {
        #[command(flatten)]
        args: admin::AuditArgs,
        #[command(flatten)]
        api: Api,
    },
    /// Reach a service through the gateway: stdin/stdout, a local TCP or UDP port.
    Connect(connect::ConnectArgs),
    /// Start a whole gateway on this machine: control plane, data plane, PKI, demo.
    Up(up::UpArgs),
    /// Certificates: a CA, the server's, users', nodes'.
    #[command(subcommand)]
    Pki(pki::PkiCmd),
    /// Print a shell completion script: `source <(ztpctl completion bash)`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `ztpctl connector`: the registry (add, list, rm: `admin::connector`), and the
/// connector process itself.
#[derive(Debug, Subcommand)]
enum ConnectorCmd {
    /// Register a connector: `ztpctl connector add lab --description "the lab's rack"`.
    Add {
        #[command(flatten)]
        args: admin::connector::AddArgs,
        #[command(flatten)]
        api: Api,
    },
    /// List connectors and their live tunnels (replica, transport, since).
    #[command(visible_alias = "ls")]
    List {
        #[command(flatten)]
        api: Api,
    },
    /// Remove a connector (refused while a service is served through it).
    #[command(alias = "remove", alias = "delete")]
    Rm {
        #[command(flatten)]
        args: admin::connector::RmArgs,
        #[command(flatten)]
        api: Api,
    },
    /// Run a connector: hold tunnels to the data planes and serve the services assigned
    /// to it (`ztpctl connector run --via A:9743,B:9743 --cert … --key … --ca …`).
    Run(connector::RunArgs),
}

impl ConnectorCmd {
    /// The control plane's flags, for the registry commands.
    fn api(&mut self) -> Option<&mut Api> {
        match self {
            ConnectorCmd::Add { api, .. }
            | ConnectorCmd::List { api }
            | ConnectorCmd::Rm { api, .. } => Some(api),
            // The connector process talks to the data planes, not the control plane.
            ConnectorCmd::Run(_) => None,
        }
    }
}

impl Command {
    /// The control plane's flags, for the commands that talk to it.
    fn api(&mut self) -> Option<&mut Api> {
        match self {
            Command::Connector(c) => c.api(),
            Command::Service { api, .. }
            | Command::User { api, .. }
            | Command::Group { api, .. }
            | Command::Node { api, .. }
            | Command::Snapshot { api, .. }
            | Command::Import { api, .. }
            | Command::Token { api, .. }
            | Command::Audit { api, .. }
            | Command::Pki(pki::PkiCmd::Revoke { api, .. }) => Some(api),
            Command::Connect(_) | Command::Up(_) | Command::Pki(_) | Command::Completion { .. } => {
                None
            }
        }
    }
}

fn main() -> ExitCode {
    // While this is the only thread.
    clock::init_local_offset();
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
    let mut cli = cli;
    let top = std::mem::take(&mut cli.top);
    match cli.command.api() {
        Some(api) => *api = std::mem::take(api).or(top),
        None if !top.is_empty() => {
            eprintln!(
                "ztpctl: --server, --token, --api-ca and -o are for the commands that talk to \
                 the control plane, not this one"
            );
            return ExitCode::from(64);
        }
        None => {}
    }
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
    let (api, command) = match cli.command {
        Command::Pki(pki::PkiCmd::Revoke { targets, crl, api }) => {
            let serials = pki::revocation_serials(&targets, crl.as_deref())?;
            (api, Admin::Revoke(serials))
        }
        Command::Pki(c) => return pki::run(c),
        Command::Up(args) => {
            init_tracing();
            return up::run(args).await;
        }
        Command::Completion { shell } => {
            completion(shell);
            return Ok(());
        }
        Command::Connect(args) => {
            let settings = settings::resolve_connect(&args)?;
            return connect::run(args, &settings).await;
        }
        Command::Service { api, cmd } => (api, Admin::Service(cmd)),
        Command::User { api, cmd } => (api, Admin::User(cmd)),
        Command::Group { api, cmd } => (api, Admin::Group(cmd)),
        Command::Node { api, cmd } => (api, Admin::Node(cmd)),
        Command::Snapshot { api, cmd } => (api, Admin::Snapshot(cmd)),
        Command::Import { file, api } => (api, Admin::Import(file)),
        Command::Token { api, cmd } => (api, Admin::Token(cmd)),
        Command::Audit { args, api } => (api, Admin::Audit(args)),
        Command::Connector(ConnectorCmd::Run(args)) => return connector::run(args).await,
        Command::Connector(c) => match c {
            ConnectorCmd::Add { args, api } => {
                (api, Admin::Connector(admin::connector::Cmd::Add(args)))
            }
            ConnectorCmd::List { api } => (api, Admin::Connector(admin::connector::Cmd::List)),
            ConnectorCmd::Rm { args, api } => {
                (api, Admin::Connector(admin::connector::Cmd::Rm(args)))
            }
            ConnectorCmd::Run(_) => unreachable!("served above"),
        },
    };
    let settings = settings::resolve_api(api.server, api.token, api.api_ca)?;
    let client = client::Client::new(&settings.server, settings.token, settings.api_ca.as_deref())?;
    let out = api.output.unwrap_or(Output::Table);
    match command {
        Admin::Service(c) => admin::service(&client, c, out).await,
        Admin::User(c) => admin::user(&client, c, out).await,
        Admin::Group(c) => admin::group(&client, c, out).await,
        Admin::Node(c) => admin::node(&client, c, out).await,
        Admin::Snapshot(c) => admin::snapshot(&client, c, out).await,
        Admin::Import(file) => admin::import(&client, &file, out).await,
        Admin::Token(c) => admin::token(&client, c, out).await,
        Admin::Audit(a) => admin::audit(&client, a, out).await,
        Admin::Connector(c) => admin::connector::connector(&client, c, out).await,
        Admin::Revoke(serials) => admin::revoke(&client, &serials, out).await,
    }
}

/// The commands that talk to the control plane, their flags taken out.
enum Admin {
    Service(admin::ServiceCmd),
    User(admin::UserCmd),
    Group(admin::GroupCmd),
    Node(admin::NodeCmd),
    Snapshot(admin::SnapshotCmd),
    Import(PathBuf),
    Token(admin::TokenCmd),
    Audit(admin::AuditArgs),
    Revoke(Vec<String>),
    Connector(admin::connector::Cmd),
}

fn completion(shell: clap_complete::Shell) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "ztpctl", &mut std::io::stdout());
}

#[cfg(test)]
mod tests;

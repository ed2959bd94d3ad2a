//! `ztpctl up`: a working gateway on a laptop, in one process and one state folder.
//!
//! First run: a fresh PKI (CA, server certificate, demo users alice and bob, a node
//! certificate), a control plane with sled, the demo configuration (group `demo`;
//! `echo.svc.internal` for the demo group, `whoami.svc.internal` answered by
//! `identity-echo`, `udp-echo.svc.internal`), and their demo backends. Later runs reuse
//! the state. One data plane on 127.0.0.1:9743 follows the control plane over gRPC, as a
//! replica would. Prints `ztpctl connect` commands that work as printed; Ctrl-C stops
//! everything cleanly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use ztp_control::server::{GrpcOptions, Options};
use ztp_control::store::{Actor, Store};
use ztp_dataplane::config::{Config, Source};
use ztp_dataplane::snapshot::grpc::ControlSource;
use ztp_dataplane::tls::TlsFiles;
use ztp_proto::{Group, Protocol, Service, Snapshot, User};

use crate::pki;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The state folder (PKI, store); reused when it exists.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// The gateway's address.
    #[arg(long, default_value = "127.0.0.1:9743")]
    pub listen: SocketAddr,
    /// The admin API's address.
    #[arg(long, default_value = "127.0.0.1:9780")]
    pub api_listen: SocketAddr,
    /// The config stream's address.
    #[arg(long, default_value = "127.0.0.1:9781")]
    pub grpc_listen: SocketAddr,
    /// The data plane's /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9790")]
    pub admin_listen: SocketAddr,
    /// The demo TCP echo backend.
    #[arg(long, default_value = "127.0.0.1:9701")]
    pub echo_backend: SocketAddr,
    /// The demo UDP echo backend.
    #[arg(long, default_value = "127.0.0.1:9702")]
    pub udp_echo_backend: SocketAddr,
}

fn default_state() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("ztp")
}

/// Quotes a path for a POSIX shell when it needs it.
fn sh(p: &Path) -> String {
    let s = p.display().to_string();
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The PKI of the state folder, made on first run.
fn ensure_pki(dir: &Path) -> anyhow::Result<()> {
    if !dir.join("ca.pem").exists() {
        pki::init(
            dir,
            false,
            &["localhost".into(), "*.svc.internal".into()],
            false,
        )?;
        let year = Duration::from_secs(365 * 24 * 3600);
        pki::issue(dir, "alice@example.com", year, "alice", false)?;
        pki::issue(dir, "bob@example.com", year, "bob", false)?;
        pki::node(
            dir,
            "local",
            ztp_proto::names::DEFAULT_TRUST_DOMAIN,
            year,
            false,
        )?;
    }
    for f in [
        "ca.pem",
        "server.pem",
        "server.key",
        "alice.pem",
        "alice.key",
        "bob.pem",
        "bob.key",
        "node-local.pem",
        "node-local.key",
    ] {
        if !dir.join(f).exists() {
            bail!(
                "{} is missing; remove {} to start afresh",
                dir.join(f).display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// The demo configuration, written once into an empty store as one version.
async fn seed(store: &Store, echo: SocketAddr, udp_echo: SocketAddr) -> anyhow::Result<()> {
    if store.version()? > 0 {
        return Ok(());
    }
    let svc =
        |name: &str, protocol, address: Option<String>, groups: &[&str], handler: Option<&str>| {
            Service {
                name: name.into(),
                protocol,
                address,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                allow: vec![],
                deny: vec![],
                handler: handler.map(str::to_owned),
            }
        };
    let user = |name: &str, groups: &[&str]| User {
        name: name.into(),
        identities: vec![format!("{name}@example.com")],
        groups: groups.iter().map(|g| g.to_string()).collect(),
        disabled: false,
    };
    let snap = Snapshot {
        version: 1,
        services: vec![
            svc(
                "echo.svc.internal",
                Protocol::Tcp,
                Some(echo.to_string()),
                &["demo"],
                None,
            ),
            svc(
                "whoami.svc.internal",
                Protocol::Tcp,
                None,
                &[],
                Some("identity-echo"),
            ),
            svc(
                "udp-echo.svc.internal",
                Protocol::Udp,
                Some(udp_echo.to_string()),
                &["demo"],
                None,
            ),
        ],
        users: vec![user("alice", &["demo"]), user("bob", &[])],
        groups: vec![Group {
            name: "demo".into(),
        }],
        revoked: vec![],
    };
    store.import(snap, Some(0), &Actor::system()).await?;
    Ok(())
}

/// The demo backends: a TCP echo and a UDP echo.
async fn backends(tcp: SocketAddr, udp: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(tcp)
        .await
        .with_context(|| format!("cannot listen for the echo backend on {tcp}"))?;
    let sock = UdpSocket::bind(udp)
        .await
        .with_context(|| format!("cannot listen for the udp echo backend on {udp}"))?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], peer).await;
        }
    });
    Ok(())
}

async fn wait_ready(admin: SocketAddr, bound: Duration) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + bound;
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(admin).await {
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut resp = Vec::new();
            let _ = s.read_to_end(&mut resp).await;
            if resp.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > end {
            bail!("the data plane did not become ready within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let state = args.state.clone().unwrap_or_else(default_state);
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    let state = state.canonicalize()?;
    let pki_dir = state.join("pki");
    ensure_pki(&pki_dir)?;

    let data_dir = state.join("control");
    let store = ztp_control::server::open_store(&data_dir).await?;
    seed(&store, args.echo_backend, args.udp_echo_backend).await?;
    backends(args.echo_backend, args.udp_echo_backend).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let opts = Options {
        data_dir: data_dir.clone(),
        api_listen: args.api_listen,
        api_tls: None,
        grpc: Some(GrpcOptions {
            listen: args.grpc_listen,
            cert: pki_dir.join("server.pem"),
            key: pki_dir.join("server.key"),
            node_ca: pki_dir.join("ca.pem"),
            trust_domain: ztp_proto::names::DEFAULT_TRUST_DOMAIN.into(),
        }),
        audit_retention: 100_000,
    };
    let control_stop = stopped();
    let mut control =
        tokio::spawn(async move { ztp_control::server::serve(store, &opts, control_stop).await });

    let config = Config {
        listen: args.listen,
        tls: TlsFiles {
            cert: pki_dir.join("server.pem"),
            key: pki_dir.join("server.key"),
            client_ca: pki_dir.join("ca.pem"),
        },
        source: Source::Control(ControlSource {
            url: format!("https://localhost:{}", args.grpc_listen.port()),
            node_cert: pki_dir.join("node-local.pem"),
            node_key: pki_dir.join("node-local.key"),
            control_ca: pki_dir.join("ca.pem"),
            trust_domain: ztp_proto::names::DEFAULT_TRUST_DOMAIN.into(),
            listen: args.listen.to_string(),
            schema: ztp_proto::wire::SCHEMA,
        }),
        admin_listen: args.admin_listen,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(3600),
        connect_timeout: Duration::from_secs(5),
        udp_timeout: Duration::from_secs(5),
        max_connections: 20_000,
        max_connections_per_source: 1000,
        handshake_rate_per_source: 200,
        allow: Vec::new(),
        deny: Vec::new(),
        max_snapshot_age: None,
        drain_timeout: Duration::from_secs(5),
        threads: 1,
    };
    let node_stop = stopped();
    let mut node = tokio::spawn(async move { ztp_dataplane::node::run(config, node_stop).await });

    tokio::select! {
        r = wait_ready(args.admin_listen, Duration::from_secs(30)) => r?,
        r = &mut control => bail!("the control plane stopped: {}", describe(r.map(|r| r.map_err(|e| format!("{e:#}"))))),
        r = &mut node => bail!("the data plane stopped: {}", describe(r.map(|r| r.map_err(|e| e.to_string())))),
    }
    print_welcome(&state, &pki_dir, &data_dir, &args);

    let sig = ztp_infra::signal::stop().await;
    eprintln!("ztpctl: {sig}: stopping");
    let _ = stop_tx.send(true);
    let (c, n) = tokio::join!(control, node);
    if let Ok(Err(e)) = c {
        eprintln!("ztpctl: control plane: {e:#}");
    }
    if let Ok(Err(e)) = n {
        eprintln!("ztpctl: data plane: {e}");
    }
    eprintln!("ztpctl: stopped; the state stays in {}", state.display());
    Ok(())
}

fn describe(r: Result<Result<(), String>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "it exited".into(),
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
    }
}

fn print_welcome(state: &Path, pki: &Path, data: &Path, args: &UpArgs) {
    let me = std::env::current_exe()
        .ok()
        .map(|p| sh(&p))
        .unwrap_or_else(|| "ztpctl".into());
    let via = args.listen;
    let files = |who: &str| {
        format!(
            "--cert {} --key {} --ca {}",
            sh(&pki.join(format!("{who}.pem"))),
            sh(&pki.join(format!("{who}.key"))),
            sh(&pki.join("ca.pem"))
        )
    };
    println!("ZTP is up. State: {}", state.display());
    println!("  gateway (TLS 1.3, mTLS, SNI)  {via}");
    println!("  admin API                     http://{}", args.api_listen);
    println!();
    println!("Try, as alice (in the demo group):");
    println!(
        "  echo hello | {me} connect echo.svc.internal --via {via} {}",
        files("alice")
    );
    println!(
        "  {me} connect whoami.svc.internal --via {via} {}",
        files("alice")
    );
    println!(
        "  {me} connect udp-echo.svc.internal --via {via} {} --udp-listen 127.0.0.1:9753",
        files("alice")
    );
    println!("     then, elsewhere: echo hello | nc -u -w1 127.0.0.1 9753");
    println!("As bob (not in the demo group), the echo service answers 403 forbidden:");
    println!(
        "  echo hello | {me} connect echo.svc.internal --via {via} {}",
        files("bob")
    );
    println!();
    println!("Administer it:");
    println!(
        "  export ZTP_SERVER=http://{} ZTP_TOKEN=$(cat {})",
        args.api_listen,
        sh(&data.join("admin-token"))
    );
    println!("  {me} service list; {me} user list; {me} node list");
    println!();
    println!("Ctrl-C stops it; the next `up` reuses the state.");
}

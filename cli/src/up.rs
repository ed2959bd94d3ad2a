//! `ztpctl up`: a working gateway on a laptop, in one process and one state folder.
//!
//! First run: a fresh PKI (CA, server certificate, demo users alice and bob, a node
//! certificate), a control plane with sled, the demo configuration (group `demo`;
//! `echo.svc.internal` for the demo group, `whoami.svc.internal` answered by
//! `identity-echo`, `udp-echo.svc.internal`), and their demo backends. Later runs reuse
//! the state. One data plane (127.0.0.1:9743 by default) follows the control plane over
//! gRPC, as a replica would.
//!
//! Every run first reserves its ports by binding them on 127.0.0.1 (or at the address a
//! flag names): a default port that is taken is swapped for a free one, and said so; a
//! named port that is taken stops the run with one line per conflict, naming the flag.
//! The demo services `up` owns (see [`DEMO_RECORD`]) are then pointed at the backends
//! started this time, through the control plane's store API. The printed `ztpctl
//! connect` commands use the addresses actually bound. Ctrl-C says once that open
//! connections drain, and for how long; a second Ctrl-C ends them at once.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_control::server::{GrpcOptions, Options};
use ztp_control::store::{Actor, Store, StoreError};
use ztp_dataplane::config::{Config, Source};
use ztp_dataplane::snapshot::grpc::ControlSource;
use ztp_dataplane::tls::TlsFiles;
use ztp_infra::fs::{write_atomic, Existing};
use ztp_proto::{Group, Protocol, Service, Snapshot, User};

use crate::pki;

/// Without a flag, each address is 127.0.0.1 and its default port, or a free port on
/// 127.0.0.1 when that one is taken (`up` says which it chose).
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The state folder (PKI, store); reused when it exists.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// The gateway's address [default: 127.0.0.1:9743, or a free port when taken].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The admin API's address [default: 127.0.0.1:9780, or a free port when taken].
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<SocketAddr>,
    /// The config stream's address [default: 127.0.0.1:9781, or a free port when taken].
    #[arg(long, value_name = "ADDR")]
    pub grpc_listen: Option<SocketAddr>,
    /// The data plane's /healthz and /readyz [default: 127.0.0.1:9790, or a free port
    /// when taken].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// The demo TCP echo backend [default: 127.0.0.1:9701, or a free port when taken].
    #[arg(long, value_name = "ADDR")]
    pub echo_backend: Option<SocketAddr>,
    /// The demo UDP echo backend [default: 127.0.0.1:9702, or a free port when taken].
    #[arg(long, value_name = "ADDR")]
    pub udp_echo_backend: Option<SocketAddr>,
}

/// How long Ctrl-C lets open connections finish before the data plane ends them.
const DRAIN: Duration = Duration::from_secs(5);

/// One address `up` binds (or, for the udp-echo example, prints).
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// The flag that sets it; `None` for the example's local port, which `up` only
    /// prints.
    flag: Option<&'static str>,
    /// What listens there, for messages.
    what: &'static str,
    /// Its port on 127.0.0.1 when no flag names it.
    default: u16,
    udp: bool,
}

const GATEWAY: Slot = Slot {
    flag: Some("--listen"),
    what: "the gateway",
    default: 9743,
    udp: false,
};
const API: Slot = Slot {
    flag: Some("--api-listen"),
    what: "the admin API",
    default: 9780,
    udp: false,
};
const GRPC: Slot = Slot {
    flag: Some("--grpc-listen"),
    what: "the config stream",
    default: 9781,
    udp: false,
};
const ADMIN: Slot = Slot {
    flag: Some("--admin-listen"),
    what: "the data plane's health endpoints",
    default: 9790,
    udp: false,
};
const ECHO: Slot = Slot {
    flag: Some("--echo-backend"),
    what: "the demo echo backend",
    default: 9701,
    udp: false,
};
const UDP_ECHO: Slot = Slot {
    flag: Some("--udp-echo-backend"),
    what: "the demo udp echo backend",
    default: 9702,
    udp: true,
};
/// The local UDP port of the printed udp-echo `connect` command.
const UDP_EXAMPLE: Slot = Slot {
    flag: None,
    what: "the udp-echo example",
    default: 9753,
    udp: true,
};

/// A socket bound to reserve an address until its user binds it (or, for the demo
/// backends, to serve on).
#[derive(Debug)]
enum Held {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Held {
    /// Binds `addr` as `slot` will be (a TCP listener or a UDP socket).
    fn bind(addr: SocketAddr, udp: bool) -> io::Result<Held> {
        if udp {
            std::net::UdpSocket::bind(addr).map(Held::Udp)
        } else {
            std::net::TcpListener::bind(addr).map(Held::Tcp)
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Held::Tcp(l) => l.local_addr(),
            Held::Udp(s) => s.local_addr(),
        }
    }
}

/// An address `up` will use, with the socket holding it meanwhile.
#[derive(Debug)]
struct Chosen {
    addr: SocketAddr,
    held: Held,
}

impl Chosen {
    /// Lets go of the address, for its user to bind.
    fn release(self) -> SocketAddr {
        self.addr
    }
}

/// Reserves an address for each slot: the one its flag names (`Some`), else its
/// default port on 127.0.0.1, else a free port there. Named addresses are bound first,
/// so a default never takes one a flag asked for. Returns the addresses in `slots`'
/// order and a line for each default that was taken; or, when any named address cannot
/// be bound, one line per such address, naming its flag.
fn choose(slots: &[(Slot, Option<SocketAddr>)]) -> Result<(Vec<Chosen>, Vec<String>), Vec<String>> {
    let mut chosen: Vec<Option<Chosen>> = slots.iter().map(|_| None).collect();
    let mut conflicts = Vec::new();
    for (i, (slot, named)) in slots.iter().enumerate() {
        let Some(addr) = *named else { continue };
        let flag = slot.flag.unwrap_or("?");
        let twin = slots[..i]
            .iter()
            .find(|(s, n)| s.udp == slot.udp && *n == Some(addr));
        if let Some((other, _)) = twin {
            conflicts.push(format!(
                "{flag} {addr} is also given to {}; give {flag} another address",
                other.flag.unwrap_or("?")
            ));
            continue;
        }
        match Held::bind(addr, slot.udp) {
            Ok(held) => chosen[i] = Some(Chosen { addr, held }),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => conflicts.push(format!(
                "{flag} {addr} is in use; name another port with {flag}, or leave {flag} out \
                 for a free one"
            )),
            Err(e) => conflicts.push(format!(
                "{flag} {addr}: cannot listen there ({e}); give {flag} another address"
            )),
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let mut moved = Vec::new();
    for (i, (slot, _)) in slots.iter().enumerate() {
        if chosen[i].is_some() {
            continue;
        }
        let default = SocketAddr::from((Ipv4Addr::LOCALHOST, slot.default));
        let held = match Held::bind(default, slot.udp) {
            Ok(held) => held,
            Err(e) => {
                let held = Held::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), slot.udp)
                    .map_err(|e| {
                        vec![format!(
                            "cannot find a free port on 127.0.0.1 for {}: {e}",
                            slot.what
                        )]
                    })?;
                let why = if e.kind() == io::ErrorKind::AddrInUse {
                    "in use".to_string()
                } else {
                    e.to_string()
                };
                let now = held.local_addr().map_err(|e| vec![e.to_string()])?;
                moved.push(match slot.flag {
                    Some(flag) => format!(
                        "{default} is {why}; {} is on {now} instead ({flag} to choose)",
                        slot.what
                    ),
                    None => format!("{default} is {why}; {} uses {now} instead", slot.what),
                });
                held
            }
        };
        let addr = held.local_addr().map_err(|e| vec![e.to_string()])?;
        chosen[i] = Some(Chosen { addr, held });
    }
    Ok((chosen.into_iter().flatten().collect(), moved))
}

/// Every address of one run, each bound (held) until its user binds it.
#[derive(Debug)]
struct Ports {
    listen: Chosen,
    api: Chosen,
    grpc: Chosen,
    admin: Chosen,
    echo: Chosen,
    udp_echo: Chosen,
    udp_example: Chosen,
}

impl Ports {
    /// Reserves the addresses of `args`; prints (to stderr) the defaults it swapped.
    fn reserve(args: &UpArgs) -> anyhow::Result<Ports> {
        let slots = [
            (GATEWAY, args.listen),
            (API, args.api_listen),
            (GRPC, args.grpc_listen),
            (ADMIN, args.admin_listen),
            (ECHO, args.echo_backend),
            (UDP_ECHO, args.udp_echo_backend),
            (UDP_EXAMPLE, None),
        ];
        // Each line becomes one `ztpctl: …` line of main's error output.
        let (chosen, moved) = choose(&slots).map_err(|lines| anyhow!(lines.join("\nztpctl: ")))?;
        for line in moved {
            eprintln!("ztpctl: {line}");
        }
        let mut it = chosen.into_iter();
        let mut next = || it.next().ok_or_else(|| anyhow!("an address is missing"));
        Ok(Ports {
            listen: next()?,
            api: next()?,
            grpc: next()?,
            admin: next()?,
            echo: next()?,
            udp_echo: next()?,
            udp_example: next()?,
        })
    }
}

/// Where to connect to reach a listener on `addr`: a wildcard address becomes 127.0.0.1
/// (a `[::]` listener is dual-stack, and falls back to IPv4 where IPv6 is off).
fn connectable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    }
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
    // The demo connector's certificate, also in a state folder from before it.
    if !dir.join(format!("connector-{DEMO_CONNECTOR}.pem")).exists() {
        let year = Duration::from_secs(365 * 24 * 3600);
        pki::connector(
            dir,
            DEMO_CONNECTOR,
            ztp_proto::names::DEFAULT_TRUST_DOMAIN,
            year,
            true,
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

/// The file in the state folder naming, for each demo service, the backend addresses
/// `up` gave it (JSON, name to addresses). A demo service is `up`'s while its address is
/// one of these: `up` moves it to this run's backend; an address set by anyone else is
/// left alone. Two addresses are listed only while a move is under way, so that a run
/// stopped half-way still finds the service its own.
const DEMO_RECORD: &str = "demo-backends.json";

/// Who the store's audit trail names for `up`'s own changes.
fn up_actor() -> Actor {
    Actor {
        token_id: "-".into(),
        token_name: "ztpctl up".into(),
        role: ztp_control::store::Role::Admin,
    }
}

/// A demo service that forwards to a backend `up` runs.
#[derive(Debug, Clone, Copy)]
struct Demo {
    name: &'static str,
    protocol: Protocol,
    backend: &'static str,
    /// Served through `up`'s demo connector, which dials the backend.
    connector: Option<&'static str>,
}

/// The connector `up` runs in-process, serving [`LAB_SVC`].
const DEMO_CONNECTOR: &str = "demo-lab";

const ECHO_SVC: Demo = Demo {
    name: "echo.svc.internal",
    protocol: Protocol::Tcp,
    backend: "the demo echo backend",
    connector: None,
};
const UDP_ECHO_SVC: Demo = Demo {
    name: "udp-echo.svc.internal",
    protocol: Protocol::Udp,
    backend: "the demo udp echo backend",
    connector: None,
};
/// The echo backend again, reached only through the demo connector's tunnel.
const LAB_SVC: Demo = Demo {
    name: "lab.svc.internal",
    protocol: Protocol::Tcp,
    backend: "the demo echo backend (through the demo connector)",
    connector: Some(DEMO_CONNECTOR),
};

impl Demo {
    /// The service as the first run writes it.
    fn service(&self, backend: SocketAddr) -> Service {
        Service {
            name: self.name.into(),
            protocol: self.protocol,
            address: Some(backend.to_string()),
            groups: vec!["demo".into()],
            allow: vec![],
            deny: vec![],
            handler: None,
            connector: self.connector.map(str::to_owned),
        }
    }

    /// Whether `svc` is this demo service as some run seeded it, whatever its backend
    /// address (a loopback one): how a state folder from before [`DEMO_RECORD`] is read.
    fn as_seeded(&self, svc: &Service) -> bool {
        let loopback = svc
            .address
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .is_some_and(|a| a.ip().is_loopback());
        loopback
            && *svc
                == Service {
                    address: svc.address.clone(),
                    ..self.service(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                }
    }
}

/// Whether `up` owns `svc`, the stored `demo` service: its address is one `up` gave it
/// (`record`, when [`DEMO_RECORD`] exists), or, in a state folder from before the
/// record, it is still as seeded.
fn owns(record: Option<&BTreeMap<String, Vec<String>>>, demo: &Demo, svc: &Service) -> bool {
    match record {
        Some(record) => match (record.get(demo.name), &svc.address) {
            (Some(given), Some(addr)) => given.contains(addr),
            _ => false,
        },
        None => demo.as_seeded(svc),
    }
}

fn read_record(path: &Path) -> anyhow::Result<Option<BTreeMap<String, Vec<String>>>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
            format!(
                "{} is not valid; remove it to reclaim the demo services",
                path.display()
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_record(path: &Path, record: &BTreeMap<String, Vec<String>>) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(record)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, 0o644, Existing::Replace)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The demo configuration, written once into an empty store as one version, with the
/// backends of this run.
async fn seed(store: &Store, record: &Path, backends: &[(Demo, SocketAddr)]) -> anyhow::Result<()> {
    let user = |name: &str, groups: &[&str]| User {
        name: name.into(),
        identities: vec![format!("{name}@example.com")],
        groups: groups.iter().map(|g| g.to_string()).collect(),
        disabled: false,
    };
    let mut services: Vec<Service> = backends.iter().map(|(d, a)| d.service(*a)).collect();
    services.push(Service {
        name: "whoami.svc.internal".into(),
        protocol: Protocol::Tcp,
        address: None,
        groups: vec![],
        allow: vec![],
        deny: vec![],
        handler: Some("identity-echo".into()),
        connector: None,
    });
    let snap = Snapshot {
        version: 1,
        services,
        users: vec![user("alice", &["demo"]), user("bob", &[])],
        groups: vec![Group {
            name: "demo".into(),
        }],
        revoked: vec![],
        connectors: vec![demo_connector()],
    };
    store.import(snap, Some(0), &Actor::system()).await?;
    let given = backends
        .iter()
        .map(|(d, a)| (d.name.to_string(), vec![a.to_string()]))
        .collect();
    write_record(record, &given)
}

fn demo_connector() -> ztp_proto::Connector {
    ztp_proto::Connector {
        name: DEMO_CONNECTOR.into(),
        description: "ztpctl up's demo connector".into(),
    }
}

/// Points each demo service `up` owns at this run's backend, through the store's API
/// (validated, versioned and audited as `ztpctl up`, as an admin's change would be).
/// A demo service someone else changed or removed is left alone, and said so.
async fn align(store: &Store, path: &Path, backends: &[(Demo, SocketAddr)]) -> anyhow::Result<()> {
    let record = read_record(path)?;
    let mut given = record.clone().unwrap_or_default();
    for (demo, backend) in backends {
        let want = backend.to_string();
        let (svc, version) = match store.service(demo.name).await {
            Ok(found) => found,
            // A demo added after this state folder was made (`up` never gave it an
            // address): added now, with its connector.
            Err(StoreError::NotFound { .. })
                if record.as_ref().is_none_or(|r| !r.contains_key(demo.name)) =>
            {
                if let Some(c) = demo.connector {
                    if let Err(StoreError::NotFound { .. }) = store.connector(c).await {
                        store
                            .put_connector(demo_connector(), true, None, &up_actor())
                            .await
                            .context("cannot add the demo connector")?;
                    }
                }
                given.insert(demo.name.to_string(), vec![want.clone()]);
                write_record(path, &given)?;
                store
                    .put_service(demo.service(*backend), true, None, &up_actor())
                    .await
                    .with_context(|| format!("cannot add {}", demo.name))?;
                continue;
            }
            Err(StoreError::NotFound { .. }) => {
                eprintln!(
                    "ztpctl: {} was removed; {} on {want} serves nothing",
                    demo.name, demo.backend
                );
                continue;
            }
            Err(e) => return Err(e).context(format!("cannot read {}", demo.name)),
        };
        if !owns(record.as_ref(), demo, &svc) {
            eprintln!(
                "ztpctl: {} forwards to {} (set outside `up`), not to {} on {want}",
                demo.name,
                svc.address.as_deref().unwrap_or("no address"),
                demo.backend
            );
            continue;
        }
        if svc.address.as_deref() != Some(want.as_str()) {
            // Both addresses are `up`'s until the store has the new one.
            let both = svc.address.iter().cloned().chain([want.clone()]).collect();
            given.insert(demo.name.to_string(), both);
            write_record(path, &given)?;
            let moved = Service {
                address: Some(want.clone()),
                ..svc
            };
            store
                .put_service(moved, false, Some(version), &up_actor())
                .await
                .with_context(|| format!("cannot point {} at {want}", demo.name))?;
        }
        given.insert(demo.name.to_string(), vec![want]);
    }
    if record.as_ref() != Some(&given) {
        write_record(path, &given)?;
    }
    Ok(())
}

/// The demo backends, on the sockets reserved for them: a TCP echo and a UDP echo.
fn backends(tcp: Held, udp: Held) -> anyhow::Result<()> {
    let (Held::Tcp(tcp), Held::Udp(udp)) = (tcp, udp) else {
        bail!("the demo backends' sockets are of the wrong kind");
    };
    tcp.set_nonblocking(true)?;
    udp.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(tcp)?;
    let sock = tokio::net::UdpSocket::from_std(udp)?;
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

/// One HTTP/1.1 GET to a data plane's admin port, bounded by `bound`.
async fn admin_get(admin: SocketAddr, path: &str, bound: Duration) -> Option<String> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(connectable(admin))
            .await
            .ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.ok()?;
        Some(String::from_utf8_lossy(&resp).into_owned())
    };
    tokio::time::timeout(bound, get).await.ok().flatten()
}

async fn wait_ready(admin: SocketAddr, bound: Duration) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + bound;
    loop {
        let resp = admin_get(admin, "/readyz", Duration::from_secs(1)).await;
        if resp.is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            return Ok(());
        }
        if tokio::time::Instant::now() > end {
            bail!("the data plane did not become ready within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The data plane's open connections, from its metrics; `None` when they cannot be read.
async fn open_connections(admin: SocketAddr) -> Option<u64> {
    let resp = admin_get(admin, "/metrics", Duration::from_secs(1)).await?;
    resp.lines()
        .find_map(|l| l.strip_prefix("ztp_active_connections "))
        .and_then(|n| n.trim().parse().ok())
}

/// Runs the data plane on its own thread and runtime, so that once it returns, the tasks
/// it leaves behind (its config stream) end with that runtime instead of logging about a
/// control plane that is going away.
fn spawn_data_plane(
    config: Config,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<Result<(), String>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ztp-dataplane".into())
        .spawn(move || {
            let r = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let r = rt
                        .block_on(ztp_dataplane::node::run(config, stop))
                        .map_err(|e| e.to_string());
                    rt.shutdown_timeout(Duration::from_millis(100));
                    r
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(r);
        })
        .context("cannot start the data plane's thread")?;
    Ok(rx)
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    // The ports first: a conflict stops the run before anything is written.
    let ports = Ports::reserve(&args)?;
    let state = args.state.clone().unwrap_or_else(default_state);
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    let state = state.canonicalize()?;
    let pki_dir = state.join("pki");
    ensure_pki(&pki_dir)?;

    let data_dir = state.join("control");
    let store = ztp_control::server::open_store(&data_dir).await?;
    let demo = [
        (ECHO_SVC, ports.echo.addr),
        (UDP_ECHO_SVC, ports.udp_echo.addr),
        (LAB_SVC, ports.echo.addr),
    ];
    let record = state.join(DEMO_RECORD);
    if store.version()? == 0 {
        seed(&store, &record, &demo).await?;
    } else {
        align(&store, &record, &demo).await?;
    }
    let Ports {
        listen,
        api,
        grpc,
        admin,
        echo,
        udp_echo,
        udp_example,
    } = ports;
    backends(echo.held, udp_echo.held)?;
    let (listen, api, grpc, admin) = (
        listen.release(),
        api.release(),
        grpc.release(),
        admin.release(),
    );

    let (control_tx, control_rx) = tokio::sync::watch::channel(false);
    let (node_tx, node_rx) = tokio::sync::watch::channel(false);
    let stopped = |rx: &tokio::sync::watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let opts = Options {
        data_dir: data_dir.clone(),
        api_listen: api,
        api_tls: None,
        grpc: Some(GrpcOptions {
            listen: grpc,
            cert: pki_dir.join("server.pem"),
            key: pki_dir.join("server.key"),
            node_ca: pki_dir.join("ca.pem"),
            trust_domain: ztp_proto::names::DEFAULT_TRUST_DOMAIN.into(),
        }),
        audit_retention: 100_000,
    };
    let control_stop = stopped(&control_rx);
    let mut control =
        tokio::spawn(async move { ztp_control::server::serve(store, &opts, control_stop).await });

    // QUIC on the gateway's port, over UDP, when that is free too.
    let quic = match std::net::UdpSocket::bind(listen) {
        Ok(probe) => {
            drop(probe);
            Some(ztp_dataplane::quic::QuicSettings {
                listen,
                max_streams: 256,
                udp_idle: Duration::from_secs(60),
                max_connections_per_identity: 64,
                retry_above: 64,
                trust_domain: ztp_proto::names::DEFAULT_TRUST_DOMAIN.into(),
            })
        }
        Err(e) => {
            eprintln!("ztpctl: udp {listen} is not free ({e}); the gateway serves TCP only");
            None
        }
    };
    let config = Config {
        trust_domain: ztp_proto::names::DEFAULT_TRUST_DOMAIN.into(),
        listen,
        advertise: None,
        quic,
        tls: TlsFiles {
            cert: pki_dir.join("server.pem"),
            key: ztp_dataplane::tls::KeySource::File(pki_dir.join("server.key")),
            client_ca: pki_dir.join("ca.pem"),
        },
        source: Source::Control(ControlSource {
            url: format!("https://localhost:{}", grpc.port()),
            node_cert: pki_dir.join("node-local.pem"),
            node_key: pki_dir.join("node-local.key"),
            control_ca: pki_dir.join("ca.pem"),
            trust_domain: ztp_proto::names::DEFAULT_TRUST_DOMAIN.into(),
            listen: listen.to_string(),
            schema: ztp_proto::wire::SCHEMA,
        }),
        admin_listen: admin,
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
        drain_timeout: DRAIN,
        threads: 1,
    };
    let mut node = spawn_data_plane(config, stopped(&node_rx))?;

    tokio::select! {
        r = wait_ready(admin, Duration::from_secs(30)) => r?,
        r = &mut control => bail!("the control plane stopped: {}", describe(r.map(|r| r.map_err(|e| format!("{e:#}"))))),
        r = &mut node => bail!("the data plane stopped: {}", node_ended(r)),
    }
    // The demo connector: a tunnel from "the lab" to the gateway, in this process.
    let connector = crate::connector::RunArgs {
        via: vec![format!("localhost:{}", connectable(listen).port())],
        cert: pki_dir.join(format!("connector-{DEMO_CONNECTOR}.pem")),
        key: pki_dir.join(format!("connector-{DEMO_CONNECTOR}.key")),
        ca: pki_dir.join("ca.pem"),
        tunnels: 1,
        transport: crate::connector::Transport::Auto,
        quiet: true,
    };
    let connector = tokio::spawn(crate::connector::run(connector));
    let addrs = Welcome {
        listen,
        api,
        udp_example: udp_example.addr,
    };
    drop(udp_example);
    print_welcome(&state, &pki_dir, &data_dir, &addrs);

    let sig = tokio::select! {
        sig = ztp_infra::signal::stop() => sig,
        r = &mut control => bail!("the control plane stopped: {}", describe(r.map(|r| r.map_err(|e| format!("{e:#}"))))),
        r = &mut node => bail!("the data plane stopped: {}", node_ended(r)),
    };
    // The demo connector goes first: its tunnel is not a user's connection to drain.
    connector.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The data plane drains while the control plane still serves it (its config stream
    // and the connections' audit records), then the control plane stops.
    match open_connections(admin).await {
        Some(n) if n > 0 => {
            let (what, it) = if n == 1 {
                ("1 open connection".to_string(), "it")
            } else {
                (format!("{n} open connections"), "them")
            };
            eprintln!(
                "ztpctl: {sig}: stopping; draining {what} for up to {}s (Ctrl-C again to \
                 end {it} now)",
                DRAIN.as_secs()
            );
        }
        _ => eprintln!("ztpctl: {sig}: stopping"),
    }
    let _ = node_tx.send(true);
    tokio::select! {
        r = &mut node => {
            if let Ok(Err(e)) = r {
                eprintln!("ztpctl: data plane: {e}");
            }
        }
        sig = ztp_infra::signal::stop() => eprintln!("ztpctl: {sig}: ending open connections now"),
    }
    let _ = control_tx.send(true);
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), control).await {
        eprintln!("ztpctl: control plane: {e:#}");
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

fn node_ended(r: Result<Result<(), String>, tokio::sync::oneshot::error::RecvError>) -> String {
    match r {
        Ok(Ok(())) => "it exited".into(),
        Ok(Err(e)) => e,
        Err(_) => "its thread ended".into(),
    }
}

/// The addresses the welcome prints.
struct Welcome {
    listen: SocketAddr,
    api: SocketAddr,
    udp_example: SocketAddr,
}

fn print_welcome(state: &Path, pki: &Path, data: &Path, addrs: &Welcome) {
    let me = std::env::current_exe()
        .ok()
        .map(|p| sh(&p))
        .unwrap_or_else(|| "ztpctl".into());
    let via = connectable(addrs.listen);
    let api = connectable(addrs.api);
    let udp = addrs.udp_example;
    let files = |who: &str| {
        format!(
            "--cert {} --key {} --ca {}",
            sh(&pki.join(format!("{who}.pem"))),
            sh(&pki.join(format!("{who}.key"))),
            sh(&pki.join("ca.pem"))
        )
    };
    println!("ZTP is up. State: {}", state.display());
    println!("  gateway (TLS 1.3, mTLS, SNI)  {}", addrs.listen);
    println!("  admin API                     http://{api}");
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
        "  echo hello | {me} connect lab.svc.internal --via {via} {}   # through the demo connector's tunnel",
        files("alice")
    );
    println!(
        "  {me} connect udp-echo.svc.internal --via {via} {} --udp-listen {udp}",
        files("alice")
    );
    println!(
        "     then, elsewhere: echo hello | nc -u -w1 {} {}",
        udp.ip(),
        udp.port()
    );
    println!("As bob (not in the demo group), the echo service answers 403 forbidden:");
    println!(
        "  echo hello | {me} connect echo.svc.internal --via {via} {}",
        files("bob")
    );
    println!();
    println!("Administer it:");
    println!(
        "  export ZTP_SERVER=http://{api} ZTP_TOKEN=$(cat {})",
        sh(&data.join("admin-token"))
    );
    println!("  {me} service list; {me} user list; {me} node list");
    println!();
    println!("Ctrl-C stops it; the next `up` reuses the state.");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(flag: &'static str, default: u16, udp: bool) -> Slot {
        Slot {
            flag: Some(flag),
            what: "the thing",
            default,
            udp,
        }
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// A folder under the system's temporary one, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(what: &str) -> Dir {
            let d = std::env::temp_dir().join(format!(
                "ztpctl-up-{what}-{}-{:?}",
                std::process::id(),
                std::time::SystemTime::now()
            ));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_taken_default_becomes_a_free_port_on_loopback_and_is_said() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = busy.local_addr().unwrap().port();
        let busy_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken_udp = busy_udp.local_addr().unwrap().port();
        let (chosen, moved) = choose(&[
            (slot("--listen", taken, false), None),
            (slot("--udp-echo-backend", taken_udp, true), None),
        ])
        .unwrap();
        assert_eq!(chosen[0].addr.ip(), Ipv4Addr::LOCALHOST);
        assert_ne!(chosen[0].addr.port(), taken);
        assert_ne!(chosen[1].addr.port(), taken_udp);
        assert!(matches!(chosen[1].held, Held::Udp(_)));
        assert_eq!(moved.len(), 2, "{moved:?}");
        assert!(
            moved[0].contains(&local(taken).to_string())
                && moved[0].contains(&chosen[0].addr.to_string())
                && moved[0].contains("--listen"),
            "{moved:?}"
        );
        // The address stays reserved until released.
        assert!(std::net::TcpListener::bind(chosen[0].addr).is_err());
        let addr = chosen.into_iter().next().unwrap().release();
        assert!(std::net::TcpListener::bind(addr).is_ok());
    }

    #[test]
    fn a_free_default_is_kept_and_a_named_address_wins_over_a_default() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (chosen, moved) = choose(&[
            (slot("--listen", free.port(), false), None),
            (slot("--api-listen", 1, false), Some(free)),
        ])
        .unwrap();
        assert_eq!(chosen[1].addr, free);
        assert_ne!(
            chosen[0].addr, free,
            "the default must not take the named one"
        );
        assert_eq!(moved.len(), 1, "{moved:?}");

        let other = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (chosen, moved) = choose(&[(slot("--listen", other.port(), false), None)]).unwrap();
        assert_eq!(chosen[0].addr, other);
        assert!(moved.is_empty(), "{moved:?}");
    }

    #[test]
    fn every_named_address_that_cannot_be_bound_is_one_line_naming_its_flag() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = busy.local_addr().unwrap();
        let udp = busy_udp.local_addr().unwrap();
        let twin = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let lines = choose(&[
            (slot("--listen", 1, false), None),
            (slot("--grpc-listen", 1, false), Some(tcp)),
            (slot("--udp-echo-backend", 1, true), Some(udp)),
            (slot("--api-listen", 1, false), Some(twin)),
            (slot("--admin-listen", 1, false), Some(twin)),
            // The same port over UDP is another socket: no conflict.
            (slot("--udp-x", 1, true), Some(twin)),
        ])
        .unwrap_err();
        assert_eq!(lines.len(), 3, "{lines:?}");
        for (line, flag, addr) in [
            (&lines[0], "--grpc-listen", tcp),
            (&lines[1], "--udp-echo-backend", udp),
            (&lines[2], "--admin-listen", twin),
        ] {
            assert!(
                line.starts_with(&format!("{flag} {addr} ")) && !line.contains('\n'),
                "{line}"
            );
        }
        assert!(lines[0].contains("in use"), "{}", lines[0]);
        assert!(lines[2].contains("--api-listen"), "{}", lines[2]);
    }

    #[test]
    fn wildcard_addresses_are_reached_on_loopback() {
        let c = |s: &str| connectable(s.parse().unwrap()).to_string();
        assert_eq!(c("0.0.0.0:9743"), "127.0.0.1:9743");
        assert_eq!(c("[::]:9743"), "127.0.0.1:9743");
        assert_eq!(c("127.0.0.1:5"), "127.0.0.1:5");
        assert_eq!(c("[::1]:5"), "[::1]:5");
    }

    #[test]
    fn up_owns_a_demo_service_while_its_address_is_one_it_gave() {
        let seeded = ECHO_SVC.service(local(9701));
        let with = |f: &dyn Fn(&mut Service)| {
            let mut s = seeded.clone();
            f(&mut s);
            s
        };
        let record: BTreeMap<String, Vec<String>> = [(
            ECHO_SVC.name.to_string(),
            vec!["127.0.0.1:9701".to_string(), "127.0.0.1:4000".to_string()],
        )]
        .into();
        let other_addr = with(&|s| s.address = Some("127.0.0.1:5555".into()));
        let other_groups = with(&|s| s.groups.clear());
        let remote = with(&|s| s.address = Some("192.0.2.1:9701".into()));
        let no_addr = with(&|s| s.address = None);
        for (record, svc, want) in [
            (Some(&record), &seeded, true),
            (Some(&record), &other_groups, true),
            (Some(&record), &other_addr, false),
            (Some(&record), &no_addr, false),
            (Some(&BTreeMap::new()), &seeded, false),
            // A state folder from before the record: as seeded, on any loopback port.
            (None, &seeded, true),
            (None, &other_addr, true),
            (None, &other_groups, false),
            (None, &remote, false),
            (None, &no_addr, false),
        ] {
            assert_eq!(owns(record, &ECHO_SVC, svc), want, "{record:?} {svc:?}");
        }
        assert!(!owns(None, &UDP_ECHO_SVC, &seeded), "another protocol");
    }

    #[tokio::test]
    async fn demo_services_follow_this_runs_backends_unless_changed_by_others() {
        let dir = Dir::new("align");
        let store = Store::open(&dir.0.join("control")).unwrap();
        let record = dir.0.join(DEMO_RECORD);
        async fn svc(store: &Store, name: &str) -> Service {
            store.service(name).await.unwrap().0
        }
        seed(
            &store,
            &record,
            &[(ECHO_SVC, local(9701)), (UDP_ECHO_SVC, local(9702))],
        )
        .await
        .unwrap();
        let v1 = store.version().unwrap();

        // The same backends: nothing written.
        let same = [(ECHO_SVC, local(9701)), (UDP_ECHO_SVC, local(9702))];
        align(&store, &record, &same).await.unwrap();
        assert_eq!(store.version().unwrap(), v1);

        // Another echo backend: the echo service follows, once, audited as `ztpctl up`.
        let moved = [(ECHO_SVC, local(4001)), (UDP_ECHO_SVC, local(9702))];
        align(&store, &record, &moved).await.unwrap();
        let echo = svc(&store, ECHO_SVC.name).await;
        assert_eq!(echo, ECHO_SVC.service(local(4001)));
        assert_eq!(store.version().unwrap(), v1 + 1);
        let last = store.audit(1).await.unwrap();
        assert_eq!(last[0].actor, up_actor());
        assert_eq!(last[0].target, ECHO_SVC.name);
        let given = read_record(&record).unwrap().unwrap();
        assert_eq!(given[ECHO_SVC.name], vec!["127.0.0.1:4001".to_string()]);

        // An admin points it elsewhere: no longer `up`'s.
        let theirs = Service {
            address: Some("127.0.0.1:5555".into()),
            ..echo
        };
        store
            .put_service(theirs.clone(), false, None, &Actor::system())
            .await
            .unwrap();
        let v2 = store.version().unwrap();
        align(&store, &record, &[(ECHO_SVC, local(4002))])
            .await
            .unwrap();
        assert_eq!(svc(&store, ECHO_SVC.name).await, theirs);
        assert_eq!(store.version().unwrap(), v2);

        // A move stopped half-way (both addresses recorded) is finished by the next run.
        let half: BTreeMap<String, Vec<String>> = [(
            UDP_ECHO_SVC.name.to_string(),
            vec!["127.0.0.1:9702".to_string(), "127.0.0.1:4003".to_string()],
        )]
        .into();
        write_record(&record, &half).unwrap();
        align(&store, &record, &[(UDP_ECHO_SVC, local(4004))])
            .await
            .unwrap();
        assert_eq!(
            svc(&store, UDP_ECHO_SVC.name).await,
            UDP_ECHO_SVC.service(local(4004))
        );
        let given = read_record(&record).unwrap().unwrap();
        assert_eq!(given[UDP_ECHO_SVC.name], vec!["127.0.0.1:4004".to_string()]);
    }
}

//! `ztpctl connector run`: a connector, next to backends no data plane can dial. It dials
//! out to the data planes (ALPN `ztp-tunnel/1`, its certificate
//! `spiffe://DOMAIN/connector/NAME`) over QUIC, or over TCP + TLS 1.3 with HTTP/2 where
//! UDP is blocked (`ztp_infra::mux`), holds `--tunnels` tunnels to distinct replicas,
//! and serves the sessions they send it: one stream each, for the services assigned to
//! it and nothing else (the contract is `ztp_proto::tunnel`).
//!
//! It learns which services it serves, and their addresses, from the data planes (the
//! tunnel's control stream), kept current on every change; a session for anything else
//! is refused and logged. It learns where the replicas are the same way, and places its
//! tunnels by rendezvous hashing of its name over them (`--via` until it knows): adding
//! or removing a replica moves only the tunnels that ranked it. A tunnel that ends is
//! dialled again, to the best-ranked free replica, with a jittered backoff.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, ValueEnum};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::VarInt;
use rustls::sign::SingleCertAndKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztp_infra::mux::{BoxSession, H2Server, QuicIo, SessionIo, CONTROL_PATH, SESSION_PATH};
use ztp_proto::tunnel::{
    decode_assignments, decode_header, Assignment, Status, ALPN, MAX_ASSIGNMENTS, MAX_HEADER,
    VERSION,
};

/// How long a backend has to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Sessions one tunnel may carry at once.
const MAX_SESSIONS: u32 = 4096;
/// Backoff between attempts to (re)establish a tunnel.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A tunnel that lived this long resets the backoff when it ends.
const STABLE: Duration = Duration::from_secs(30);
/// Under `--transport auto`, how long QUIC has alone before TCP is tried beside it.
const TCP_AFTER: Duration = Duration::from_millis(500);
/// Between the first dials of a connector's tunnels (jittered).
const STAGGER: Duration = Duration::from_millis(100);
/// How often a tunnel checks that its replica is still among the best placed.
const REPLACE_EVERY: Duration = Duration::from_secs(1);
/// A replica that could not be reached is passed over this long.
const PASS_OVER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Auto,
    Quic,
    Tcp,
}

/// Say what the connector does on stderr (not when `ztpctl up` runs it in-process).
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

macro_rules! say {
    ($($arg:tt)*) => {
        if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($arg)*);
        }
    };
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where the data planes are: HOST:PORT[,HOST:PORT…] (their client port). The
    /// connector starts here, learns every replica from them, and places its tunnels
    /// among those by rendezvous hashing (back to these when none answers).
    #[arg(
        long,
        value_name = "HOST:PORT,…",
        value_delimiter = ',',
        required = true
    )]
    pub via: Vec<String>,
    /// The connector's certificate (PEM), carrying spiffe://DOMAIN/connector/NAME.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// The connector's key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The CA that signed the data planes' server certificate (PEM); each is checked
    /// against it and the host name dialled.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Tunnels to hold, each to a distinct data plane.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64), value_name = "N")]
    pub tunnels: u16,
    /// How tunnels are carried: QUIC, TCP + TLS (where UDP is blocked), or QUIC with TCP
    /// tried beside it when QUIC has not answered within 500 ms.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    pub transport: Transport,
    /// Say nothing on stderr (`ztpctl up` runs its demo connector so).
    #[arg(skip)]
    pub quiet: bool,
}

/// The services this connector serves, by name, as the data planes last said.
type Assigned = Arc<Mutex<HashMap<String, Assignment>>>;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.quiet {
        QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let roots = ztp_infra::tls::read_roots(&args.ca)?;
    let provider = ztp_infra::tls::provider();
    let certified = ztp_infra::tls::certified_key(&args.cert, &args.key, &provider)?;
    // The connector's name (its certificate's URI) ranks the replicas for it.
    let name = certified
        .cert
        .first()
        .and_then(|leaf| first_uri(leaf))
        .unwrap_or_else(|| args.cert.display().to_string());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let tls = Arc::new(tls);
    let crypto = QuicClientConfig::try_from(tls.clone()).map_err(|e| anyhow!("QUIC TLS: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // A tunnel that goes silent is given up after 3 s on both ends: the data plane stops
    // sending sessions into it, and the connector dials again. The data plane opens a
    // stream per session.
    let transport =
        ztp_infra::mux::machine_transport(MAX_SESSIONS, ztp_proto::quic::MAX_UDP_PAYLOAD);
    config.transport_config(Arc::new(transport));
    let dialer = Arc::new(Dialer {
        quic: config,
        tls: tokio_rustls::TlsConnector::from(tls),
        transport: args.transport,
    });

    // Each replica once, in the order given.
    let mut vias: Vec<String> = Vec::new();
    for v in &args.via {
        if !vias.contains(v) {
            vias.push(v.clone());
        }
    }
    let tunnels = usize::from(args.tunnels);
    say!(
        "ztpctl: connector: holding {tunnels} tunnel(s) to distinct replicas, first of {}",
        vias.join(", ")
    );
    let placement = Arc::new(Placement::new(name, vias, tunnels));
    let mut tasks = tokio::task::JoinSet::new();
    for slot in 0..tunnels {
        tasks.spawn(hold(slot, placement.clone(), dialer.clone()));
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    Ok(())
}

/// The host of HOST:PORT (an IPv6 address without its brackets).
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// The first URI of a certificate's subjectAltName.
fn first_uri(leaf: &rustls::pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

/// Where the tunnels go: the replicas known (learnt from the data planes, else `--via`),
/// ranked for this connector by rendezvous hashing, each held by at most one tunnel.
struct Placement {
    name: String,
    vias: Vec<String>,
    tunnels: usize,
    state: Mutex<PlacementState>,
    /// Moves whenever the learnt replica set changes.
    changes: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct PlacementState {
    /// The replicas as the data planes last said (empty until one says), and when the
    /// control plane took that list (a list older than the one held is ignored).
    learnt: Vec<String>,
    learnt_at: u64,
    /// The name each learnt replica's certificate is checked against: its own host
    /// name, or, for an address, the name of the `--via` it was learnt through (the
    /// replicas of one fleet present one server certificate).
    names: HashMap<String, String>,
    held: HashSet<String>,
    /// Replicas that could not be reached, until when they are passed over.
    failed: HashMap<String, tokio::time::Instant>,
    /// Replicas that were in the learnt set and left it (they died, or lost the
    /// control plane), until they come back.
    gone: HashSet<String>,
}

impl Placement {
    fn new(name: String, vias: Vec<String>, tunnels: usize) -> Self {
        Placement {
            name,
            vias,
            tunnels,
            state: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PlacementState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This connector's weight for `replica` (the highest ranks first).
    fn score(&self, replica: &str) -> u64 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.name.as_bytes());
        ctx.update(&[0]);
        ctx.update(replica.as_bytes());
        let d = ctx.finish();
        u64::from_be_bytes(d.as_ref()[..8].try_into().unwrap_or_default())
    }

    /// The known replicas, best ranked first.
    fn ranked(&self, st: &PlacementState) -> Vec<String> {
        let mut all = if st.learnt.is_empty() {
            self.vias.clone()
        } else {
            st.learnt.clone()
        };
        all.sort_by_key(|r| std::cmp::Reverse(self.score(r)));
        all
    }

    /// The best-ranked replica no tunnel holds and none failed lately, taken; else a
    /// `--via` (the learnt addresses may not be reachable from here); else any free one
    /// (a replica that failed may be back). With the name to check its certificate
    /// against.
    fn take(&self) -> Option<(String, String)> {
        let mut st = self.lock();
        let now = tokio::time::Instant::now();
        st.failed.retain(|_, until| *until > now);
        let ranked = self.ranked(&st);
        let mut vias = self.vias.clone();
        vias.sort_by_key(|r| std::cmp::Reverse(self.score(r)));
        let free = |r: &&String| !st.held.contains(*r);
        let fresh = |r: &&String| !st.held.contains(*r) && !st.failed.contains_key(*r);
        let pick = ranked
            .iter()
            .find(fresh)
            .or_else(|| vias.iter().find(fresh))
            .or_else(|| ranked.iter().find(free))
            .or_else(|| vias.iter().find(free))?
            .clone();
        st.held.insert(pick.clone());
        let name = self.name_of(&st, &pick);
        Some((pick, name))
    }

    fn name_of(&self, st: &PlacementState, replica: &str) -> String {
        st.names
            .get(replica)
            .cloned()
            .unwrap_or_else(|| host_of(replica).to_owned())
    }

    fn give_back(&self, via: &str) {
        self.lock().held.remove(via);
    }

    fn failed(&self, via: &str) {
        self.lock()
            .failed
            .insert(via.to_owned(), tokio::time::Instant::now() + PASS_OVER);
    }

    /// A better-ranked replica than `via` that no tunnel holds and is among the
    /// `--tunnels` best (where a tunnel on `via` should move), if any.
    fn better_than(&self, via: &str) -> Option<String> {
        let st = self.lock();
        // Before the data planes say where the replicas are, `--via` is all there is:
        // nothing to move to.
        if st.learnt.is_empty() {
            return None;
        }
        let ranked = self.ranked(&st);
        let best: Vec<&String> = ranked
            .iter()
            .filter(|r| !st.failed.contains_key(*r))
            .take(self.tunnels)
            .collect();
        if best.iter().any(|r| *r == via) {
            return None;
        }
        best.into_iter().find(|r| !st.held.contains(*r)).cloned()
    }

    /// The name to check `replica`'s certificate against.
    fn name(&self, replica: &str) -> String {
        let st = self.lock();
        self.name_of(&st, replica)
    }

    /// Takes `to` if it is still free.
    fn reserve(&self, to: &str) -> bool {
        self.lock().held.insert(to.to_owned())
    }

    /// The replicas as the data plane at `via` says (sorted), as the control plane took
    /// them at `at_ms`.
    fn learn(&self, replicas: Vec<String>, at_ms: u64, via: &str) {
        if replicas.is_empty() {
            return;
        }
        let mut st = self.lock();
        if at_ms < st.learnt_at {
            return;
        }
        st.learnt_at = at_ms;
        let via_name = self.name_of(&st, via);
        for r in &replicas {
            let host = host_of(r);
            let name = if host.parse::<std::net::IpAddr>().is_ok() {
                via_name.clone()
            } else {
                host.to_owned()
            };
            st.names.insert(r.clone(), name);
        }
        if st.learnt != replicas {
            say!(
                "ztpctl: connector: the data planes are at {}",
                replicas.join(", ")
            );
            let left: Vec<String> = st
                .learnt
                .iter()
                .filter(|r| !replicas.contains(r))
                .cloned()
                .collect();
            st.gone.retain(|r| !replicas.contains(r));
            st.gone.extend(left);
            st.learnt = replicas;
            drop(st);
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// The tunnel dialled as `via` is to the replica whose own address is `me`: it is
    /// known by that from now on (unless another tunnel holds that already). Returns the
    /// tunnel's name.
    fn relabel(&self, via: &str, me: &str) -> String {
        if me.is_empty() || me == via {
            return via.to_owned();
        }
        let mut st = self.lock();
        // Only an address of the replica set: placement ranks those (a data plane whose
        // control plane sends no set would otherwise have its tunnel moved between its
        // two names).
        if st.held.contains(me) || !st.learnt.iter().any(|r| r == me) {
            return via.to_owned();
        }
        st.held.remove(via);
        st.held.insert(me.to_owned());
        if let Some(name) = st
            .names
            .get(via)
            .cloned()
            .or_else(|| Some(host_of(via).to_owned()))
        {
            st.names.entry(me.to_owned()).or_insert(name);
        }
        me.to_owned()
    }

    /// Whether `via` left the learnt replica set (its tunnel is likely dead: the data
    /// planes learnt it within the control plane's second, the tunnel's own silence
    /// takes 3 s to tell).
    fn left(&self, via: &str) -> bool {
        self.lock().gone.contains(via)
    }

    /// The best-ranked replica no tunnel holds, none failed lately and not `via`.
    fn best_free(&self) -> Option<String> {
        let st = self.lock();
        self.ranked(&st)
            .into_iter()
            .find(|r| !st.held.contains(r) && !st.failed.contains_key(r) && !st.gone.contains(r))
    }
}

/// Holds tunnel `slot`: to the best-ranked free replica, and whenever a tunnel ends or
/// cannot be made, to the next (so that a replica that died is replaced by another at
/// once, not dialled again and again).
async fn hold(slot: usize, placement: Arc<Placement>, dialer: Arc<Dialer>) {
    // Staggered: the tunnels of a connector (and of connectors started together) do not
    // all dial at once.
    if slot > 0 {
        sleep_jittered(STAGGER * slot as u32).await;
    }
    let mut backoff = BACKOFF_MIN;
    let mut next: Option<(String, Carrier)> = None;
    loop {
        let (via, carrier) = match next.take() {
            Some(moved) => moved,
            None => {
                let Some((via, name)) = placement.take() else {
                    tokio::time::sleep(backoff).await;
                    continue;
                };
                match dialer.dial(&via, &name).await {
                    Ok(c) => (via, c),
                    Err(e) => {
                        say!("ztpctl: connector: tunnel {slot} to {via}: {e:#}");
                        placement.failed(&via);
                        placement.give_back(&via);
                        sleep_jittered(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
        };
        let began = tokio::time::Instant::now();
        let end = tunnel(&via, carrier, &placement, &dialer).await;
        match end {
            End::Moved(to, carrier, from) => {
                say!("ztpctl: connector: tunnel {slot} moved from {from} to {to}");
                next = Some((to, carrier));
                continue;
            }
            End::Ended(why, via) => {
                placement.give_back(&via);
                say!("ztpctl: connector: tunnel to {via} ended: {why}");
                // Quick again only after a tunnel that served a while: one refused at
                // once (an unknown connector, a revoked certificate) backs off. Either
                // way the replica is passed over a while (it may be frozen, or going):
                // the next tunnel goes to another if there is one.
                if began.elapsed() >= STABLE {
                    backoff = BACKOFF_MIN;
                }
                placement.failed(&via);
            }
        }
        sleep_jittered(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Jittered, so that connectors cut off together do not come back together.
async fn sleep_jittered(d: Duration) {
    tokio::time::sleep(d.mul_f64(0.5 + rand_fraction())).await;
}

/// A number in [0, 1) from the clock's low bits (jitter needs no better).
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

/// Makes tunnels: QUIC, TCP + TLS, or both raced.
struct Dialer {
    quic: quinn::ClientConfig,
    tls: tokio_rustls::TlsConnector,
    transport: Transport,
}

/// A tunnel's connection, before it serves.
enum Carrier {
    Quic(quinn::Connection),
    Tcp(H2Server),
}

impl Carrier {
    fn transport(&self) -> &'static str {
        match self {
            Carrier::Quic(_) => "quic",
            Carrier::Tcp(_) => "tcp",
        }
    }
}

impl Dialer {
    /// A tunnel to `via` (HOST:PORT), whose certificate must name `host`.
    async fn dial(&self, via: &str, host: &str) -> anyhow::Result<Carrier> {
        if !via.contains(':') {
            return Err(anyhow!("{via}: not HOST:PORT"));
        }
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(via)
            .await
            .with_context(|| format!("cannot resolve {via}"))?
            .collect();
        // IPv4 first: a name with both (`localhost`) is most often served on IPv4, and a
        // QUIC attempt to a silent address waits out its timeout.
        addrs.sort_by_key(|a| a.is_ipv6());
        let mut last = anyhow!("{via}: no address");
        for addr in addrs {
            let attempt = async {
                match self.transport {
                    Transport::Quic => self.quic(addr, host).await,
                    Transport::Tcp => self.tcp(addr, host).await,
                    Transport::Auto => {
                        // QUIC first; TCP beside it once QUIC is late (UDP blocked);
                        // the first tunnel up wins.
                        let quic = self.quic(addr, host);
                        let tcp = async {
                            tokio::time::sleep(TCP_AFTER).await;
                            self.tcp(addr, host).await
                        };
                        tokio::pin!(quic, tcp);
                        let mut quic_err = None;
                        let mut tcp_err = None;
                        loop {
                            tokio::select! {
                                r = &mut quic, if quic_err.is_none() => match r {
                                    Ok(c) => return Ok(c),
                                    Err(e) => quic_err = Some(e),
                                },
                                r = &mut tcp, if tcp_err.is_none() => match r {
                                    Ok(c) => return Ok(c),
                                    Err(e) => tcp_err = Some(e),
                                },
                            }
                            if let (Some(q), Some(t)) = (&quic_err, &tcp_err) {
                                return Err(anyhow!("quic: {q:#}; tcp: {t:#}"));
                            }
                        }
                    }
                }
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => last = e.context(format!("{addr}")),
                Err(_) => last = anyhow!("{addr}: no answer within {CONNECT_TIMEOUT:?}"),
            }
        }
        Err(last)
    }

    async fn quic(&self, addr: SocketAddr, host: &str) -> anyhow::Result<Carrier> {
        let endpoint =
            ztp_infra::mux::quic_client_endpoint(addr, ztp_proto::quic::MAX_UDP_PAYLOAD)?;
        let conn = endpoint
            .connect_with(self.quic.clone(), addr, host)?
            .await
            .map_err(|e| anyhow!("{e}"))?;
        Ok(Carrier::Quic(conn))
    }

    async fn tcp(&self, addr: SocketAddr, host: &str) -> anyhow::Result<Carrier> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        // A replica that went silent ends the tunnel within about 3 s, as over QUIC.
        ztp_infra::mux::tcp_liveness(&tcp)?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| anyhow!("{host}: not a host name"))?;
        let mut tls = self.tls.connect(name, tcp).await?;
        // A refusal comes as a line before anything of HTTP/2; the server's preface
        // comes only once the client's arrives, so wait briefly for a line first.
        let mut first = [0u8; 10];
        let peek = tokio::time::timeout(Duration::from_millis(200), tls.read(&mut first)).await;
        let rewind = match peek {
            Ok(Ok(0)) => return Err(anyhow!("closed by the data plane")),
            Ok(Ok(n))
                if first[..n].starts_with(b"ZTP-ERROR")
                    || b"ZTP-ERROR".starts_with(&first[..n]) =>
            {
                let mut line = first[..n].to_vec();
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    (&mut tls).take(512).read_to_end(&mut rest),
                )
                .await;
                line.extend_from_slice(&rest);
                let line = String::from_utf8_lossy(&line);
                return Err(anyhow!(
                    "refused: {}",
                    line.lines().next().unwrap_or_default()
                ));
            }
            Ok(Ok(n)) => first[..n].to_vec(),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => Vec::new(),
        };
        let server = H2Server::handshake(Rewind::new(rewind, tls)).await?;
        Ok(Carrier::Tcp(server))
    }
}

/// A stream with bytes already read put back in front.
struct Rewind<T> {
    prefix: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Rewind<T> {
    fn new(prefix: Vec<u8>, inner: T) -> Self {
        Rewind {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a tunnel ended.
enum End {
    /// It ended (why), known last by the name given.
    Ended(String, String),
    /// It carried no session and a better-placed replica took its place (the new
    /// tunnel, up before the old one closed).
    Moved(String, Carrier, String),
}

/// A stream from the data plane: the control stream or a session.
enum Incoming {
    Control(BoxSession),
    Session(BoxSession),
}

/// One tunnel's life: its control stream, the sessions, until it ends (or moves).
async fn tunnel(
    dialled: &str,
    mut carrier: Carrier,
    placement: &Arc<Placement>,
    dialer: &Dialer,
) -> End {
    // The tunnel's name: as dialled, then the replica's own address once it says it.
    let label = Arc::new(Mutex::new(dialled.to_owned()));
    let name = || label.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // This tunnel's own assignments: each replica says what its snapshot says, and a
    // session on this tunnel is judged on this replica's word.
    let assigned: &Assigned = &Assigned::default();
    let transport = carrier.transport();
    // Over QUIC the connector opens the control stream (its first byte makes it exist
    // for the peer); over TCP the data plane does, as its first stream.
    let mut control: Option<BoxSession> = None;
    if let Carrier::Quic(conn) = &carrier {
        let opened = async {
            let (mut send, recv) = conn.open_bi().await?;
            send.write_all(&[VERSION]).await?;
            Ok::<_, anyhow::Error>(QuicIo::new(send, recv))
        };
        match opened.await {
            Ok(io) => control = Some(Box::new(io)),
            Err(e) => return End::Ended(format!("{e:#}"), dialled.to_owned()),
        }
    }
    say!("ztpctl: connector: tunnel up to {dialled} ({transport})");
    // Everything of the tunnel lives in this future (the control stream, the sessions):
    // when it ends or is dropped, nothing keeps the connection open.
    let mut reading: Reading = match control.take() {
        Some(io) => Box::pin(read_assignments(
            io,
            assigned.clone(),
            placement.clone(),
            label.clone(),
        )),
        None => Box::pin(std::future::pending()),
    };
    let mut have_control = matches!(carrier, Carrier::Quic(_));
    let mut sessions = tokio::task::JoinSet::new();
    type Dialling<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Carrier>> + Send + 'a>>;
    let mut moving: Option<(String, Dialling<'_>)> = None;
    // Whether the move under way replaces a replica that left (it goes through even
    // with sessions, which linger on the old tunnel).
    let mut urgent = false;
    let mut changes = placement.changes.subscribe();
    let mut check = tokio::time::interval(REPLACE_EVERY);
    check.tick().await;
    let end = loop {
        let next = async {
            match &mut carrier {
                Carrier::Quic(conn) => match conn.accept_bi().await {
                    Ok((send, recv)) => Ok(Incoming::Session(Box::new(QuicIo::new(send, recv)))),
                    Err(e) => Err(e.to_string()),
                },
                Carrier::Tcp(server) => match server.accept().await {
                    Ok(a) if a.path == CONTROL_PATH => Ok(Incoming::Control(Box::new(a.io))),
                    Ok(mut a) => {
                        if a.path != SESSION_PATH {
                            a.io.abort();
                        }
                        Ok(Incoming::Session(Box::new(a.io)))
                    }
                    Err(e) => Err(e.to_owned()),
                },
            }
        };
        tokio::select! {
            s = next => match s {
                Ok(Incoming::Session(io)) => {
                    sessions.spawn(session(io, assigned.clone()));
                }
                Ok(Incoming::Control(io)) => {
                    if have_control {
                        break "a second control stream".to_owned();
                    }
                    have_control = true;
                    reading = Box::pin(read_assignments(io, assigned.clone(), placement.clone(), label.clone()));
                }
                Err(e) => break e,
            },
            () = &mut reading => break "the control stream ended".to_owned(),
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            Ok(()) = changes.changed(), if moving.is_none() => {
                // This tunnel's replica left the set: a new tunnel at once, elsewhere.
                let via = name();
                if !placement.left(&via) {
                    continue;
                }
                let Some(to) = placement.best_free() else { continue };
                if !placement.reserve(&to) {
                    continue;
                }
                say!("ztpctl: connector: {via} left the data planes' replica set");
                urgent = true;
                let name = placement.name(&to);
                moving = Some((to.clone(), Box::pin(async move { dialer.dial(&to, &name).await })));
            }
            _ = check.tick(), if moving.is_none() => {
                // A better-placed replica (one just added, or one back) takes this
                // tunnel's place once it carries no session: the new tunnel first,
                // dialled while this one goes on serving.
                if !sessions.is_empty() {
                    continue;
                }
                let Some(to) = placement.better_than(&name()) else { continue };
                if !placement.reserve(&to) {
                    continue;
                }
                urgent = false;
                let name = placement.name(&to);
                moving = Some((to.clone(), Box::pin(async move { dialer.dial(&to, &name).await })));
            }
            Some(r) = async { match &mut moving { Some((_, f)) => Some(f.await), None => None } }, if moving.is_some() => {
                let Some((to, _)) = moving.take() else { continue };
                match r {
                    Ok(new) if sessions.is_empty() => {
                        close(&mut carrier);
                        let via = name();
                        placement.give_back(&via);
                        return End::Moved(to, new, via);
                    }
                    Ok(new) if urgent => {
                        // The sessions it carries end with it (or go on, if the replica
                        // lives): they linger in the background, with the control stream
                        // still read, and the slot moves on.
                        let via = name();
                        // `via` stays held while it lingers: no other tunnel goes there.
                        tokio::spawn(linger(
                            carrier,
                            sessions,
                            assigned.clone(),
                            reading,
                            placement.clone(),
                            via.clone(),
                        ));
                        return End::Moved(to, new, via);
                    }
                    // A session came meanwhile: stay (the new tunnel is dropped).
                    Ok(_) => placement.give_back(&to),
                    Err(e) => {
                        say!("ztpctl: connector: {to}: {e:#}");
                        placement.failed(&to);
                        placement.give_back(&to);
                    }
                }
            }
        }
    };
    if let Some((to, _)) = moving.take() {
        placement.give_back(&to);
    }
    close(&mut carrier);
    End::Ended(end, name())
}

/// A tunnel replaced while it carried sessions: it serves them (and any new one) until
/// it carries none, or ends.
async fn linger(
    mut carrier: Carrier,
    mut sessions: tokio::task::JoinSet<()>,
    assigned: Assigned,
    mut reading: Reading,
    placement: Arc<Placement>,
    via: String,
) {
    let mut check = tokio::time::interval(REPLACE_EVERY);
    loop {
        let next = async {
            match &mut carrier {
                Carrier::Quic(conn) => conn
                    .accept_bi()
                    .await
                    .ok()
                    .map(|(send, recv)| Some(Box::new(QuicIo::new(send, recv)) as BoxSession)),
                Carrier::Tcp(server) => match server.accept().await {
                    Ok(a) if a.path == SESSION_PATH => Some(Some(Box::new(a.io) as BoxSession)),
                    // Not a session (dropped: reset).
                    Ok(_) => Some(None),
                    Err(_) => None,
                },
            }
        };
        tokio::select! {
            s = next => match s {
                Some(Some(io)) => {
                    sessions.spawn(session(io, assigned.clone()));
                }
                Some(None) => {}
                None => break,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            () = &mut reading => break,
            _ = check.tick() => {
                if sessions.is_empty() {
                    break;
                }
            }
        }
    }
    close(&mut carrier);
    placement.give_back(&via);
}

/// A tunnel's control stream being read.
type Reading = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn close(carrier: &mut Carrier) {
    match carrier {
        Carrier::Quic(conn) => conn.close(VarInt::from_u32(0), b"done"),
        Carrier::Tcp(server) => server.close(),
    }
}

/// Reads the data plane's assignments and keeps `assigned` current (and what the data
/// planes say of where the replicas are).
async fn read_assignments(
    mut recv: BoxSession,
    assigned: Assigned,
    placement: Arc<Placement>,
    label: Arc<Mutex<String>>,
) {
    let via = label.lock().unwrap_or_else(|p| p.into_inner()).clone();
    loop {
        let mut len = [0u8; 4];
        if recv.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_ASSIGNMENTS {
            say!("ztpctl: connector: {via}: assignments of {len} bytes refused");
            return;
        }
        let mut body = vec![0u8; len];
        if recv.read_exact(&mut body).await.is_err() {
            return;
        }
        match decode_assignments(&body) {
            Ok(a) => {
                let names: Vec<&str> = a.services.iter().map(|s| s.name.as_str()).collect();
                say!(
                    "ztpctl: connector: serving {} service(s) (version {}): {}",
                    a.services.len(),
                    a.version,
                    names.join(", ")
                );
                placement.learn(a.replicas, a.replicas_at_ms, &via);
                {
                    let mut l = label.lock().unwrap_or_else(|p| p.into_inner());
                    *l = placement.relabel(&l, &a.replica);
                }
                let mut map = assigned.lock().unwrap_or_else(|p| p.into_inner());
                map.clear();
                for s in a.services {
                    map.insert(s.name.clone(), s);
                }
            }
            Err(e) => {
                say!("ztpctl: connector: {via}: {e}");
                return;
            }
        }
    }
}

/// How long a datagram session with nothing moving lives.
const UDP_IDLE: Duration = Duration::from_secs(60);

/// A udp service's session: datagrams framed on the stream, to and from a UDP socket
/// connected to the backend.
async fn datagram_session(
    mut io: BoxSession,
    dial: &str,
    header: &ztp_proto::tunnel::SessionHeader,
) {
    use ztp_proto::framing::{encode, Decoder, MAX_FRAME};
    let sock = async {
        let target = tokio::net::lookup_host(dial)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let bind: SocketAddr = if target.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let sock = tokio::net::UdpSocket::bind(bind).await?;
        sock.connect(target).await?;
        Ok::<_, std::io::Error>(sock)
    };
    let sock = match tokio::time::timeout(CONNECT_TIMEOUT, sock).await {
        Ok(Ok(s)) => s,
        other => {
            say!(
                "ztpctl: connector: {} ({}): {dial}: {:?}",
                header.service,
                header.identity,
                other.map(|r| r.map(|_| ()))
            );
            let _ = io.write_all(&[Status::Unreachable as u8]).await;
            let _ = io.shutdown().await;
            return;
        }
    };
    if io.write_all(&[Status::Connected as u8]).await.is_err() {
        return;
    }
    let mut dec = Decoder::default();
    let mut rbuf = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; MAX_FRAME + 1];
    let mut out = Vec::new();
    loop {
        while let Ok(Some(f)) = dec.frame() {
            let _ = sock.send(f).await;
            dec.consume_frame();
        }
        if dec.frame().is_err() {
            break;
        }
        tokio::select! {
            r = io.read(&mut rbuf) => match r {
                Ok(n) if n > 0 => dec.push(&rbuf[..n]),
                _ => break,
            },
            r = sock.recv(&mut down) => match r {
                Ok(n) if n <= MAX_FRAME => {
                    out.clear();
                    encode(&down[..n], &mut out);
                    if io.write_all(&out).await.is_err() {
                        break;
                    }
                }
                // Too large for a frame, or an ICMP error from an earlier send: lost.
                _ => {}
            },
            _ = tokio::time::sleep(UDP_IDLE) => break,
        }
    }
    let _ = io.shutdown().await;
}

/// One session: its header, the backend it names (if assigned), then bytes both ways.
async fn session(mut io: BoxSession, assigned: Assigned) {
    let mut len = [0u8; 2];
    if io.read_exact(&mut len).await.is_err() {
        return;
    }
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HEADER {
        io.abort();
        return;
    }
    let mut body = vec![0u8; len];
    if io.read_exact(&mut body).await.is_err() {
        return;
    }
    let header = match decode_header(&body) {
        Ok(h) => h,
        Err(e) => {
            say!("ztpctl: connector: {e}");
            io.abort();
            return;
        }
    };
    let target = assigned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&header.service)
        .map(|a| a.address.clone());
    let Some(address) = target else {
        say!(
            "ztpctl: connector: refused a session for {} ({}): not a service of this connector",
            header.service,
            header.identity
        );
        let _ = io.write_all(&[Status::NotAssigned as u8]).await;
        let _ = io.shutdown().await;
        return;
    };
    let dial = if let Some(port) = address.strip_prefix(':') {
        format!("127.0.0.1:{port}")
    } else {
        address.clone()
    };
    if header.datagrams {
        return datagram_session(io, &dial, &header).await;
    }
    let backend = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&dial)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            say!(
                "ztpctl: connector: {} ({}): {address}: {e}",
                header.service,
                header.identity
            );
            let _ = io.write_all(&[Status::Unreachable as u8]).await;
            let _ = io.shutdown().await;
            return;
        }
        Err(_) => {
            let _ = io.write_all(&[Status::Timeout as u8]).await;
            let _ = io.shutdown().await;
            return;
        }
    };
    let _ = backend.set_nodelay(true);
    if io.write_all(&[Status::Connected as u8]).await.is_err() {
        return;
    }
    let (mut br, mut bw) = backend.into_split();
    let (mut recv, mut send) = tokio::io::split(io);
    let up = async {
        // Session bytes from the data plane to the backend; its FIN, the half-close.
        let r = tokio::io::copy(&mut recv, &mut bw).await;
        let _ = bw.shutdown().await;
        r
    };
    let down = async {
        // The backend's bytes; its FIN finishes the stream. An error leaves it
        // unfinished, and the stream is cut when both halves are gone.
        let r = tokio::io::copy(&mut br, &mut send).await;
        if r.is_ok() {
            let _ = send.shutdown().await;
        }
        r
    };
    let _ = tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(p: &Placement, replicas: &[String], n: usize) -> Vec<String> {
        let st = PlacementState {
            learnt: replicas.to_vec(),
            ..Default::default()
        };
        let mut t: Vec<String> = p.ranked(&st).into_iter().take(n).collect();
        t.sort();
        t
    }

    #[test]
    fn rendezvous_placement_moves_only_the_tunnels_a_change_concerns() {
        let replicas: Vec<String> = (1..=5).map(|i| format!("10.0.0.{i}:9743")).collect();
        let mut more = replicas.clone();
        more.push("10.0.0.6:9743".into());
        let fewer: Vec<String> = replicas
            .iter()
            .filter(|r| !r.starts_with("10.0.0.3:"))
            .cloned()
            .collect();
        let mut moved_on_add = 0;
        let mut per_replica = HashMap::<String, usize>::new();
        for c in 0..1000 {
            let p = Placement::new(format!("spiffe://ztp.internal/connector/c{c}"), vec![], 2);
            let before = top(&p, &replicas, 2);
            for r in &before {
                *per_replica.entry(r.clone()).or_default() += 1;
            }
            // Added: a connector's set changes only by taking the new replica.
            let after = top(&p, &more, 2);
            if after != before {
                moved_on_add += 1;
                assert!(after.contains(&"10.0.0.6:9743".to_owned()));
                assert_eq!(after.iter().filter(|r| before.contains(r)).count(), 1);
            }
            // Removed: only the connectors that ranked it move, and keep the other.
            let after = top(&p, &fewer, 2);
            if before.contains(&"10.0.0.3:9743".to_owned()) {
                assert_eq!(after.iter().filter(|r| before.contains(r)).count(), 1);
            } else {
                assert_eq!(after, before);
            }
        }
        // About 2 in 6 take the new replica; the load is spread.
        assert!((200..=470).contains(&moved_on_add), "{moved_on_add} moved");
        for (r, n) in per_replica {
            assert!((300..=500).contains(&n), "{r} holds {n} of 2,000 tunnels");
        }
    }

    #[test]
    fn tunnels_take_distinct_replicas_pass_over_failed_ones_and_fall_back_to_via() {
        let p = Placement::new("c".into(), vec!["gw.example:9743".into()], 2);
        // Before anything is learnt: the --via names.
        let (via, name) = p.take().unwrap();
        assert_eq!(
            (via.as_str(), name.as_str()),
            ("gw.example:9743", "gw.example")
        );
        assert!(p.take().is_none(), "one replica, one tunnel");
        // Learnt addresses are checked against the name of the --via they came from.
        p.learn(
            vec![
                "10.0.0.1:9743".into(),
                "10.0.0.2:9743".into(),
                "r3.example:9743".into(),
            ],
            1,
            "gw.example:9743",
        );
        p.give_back("gw.example:9743");
        let (a, name_a) = p.take().unwrap();
        let (b, _) = p.take().unwrap();
        assert_ne!(a, b);
        assert!(a != "gw.example:9743" && b != "gw.example:9743");
        if a.starts_with("10.") {
            assert_eq!(name_a, "gw.example");
        } else {
            assert_eq!(name_a, "r3.example");
        }
        // The third learnt replica is better placed than neither (both held are the
        // best two), unless it ranks higher.
        let ranked = p.ranked(&p.lock());
        assert!(p.better_than(&ranked[0]).is_none());
        // All learnt ones failed: the --via is tried.
        p.give_back(&a);
        p.give_back(&b);
        for r in ["10.0.0.1:9743", "10.0.0.2:9743", "r3.example:9743"] {
            p.failed(r);
        }
        assert_eq!(p.take().unwrap().0, "gw.example:9743");
        // Then failed ones rather than none.
        assert!(p.take().is_some());

        // A replica that leaves the learnt set is gone (its tunnel moves at once), and
        // is not where a replacement goes; it is back when it comes back.
        let p = Placement::new("c".into(), vec!["gw.example:9743".into()], 1);
        let all: Vec<String> = (1..=3).map(|i| format!("10.0.0.{i}:9743")).collect();
        p.learn(all.clone(), 1, "gw.example:9743");
        let mut changes = p.changes.subscribe();
        changes.borrow_and_update();
        let (held, _) = p.take().unwrap();
        let rest: Vec<String> = all.iter().filter(|r| **r != held).cloned().collect();
        p.learn(rest.clone(), 2, "gw.example:9743");
        assert!(changes.has_changed().unwrap());
        assert!(p.left(&held));
        let to = p.best_free().unwrap();
        assert!(rest.contains(&to));
        // A tunnel dialled by name is known by the replica's own address once it says it
        // (unless another tunnel holds that address already).
        let q = Placement::new(
            "c".into(),
            vec!["a.example:1".into(), "b.example:1".into()],
            2,
        );
        let (first, _) = q.take().unwrap();
        let (second, _) = q.take().unwrap();
        assert!(
            q.better_than(&first).is_none(),
            "nothing learnt, nothing to move to"
        );
        assert_eq!(
            q.relabel(&first, "10.0.0.9:1"),
            first,
            "not in a learnt set"
        );
        q.learn(vec!["10.0.0.8:1".into(), "10.0.0.9:1".into()], 1, &first);
        assert_eq!(q.relabel(&first, "10.0.0.9:1"), "10.0.0.9:1");
        assert!(q.lock().held.contains("10.0.0.9:1") && !q.lock().held.contains(&first));
        assert_eq!(q.relabel(&second, "10.0.0.9:1"), second);
        // An older list (a replica passing its on late) does not undo a newer one.
        p.learn(all.clone(), 1, "gw.example:9743");
        assert!(p.left(&held));
        p.learn(all, 3, "gw.example:9743");
        assert!(!p.left(&held));
    }
}

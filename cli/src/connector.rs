//! `ztpctl connector run`: a connector, next to backends no data plane can dial. It dials
//! out to the data planes over QUIC (ALPN `ztp-tunnel/1`, its certificate
//! `spiffe://DOMAIN/connector/NAME`), holds a tunnel to each (up to `--tunnels`), and
//! serves the sessions they send it: one stream each, for the services assigned to it
//! and nothing else (the contract is `ztp_proto::tunnel`).
//!
//! It learns which services it serves, and their addresses, from the data planes (the
//! tunnel's control stream), kept current on every change; a session for anything else
//! is refused and logged. A tunnel that ends is dialled again with a jittered backoff.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use rustls::sign::SingleCertAndKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
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
    /// The data planes to hold tunnels to: HOST:PORT[,HOST:PORT…] (their client port).
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
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| anyhow!("QUIC TLS: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // A tunnel that goes silent is given up after 3 s on both ends (the lower of the two
    // sides' timeouts holds): the data plane stops sending sessions into it, and the
    // connector dials again. A keepalive a second keeps a live one from idling.
    transport
        .keep_alive_interval(Some(Duration::from_secs(1)))
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(3))?))
        // The data plane opens a stream per session.
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_SESSIONS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // Larger packets where the path carries them (`MAX_UDP_PAYLOAD`), as the data
        // planes allow: bulk through a tunnel pays per packet.
        .initial_mtu(1452)
        .mtu_discovery_config(Some({
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(ztp_proto::quic::MAX_UDP_PAYLOAD);
            m
        }));
    config.transport_config(Arc::new(transport));

    // Each replica once, in the order given.
    let mut vias: Vec<String> = Vec::new();
    for v in &args.via {
        if !vias.contains(v) {
            vias.push(v.clone());
        }
    }
    let tunnels = vias.len().min(usize::from(args.tunnels));
    say!(
        "ztpctl: connector: holding {tunnels} tunnel(s), to distinct replicas of {}",
        vias.join(", ")
    );
    let placement = Arc::new(Placement {
        vias,
        held: Mutex::default(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for slot in 0..tunnels {
        tasks.spawn(hold(slot, placement.clone(), config.clone()));
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    Ok(())
}

/// The replicas a connector may dial, and those its tunnels hold now (each tunnel goes
/// to a distinct one).
struct Placement {
    vias: Vec<String>,
    held: Mutex<std::collections::HashSet<String>>,
}

impl Placement {
    /// The first replica from `from` on (in turn) that no other tunnel holds, taken.
    fn take(&self, from: usize) -> Option<String> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.vias.len();
        let via = (0..n)
            .map(|k| &self.vias[(from + k) % n])
            .find(|v| !held.contains(*v))?
            .clone();
        held.insert(via.clone());
        Some(via)
    }

    fn give_back(&self, via: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(via);
    }
}

/// Holds tunnel `slot`: to its own replica first, and whenever a tunnel ends or cannot
/// be made, to the next replica no other tunnel holds (so that a replica that died is
/// replaced by another at once, not dialled again and again).
async fn hold(slot: usize, placement: Arc<Placement>, config: quinn::ClientConfig) {
    let mut backoff = BACKOFF_MIN;
    let mut next = slot;
    loop {
        let Some(via) = placement.take(next) else {
            tokio::time::sleep(backoff).await;
            continue;
        };
        let began = tokio::time::Instant::now();
        let r = tunnel(&via, &config).await;
        placement.give_back(&via);
        match r {
            Ok(end) => {
                say!("ztpctl: connector: tunnel to {via} ended: {end}");
                // Quick again only after a tunnel that served a while: one refused at
                // once (an unknown connector, a revoked certificate) backs off.
                if began.elapsed() >= STABLE {
                    backoff = BACKOFF_MIN;
                }
            }
            Err(e) => say!("ztpctl: connector: tunnel to {via}: {e:#}"),
        }
        next = placement
            .vias
            .iter()
            .position(|v| *v == via)
            .unwrap_or(next)
            + 1;
        // Jittered, so that connectors cut off together do not come back together.
        let jitter = rand_fraction();
        tokio::time::sleep(backoff.mul_f64(0.5 + jitter)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A number in [0, 1) from the clock's low bits (jitter needs no better).
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

/// One tunnel's life: connect, open the control stream, serve sessions until it ends.
async fn tunnel(via: &str, config: &quinn::ClientConfig) -> anyhow::Result<String> {
    // This tunnel's own assignments: each replica says what its snapshot says, and a
    // session on this tunnel is judged on this replica's word.
    let assigned: &Assigned = &Assigned::default();
    let host = via
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| anyhow!("{via}: not HOST:PORT"))?
        .to_owned();
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(via)
        .await
        .with_context(|| format!("cannot resolve {via}"))?
        .collect();
    // IPv4 first: a name with both (`localhost`) is most often served on IPv4, and a
    // QUIC attempt to a silent address waits out its timeout.
    addrs.sort_by_key(|a| a.is_ipv6());
    let mut last = anyhow!("{via}: no address");
    let mut conn = None;
    for addr in addrs {
        let bind: SocketAddr = if addr.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(ztp_proto::quic::MAX_UDP_PAYLOAD)
            .map_err(|e| anyhow!("{e}"))?;
        let socket = std::net::UdpSocket::bind(bind).context("a UDP socket for QUIC")?;
        let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
        let endpoint = Endpoint::new(endpoint_config, None, socket, runtime)
            .context("a UDP socket for QUIC")?;
        let attempt = async {
            let c = endpoint
                .connect_with(config.clone(), addr, &host)?
                .await
                .map_err(|e| anyhow!("{e}"))?;
            Ok::<_, anyhow::Error>(c)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(c)) => {
                conn = Some(c);
                break;
            }
            Ok(Err(e)) => last = e.context(format!("{addr}")),
            Err(_) => last = anyhow!("{addr}: no answer within {CONNECT_TIMEOUT:?}"),
        }
    }
    let conn = conn.ok_or(last)?;
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(&[VERSION]).await?;
    say!("ztpctl: connector: tunnel up to {via}");
    // Everything of the tunnel lives in this future (the control stream, the sessions):
    // when it ends or is dropped, nothing keeps the connection open.
    let control = read_assignments(recv, assigned.clone(), via.to_owned());
    tokio::pin!(control);
    let mut sessions = tokio::task::JoinSet::new();
    let end = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    sessions.spawn(session(send, recv, assigned.clone()));
                }
                Err(e) => break e.to_string(),
            },
            () = &mut control => {
                conn.close(VarInt::from_u32(0), b"control stream ended");
                break "the control stream ended".to_owned();
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    };
    drop(send);
    Ok(end)
}

/// Reads the data plane's assignments and keeps `assigned` current.
async fn read_assignments(mut recv: RecvStream, assigned: Assigned, via: String) {
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
    mut send: SendStream,
    mut recv: RecvStream,
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
            let _ = send.write_all(&[Status::Unreachable as u8]).await;
            let _ = send.finish();
            return;
        }
    };
    if send.write_all(&[Status::Connected as u8]).await.is_err() {
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
            r = recv.read(&mut rbuf) => match r {
                Ok(Some(n)) => dec.push(&rbuf[..n]),
                _ => break,
            },
            r = sock.recv(&mut down) => match r {
                Ok(n) if n <= MAX_FRAME => {
                    out.clear();
                    encode(&down[..n], &mut out);
                    if send.write_all(&out).await.is_err() {
                        break;
                    }
                }
                // Too large for a frame, or an ICMP error from an earlier send: lost.
                _ => {}
            },
            _ = tokio::time::sleep(UDP_IDLE) => break,
        }
    }
    let _ = send.finish();
}

/// One session: its header, the backend it names (if assigned), then bytes both ways.
async fn session(mut send: SendStream, mut recv: RecvStream, assigned: Assigned) {
    let mut len = [0u8; 2];
    if recv.read_exact(&mut len).await.is_err() {
        return;
    }
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HEADER {
        let _ = send.reset(VarInt::from_u32(ztp_proto::quic::STREAM_ABORTED));
        return;
    }
    let mut body = vec![0u8; len];
    if recv.read_exact(&mut body).await.is_err() {
        return;
    }
    let header = match decode_header(&body) {
        Ok(h) => h,
        Err(e) => {
            say!("ztpctl: connector: {e}");
            let _ = send.reset(VarInt::from_u32(ztp_proto::quic::STREAM_ABORTED));
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
        let _ = send.write_all(&[Status::NotAssigned as u8]).await;
        let _ = send.finish();
        return;
    };
    let dial = if let Some(port) = address.strip_prefix(':') {
        format!("127.0.0.1:{port}")
    } else {
        address.clone()
    };
    if header.datagrams {
        return datagram_session(send, recv, &dial, &header).await;
    }
    let backend = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&dial)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            say!(
                "ztpctl: connector: {} ({}): {address}: {e}",
                header.service,
                header.identity
            );
            let _ = send.write_all(&[Status::Unreachable as u8]).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            let _ = send.write_all(&[Status::Timeout as u8]).await;
            let _ = send.finish();
            return;
        }
    };
    let _ = backend.set_nodelay(true);
    if send.write_all(&[Status::Connected as u8]).await.is_err() {
        return;
    }
    let (mut br, mut bw) = backend.into_split();
    let up = async {
        // Session bytes from the data plane to the backend; its FIN, the half-close.
        let r = tokio::io::copy(&mut recv, &mut bw).await;
        let _ = bw.shutdown().await;
        r
    };
    let down = async {
        let r = tokio::io::copy(&mut br, &mut send).await;
        match r {
            Ok(_) => {
                let _ = send.finish();
            }
            Err(_) => {
                let _ = send.reset(VarInt::from_u32(ztp_proto::quic::STREAM_ABORTED));
            }
        }
        r
    };
    let _ = tokio::join!(up, down);
}

//! Services behind a connector (DESIGN.md, "Connectors"): the data plane never dials
//! their address; a session goes as one stream over a tunnel the service's connector
//! holds to this node (`ztp_proto::tunnel`).
//!
//! [`Tunnels`] holds the live tunnels by connector name; the QUIC listener registers a
//! connector's connection once it is admitted and removes it when it ends.
//! [`TunnelForwarder`] is the handler of every service that names a connector: no live
//! tunnel is `ZTP-ERROR 503 unavailable`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Connection, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_infra::mux::{BoxSession, H2Opener, QuicIo};
use ztp_proto::framing::{encode, Decoder, MAX_FRAME};
use ztp_proto::tunnel::{encode_header, SessionHeader, Status};
use ztp_proto::Protocol;

use super::splice::{splice, SpliceEnd};
use super::{BoxOutcome, Client, DatagramChannel, Handler, Outcome, Session};
use crate::refusal::Refusal;

/// What carries sessions to a connector (or to a replica, on a relay): a QUIC
/// connection, or HTTP/2 over TCP + TLS 1.3 where UDP is blocked
/// (`ztp_infra::mux`). The tunnel's protocol above it is the same.
#[derive(Debug, Clone)]
pub enum Link {
    Quic(Connection),
    Tcp(Arc<TcpLink>),
}

/// A tunnel over TCP: its HTTP/2 opener, and the task that drives the connection.
#[derive(Debug)]
pub struct TcpLink {
    /// Distinct from every other link's id while both live (QUIC's are addresses, far
    /// below these).
    id: usize,
    opener: H2Opener,
    remote: std::net::SocketAddr,
    /// True once the connection ended (or was closed).
    ended: tokio::sync::watch::Receiver<bool>,
    /// Ends the connection.
    close: tokio::sync::watch::Sender<bool>,
}

impl TcpLink {
    /// A link over `opener`, whose connection is driven by `drive` (spawned here); it
    /// ends when `drive` does or [`Link::close`] is called.
    pub fn spawn(
        opener: H2Opener,
        drive: impl std::future::Future<Output = &'static str> + Send + 'static,
        remote: std::net::SocketAddr,
    ) -> Arc<TcpLink> {
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        let (close, mut closing) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let why = tokio::select! {
                why = drive => why,
                _ = closing.wait_for(|c| *c) => "closed here",
            };
            tracing::debug!(why, "tunnel over tcp ended");
            ended_tx.send_replace(true);
        });
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        Arc::new(TcpLink {
            id: usize::MAX / 2 + NEXT.fetch_add(1, Ordering::Relaxed),
            opener,
            remote,
            ended,
            close,
        })
    }
}

impl Link {
    /// Stable while the link lives, distinct between live links.
    pub fn id(&self) -> usize {
        match self {
            Link::Quic(c) => c.stable_id(),
            Link::Tcp(t) => t.id,
        }
    }

    pub fn is_open(&self) -> bool {
        match self {
            Link::Quic(c) => c.close_reason().is_none(),
            Link::Tcp(t) => !*t.ended.borrow(),
        }
    }

    pub fn remote(&self) -> std::net::SocketAddr {
        match self {
            Link::Quic(c) => c.remote_address(),
            Link::Tcp(t) => t.remote,
        }
    }

    pub fn transport(&self) -> &'static str {
        match self {
            Link::Quic(_) => "quic",
            Link::Tcp(_) => "tcp",
        }
    }

    /// A new stream for one session.
    pub async fn open(&self) -> io::Result<BoxSession> {
        match self {
            Link::Quic(c) => {
                let (send, recv) = c.open_bi().await.map_err(io::Error::other)?;
                Ok(Box::new(QuicIo::new(send, recv)))
            }
            Link::Tcp(t) => Ok(Box::new(t.opener.open(ztp_infra::mux::SESSION_PATH).await?)),
        }
    }

    /// Ends the link: over QUIC with `code` and `reason` (the refusal line, or "drained"
    /// with 0); over TCP the connection is closed.
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Link::Quic(c) => c.close(VarInt::from_u32(code), reason),
            Link::Tcp(t) => {
                t.close.send_replace(true);
            }
        }
    }

    /// Completes once the link has ended.
    pub async fn closed(&self) {
        match self {
            Link::Quic(c) => {
                c.closed().await;
            }
            Link::Tcp(t) => {
                let mut ended = t.ended.clone();
                let _ = ended.wait_for(|e| *e).await;
            }
        }
    }
}

/// The live tunnels of this node, by connector name.
#[derive(Debug)]
pub struct Tunnels {
    live: Mutex<HashMap<String, Vec<Live>>>,
    next: AtomicU64,
    /// Moves on every change (the control plane is told: `ztpctl connector list`).
    changes: tokio::sync::watch::Sender<u64>,
    /// Other replicas holding tunnels, by connector: `(node id, address)`, as the
    /// control plane last said (soft state, kept while it is away).
    remote: Mutex<HashMap<String, Vec<(String, String)>>>,
    /// Carries sessions to those replicas (a node with a control plane only).
    relayer: std::sync::OnceLock<Arc<Relayer>>,
    /// Sessions each tunnel carries now, by its connection's stable id (a draining node
    /// closes a tunnel once it carries none).
    in_use: Arc<Mutex<HashMap<usize, usize>>>,
    /// True once the node stops: tunnels take no new session.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Relay holders that just failed (could not be reached, or their stream failed),
    /// until when they are passed over while another holder is there.
    shunned: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Where the replicas are (their advertised addresses), as the control plane last
    /// said: connectors place their tunnels by it.
    replicas: tokio::sync::watch::Sender<(Vec<String>, u64)>,
    /// This node's own advertised address (empty: none).
    me: std::sync::OnceLock<String>,
}

/// A session's hold on its tunnel; let go when dropped.
#[derive(Debug)]
pub struct TunnelUse {
    in_use: Arc<Mutex<HashMap<usize, usize>>>,
    id: usize,
}

impl Drop for TunnelUse {
    fn drop(&mut self) {
        let mut m = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.id);
            }
        }
    }
}

#[derive(Debug)]
struct Live {
    id: u64,
    link: Link,
    /// Milliseconds since the Unix epoch.
    since_ms: u64,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels {
            live: Mutex::default(),
            next: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
            remote: Mutex::default(),
            relayer: std::sync::OnceLock::new(),
            in_use: Arc::default(),
            stopping: tokio::sync::watch::Sender::new(false),
            shunned: Mutex::default(),
            replicas: tokio::sync::watch::Sender::new((Vec::new(), 0)),
            me: std::sync::OnceLock::new(),
        }
    }
}

/// One live tunnel, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelInfo {
    pub connector: String,
    pub transport: &'static str,
    pub since_ms: u64,
}

/// A registered tunnel; removed when dropped.
#[derive(Debug)]
pub struct TunnelGuard {
    tunnels: Arc<Tunnels>,
    name: String,
    id: u64,
}

impl Tunnels {
    /// Registers a connector's connection as a tunnel.
    pub fn register(self: &Arc<Self>, name: &str, link: Link) -> TunnelGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let since_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.lock()
            .entry(name.to_owned())
            .or_default()
            .push(Live { id, link, since_ms });
        self.changes.send_modify(|n| *n += 1);
        TunnelGuard {
            tunnels: self.clone(),
            name: name.to_owned(),
            id,
        }
    }

    /// A live tunnel of `name`, taking turns between several.
    pub fn pick(&self, name: &str) -> Option<Link> {
        self.pick_except(name, &[])
    }

    /// A live tunnel of `name` but those whose ids are in `except`, taking turns.
    pub fn pick_except(&self, name: &str, except: &[usize]) -> Option<Link> {
        let live = self.lock();
        let tunnels = live.get(name)?;
        let open: Vec<&Link> = tunnels
            .iter()
            .map(|t| &t.link)
            .filter(|l| l.is_open() && !except.contains(&l.id()))
            .collect();
        if open.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        Some(open[turn % open.len()].clone())
    }

    /// A session's hold on tunnel `link`, for its life.
    pub fn hold(&self, link: &Link) -> TunnelUse {
        let id = link.id();
        *self
            .in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default() += 1;
        TunnelUse {
            in_use: self.in_use.clone(),
            id,
        }
    }

    /// Sessions tunnel `link` carries now.
    pub fn in_use(&self, link: &Link) -> usize {
        self.in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&link.id())
            .copied()
            .unwrap_or(0)
    }

    /// Live tunnels of `name`.
    pub fn count(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, Vec::len)
    }

    /// Every live tunnel, sorted.
    pub fn report(&self) -> Vec<TunnelInfo> {
        let mut out: Vec<TunnelInfo> = self
            .lock()
            .iter()
            .flat_map(|(name, v)| {
                v.iter().map(|t| TunnelInfo {
                    connector: name.clone(),
                    transport: t.link.transport(),
                    since_ms: t.since_ms,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.connector, a.since_ms).cmp(&(&b.connector, b.since_ms)));
        out
    }

    /// Replaces what other replicas hold: `(connector, node id, address)`, this node's
    /// own (`me`) left out.
    pub fn set_remote(
        &self,
        me: &str,
        holders: impl IntoIterator<Item = (String, String, String)>,
    ) {
        let mut map: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (connector, node, addr) in holders {
            if node != me && !addr.is_empty() {
                map.entry(connector).or_default().push((node, addr));
            }
        }
        *self.remote.lock().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// A replica holding a tunnel of `name`, taking turns.
    pub fn pick_remote(&self, name: &str) -> Option<(String, String)> {
        self.pick_remote_except(name, &[])
    }

    /// A replica holding a tunnel of `name`, none of `except` (node ids), taking turns;
    /// one that failed lately only when no other is there.
    pub fn pick_remote_except(&self, name: &str, except: &[String]) -> Option<(String, String)> {
        let now = tokio::time::Instant::now();
        let shunned: Vec<String> = {
            let mut s = self.shunned.lock().unwrap_or_else(|p| p.into_inner());
            s.retain(|_, until| *until > now);
            s.keys().cloned().collect()
        };
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let candidates: Vec<&(String, String)> = remote
            .get(name)?
            .iter()
            .filter(|(node, _)| !except.contains(node))
            .collect();
        let fresh: Vec<&(String, String)> = candidates
            .iter()
            .copied()
            .filter(|(node, _)| !shunned.contains(node))
            .collect();
        let holders = if fresh.is_empty() { candidates } else { fresh };
        if holders.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        Some(holders[turn % holders.len()].clone())
    }

    /// Passes over relay holder `node` for a few seconds while another is there (it
    /// could not be reached, or a session's stream to it failed).
    pub fn shun(&self, node: &str) {
        self.shunned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                node.to_owned(),
                tokio::time::Instant::now() + Duration::from_secs(5),
            );
    }

    /// Sets how sessions are carried to other replicas (once).
    pub fn set_relayer(&self, relayer: Arc<Relayer>) {
        let _ = self.relayer.set(relayer);
    }

    /// The node stops: its tunnels take no new session, and close once idle.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Whether the node stops, to watch.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Sets this node's advertised address (once).
    pub fn set_me(&self, advertise: String) {
        let _ = self.me.set(advertise);
    }

    /// This node's advertised address (empty: none).
    pub fn me(&self) -> String {
        self.me.get().cloned().unwrap_or_default()
    }

    /// Sets where the replicas are (sorted), as the control plane says at `at_ms`.
    pub fn set_replicas(&self, mut replicas: Vec<String>, at_ms: u64) {
        replicas.sort();
        replicas.dedup();
        // A relay to a replica that left the set (it stopped, died, or lost the control
        // plane) takes no new session; the sessions on it go on.
        if let (Some(relayer), false) = (self.relayer.get(), replicas.is_empty()) {
            relayer.keep_only(&replicas);
        }
        self.replicas.send_if_modified(|r| {
            let changed = r.0 != replicas;
            *r = (replicas, at_ms);
            changed
        });
    }

    /// Where the replicas are, as last said, and when the control plane said so.
    pub fn replicas(&self) -> (Vec<String>, u64) {
        self.replicas.borrow().clone()
    }

    /// Changes to where the replicas are.
    pub fn replicas_changed(&self) -> tokio::sync::watch::Receiver<(Vec<String>, u64)> {
        self.replicas.subscribe()
    }

    /// Changes to watch (the value only counts them).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        {
            let mut live = self.tunnels.lock();
            if let Some(v) = live.get_mut(&self.name) {
                v.retain(|t| t.id != self.id);
                if v.is_empty() {
                    live.remove(&self.name);
                }
            }
        }
        self.tunnels.changes.send_modify(|n| *n += 1);
    }
}

/// The handler of services behind a connector.
#[derive(Debug)]
pub struct TunnelForwarder {
    tunnels: Arc<Tunnels>,
}

impl TunnelForwarder {
    pub fn new(tunnels: Arc<Tunnels>) -> Self {
        TunnelForwarder { tunnels }
    }

    /// A relay to a replica holding a tunnel of `name`, none of `tried`: the holders in
    /// turn, one that cannot be reached added to `tried` and giving way to the next.
    /// `Err` with why there is none.
    async fn reach_remote(
        &self,
        name: &str,
        tried: &mut Vec<String>,
    ) -> Result<(Link, String), &'static str> {
        let Some(relayer) = self.tunnels.relayer.get() else {
            return Err("no tunnel");
        };
        let mut unreachable = false;
        while let Some((node, addr)) = self.tunnels.pick_remote_except(name, tried) {
            match relayer.connection(&node, &addr).await {
                Ok(c) => return Ok((Link::Quic(c), node)),
                Err(e) => {
                    tracing::debug!(relay.node = %node, error = %e, "relay unreachable");
                    self.tunnels.shun(&node);
                    tried.push(node);
                    unreachable = true;
                }
            }
        }
        Err(if unreachable {
            "relay unreachable"
        } else {
            "no tunnel"
        })
    }
}

impl Handler for TunnelForwarder {
    fn name(&self) -> &'static str {
        "tunnel"
    }

    fn supports(&self, _protocol: Protocol) -> bool {
        // Streams are spliced; udp and quic datagrams go framed on the session's stream.
        true
    }

    fn serve<'a>(&'a self, s: Session<'a>) -> BoxOutcome<'a> {
        Box::pin(async move {
            let Session {
                client,
                target,
                caller,
                limits,
                report,
            } = s;
            let datagrams = matches!(target.protocol, Protocol::Udp | Protocol::Quic);
            let Some(name) = target.connector else {
                return Outcome::refused(Refusal::Unavailable, "no connector");
            };
            // A tunnel here, else one on another replica (relayed), else 503. A tunnel
            // or relay that fails before the session's first byte (it died under it: a
            // connector restarted, a replica was killed and the map does not say so yet)
            // gives way to another, up to three.
            let bound = limits.connect_timeout + Duration::from_secs(1);
            let mut tried_local: Vec<usize> = Vec::new();
            let mut tried_nodes: Vec<String> = Vec::new();
            let mut failure = Outcome::refused(Refusal::Unavailable, "no tunnel");
            let mut opened = None;
            for _ in 0..3 {
                let (link, node) = match self.tunnels.pick_except(name, &tried_local) {
                    Some(l) => (l, None),
                    None => match self.reach_remote(name, &mut tried_nodes).await {
                        Ok((l, node)) => (l, Some(node)),
                        // A tunnel may have come here while the relays were tried.
                        Err(_) if self.tunnels.pick_except(name, &tried_local).is_some() => {
                            continue;
                        }
                        Err(why) => {
                            if why != "no tunnel"
                                || tried_local.is_empty() && tried_nodes.is_empty()
                            {
                                failure = Outcome::refused(Refusal::Unavailable, why);
                            }
                            break;
                        }
                    },
                };
                let header = match encode_header(&SessionHeader {
                    service: target.service.to_owned(),
                    identity: caller.identity.id.clone(),
                    connector: node.as_ref().map(|_| name.to_owned()),
                    datagrams,
                }) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(error = %e, "session header");
                        return Outcome::refused(Refusal::BadGateway, "bad session header");
                    }
                };
                // The session's hold on its tunnel (a draining node waits for it).
                let held = node.is_none().then(|| self.tunnels.hold(&link));
                // The connector dials within the connect timeout; a little more for the
                // round trip to it.
                match tokio::time::timeout(bound, open_session(&link, &header)).await {
                    Ok(Ok((stream, status))) => {
                        if let (Some(node), Some(Status::NoTunnel)) =
                            (&node, Status::from_byte(status))
                        {
                            // The holder lost its tunnel since the map said so.
                            tried_nodes.push(node.clone());
                            failure =
                                Outcome::refused(Refusal::Unavailable, "no tunnel at the relay");
                            continue;
                        }
                        report.backend_addr = Some(link.remote());
                        opened = Some((stream, status, held));
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(connector = name, error = %e, "tunnel session failed");
                        match node {
                            Some(node) => {
                                self.tunnels.shun(&node);
                                tried_nodes.push(node);
                            }
                            None => tried_local.push(link.id()),
                        }
                        failure = Outcome::refused(Refusal::BadGateway, "tunnel error");
                    }
                    Err(_) => {
                        return Outcome::refused(Refusal::GatewayTimeout, "connector timeout")
                    }
                }
            }
            let Some((mut stream, status, _held)) = opened else {
                return failure;
            };
            match Status::from_byte(status) {
                Some(Status::Connected) => {}
                Some(Status::Timeout) => {
                    let _ = stream.shutdown().await;
                    return Outcome::refused(Refusal::GatewayTimeout, "backend timeout");
                }
                Some(Status::NotAssigned) => {
                    let _ = stream.shutdown().await;
                    tracing::warn!(connector = name, "the connector does not serve the service");
                    return Outcome::refused(Refusal::BadGateway, "not assigned");
                }
                Some(Status::NoTunnel) => {
                    let _ = stream.shutdown().await;
                    return Outcome::refused(Refusal::Unavailable, "no tunnel at the relay");
                }
                Some(Status::Unreachable) | None => {
                    let _ = stream.shutdown().await;
                    return Outcome::refused(Refusal::BadGateway, "backend unreachable");
                }
            }
            match (client, datagrams) {
                (Client::Stream(client), false) => {
                    let res = splice(client, &mut stream, limits.idle_timeout).await;
                    match res.end {
                        SpliceEnd::Closed => Outcome::ended("closed"),
                        SpliceEnd::Idle => Outcome::ended("idle timeout"),
                        SpliceEnd::Error(_) => Outcome::aborted("connection error"),
                    }
                }
                (Client::Datagrams(channel), _) => {
                    let end = carry_datagrams(channel, &mut stream, limits.idle_timeout).await;
                    let _ = stream.shutdown().await;
                    Outcome::ended(end)
                }
                (Client::Stream(client), true) => {
                    // Spec mode: one message out, one datagram back (within
                    // --udp-timeout), then close.
                    spec_exchange(client, &mut stream, limits.idle_timeout, limits.udp_timeout)
                        .await
                }
            }
        })
    }
}

/// Opens a session's stream on a tunnel (or relay): its header out, the status byte back.
async fn open_session(link: &Link, header: &[u8]) -> io::Result<(BoxSession, u8)> {
    let mut stream = link.open().await?;
    stream.write_all(header).await?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).await?;
    Ok((stream, status[0]))
}

/// Datagrams between the client's channel and the session's stream in the tunnel, each
/// framed on the stream (`ztp_proto::framing`: 2-byte length, at most 16,384 bytes).
async fn carry_datagrams(
    channel: &mut dyn DatagramChannel,
    stream: &mut BoxSession,
    idle: Duration,
) -> &'static str {
    let mut up = Vec::new();
    let mut out = Vec::new();
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Whole frames already read go to the client first.
        loop {
            match dec.frame() {
                Ok(Some(f)) => {
                    if channel.send(f).await.is_err() {
                        return "connection error";
                    }
                    dec.consume_frame();
                }
                Ok(None) => break,
                Err(_) => return "bad frame from the connector",
            }
        }
        tokio::select! {
            r = channel.recv(&mut up) => match r {
                Ok(true) => {
                    out.clear();
                    encode(&up, &mut out);
                    if stream.write_all(&out).await.is_err() {
                        return "tunnel error";
                    }
                }
                Ok(false) => return "closed",
                Err(_) => return "connection error",
            },
            r = stream.read(&mut buf) => match r {
                Ok(0) => return "closed by the connector",
                Ok(n) => dec.push(&buf[..n]),
                Err(_) => return "tunnel error",
            },
            _ = tokio::time::sleep(idle) => return "idle timeout",
        }
    }
}

/// The udp spec mode through a tunnel: the client's first message as one datagram, the
/// first datagram back as the answer.
async fn spec_exchange(
    client: &mut dyn super::ClientIo,
    stream: &mut BoxSession,
    idle: Duration,
    answer: Duration,
) -> Outcome {
    let first = match tokio::time::timeout(idle, client.read_message()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return Outcome::ended("closed"),
        Ok(Err(_)) => return Outcome::aborted("connection error"),
        Err(_) => return Outcome::ended("idle timeout"),
    };
    let mut out = Vec::new();
    encode(&first[..first.len().min(MAX_FRAME)], &mut out);
    if stream.write_all(&out).await.is_err() {
        return Outcome::ended("tunnel error");
    }
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    let got = tokio::time::timeout(answer, async {
        loop {
            if let Ok(Some(f)) = dec.frame() {
                return Some(f.to_vec());
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => dec.push(&buf[..n]),
            }
        }
    })
    .await;
    let _ = stream.shutdown().await;
    match got {
        Ok(Some(d)) => {
            if client.write_all(&d).await.is_err() || client.flush().await.is_err() {
                return Outcome::aborted("connection error");
            }
            Outcome::answered("answered")
        }
        Ok(None) => Outcome::ended("backend unreachable"),
        Err(_) => Outcome::ended("backend timeout"),
    }
}

/// Carries sessions to other replicas over mutual TLS with node certificates (QUIC,
/// ALPN `ztp-relay/1`): one connection per replica, kept, a stream per session.
pub struct Relayer {
    endpoints: Mutex<(Option<quinn::Endpoint>, Option<quinn::Endpoint>)>,
    node_key: Arc<rustls::sign::CertifiedKey>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    trust_domain: String,
    /// The verifier of the current snapshot (the client CA set and its revocations),
    /// which the peer's node certificate must pass.
    verifier: Box<dyn Fn() -> Arc<dyn rustls::server::danger::ClientCertVerifier> + Send + Sync>,
    /// By node id: the address dialled, and the connection.
    conns: Mutex<HashMap<String, (String, Connection)>>,
}

impl std::fmt::Debug for Relayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayer").finish_non_exhaustive()
    }
}

impl Relayer {
    pub fn new(
        node_key: Arc<rustls::sign::CertifiedKey>,
        provider: Arc<rustls::crypto::CryptoProvider>,
        trust_domain: String,
        verifier: Box<
            dyn Fn() -> Arc<dyn rustls::server::danger::ClientCertVerifier> + Send + Sync,
        >,
    ) -> Self {
        Relayer {
            endpoints: Mutex::new((None, None)),
            node_key,
            provider,
            trust_domain,
            verifier,
            conns: Mutex::default(),
        }
    }

    /// A connection to replica `node` at `addr` (kept and reused while it lives).
    pub async fn connection(&self, node: &str, addr: &str) -> io::Result<Connection> {
        let cached = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map(|(_, c)| c)
            .filter(|c| c.close_reason().is_none())
            .cloned();
        if let Some(c) = cached {
            // The peer's certificate judged again, on the current CA set and revocations:
            // a replica revoked since the handshake gets no more sessions.
            if self.still_trusted(&c) {
                return Ok(c);
            }
            c.close(VarInt::from_u32(0), b"certificate refused");
            self.conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(node);
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the replica's certificate is refused now",
            ));
        }
        let remote = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "name resolution"))??
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        let endpoint = self.endpoint(remote.is_ipv6())?;
        let verifier = Arc::new(NodeServerVerifier {
            inner: (self.verifier)(),
            expect: node.to_owned(),
            trust_domain: self.trust_domain.clone(),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                self.node_key.clone(),
            )));
        tls.alpn_protocols = vec![ztp_proto::tunnel::RELAY_ALPN.to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(io::Error::other)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        // The peer (the holder) opens no stream of its own.
        let transport = ztp_infra::mux::machine_transport(0, ztp_proto::quic::MAX_UDP_PAYLOAD);
        config.transport_config(Arc::new(transport));
        let conn = tokio::time::timeout(Duration::from_secs(5), async {
            endpoint
                .connect_with(config, remote, "relay")
                .map_err(io::Error::other)?
                .await
                .map_err(io::Error::other)
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "relay handshake"))??;
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_owned(), (addr.to_owned(), conn.clone()));
        Ok(conn)
    }

    /// Forgets the relays to replicas whose address is not in `replicas`: new sessions
    /// do not go there, and the sessions on them go on (a replica that only lost the
    /// control plane still carries them; a dead one's end with its connection).
    pub fn keep_only(&self, replicas: &[String]) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (addr, _)| replicas.contains(addr));
    }

    fn still_trusted(&self, c: &Connection) -> bool {
        let chain = c
            .peer_identity()
            .and_then(|p| {
                p.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .map(|c| *c)
            .unwrap_or_default();
        let Some((leaf, rest)) = chain.split_first() else {
            return false;
        };
        (self.verifier)()
            .verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now())
            .is_ok()
    }

    fn endpoint(&self, v6: bool) -> io::Result<quinn::Endpoint> {
        let mut eps = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let slot = if v6 { &mut eps.1 } else { &mut eps.0 };
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let remote: std::net::SocketAddr = if v6 {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        } else {
            (std::net::Ipv4Addr::LOCALHOST, 0).into()
        };
        let e = ztp_infra::mux::quic_client_endpoint(remote, ztp_proto::quic::MAX_UDP_PAYLOAD)?;
        *slot = Some(e.clone());
        Ok(e)
    }
}

/// The peer replica's certificate on a relay: a node certificate of the client CA set
/// (not revoked) naming the replica expected.
#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    expect: String,
    trust_domain: String,
}

impl rustls::client::danger::ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match ztp_proto::names::node_id_of_cert(end_entity, &self.trust_domain) {
            Some(id) if id == self.expect => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::General("not the replica expected".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(t: &Tunnels) {
        t.set_remote(
            "me",
            [
                ("lab".to_owned(), "a".to_owned(), "10.0.0.1:9743".to_owned()),
                ("lab".to_owned(), "b".to_owned(), "10.0.0.2:9743".to_owned()),
                (
                    "lab".to_owned(),
                    "me".to_owned(),
                    "10.0.0.3:9743".to_owned(),
                ),
            ],
        );
    }

    #[tokio::test]
    async fn relays_take_turns_skip_what_was_tried_and_pass_over_a_holder_that_failed() {
        let t = Tunnels::default();
        holders(&t);
        // Never this node itself; both others in turn.
        let mut seen: Vec<String> = (0..4).map(|_| t.pick_remote("lab").unwrap().0).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, ["a", "b"]);
        assert_eq!(t.pick_remote_except("lab", &["a".into()]).unwrap().0, "b");
        assert!(t
            .pick_remote_except("lab", &["a".into(), "b".into()])
            .is_none());
        // A holder that just failed is passed over while another is there...
        t.shun("a");
        for _ in 0..4 {
            assert_eq!(t.pick_remote("lab").unwrap().0, "b");
        }
        // ... and taken when it is the only one left.
        assert_eq!(t.pick_remote_except("lab", &["b".into()]).unwrap().0, "a");
        assert!(t.pick_remote("other").is_none());
    }
}

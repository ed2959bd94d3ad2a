//! Connections to the key servers, and the signing requests on them.
//!
//! A signature is asked for from inside rustls's handshake processing, which is
//! synchronous: the caller is a thread that may block (tokio's blocking pool, or a worker
//! inside `block_in_place`, see [`super::RemoteSigner`]). So the pool is plain threads
//! and blocking sockets, and the caller does its own I/O: it writes its request on the
//! connection itself and waits for the answer on a channel. Each key server has one
//! thread (`ztp-keyless-N`) that dials, keeps the TLS connection, reads the answers and
//! hands each to its waiter. A signature costs the key server's round trip and two
//! thread wake-ups (the reader's, then the waiter's).
//!
//! Each key server has one TLS connection at a time, pipelined: every request has an id,
//! answers complete them in any order. A connection is pinged every second and dropped if
//! nothing answers for two; it is dialled again with a backoff. A request goes to the
//! connected server with the fewest requests in flight; if it has no answer after a
//! hedge delay (three times the server's recent latency, 2 to 50 ms) it is sent to
//! another server too, and the first answer wins; if its server's connection is lost,
//! it is sent to another at once. An answer with an error code (key not found, crypto
//! failure, ...) is final.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::ClientConnection;
use ztp_proto::keyless::{split, ErrorCode, Header, Op, Outcome, Request, Response, HEADER_LEN};

/// Process-wide counts for the data plane's `/metrics`: signatures asked of key servers
/// and not obtained, and key-server connections up now.
pub static SIGNATURES: AtomicU64 = AtomicU64::new(0);
pub static SIGNATURE_FAILURES: AtomicU64 = AtomicU64::new(0);
pub static CONNECTED: AtomicUsize = AtomicUsize::new(0);
/// How long signatures took, asked to answered (or given up), for `/metrics`.
pub static LATENCY: Latency = Latency::new();

/// A latency histogram: counts per bucket and the sum.
pub struct Latency {
    /// Per bucket of [`Latency::BOUNDS`], then the overflow (past the last bound).
    counts: [AtomicU64; 13],
    sum_us: AtomicU64,
}

impl Latency {
    /// Upper bounds of the buckets, seconds: from a loopback round trip to the 2 s a
    /// signature may take.
    pub const BOUNDS: [f64; 12] = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
    ];

    const fn new() -> Latency {
        Latency {
            counts: [const { AtomicU64::new(0) }; 13],
            sum_us: AtomicU64::new(0),
        }
    }

    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = Self::BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(Self::BOUNDS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (Prometheus's `le`), the total count and the sum in
    /// seconds.
    pub fn read(&self) -> (Vec<u64>, u64, f64) {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(Self::BOUNDS.len());
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            if i < Self::BOUNDS.len() {
                cumulative.push(total);
            }
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (cumulative, total, sum)
    }
}

/// Why a signature did not come.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the key server answered: {0}")]
    Remote(ErrorCode),
    #[error("no key server answered within {0:?}")]
    Timeout(Duration),
    #[error("the request cannot be encoded: {0}")]
    Encode(String),
}

/// Where a key server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A request's fields but its id (each connection numbers its own).
#[derive(Debug, Clone)]
pub struct Ask {
    pub op: Op,
    pub key_id: [u8; 32],
    pub sni: Option<String>,
    pub payload: Vec<u8>,
}

/// Time between pings, and how long a connection may go without any answer (to a ping
/// or a request) before it is dropped.
const PING_EVERY: Duration = Duration::from_secs(1);
const PING_DEADLINE: Duration = Duration::from_secs(2);
/// Dialling a key server (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a connection's reader looks up from the socket (pings, the pool stopping).
const READ_TICK: Duration = Duration::from_millis(100);
/// A write the key server does not take within this (or within the caller's deadline,
/// if sooner) drops the connection (its waiters go to another server).
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a caller with no connected server looks for one.
const NO_SERVER_POLL: Duration = Duration::from_millis(10);
/// Requests in flight on one connection; past it the server is not picked (bounded
/// memory whatever the handshake rate).
const MAX_IN_FLIGHT: usize = 1024;
/// Largest answer body accepted (a signature is at most 512 bytes, RSA-4096).
const MAX_ANSWER: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a waiter hears of its request `.1` to server `.0`: the answer, or `None` when
/// the connection was lost before it.
type Heard = (usize, u32, Option<Outcome>);

/// The TLS records the session has queued.
fn records(tls: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while tls.wants_write() {
        // Writing into a Vec does not fail.
        if tls.write_tls(&mut out).is_err() {
            break;
        }
    }
    out
}

/// One live connection.
struct Conn {
    /// Which server of the pool.
    index: usize,
    /// The TLS session: callers encrypt requests with it, the reader decrypts answers.
    tls: Mutex<ClientConnection>,
    /// The socket's writing side. Taken before the session is let go, so that records
    /// go out in the order they were made; written to without holding the session, so
    /// a slow write does not keep the reader from handing out answers.
    out: Mutex<TcpStream>,
    /// The socket again, to shut it down from any thread without a lock.
    sock: TcpStream,
    pending: Mutex<HashMap<u32, Sender<Heard>>>,
    closed: AtomicBool,
}

impl Conn {
    /// Writes one message, taking at most `within` (and [`WRITE_TIMEOUT`]). An error
    /// means the connection is no good: the caller closes it.
    fn write(&self, frame: &[u8], within: Duration) -> std::io::Result<()> {
        let mut tls = lock(&self.tls);
        if self.closed.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::NotConnected.into());
        }
        tls.writer().write_all(frame)?;
        let bytes = records(&mut tls);
        let out = lock(&self.out);
        drop(tls);
        self.send(out, &bytes, within)
    }

    /// Writes records the session made (under `out`, taken while the session was held).
    fn send(
        &self,
        mut out: MutexGuard<'_, TcpStream>,
        bytes: &[u8],
        within: Duration,
    ) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::NotConnected.into());
        }
        let within = within.min(WRITE_TIMEOUT);
        if within.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        out.set_write_timeout(Some(within))?;
        out.write_all(bytes)
    }

    /// Ends the connection: its socket is shut (the reader wakes and stops), and every
    /// waiter hears that its answer is lost.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.sock.shutdown(Shutdown::Both);
        let waiters: Vec<(u32, Sender<Heard>)> = lock(&self.pending).drain().collect();
        for (id, w) in waiters {
            let _ = w.send((self.index, id, None));
        }
    }

    fn in_flight(&self) -> usize {
        lock(&self.pending).len()
    }
}

/// One key server.
struct Server {
    addr: ServerAddr,
    conn: Mutex<Option<Arc<Conn>>>,
    /// Recent answer latency, microseconds (an exponentially weighted average).
    latency_us: AtomicU64,
    /// Request ids, unique across the server's connections (a waiter knows its answer
    /// by server and id).
    next_id: AtomicU32,
}

impl Server {
    fn current(&self) -> Option<Arc<Conn>> {
        lock(&self.conn)
            .clone()
            .filter(|c| !c.closed.load(Ordering::SeqCst))
    }

    fn hedge_after(&self) -> Duration {
        let us = self.latency_us.load(Ordering::Relaxed).saturating_mul(3);
        Duration::from_micros(us).clamp(Duration::from_millis(2), Duration::from_millis(50))
    }

    fn answered_in(&self, took: Duration) {
        let us = took.as_micros() as u64;
        let old = self.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.latency_us.store(new, Ordering::Relaxed);
    }
}

/// A request sent and not yet heard of.
struct Sent {
    server: usize,
    conn: Arc<Conn>,
    id: u32,
    at: Instant,
}

/// The key servers of `--key keyless://…`.
pub struct Pool {
    servers: Vec<Arc<Server>>,
    /// Tells the connection threads to end (when the pool is dropped).
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<String> = self.servers.iter().map(|s| s.addr.to_string()).collect();
        f.debug_struct("Pool").field("servers", &addrs).finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Pool {
    /// Starts a thread per server that keeps a connection to it.
    pub fn start(
        servers: Vec<ServerAddr>,
        tls: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<Arc<Pool>> {
        let stop = Arc::new(AtomicBool::new(false));
        let servers: Vec<Arc<Server>> = servers
            .into_iter()
            .map(|addr| {
                Arc::new(Server {
                    addr,
                    conn: Mutex::new(None),
                    latency_us: AtomicU64::new(0),
                    next_id: AtomicU32::new(1),
                })
            })
            .collect();
        for (index, server) in servers.iter().enumerate() {
            let (server, tls, stop) = (server.clone(), tls.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("ztp-keyless-{index}"))
                .spawn(move || keep_connected(index, &server, &tls, &stop))?;
        }
        Ok(Arc::new(Pool { servers, stop }))
    }

    /// Asks for a signature and waits for it, at most `deadline`: from a thread that
    /// may block.
    pub fn sign_blocking(&self, ask: Ask, deadline: Duration) -> Result<Vec<u8>, SignError> {
        let asked = Instant::now();
        let r = self.attempts(&ask, deadline);
        LATENCY.observe(asked.elapsed());
        SIGNATURES.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            SIGNATURE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// The connected server, not yet tried and not full, with the fewest requests in
    /// flight.
    fn pick(&self, tried: &[usize]) -> Option<(usize, Arc<Conn>)> {
        self.servers
            .iter()
            .enumerate()
            .filter(|(i, _)| !tried.contains(i))
            .filter_map(|(i, s)| s.current().map(|c| (c.in_flight(), i, c)))
            .filter(|(n, _, _)| *n < MAX_IN_FLIGHT)
            .min_by_key(|(n, _, _)| *n)
            .map(|(_, i, c)| (i, c))
    }

    /// Sends `ask` to the best server not yet tried: false if there is none (or no
    /// connection took the request).
    fn send_to_best(
        &self,
        ask: &Ask,
        waiter: &Sender<Heard>,
        tried: &mut Vec<usize>,
        sent: &mut Vec<Sent>,
        end: Instant,
    ) -> Result<bool, SignError> {
        while let Some((server, conn)) = self.pick(tried) {
            tried.push(server);
            let id = self.servers[server].next_id.fetch_add(1, Ordering::Relaxed);
            let frame = Request {
                id,
                op: ask.op,
                key_id: Some(ask.key_id),
                sni: ask.sni.clone(),
                client_ip: None,
                payload: ask.payload.clone(),
            }
            .encode()
            .map_err(|e| SignError::Encode(e.to_string()))?;
            lock(&conn.pending).insert(id, waiter.clone());
            let at = Instant::now();
            if conn
                .write(&frame, end.saturating_duration_since(at))
                .is_ok()
            {
                sent.push(Sent {
                    server,
                    conn,
                    id,
                    at,
                });
                return Ok(true);
            }
            // This one failed to take it: forget it here, then end the connection (its
            // other waiters hear it), and try the next server.
            lock(&conn.pending).remove(&id);
            conn.close();
        }
        Ok(false)
    }

    /// Sends `ask` to one server, to a second one when the first is slow or lost, and
    /// so on, until an answer or the deadline.
    fn attempts(&self, ask: &Ask, deadline: Duration) -> Result<Vec<u8>, SignError> {
        let end = Instant::now() + deadline;
        // Each request sent is heard of once (its answer, or its connection's loss).
        let (waiter, heard) = channel::<Heard>();
        let mut tried: Vec<usize> = Vec::new();
        let mut sent: Vec<Sent> = Vec::new();
        let result = loop {
            let now = Instant::now();
            if now >= end {
                break Err(SignError::Timeout(deadline));
            }
            if sent.is_empty() {
                match self.send_to_best(ask, &waiter, &mut tried, &mut sent, end) {
                    Ok(true) => {}
                    Ok(false) => {
                        // None connected (or all tried): wait for one to come (back).
                        tried.clear();
                        std::thread::sleep(NO_SERVER_POLL.min(end - now));
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
            let hedge = self
                .pick(&tried)
                .and_then(|_| sent.last())
                .map(|s| self.servers[s.server].hedge_after());
            let left = end.saturating_duration_since(Instant::now());
            match heard.recv_timeout(hedge.map_or(left, |h| h.min(left))) {
                Ok((i, id, heard)) => {
                    // Only a request still out counts (not one given up on already).
                    let Some(k) = sent.iter().position(|s| s.server == i && s.id == id) else {
                        continue;
                    };
                    let request = sent.swap_remove(k);
                    let Some(outcome) = heard else {
                        // Lost with its connection: another server at once.
                        if let Err(e) = self.send_to_best(ask, &waiter, &mut tried, &mut sent, end)
                        {
                            break Err(e);
                        }
                        continue;
                    };
                    self.servers[i].answered_in(request.at.elapsed());
                    break match outcome {
                        Outcome::Signature(sig) => Ok(sig),
                        Outcome::Error(e) => Err(SignError::Remote(e)),
                        Outcome::Pong(_) => Err(SignError::Remote(ErrorCode::Internal)),
                    };
                }
                Err(RecvTimeoutError::Timeout) => {
                    if hedge.is_some() && Instant::now() < end {
                        if let Err(e) = self.send_to_best(ask, &waiter, &mut tried, &mut sent, end)
                        {
                            break Err(e);
                        }
                    }
                }
                // The pool keeps `waiter`: never.
                Err(RecvTimeoutError::Disconnected) => break Err(SignError::Timeout(deadline)),
            }
        };
        // What is still out (a hedge that lost, a server past the deadline): a late
        // answer finds no waiter.
        for s in sent {
            lock(&s.conn.pending).remove(&s.id);
        }
        result
    }
}

/// Keeps one connection to `server` up until the pool stops.
fn keep_connected(
    index: usize,
    server: &Server,
    tls: &Arc<rustls::ClientConfig>,
    stop: &AtomicBool,
) {
    let mut backoff = BACKOFF_FIRST;
    while !stop.load(Ordering::SeqCst) {
        match dial(&server.addr, tls) {
            Ok((sock, session)) => {
                tracing::info!(keyserver = %server.addr, "connected to the key server");
                backoff = BACKOFF_FIRST;
                let reason = serve(index, server, sock, session, stop);
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(keyserver = %server.addr, reason, "lost the key server");
            }
            Err(e) => {
                tracing::warn!(keyserver = %server.addr, error = %e, "cannot reach the key server")
            }
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(READ_TICK.min(until.saturating_duration_since(Instant::now())));
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A TCP connection and a completed TLS handshake, within [`CONNECT_TIMEOUT`].
fn dial(
    addr: &ServerAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> std::io::Result<(TcpStream, ClientConnection)> {
    use std::io::{Error, ErrorKind};
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let targets: Vec<SocketAddr> = match addr.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, addr.port)],
        Err(_) => (addr.host.as_str(), addr.port).to_socket_addrs()?.collect(),
    };
    let mut sock = None;
    let mut last = Error::new(ErrorKind::NotFound, "the name has no address");
    for target in targets {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last = Error::new(ErrorKind::TimedOut, "no connection in time");
            break;
        }
        match TcpStream::connect_timeout(&target, left) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut sock = sock.ok_or(last)?;
    sock.set_nodelay(true)?;
    let name = ServerName::try_from(addr.host.clone())
        .map_err(|e| Error::new(ErrorKind::InvalidInput, e))?;
    let mut session = ClientConnection::new(tls.clone(), name).map_err(Error::other)?;
    while session.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(
                ErrorKind::TimedOut,
                "the TLS handshake did not finish in time",
            ));
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        session.complete_io(&mut sock)?;
    }
    let rest = records(&mut session);
    sock.write_all(&rest)?;
    Ok((sock, session))
}

/// Runs one connection until it fails or the pool stops; why it ended.
fn serve(
    index: usize,
    server: &Server,
    sock: TcpStream,
    session: ClientConnection,
    stop: &AtomicBool,
) -> &'static str {
    let clones = (|| {
        sock.set_read_timeout(Some(READ_TICK))?;
        Ok::<_, std::io::Error>((sock.try_clone()?, sock.try_clone()?))
    })();
    let Ok((reader, shut)) = clones else {
        return "cannot set up the socket";
    };
    let conn = Arc::new(Conn {
        index,
        tls: Mutex::new(session),
        out: Mutex::new(sock),
        sock: shut,
        pending: Mutex::new(HashMap::new()),
        closed: AtomicBool::new(false),
    });
    *lock(&server.conn) = Some(conn.clone());
    CONNECTED.fetch_add(1, Ordering::Relaxed);
    let reason = read_answers(server, &conn, reader, stop);
    conn.close();
    CONNECTED.fetch_sub(1, Ordering::Relaxed);
    let mut current = lock(&server.conn);
    if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
        *current = None;
    }
    reason
}

/// Reads answers and hands each to its waiter; pings; why the connection ended.
fn read_answers(
    server: &Server,
    conn: &Conn,
    mut sock: TcpStream,
    stop: &AtomicBool,
) -> &'static str {
    let mut raw = vec![0u8; 16 * 1024];
    let mut plain: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut last_answer = Instant::now();
    let mut last_ping = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            return "the pool stopped";
        }
        if conn.closed.load(Ordering::SeqCst) {
            return "a write failed";
        }
        if last_answer.elapsed() > PING_DEADLINE {
            return "no answer to pings";
        }
        if last_ping.elapsed() >= PING_EVERY {
            last_ping = Instant::now();
            let id = server.next_id.fetch_add(1, Ordering::Relaxed);
            let ping = Request {
                id,
                op: Op::Ping,
                key_id: None,
                sni: None,
                client_ip: None,
                payload: Vec::new(),
            };
            if let Ok(frame) = ping.encode() {
                if conn.write(&frame, WRITE_TIMEOUT).is_err() {
                    return "a write failed";
                }
            }
        }
        let n = match sock.read(&mut raw) {
            Ok(0) => return "connection closed",
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return "connection closed",
        };
        // What was read goes through the TLS session.
        let mut peer_closed = false;
        {
            let mut tls = lock(&conn.tls);
            let mut data = &raw[..n];
            while !data.is_empty() {
                if tls.read_tls(&mut data).is_err() {
                    return "TLS read failed";
                }
                let state = match tls.process_new_packets() {
                    Ok(s) => s,
                    Err(_) => {
                        // rustls queued an alert for the key server.
                        let alert = records(&mut tls);
                        let out = lock(&conn.out);
                        drop(tls);
                        let _ = conn.send(out, &alert, WRITE_TIMEOUT);
                        return "TLS error";
                    }
                };
                let ready = state.plaintext_bytes_to_read();
                peer_closed |= state.peer_has_closed();
                if ready > 0 {
                    let at = plain.len();
                    plain.resize(at + ready, 0);
                    if tls.reader().read_exact(&mut plain[at..]).is_err() {
                        return "TLS read failed";
                    }
                }
            }
            // A key update, say.
            let update = records(&mut tls);
            let out = lock(&conn.out);
            drop(tls);
            if conn.send(out, &update, WRITE_TIMEOUT).is_err() {
                return "a write failed";
            }
        }
        let mut start = 0;
        loop {
            let rest = &plain[start..];
            if let Some(Ok(head)) = rest.get(..HEADER_LEN).map(<&[u8; HEADER_LEN]>::try_from) {
                if usize::from(Header::parse(head).len) > MAX_ANSWER {
                    return "answer too large";
                }
            }
            let Some((h, body)) = split(rest) else { break };
            let answer = match Response::decode(&h, &rest[body.clone()]) {
                Ok(a) => a,
                Err(_) => return "malformed answer",
            };
            start += body.end;
            last_answer = Instant::now();
            if let Outcome::Pong(_) = answer.outcome {
                continue;
            }
            let waiter = lock(&conn.pending).remove(&answer.id);
            if let Some(w) = waiter {
                let _ = w.send((conn.index, answer.id, Some(answer.outcome)));
            }
        }
        plain.drain(..start);
        if peer_closed {
            return "connection closed";
        }
    }
}

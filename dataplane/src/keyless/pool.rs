//! Connections to the key servers, and the signing requests on them.
//!
//! The pool runs on a runtime of its own (one thread, `ztp-keyless`): a signature is
//! asked for from inside rustls's handshake processing, which is synchronous, so the
//! caller blocks (off the data plane's async workers, see [`super::RemoteSigner`]) while
//! the pool's thread does the I/O; no caller can stall the pool, nor the pool a worker.
//!
//! Each key server has one TLS connection at a time, pipelined: every request has an id,
//! answers complete them in any order. A connection is pinged every second and dropped if
//! a ping goes unanswered for two; it is dialled again with a backoff. A request goes to
//! the connected server with the fewest requests in flight; if it has no answer after a
//! hedge delay (three times the server's recent latency, 2 to 50 ms) it is sent to
//! another server too, and the first answer wins; if its server's connection is lost,
//! it is sent to another at once. An answer with an error code (key not found, crypto
//! failure, ...) is final.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use ztp_proto::keyless::{split, ErrorCode, Op, Outcome, Request, Response};

/// Process-wide counts for the data plane's `/metrics`: signatures asked of key servers
/// and not obtained, and key-server connections up now.
pub static SIGNATURES: AtomicU64 = AtomicU64::new(0);
pub static SIGNATURE_FAILURES: AtomicU64 = AtomicU64::new(0);
pub static CONNECTED: AtomicUsize = AtomicUsize::new(0);

/// Why a signature did not come.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the key server answered: {0}")]
    Remote(ErrorCode),
    #[error("no key server answered within {0:?}")]
    Timeout(Duration),
    #[error("the keyless pool has stopped")]
    Stopped,
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

/// Time between pings on an idle or busy connection, and how long a ping may go
/// unanswered before the connection is dropped.
const PING_EVERY: Duration = Duration::from_secs(1);
const PING_DEADLINE: Duration = Duration::from_secs(2);
/// Dialling a key server (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Requests in flight on one connection; past it, a request waits for room (bounded
/// memory whatever the handshake rate).
const MAX_IN_FLIGHT: usize = 1024;
/// Largest answer body accepted (a signature is at most 512 bytes, RSA-4096).
const MAX_ANSWER: usize = 4096;

/// One live connection.
struct Conn {
    frames: mpsc::Sender<Vec<u8>>,
    pending: Mutex<HashMap<u32, oneshot::Sender<Outcome>>>,
    next_id: AtomicU32,
    closed: AtomicBool,
}

impl Conn {
    fn fail_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// One key server.
struct Server {
    addr: ServerAddr,
    conn: Mutex<Option<Arc<Conn>>>,
    in_flight: AtomicUsize,
    /// Recent answer latency, microseconds (an exponentially weighted average).
    latency_us: AtomicU64,
}

impl Server {
    fn current(&self) -> Option<Arc<Conn>> {
        self.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|c| !c.closed.load(Ordering::SeqCst))
    }

    fn hedge_after(&self) -> Duration {
        let us = self.latency_us.load(Ordering::Relaxed).saturating_mul(3);
        Duration::from_micros(us).clamp(Duration::from_millis(2), Duration::from_millis(50))
    }

    /// One request on the current connection: the answer, or `None` if the connection
    /// is down or was lost before the answer.
    async fn call(&self, ask: &Ask) -> Option<Outcome> {
        let conn = self.current()?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = Request {
            id,
            op: ask.op,
            key_id: Some(ask.key_id),
            sni: ask.sni.clone(),
            client_ip: None,
            payload: ask.payload.clone(),
        }
        .encode()
        .ok()?;
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        if conn.closed.load(Ordering::SeqCst) {
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let answer = async {
            conn.frames.send(frame).await.ok()?;
            rx.await.ok()
        }
        .await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if answer.is_some() {
            let us = started.elapsed().as_micros() as u64;
            let old = self.latency_us.load(Ordering::Relaxed);
            let new = if old == 0 { us } else { (old * 7 + us) / 8 };
            self.latency_us.store(new, Ordering::Relaxed);
        } else {
            conn.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
        answer
    }
}

/// The key servers of `--key keyless://…`.
pub struct Pool {
    servers: Vec<Arc<Server>>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<String> = self.servers.iter().map(|s| s.addr.to_string()).collect();
        f.debug_struct("Pool").field("servers", &addrs).finish()
    }
}

impl Pool {
    /// Starts the pool's thread and a connection to each server.
    pub fn start(
        servers: Vec<ServerAddr>,
        tls: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<Arc<Pool>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("ztp-keyless".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        let servers: Vec<Arc<Server>> = servers
            .into_iter()
            .map(|addr| {
                Arc::new(Server {
                    addr,
                    conn: Mutex::new(None),
                    in_flight: AtomicUsize::new(0),
                    latency_us: AtomicU64::new(0),
                })
            })
            .collect();
        for s in &servers {
            handle.spawn(keep_connected(s.clone(), TlsConnector::from(tls.clone())));
        }
        Ok(Arc::new(Pool { servers, handle }))
    }

    /// Asks for a signature and waits for it, at most `deadline`: from a synchronous
    /// context (rustls's signer), never from the pool's own thread.
    pub fn sign_blocking(&self, ask: Ask, deadline: Duration) -> Result<Vec<u8>, SignError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let servers = self.servers.clone();
        self.handle.spawn(async move {
            let r = tokio::time::timeout(deadline, attempts(&servers, &ask))
                .await
                .unwrap_or(Err(SignError::Timeout(deadline)));
            let _ = tx.try_send(r);
        });
        let r = rx
            .recv_timeout(deadline + Duration::from_millis(100))
            .unwrap_or(Err(SignError::Stopped));
        SIGNATURES.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            SIGNATURE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

/// The connected server, not yet tried, with the fewest requests in flight.
fn pick(servers: &[Arc<Server>], tried: &[usize]) -> Option<usize> {
    servers
        .iter()
        .enumerate()
        .filter(|(i, s)| !tried.contains(i) && s.current().is_some())
        .min_by_key(|(_, s)| s.in_flight.load(Ordering::Relaxed))
        .map(|(i, _)| i)
}

/// Sends `ask` to one server, a second one when the first is slow or lost, and so on,
/// until an answer (the caller bounds the time).
async fn attempts(servers: &[Arc<Server>], ask: &Ask) -> Result<Vec<u8>, SignError> {
    use std::future::Future;
    use std::pin::Pin;
    type Call<'a> = Pin<Box<dyn Future<Output = (usize, Option<Outcome>)> + Send + 'a>>;
    let call = |i: usize| -> Call<'_> {
        let s = servers[i].clone();
        Box::pin(async move { (i, s.call(ask).await) })
    };
    let mut tried: Vec<usize> = Vec::new();
    let mut calls: Vec<Call<'_>> = Vec::new();
    loop {
        if calls.is_empty() {
            match pick(servers, &tried) {
                Some(i) => {
                    tried.push(i);
                    calls.push(call(i));
                }
                None => {
                    // None connected (or all tried): wait for one to come (back).
                    tried.clear();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let hedge = servers[*tried.last().unwrap_or(&0)].hedge_after();
        let can_hedge = pick(servers, &tried).is_some();
        let next = std::future::poll_fn(|cx| {
            for (k, c) in calls.iter_mut().enumerate() {
                if let std::task::Poll::Ready(r) = c.as_mut().poll(cx) {
                    return std::task::Poll::Ready((k, r));
                }
            }
            std::task::Poll::Pending
        });
        tokio::select! {
            (k, (_, answer)) = next => {
                drop(calls.swap_remove(k));
                match answer {
                    Some(Outcome::Signature(s)) => return Ok(s),
                    Some(Outcome::Error(e)) => return Err(SignError::Remote(e)),
                    Some(Outcome::Pong(_)) => return Err(SignError::Remote(ErrorCode::Internal)),
                    // Lost with its connection: another server at once.
                    None => {
                        if let Some(i) = pick(servers, &tried) {
                            tried.push(i);
                            calls.push(call(i));
                        }
                    }
                }
            }
            () = tokio::time::sleep(hedge), if can_hedge => {
                if let Some(i) = pick(servers, &tried) {
                    tried.push(i);
                    calls.push(call(i));
                }
            }
        }
    }
}

/// Keeps one connection to `server` up, for the life of the process.
async fn keep_connected(server: Arc<Server>, tls: TlsConnector) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, dial(&server.addr, &tls)).await {
            Ok(Ok(stream)) => {
                tracing::info!(keyserver = %server.addr, "connected to the key server");
                backoff = BACKOFF_FIRST;
                let reason = serve(&server, stream).await;
                tracing::warn!(keyserver = %server.addr, reason, "lost the key server");
            }
            Ok(Err(e)) => {
                tracing::warn!(keyserver = %server.addr, error = %e, "cannot reach the key server")
            }
            Err(_) => {
                tracing::warn!(keyserver = %server.addr, "the key server did not answer the connection in time")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn dial(
    addr: &ServerAddr,
    tls: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = match addr.host.parse::<std::net::IpAddr>() {
        Ok(ip) => TcpStream::connect(SocketAddr::new(ip, addr.port)).await?,
        Err(_) => TcpStream::connect((addr.host.as_str(), addr.port)).await?,
    };
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(addr.host.clone())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tls.connect(name, tcp).await
}

/// Runs one connection until it fails; why it ended.
async fn serve(
    server: &Server,
    stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> &'static str {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (frames, mut outbox) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
    let conn = Arc::new(Conn {
        frames,
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU32::new(1),
        closed: AtomicBool::new(false),
    });
    *server.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
    CONNECTED.fetch_add(1, Ordering::Relaxed);
    let last_answer = Arc::new(Mutex::new(Instant::now()));

    let writer = async {
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut buf = Vec::new();
        loop {
            tokio::select! {
                f = outbox.recv() => {
                    let Some(f) = f else { return "closed" };
                    buf.extend_from_slice(&f);
                    // Whatever else is queued goes in the same write.
                    while let Ok(f) = outbox.try_recv() {
                        buf.extend_from_slice(&f);
                    }
                }
                _ = ping.tick() => {
                    let quiet = last_answer.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                    if quiet > PING_DEADLINE {
                        return "no answer to pings";
                    }
                    let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
                    if let Ok(f) = (Request { id, op: Op::Ping, key_id: None, sni: None, client_ip: None, payload: Vec::new() }).encode() {
                        buf.extend_from_slice(&f);
                    }
                }
            }
            if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                return "write failed";
            }
            buf.clear();
        }
    };
    let reader = async {
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return "connection closed",
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some((h, body)) = split(&buf[start..]) {
                if h.len as usize > MAX_ANSWER {
                    return "answer too large";
                }
                let body = start + body.start..start + body.end;
                let answer = match Response::decode(&h, &buf[body.clone()]) {
                    Ok(a) => a,
                    Err(_) => return "malformed answer",
                };
                start = body.end;
                *last_answer.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                if let Outcome::Pong(_) = answer.outcome {
                    conn.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&answer.id);
                    continue;
                }
                let waiter = conn
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&answer.id);
                if let Some(w) = waiter {
                    let _ = w.send(answer.outcome);
                }
            }
            buf.drain(..start);
        }
    };
    let reason = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    conn.fail_all();
    CONNECTED.fetch_sub(1, Ordering::Relaxed);
    let mut current = server.conn.lock().unwrap_or_else(|p| p.into_inner());
    if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
        *current = None;
    }
    reason
}

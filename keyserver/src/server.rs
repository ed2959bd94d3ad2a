//! Serving the protocol: `Listener → Connection → request`, mini-redis' shape.
//!
//! - The listener admits at most [`Limits::max_connections`] connections (more are closed
//!   at accept) and gives each [`Limits::handshake_timeout`] to complete the handshake.
//! - A connection reads messages one after another. Each takes a place among the
//!   connection's [`Limits::max_inflight`] before it is read, and gives it back once its
//!   answer is written: past the cap the connection is not read until answers go out.
//!   The cap bounds the requests waiting for the pool and the answers waiting for a
//!   client that does not read, whichever signed them.
//! - A request that cannot be served is answered at once with its error code, and the
//!   connection goes on (the header says where the next message starts).
//! - A signature with a fast key, ECDSA P-256 (~36 µs with the table of
//!   [`crate::keys::p256_table`]) or Ed25519 (~20 µs), is made right on the connection's
//!   task: less than handing it to a thread and its answer back costs (two wake-ups
//!   across threads: at 1,000 requests a second on loopback, an answer now leaves 91 µs
//!   after its request was read, against 114 through the pool). A connection's fast
//!   signatures are so made one after another, on one core; after [`INLINE_SLICE`] of
//!   them without a pause the task yields, so that its answers go out and the worker's
//!   other connections run.
//! - A signature with a slow key, RSA (milliseconds) or ECDSA P-384 (the generic k×G,
//!   ~0.6 ms), goes to the [`SignPool`], whose `--sign-threads` threads sign off the async
//!   workers, many requests at once.
//! - Answers are written as they are ready, in any order, every one counted and logged
//!   the same wherever it was signed.
//! - A request body over [`MAX_BODY`] is skipped unbuffered and answered `format error`.
//! - A connection with nothing to read and no answer leaving for
//!   [`Limits::idle_timeout`] is closed.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tracing::Instrument as _;
use ztp_proto::keyless::{ErrorCode, Header, Op, Outcome, Request, Response, HEADER_LEN};

use crate::keys::{short_id, Algorithm, Key, KeySet};
use crate::metrics::Metrics;

/// The largest request body served, in bytes: a signing request is a few hundred (a
/// digest, or an Ed25519 handshake message of ~160 bytes, and the SNI). A longer one is
/// read past without being buffered and answered `format error` (0x07), the connection
/// kept; so a connection buffers at most `--max-inflight` times this.
pub const MAX_BODY: usize = 16 * 1024;

/// How long a connection's task signs fast keys' requests back to back before it yields
/// to its writer and the worker's other tasks: a dozen P-256 signatures.
pub const INLINE_SLICE: Duration = Duration::from_micros(500);

/// Limits on what a client can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests read and not yet answered, per connection.
    pub max_inflight: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// On shutdown, how long live connections get to answer what they read.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inflight: 256,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that make the slow signatures (RSA, ECDSA P-384) off the async workers: a
/// fixed number (`--sign-threads`), fed by one queue.
pub struct SignPool {
    tx: std::sync::mpsc::Sender<Job>,
}

impl SignPool {
    /// Starts `threads` signing threads (at least one); they end when the pool is
    /// dropped.
    pub fn new(threads: usize) -> std::io::Result<SignPool> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("ztp-sign-{i}"))
                .spawn(move || loop {
                    let job = {
                        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                        rx.recv()
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(SignPool { tx })
    }

    fn submit(&self, job: Job) {
        // The threads live as long as the pool: the send fails only if every one of
        // them died, and then the job (and its answer's sender) is dropped.
        let _ = self.tx.send(job);
    }
}

/// What every connection shares: the keys, the TLS config, metrics, the signing pool.
pub struct Server {
    keys: RwLock<Arc<KeySet>>,
    tls: RwLock<Arc<rustls::ServerConfig>>,
    metrics: Arc<Metrics>,
    pool: SignPool,
    limits: Limits,
    trust_domain: String,
}

/// An answer on its way out, with the in-flight place it frees once written.
struct Reply {
    bytes: Vec<u8>,
    place: OwnedSemaphorePermit,
}

impl Reply {
    /// The answer to request `id`.
    fn new(id: u32, outcome: Outcome, place: OwnedSemaphorePermit) -> Reply {
        Reply {
            bytes: Response { id, outcome }.encode(),
            place,
        }
    }
}

impl Server {
    pub fn new(
        keys: KeySet,
        tls: Arc<rustls::ServerConfig>,
        limits: Limits,
        sign_threads: usize,
        trust_domain: &str,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<Server>> {
        metrics.set_keys(keys.len());
        Ok(Arc::new(Server {
            keys: RwLock::new(Arc::new(keys)),
            tls: RwLock::new(tls),
            metrics,
            pool: SignPool::new(sign_threads)?,
            limits,
            trust_domain: trust_domain.to_owned(),
        }))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The keys in use.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the keys: requests read from now on use the new set.
    pub fn set_keys(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
    }

    /// Replaces the TLS config: handshakes started from now on use it.
    pub fn set_tls(&self, tls: Arc<rustls::ServerConfig>) {
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
    }

    fn tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serves `listener` until `shutdown` completes; then stops accepting, stops reading
    /// live connections, and gives them [`Limits::drain_timeout`] to answer what they
    /// read.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let places = Arc::new(Semaphore::new(self.limits.max_connections));
        let mut tasks = tokio::task::JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut last_warn: Option<Instant> = None;
        loop {
            while tasks.try_join_next().is_some() {}
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, mostly: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                drop(tcp);
                self.metrics.connection_refused();
                if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_warn = Some(Instant::now());
                    tracing::warn!(
                        client.addr = %peer,
                        max_connections = self.limits.max_connections,
                        "connection refused: too many connections (logged at most every 10 s)"
                    );
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let server = self.clone();
            let stop = stop_rx.clone();
            tasks.spawn(async move {
                let _place = place;
                server.connection(tcp, peer, stop).await;
            });
        }
        drop(listener);
        let _ = stop_tx.send(true);
        let drained = timeout(self.limits.drain_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = tasks.len(),
                "drain timeout: closing the connections left"
            );
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        stop: watch::Receiver<bool>,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls());
        let tls = match timeout(self.limits.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) if crate::tls::is_not_a_node(&e) => {
                self.metrics.handshake_failed("not_node");
                tracing::warn!(client.addr = %peer, error = %e, "client certificate refused");
                return;
            }
            Ok(Err(e)) => {
                self.metrics.handshake_failed("error");
                tracing::info!(client.addr = %peer, error = %e, "handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.handshake_failed("timeout");
                tracing::info!(client.addr = %peer, "handshake timed out");
                return;
            }
        };
        // The verifier admitted only certificates that name a node.
        let node = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| crate::tls::node_id(c, &self.trust_domain));
        let Some(node) = node else {
            return;
        };
        let span = tracing::info_span!("connection", client.addr = %peer, client.id = %node);
        self.metrics.connection_opened();
        async {
            tracing::info!("connected");
            let (rd, wr) = tokio::io::split(tls);
            let (tx, rx) = mpsc::unbounded_channel::<Reply>();
            let writer = tokio::spawn(
                write_loop(wr, rx, self.limits.idle_timeout).instrument(tracing::Span::current()),
            );
            self.read_loop(rd, tx, Arc::from(node), stop).await;
            // The writer ends once every answer read is written (signing jobs hold
            // senders), or the client stops reading.
            let _ = writer.await;
            tracing::info!("closed");
        }
        .instrument(span)
        .await;
        self.metrics.connection_closed();
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        rd: R,
        tx: mpsc::UnboundedSender<Reply>,
        node: Arc<str>,
        mut stop: watch::Receiver<bool>,
    ) {
        let idle = self.limits.idle_timeout;
        let mut rd = BufReader::with_capacity(16 * 1024, rd);
        let places = Arc::new(Semaphore::new(self.limits.max_inflight));
        let mut body = Vec::new();
        // Time spent signing on this task since it last yielded for INLINE_SLICE.
        let mut signed_here = Duration::ZERO;
        loop {
            // A place for the answer before the request is read: past --max-inflight the
            // connection is not read until answers go out.
            let place = tokio::select! {
                p = timeout(idle, places.clone().acquire_owned()) => match p {
                    Ok(Ok(p)) => p,
                    _ => {
                        tracing::info!("closing: no answer was read for the idle timeout");
                        return;
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            let mut head = [0u8; HEADER_LEN];
            let read = tokio::select! {
                r = timeout(idle, rd.read_exact(&mut head)) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match read {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    if e.kind() != std::io::ErrorKind::UnexpectedEof {
                        tracing::debug!(error = %e, "read failed");
                    }
                    return;
                }
                Err(_) => {
                    tracing::debug!("closing: idle");
                    return;
                }
            }
            let header = Header::parse(&head);
            // An oversize body is read past, never buffered, and answered.
            let oversize = usize::from(header.len) > MAX_BODY;
            let read = if oversize {
                body.clear();
                let mut rest = (&mut rd).take(u64::from(header.len));
                timeout(idle, tokio::io::copy(&mut rest, &mut tokio::io::sink()))
                    .await
                    .map(|r| {
                        r.and_then(|n| {
                            if n == u64::from(header.len) {
                                Ok(())
                            } else {
                                Err(std::io::ErrorKind::UnexpectedEof.into())
                            }
                        })
                    })
            } else {
                body.resize(usize::from(header.len), 0);
                timeout(idle, rd.read_exact(&mut body))
                    .await
                    .map(|r| r.map(|_| ()))
            };
            match read {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "read failed in a message");
                    return;
                }
                Err(_) => {
                    tracing::debug!("closing: a message stalled for the idle timeout");
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
            if oversize {
                let code = ErrorCode::FormatError;
                self.metrics.error(code);
                tracing::info!(
                    request.id = header.id,
                    body.len = header.len,
                    error = code.as_str(),
                    "request refused: body over the key server's limit"
                );
                let _ = tx.send(Reply::new(header.id, Outcome::Error(code), place));
                continue;
            }
            signed_here += self.request(header, &body, place, &tx, &node);
            if signed_here >= INLINE_SLICE {
                signed_here = Duration::ZERO;
                tokio::task::yield_now().await;
            }
        }
    }

    /// Answers one request: now (an error, a pong, a fast key's signature) or from the
    /// signing pool. Returns the time spent signing here.
    fn request(
        &self,
        header: Header,
        body: &[u8],
        place: OwnedSemaphorePermit,
        tx: &mpsc::UnboundedSender<Reply>,
        node: &Arc<str>,
    ) -> Duration {
        let answer = |outcome, place| Reply::new(header.id, outcome, place);
        let req = match Request::decode(&header, body) {
            Ok(r) => r,
            Err(code) => {
                self.metrics.error(code);
                tracing::info!(
                    request.id = header.id,
                    error = code.as_str(),
                    "request refused"
                );
                let _ = tx.send(answer(Outcome::Error(code), place));
                return Duration::ZERO;
            }
        };
        if req.op == Op::Ping {
            self.metrics.pong();
            let _ = tx.send(answer(Outcome::Pong(req.payload), place));
            return Duration::ZERO;
        }
        // `decode` requires a key id for every signing request.
        let Some(key_id) = req.key_id else {
            self.metrics.error(ErrorCode::FormatError);
            let _ = tx.send(answer(Outcome::Error(ErrorCode::FormatError), place));
            return Duration::ZERO;
        };
        let Some(key) = self.keys().lookup(&key_id, node).cloned() else {
            // Unknown, or not this node's to use: the same answer.
            self.metrics.error(ErrorCode::KeyNotFound);
            tracing::info!(
                request.id = req.id,
                key.id = %short_id(&key_id),
                op = req.op.as_str(),
                "key not found"
            );
            let _ = tx.send(answer(Outcome::Error(ErrorCode::KeyNotFound), place));
            return Duration::ZERO;
        };
        self.metrics.inflight(1);
        if signs_here(key.algorithm) {
            let start = Instant::now();
            let outcome = sign(&key, &req, node, &self.metrics);
            let _ = tx.send(answer(outcome, place));
            return start.elapsed();
        }
        let (node, metrics, tx) = (node.clone(), self.metrics.clone(), tx.clone());
        self.pool.submit(Box::new(move || {
            let outcome = sign(&key, &req, &node, &metrics);
            let _ = tx.send(Reply::new(req.id, outcome, place));
        }));
        Duration::ZERO
    }
}

/// Whether a key's signatures are made on the connection's task (tens of microseconds)
/// rather than on the [`SignPool`] (RSA: milliseconds; P-384: ~0.6 ms).
fn signs_here(algorithm: Algorithm) -> bool {
    matches!(algorithm, Algorithm::EcdsaP256 | Algorithm::Ed25519)
}

/// Signs `req` with `key`, counts and logs it: the answer's outcome. A panic in the
/// signing code becomes `internal error`. The log lines belong to no span, so that they
/// are the same whether the connection's task or a pool thread signed.
fn sign(key: &Key, req: &Request, node: &str, metrics: &Metrics) -> Outcome {
    let start = Instant::now();
    let signed = catch_unwind(AssertUnwindSafe(|| key.sign(req.op, &req.payload)));
    let took = start.elapsed();
    let outcome = match signed {
        Ok(Ok(sig)) => {
            metrics.signed(&key.name, req.op, took);
            tracing::info!(
                parent: None,
                client.id = %node,
                key.id = %short_id(&key.id),
                key.name = %key.name,
                op = req.op.as_str(),
                tls.sni = req.sni.as_deref(),
                client.ip = req.client_ip.map(tracing::field::display),
                request.id = req.id,
                "signed"
            );
            Outcome::Signature(sig)
        }
        Ok(Err(code)) => {
            metrics.error(code);
            tracing::info!(
                parent: None,
                client.id = %node,
                key.id = %short_id(&key.id),
                key.name = %key.name,
                key.algorithm = %key.algorithm,
                op = req.op.as_str(),
                request.id = req.id,
                error = code.as_str(),
                "not signed"
            );
            Outcome::Error(code)
        }
        Err(_) => {
            metrics.error(ErrorCode::Internal);
            tracing::error!(
                parent: None,
                client.id = %node,
                key.id = %short_id(&key.id),
                op = req.op.as_str(),
                "signing panicked"
            );
            Outcome::Error(ErrorCode::Internal)
        }
    };
    metrics.inflight(-1);
    outcome
}

/// Writes answers as they come, a batch per flush; ends when every sender is gone (then
/// closes the TLS session) or when a write waits `idle` for the client to read.
async fn write_loop<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    idle: Duration,
) {
    let mut wr = BufWriter::with_capacity(16 * 1024, wr);
    // Places are freed once their answers are flushed.
    let mut written: Vec<OwnedSemaphorePermit> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let sent = timeout(idle, async {
            while let Some(reply) = next.take() {
                wr.write_all(&reply.bytes).await?;
                written.push(reply.place);
                next = rx.try_recv().ok();
            }
            wr.flush().await
        })
        .await;
        written.clear();
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                return;
            }
            Err(_) => {
                tracing::info!("closing: the client did not read its answers for the idle timeout");
                return;
            }
        }
    }
    let _ = timeout(Duration::from_secs(1), wr.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    use ztp_proto::keyless::split;
    use ztp_tests::{TempDir, TestPki};

    use super::*;

    /// A P-256 or Ed25519 signature is answered by the time `request` returns: made on
    /// the calling task. A P-384 one is answered later, from the pool.
    #[tokio::test]
    async fn fast_keys_sign_on_the_connections_task_slow_ones_in_the_pool() {
        ztp_tests::install_crypto_provider();
        let dir = TempDir::new("keyserver-signs-here");
        let mut ids = Vec::new();
        for (name, alg) in [
            ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("ed25519", &rcgen::PKCS_ED25519),
            ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ] {
            let pem = rcgen::KeyPair::generate_for(alg).unwrap().serialize_pem();
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join(format!("{name}.key")))
                .unwrap()
                .write_all(pem.as_bytes())
                .unwrap();
            ids.push(Key::from_pem(name, pem.as_bytes()).unwrap().id);
        }
        let td = ztp_proto::names::DEFAULT_TRUST_DOMAIN;
        let pki = TestPki::new();
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.server.cert_der.clone()],
                pki.server.key_der.clone_key(),
            )
            .unwrap();
        let server = Server::new(
            KeySet::load_dir(dir.path(), td).unwrap(),
            Arc::new(tls),
            Limits::default(),
            1,
            td,
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let places = Arc::new(Semaphore::new(8));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let node: Arc<str> = Arc::from("edge-1");
        let cases = [
            (ids[0], Op::EcdsaSha256, vec![1; 32], true),
            (ids[1], Op::Ed25519, b"a handshake message".to_vec(), true),
            (ids[2], Op::EcdsaSha384, vec![1; 48], false),
        ];
        for (id, (key_id, op, payload, here)) in (1u32..).zip(cases) {
            let bytes = Request {
                id,
                op,
                key_id: Some(key_id),
                sni: None,
                client_ip: None,
                payload,
            }
            .encode()
            .unwrap();
            let (header, body) = split(&bytes).unwrap();
            let place = places.clone().acquire_owned().await.unwrap();
            let took = server.request(header, &bytes[body], place, &tx, &node);
            let reply = if here {
                assert!(took > Duration::ZERO, "{op:?}");
                rx.try_recv().expect("answered before `request` returned")
            } else {
                assert_eq!(took, Duration::ZERO, "{op:?}");
                rx.recv().await.unwrap()
            };
            let (header, body) = split(&reply.bytes).unwrap();
            let answer = Response::decode(&header, &reply.bytes[body]).unwrap();
            assert_eq!(answer.id, id);
            assert!(
                matches!(answer.outcome, Outcome::Signature(_)),
                "{op:?}: {answer:?}"
            );
        }
        let metrics = server.metrics().render();
        for line in [
            "ztp_keyserver_signatures_total{key=\"p256\",op=\"ecdsa-sha256\"} 1",
            "ztp_keyserver_signatures_total{key=\"ed25519\",op=\"ed25519\"} 1",
            "ztp_keyserver_signatures_total{key=\"p384\",op=\"ecdsa-sha384\"} 1",
            "ztp_keyserver_requests_inflight 0",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
        }
    }
}

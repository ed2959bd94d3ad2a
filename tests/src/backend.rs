//! Loopback backends, each a tokio task on `127.0.0.1:0` that stops when its handle is
//! dropped (the accept loop and every connection task are aborted).
//!
//! TCP: [`EchoBackend`], [`HashSinkBackend`], [`SourceBackend`], [`BannerBackend`]
//! (server speaks first), [`closed_port`], [`BlackholeListener`]. UDP: [`UdpBackend`]
//! (echo, SHA-256 answer, or silent), [`closed_udp_port`].

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Deterministic pseudo-random bytes (splitmix64 seeded with `seed`).
pub fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A running accept loop; aborts it (and with it every connection task) on drop.
#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Server {
    async fn spawn<F, Fut>(handler: F) -> io::Result<Server>
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    r = listener.accept() => match r {
                        Ok((stream, _)) => {
                            count.fetch_add(1, Ordering::SeqCst);
                            let _ = stream.set_nodelay(true);
                            conns.spawn(handler(stream));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Server {
            addr,
            accepted,
            task,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Echoes every byte back; after reading EOF it shuts down its write side (so a client
/// half-close comes back as EOF). Counts accepted connections.
#[derive(Debug)]
pub struct EchoBackend {
    server: Server,
}

impl EchoBackend {
    /// Starts the backend.
    pub async fn start() -> EchoBackend {
        let server = Server::spawn(|mut stream: TcpStream| async move {
            let (mut rd, mut wr) = stream.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
        })
        .await
        .expect("start echo backend");
        EchoBackend { server }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.server.accepted.load(Ordering::SeqCst)
    }
}

/// Reads to EOF, then writes the 32-byte SHA-256 of everything it read and closes.
#[derive(Debug)]
pub struct HashSinkBackend {
    server: Server,
}

impl HashSinkBackend {
    /// Starts the backend.
    pub async fn start() -> HashSinkBackend {
        let server = Server::spawn(|mut stream: TcpStream| async move {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => hasher.update(&buf[..n]),
                    Err(_) => return,
                }
            }
            let digest: [u8; 32] = hasher.finalize().into();
            let _ = stream.write_all(&digest).await;
            let _ = stream.shutdown().await;
        })
        .await
        .expect("start hash sink backend");
        HashSinkBackend { server }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.server.accepted.load(Ordering::SeqCst)
    }
}

/// Writes `n_bytes` of [`pseudo_random_bytes`]`(n_bytes, seed)`, shuts down its write side,
/// then keeps reading; when the peer closes, it sends everything it read (after its own
/// half-close) on the channel returned by [`SourceBackend::received`]. That proves the
/// other direction stayed open after the backend's half-close.
#[derive(Debug)]
pub struct SourceBackend {
    server: Server,
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    /// The bytes every connection is sent.
    pub data: Arc<Vec<u8>>,
}

impl SourceBackend {
    /// Starts the backend.
    pub async fn start(n_bytes: usize, seed: u64) -> SourceBackend {
        let data = Arc::new(pseudo_random_bytes(n_bytes, seed));
        let (tx, rx) = mpsc::unbounded_channel();
        let payload = data.clone();
        let server = Server::spawn(move |mut stream: TcpStream| {
            let payload = payload.clone();
            let tx = tx.clone();
            async move {
                if stream.write_all(&payload).await.is_err() {
                    return;
                }
                if stream.shutdown().await.is_err() {
                    return;
                }
                let mut got = Vec::new();
                if stream.read_to_end(&mut got).await.is_ok() {
                    let _ = tx.send(got);
                }
            }
        })
        .await
        .expect("start source backend");
        SourceBackend { server, rx, data }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.server.accepted.load(Ordering::SeqCst)
    }

    /// Waits (bounded) for one connection's report: the bytes it read after its
    /// half-close, up to the peer's close. `None` on timeout.
    pub async fn received(&mut self, bound: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(bound, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Writes a banner as soon as it accepts (a server-speaks-first protocol such as SMTP or
/// FTP), then echoes every byte it reads; after reading EOF it shuts down its write side.
/// Counts accepted connections.
#[derive(Debug)]
pub struct BannerBackend {
    server: Server,
    /// The banner every connection is sent first.
    pub banner: Arc<Vec<u8>>,
}

impl BannerBackend {
    /// The banner [`BannerBackend::start_default`] sends.
    pub const DEFAULT_BANNER: &'static [u8] = b"220 hello\r\n";

    /// Starts the backend with `banner`.
    pub async fn start(banner: &[u8]) -> BannerBackend {
        let banner = Arc::new(banner.to_vec());
        let b = banner.clone();
        let server = Server::spawn(move |mut stream: TcpStream| {
            let b = b.clone();
            async move {
                if stream.write_all(&b).await.is_err() {
                    return;
                }
                let (mut rd, mut wr) = stream.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            }
        })
        .await
        .expect("start banner backend");
        BannerBackend { server, banner }
    }

    /// Starts the backend with [`BannerBackend::DEFAULT_BANNER`] (`220 hello\r\n`).
    pub async fn start_default() -> BannerBackend {
        Self::start(Self::DEFAULT_BANNER).await
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.server.accepted.load(Ordering::SeqCst)
    }
}

/// What a [`UdpBackend`] answers to each datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpMode {
    /// The datagram itself, to its sender.
    Echo,
    /// The 32-byte SHA-256 of the datagram, to its sender.
    Sha256,
    /// Nothing, ever (the datagram is still recorded).
    Silent,
}

/// Largest datagram a [`UdpBackend`] can receive whole (the UDP maximum).
const UDP_RECV_BUF: usize = 65_536;

#[derive(Debug, Default)]
struct UdpLog {
    datagrams: Vec<Vec<u8>>,
    sources: Vec<SocketAddr>,
}

/// A UDP backend on `127.0.0.1:0` that records every datagram it receives (bytes and
/// source address) and answers according to its [`UdpMode`]. Stops on drop.
#[derive(Debug)]
pub struct UdpBackend {
    addr: SocketAddr,
    mode: UdpMode,
    log: Arc<Mutex<UdpLog>>,
    task: JoinHandle<()>,
}

impl UdpBackend {
    /// Starts a backend answering in `mode`.
    pub async fn start(mode: UdpMode) -> UdpBackend {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind a UDP backend on 127.0.0.1:0");
        let addr = socket.local_addr().expect("UDP local addr");
        let log = Arc::new(Mutex::new(UdpLog::default()));
        let record = log.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; UDP_RECV_BUF];
            loop {
                let (n, from) = match socket.recv_from(&mut buf).await {
                    Ok(r) => r,
                    // e.g. ECONNREFUSED from an earlier answer's ICMP error: keep serving.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                };
                let data = &buf[..n];
                if let Ok(mut l) = record.lock() {
                    l.datagrams.push(data.to_vec());
                    l.sources.push(from);
                }
                match mode {
                    UdpMode::Echo => {
                        let _ = socket.send_to(data, from).await;
                    }
                    UdpMode::Sha256 => {
                        let _ = socket.send_to(&sha256(data), from).await;
                    }
                    UdpMode::Silent => {}
                }
            }
        });
        UdpBackend {
            addr,
            mode,
            log,
            task,
        }
    }

    /// A backend that echoes each datagram to its sender.
    pub async fn echo() -> UdpBackend {
        Self::start(UdpMode::Echo).await
    }

    /// A backend that answers each datagram with its 32-byte SHA-256.
    pub async fn sha256() -> UdpBackend {
        Self::start(UdpMode::Sha256).await
    }

    /// A backend that never answers.
    pub async fn silent() -> UdpBackend {
        Self::start(UdpMode::Silent).await
    }

    /// The bound address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How it answers.
    pub fn mode(&self) -> UdpMode {
        self.mode
    }

    /// How many datagrams it received so far.
    pub fn datagrams(&self) -> usize {
        self.log.lock().map(|l| l.datagrams.len()).unwrap_or(0)
    }

    /// Every datagram received so far, in arrival order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.log
            .lock()
            .map(|l| l.datagrams.clone())
            .unwrap_or_default()
    }

    /// The source address of every datagram received so far, in arrival order.
    pub fn sources(&self) -> Vec<SocketAddr> {
        self.log
            .lock()
            .map(|l| l.sources.clone())
            .unwrap_or_default()
    }

    /// Waits (polling, bounded) until at least `n` datagrams arrived; returns the count
    /// then.
    pub async fn wait_for_datagrams(&self, n: usize, bound: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let have = self.datagrams();
            if have >= n || tokio::time::Instant::now() >= deadline {
                return have;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `127.0.0.1` UDP port with no socket bound to it (bound, read, released): a datagram
/// sent there draws an ICMP port unreachable.
pub fn closed_udp_port() -> u16 {
    let s = StdUdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    s.local_addr().expect("local addr").port()
}

/// A `127.0.0.1` port with nothing listening on it (bound, read, released).
pub fn closed_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A listener whose accept queue is full, so that new connection attempts get no answer
/// (their SYNs are dropped) and a connect to it times out rather than being refused.
///
/// Built with backlog 0 and never accepting; the queue is filled by connecting until a
/// connect attempt hangs. Linux-specific in practice.
#[derive(Debug)]
pub struct BlackholeListener {
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
    addr: SocketAddr,
}

impl BlackholeListener {
    /// Creates and fills the listener. Fails if no connect attempt hangs after 16 tries.
    pub async fn start() -> io::Result<BlackholeListener> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        socket.listen(0)?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("listener has no inet address"))?;
        let mut fillers = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Ok(BlackholeListener {
                        _listener: socket,
                        _fillers: fillers,
                        addr,
                    })
                }
            }
        }
        Err(io::Error::other(
            "accept queue never filled: connects to a backlog-0 listener keep succeeding",
        ))
    }

    /// The address whose connects hang.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

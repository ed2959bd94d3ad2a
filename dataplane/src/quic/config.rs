//! The QUIC listener's configs: its socket, its transport limits, and a TLS config per
//! connection that decides the ClientHello the way the TCP gate does.
//!
//! A connection's TLS config is built for it at accept time (a few microseconds, against
//! a handshake's milliseconds of public-key crypto), because the gate needs two things
//! rustls cannot tell a shared config: the source address (a service's `allow` ranges are
//! checked before anything is signed), and where to note why a handshake was refused (the
//! refusal's reason and the identity a refused certificate claims, for the record).
//! Session tickets are off: quinn does not tell a resumed handshake apart, and a resumed
//! one would skip the client verifier.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use socket2::{Domain, Protocol, Socket, Type};

use crate::routing::Routes;
use crate::tls::{self, ClientVerifier, TlsConfigs};

/// Socket buffers asked of the kernel, each way: a loopback or LAN transfer keeps many
/// datagrams in flight, and the kernel's default (~200 KiB) drops them under load.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Flow-control windows: what one stream, and one connection in all, may have in flight
/// unread (memory a peer can make the data plane hold).
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Datagrams queued each way per connection, in bytes; beyond them the oldest is dropped
/// (datagrams are lossy).
pub const DATAGRAM_BUFFER: usize = 1 << 20;
/// The first packets' size: large enough that a 1,200-byte datagram of a QUIC backend
/// (its Initial) fits in a DATAGRAM frame from the start; a path that cannot carry it is
/// found by quinn's black-hole detection, which falls back to 1,200.
pub const INITIAL_MTU: u16 = 1452;

/// Binds the UDP socket: an IPv6 wildcard dual-stack (falling back to IPv4 where IPv6 is
/// off), with large buffers; a kernel that caps them is named in a warning.
pub fn socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    match socket_exact(addr) {
        Err(e)
            if addr.ip().is_unspecified()
                && addr.is_ipv6()
                && (e.raw_os_error() == Some(97)
                    || e.kind() == io::ErrorKind::AddrNotAvailable) =>
        {
            tracing::warn!(error = %e, "IPv6 unavailable; QUIC on IPv4 only");
            socket_exact(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))
        }
        other => other,
    }
}

fn socket_exact(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    for (what, set, get, sysctl) in [
        (
            "receive",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> io::Result<()>,
            Socket::recv_buffer_size as fn(&Socket) -> io::Result<usize>,
            "net.core.rmem_max",
        ),
        (
            "send",
            Socket::set_send_buffer_size,
            Socket::send_buffer_size,
            "net.core.wmem_max",
        ),
    ] {
        let _ = set(&socket, SOCKET_BUFFER);
        // Linux reports twice what it grants (its bookkeeping share).
        let got = get(&socket).unwrap_or(0) / if cfg!(target_os = "linux") { 2 } else { 1 };
        if got < SOCKET_BUFFER {
            tracing::warn!(
                buffer = what,
                asked = SOCKET_BUFFER,
                granted = got,
                "the kernel caps the QUIC socket's buffer; raise {sysctl} for bulk throughput"
            );
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The transport limits of every client connection.
pub fn transport(idle_timeout: Duration, max_streams: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_BUFFER)
        .initial_mtu(INITIAL_MTU)
        .mtu_discovery_config(Some({
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(ztp_proto::quic::MAX_UDP_PAYLOAD);
            m
        }))
        // Keepalives are the client's; an idle connection ends at --idle-timeout.
        .keep_alive_interval(None)
        .max_idle_timeout(Some(
            IdleTimeout::try_from(idle_timeout).unwrap_or(IdleTimeout::from(VarInt::MAX)),
        ));
    t
}

/// What a connection's handshake learnt before it ended or completed, for its record.
#[derive(Debug, Default)]
pub struct Notes {
    pub sni: Option<String>,
    /// The service the SNI named.
    pub service: Option<String>,
    /// Why the gate refused, when it did.
    pub refused: Option<&'static str>,
    /// The identity a refused certificate of our CA set claims (see `tls`).
    pub claimed: Option<String>,
}

pub type SharedNotes = Arc<Mutex<Notes>>;

fn note(notes: &SharedNotes, f: impl FnOnce(&mut Notes)) {
    f(&mut notes.lock().unwrap_or_else(|p| p.into_inner()))
}

/// The TLS config of one connection from `source`: TLS 1.3, ALPN `ztp/1` (rustls refuses
/// a client that offers no or other ALPN), the snapshot's routes and verifier.
pub fn connection_crypto(
    tls: &TlsConfigs,
    routes: Arc<Routes>,
    source: IpAddr,
    notes: SharedNotes,
    node_key: Option<Arc<CertifiedKey>>,
) -> Result<Arc<QuicServerConfig>, String> {
    let verifier = Arc::new(NotingVerifier {
        inner: tls.verifier.clone(),
        notes: notes.clone(),
    });
    let resolver = Arc::new(SniGate {
        routes,
        source,
        certified: tls.certified.clone(),
        keyless: tls.keyless.clone(),
        node_key,
        notes,
    });
    let mut config = ServerConfig::builder_with_provider(tls.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    // The tunnel's first: a client that offers it is judged as a connector.
    config.alpn_protocols = vec![
        ztp_proto::tunnel::RELAY_ALPN.to_vec(),
        ztp_proto::tunnel::ALPN.to_vec(),
        ztp_proto::quic::ALPN.to_vec(),
    ];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    QuicServerConfig::try_from(config)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// A config that refuses every ClientHello (no certificate resolves): the endpoint's
/// default, never used to accept (each connection gets its own).
pub fn refuse_all(tls: &TlsConfigs) -> Result<Arc<QuicServerConfig>, String> {
    connection_crypto(
        tls,
        Arc::default(),
        Ipv4Addr::UNSPECIFIED.into(),
        SharedNotes::default(),
        None,
    )
}

/// Decides the ClientHello before anything is signed: SNI required, naming a service
/// this source may reach. A refusal resolves no certificate, and rustls answers with
/// `access_denied`.
#[derive(Debug)]
struct SniGate {
    routes: Arc<Routes>,
    source: IpAddr,
    certified: Arc<CertifiedKey>,
    /// With a key on key servers: the key that names the handshake's SNI to them.
    keyless: Option<Arc<crate::keyless::Resolver>>,
    /// The node's own certificate: what it presents to a replica relaying to it.
    node_key: Option<Arc<CertifiedKey>>,
    notes: SharedNotes,
}

impl ResolvesServerCert for SniGate {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A replica relaying to this one: both present node certificates (a node without
        // a control plane has none, and serves no relay).
        if hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ztp_proto::tunnel::RELAY_ALPN))
        {
            if self.node_key.is_none() {
                note(&self.notes, |n| n.refused = Some("no relay here"));
            }
            return self.node_key.clone();
        }
        // A connector dials a replica by the replica's own name: its tunnels are judged on
        // its certificate, after the handshake (`quic::tunnel`).
        if hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ztp_proto::tunnel::ALPN))
        {
            note(&self.notes, |n| {
                n.sni = hello.server_name().map(str::to_owned)
            });
            return Some(self.server_key(hello.server_name()));
        }
        let Some(sni) = hello.server_name() else {
            note(&self.notes, |n| n.refused = Some("no sni"));
            return None;
        };
        let route = self.routes.lookup(sni);
        note(&self.notes, |n| {
            n.sni = Some(sni.to_owned());
            n.service = route.map(|r| r.name.clone());
        });
        let Some(route) = route else {
            note(&self.notes, |n| n.refused = Some("unknown sni"));
            return None;
        };
        if !route.admits_source(self.source) {
            // As on TCP: indistinguishable from an unknown name to the client.
            note(&self.notes, |n| n.refused = Some("source not allowed"));
            return None;
        }
        Some(self.server_key(Some(sni)))
    }
}

impl SniGate {
    /// The server certificate and key for a handshake naming `sni`.
    fn server_key(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        match &self.keyless {
            Some(r) => r.certified(sni),
            None => self.certified.clone(),
        }
    }
}

/// The gate's client verifier, noting why it refused and what a refused certificate of
/// our CA set claims. rustls calls it inside quinn's connection driver, in the same call
/// as [`ClientVerifier`] notes the claim on its thread: taken right after, it is this
/// connection's.
struct NotingVerifier {
    inner: Arc<ClientVerifier>,
    notes: SharedNotes,
}

impl std::fmt::Debug for NotingVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl ClientCertVerifier for NotingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let _ = tls::take_refused_identity();
        let verdict = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &verdict {
            let claimed = tls::take_refused_identity();
            note(&self.notes, |n| {
                n.refused = Some(tls::tls_reason(e));
                n.claimed = claimed;
            });
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

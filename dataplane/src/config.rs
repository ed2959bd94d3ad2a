//! Process settings: the command line of DESIGN.md, parsed once and validated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ztp_proto::parse_duration;

use crate::snapshot::grpc::ControlSource;

/// ZTP data plane: a zero-trust mTLS gateway. Clients present a certificate, name a
/// service with SNI, and are forwarded to its backend if their identity is allowed.
#[derive(Debug, Parser)]
#[command(name = "ztp-dataplane", version, about, max_term_width = 100)]
pub struct Args {
    /// Validate a snapshot file, print the result and exit (0 valid, 1 invalid).
    #[arg(long, value_name = "FILE")]
    pub check: Option<PathBuf>,

    /// Address clients connect to; `[::]` is dual-stack.
    #[arg(long, default_value = "[::]:9743", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Address of the QUIC listener (UDP): by default --listen's address and port; `off`
    /// serves TCP only.
    #[arg(long, value_name = "ADDR|off")]
    pub quic_listen: Option<String>,

    /// Concurrent streams a QUIC connection may open (one backend connection each).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000), value_name = "N")]
    pub quic_max_streams: u32,

    /// Live QUIC connections per client identity (each carries many streams); more are
    /// closed with `ZTP-ERROR 429 too many connections`. 0: no limit.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub quic_max_connections_per_identity: u32,

    /// Handshakes in flight above which a QUIC client must validate its address (a
    /// Retry) before any crypto; 0: always.
    #[arg(long, hide = true, default_value_t = 64, value_name = "N")]
    pub quic_retry_above: usize,

    /// A QUIC datagram flow (udp and quic services) with nothing moving for this long
    /// ends, with its backend socket.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub udp_idle: Duration,

    /// The server certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// The server certificate's private key (PEM), or `keyless://HOST:PORT[,HOST:PORT…]`:
    /// key servers that hold it and sign for this node, which then never holds it (with
    /// --keyless-cert, --keyless-key and --keyless-ca).
    #[arg(long, value_name = "FILE|keyless://HOST:PORT[,…]")]
    pub key: Option<PathBuf>,

    /// With `--key keyless://…`: this node's certificate towards the key servers (PEM,
    /// carrying spiffe://DOMAIN/node/ID).
    #[arg(long, value_name = "FILE")]
    pub keyless_cert: Option<PathBuf>,

    /// With `--key keyless://…`: the key of --keyless-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub keyless_key: Option<PathBuf>,

    /// With `--key keyless://…`: CA certificates (PEM) the key servers' certificates must
    /// chain to.
    #[arg(long, value_name = "FILE")]
    pub keyless_ca: Option<PathBuf>,

    /// CA certificates that client certificates must chain to (PEM).
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// The snapshot file (YAML) to serve (or --control).
    #[arg(long, value_name = "FILE", conflicts_with = "control")]
    pub snapshot: Option<PathBuf>,

    /// The control plane's config stream, https://HOST:9781 (or --snapshot). Several
    /// instances, comma-separated, are tried in order: on loss the node moves to the next
    /// one and resumes from the version it applied.
    #[arg(long, value_name = "URL[,URL…]", requires_all = ["node_cert", "node_key", "control_ca"])]
    pub control: Option<String>,

    /// This node's certificate (PEM), carrying spiffe://DOMAIN/node/ID.
    #[arg(long, value_name = "FILE")]
    pub node_cert: Option<PathBuf>,

    /// This node's key (PEM).
    #[arg(long, value_name = "FILE")]
    pub node_key: Option<PathBuf>,

    /// CA certificates (PEM) the control plane's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    pub control_ca: Option<PathBuf>,

    /// Where other replicas (relaying sessions to this node's connector tunnels) and
    /// connectors reach this node, HOST:PORT. Default: the listen address, when it is
    /// not a wildcard.
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    /// Trust domain of node identities.
    #[arg(long, default_value = ztp_proto::names::DEFAULT_TRUST_DOMAIN, value_name = "DOMAIN")]
    pub trust_domain: String,

    /// The highest snapshot schema this node accepts (for rolling-upgrade tests).
    #[arg(long, hide = true, default_value_t = ztp_proto::wire::SCHEMA)]
    pub snapshot_schema: u32,

    /// Address of /healthz, /readyz and /metrics (no token: keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:9790", value_name = "ADDR")]
    pub admin_listen: SocketAddr,

    /// Time a client has from connect to a completed handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,

    /// A connection with no byte moving either way for this long is closed.
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// Time allowed to connect to a tcp backend (then 504).
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// Time a udp or quic backend has to answer a datagram.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub udp_timeout: Duration,

    /// Concurrent client connections; more are closed at once.
    #[arg(long, default_value_t = 20000, value_parser = clap::value_parser!(u32).range(1..=1_000_000), value_name = "N")]
    pub max_connections: u32,

    /// Concurrent connections from one source (an IPv4 address or an IPv6 /64); more are
    /// closed at once. 0: no limit.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub max_connections_per_source: u32,

    /// New connections per second from one source, and the burst allowed (a token
    /// bucket); more are closed before the handshake. 0: no limit.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub handshake_rate_per_source: u32,

    /// Only sources in these ranges may connect (CIDR or address; repeat the flag).
    /// Default: any.
    #[arg(long, value_name = "CIDR", value_parser = ztp_proto::names::parse_source_range)]
    pub allow: Vec<ipnet::IpNet>,

    /// Sources in these ranges are refused before the handshake, whatever --allow says
    /// (repeat the flag).
    #[arg(long, value_name = "CIDR", value_parser = ztp_proto::names::parse_source_range)]
    pub deny: Vec<ipnet::IpNet>,

    /// With --control: refuse new connections once the control plane has been out of
    /// reach this long (fail closed); live ones go on. Default: serve the last snapshot
    /// for as long as it takes.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub max_snapshot_age: Option<Duration>,

    /// On SIGTERM, time live connections get to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,

    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024), value_name = "N")]
    pub threads: Option<u16>,

    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], value_name = "FORMAT")]
    pub log_format: String,
}

/// Where the routing state comes from.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Control(ControlSource),
}

/// A data plane's validated settings.
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// `--advertise`: where other replicas relay to this node.
    pub advertise: Option<String>,
    /// The QUIC listener, unless `--quic-listen off`.
    pub quic: Option<crate::quic::QuicSettings>,
    pub tls: crate::tls::TlsFiles,
    pub source: Source,
    pub admin_listen: SocketAddr,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub udp_timeout: Duration,
    pub max_connections: u32,
    pub max_connections_per_source: u32,
    pub handshake_rate_per_source: u32,
    pub allow: Vec<ipnet::IpNet>,
    pub deny: Vec<ipnet::IpNet>,
    pub max_snapshot_age: Option<Duration>,
    pub drain_timeout: Duration,
    pub threads: usize,
    /// Trust domain of machine identities (connectors, nodes).
    pub trust_domain: String,
}

impl Args {
    /// Checks what clap cannot: the files a serving node needs.
    pub fn into_config(self) -> Result<Config, String> {
        let need = |v: Option<PathBuf>, flag: &str| {
            v.ok_or_else(|| format!("{flag} is required (see --help)"))
        };
        let cert = need(self.cert, "--cert")?;
        let key = need(self.key, "--key")?;
        let key = match crate::keyless::parse_url(&key.to_string_lossy()) {
            None => {
                if let Some(flag) = [
                    ("--keyless-cert", &self.keyless_cert),
                    ("--keyless-key", &self.keyless_key),
                    ("--keyless-ca", &self.keyless_ca),
                ]
                .iter()
                .find_map(|(f, v)| v.is_some().then_some(f))
                {
                    return Err(format!("{flag} goes with --key keyless://HOST:PORT"));
                }
                crate::tls::KeySource::File(key)
            }
            Some(servers) => crate::tls::KeySource::keyless(crate::keyless::KeylessFiles {
                servers: servers?,
                cert: need(self.keyless_cert, "--keyless-cert (with --key keyless://…)")?,
                key: need(self.keyless_key, "--keyless-key (with --key keyless://…)")?,
                ca: need(self.keyless_ca, "--keyless-ca (with --key keyless://…)")?,
            }),
        };
        let client_ca = need(self.client_ca, "--client-ca")?;
        let source = match (self.snapshot, self.control) {
            (Some(path), None) => Source::File(path),
            (None, Some(url)) => Source::Control(ControlSource {
                // Every entry checked before anything starts (the subscriber parses the
                // list again).
                url: crate::snapshot::grpc::parse_control_urls(&url)
                    .map(|_| url)
                    .map_err(|e| e.to_string())?,
                node_cert: need(self.node_cert, "--node-cert")?,
                node_key: need(self.node_key, "--node-key")?,
                control_ca: need(self.control_ca, "--control-ca")?,
                trust_domain: self.trust_domain.clone(),
                listen: self.listen.to_string(),
                schema: self.snapshot_schema,
            }),
            _ => {
                return Err(
                    "one of --snapshot FILE or --control URL is required (see --help)".into(),
                )
            }
        };
        for (name, d) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--udp-timeout", self.udp_timeout),
            ("--udp-idle", self.udp_idle),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be greater than zero"));
            }
        }
        let threads = match self.threads {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let quic_listen = match self.quic_listen.as_deref() {
            None => Some(self.listen),
            Some("off") => None,
            Some(addr) => Some(addr.parse::<SocketAddr>().map_err(|_| {
                format!("--quic-listen: {addr:?} is not an address (HOST:PORT) or `off`")
            })?),
        };
        let quic = quic_listen.map(|listen| crate::quic::QuicSettings {
            listen,
            max_streams: self.quic_max_streams,
            udp_idle: self.udp_idle,
            max_connections_per_identity: self.quic_max_connections_per_identity,
            retry_above: self.quic_retry_above,
            trust_domain: self.trust_domain.clone(),
        });
        Ok(Config {
            trust_domain: self.trust_domain.clone(),
            listen: self.listen,
            advertise: self.advertise,
            quic,
            tls: crate::tls::TlsFiles {
                cert,
                key,
                client_ca,
            },
            source,
            admin_listen: self.admin_listen,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            connect_timeout: self.connect_timeout,
            udp_timeout: self.udp_timeout,
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            handshake_rate_per_source: self.handshake_rate_per_source,
            allow: self.allow,
            deny: self.deny,
            max_snapshot_age: self.max_snapshot_age,
            drain_timeout: self.drain_timeout,
            threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(control: &str) -> Result<Config, String> {
        let args = Args::try_parse_from([
            "ztp-dataplane",
            "--cert",
            "s.pem",
            "--key",
            "s.key",
            "--client-ca",
            "ca.pem",
            "--node-cert",
            "n.pem",
            "--node-key",
            "n.key",
            "--control-ca",
            "ca.pem",
            "--control",
            control,
        ])
        .map_err(|e| e.to_string())?;
        args.into_config()
    }

    #[test]
    fn control_takes_a_list_and_names_a_bad_entry() {
        let c = config("https://a.example:9781, https://b.example:9782").unwrap();
        match c.source {
            Source::Control(s) => {
                assert_eq!(s.url, "https://a.example:9781, https://b.example:9782");
            }
            Source::File(_) => panic!("not a control source"),
        }
        let e = config("https://a.example:9781,http://b.example:9782").unwrap_err();
        assert!(e.contains("\"http://b.example:9782\""), "{e}");
        assert!(e.contains("https://HOST:PORT"), "{e}");
        let e = config("https://a.example:9781,,https://b.example:1").unwrap_err();
        assert!(e.contains("empty entry"), "{e}");
        let e = config("https://a.example:9781,https://A.example").unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
    }
}

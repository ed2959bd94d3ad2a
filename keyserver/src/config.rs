//! Process settings: the command line of DESIGN.md's "Keyless", parsed once and
//! validated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ztp_proto::parse_duration;

use crate::server::Limits;
use crate::tls::TlsFiles;

/// ZTP key server: signs TLS handshakes for data-plane nodes that hold no server key.
/// Clients present a node certificate from --client-ca; keys are the PEM files `*.key`
/// of --keys DIR (mode 0600), each usable by the nodes its `NAME.nodes` file lists
/// (every node without one). SIGHUP reloads the keys, the .nodes files and the TLS files.
#[derive(Debug, Parser)]
#[command(name = "ztp-keyserver", version, about, max_term_width = 100)]
pub struct Args {
    /// Address data planes connect to; `[::]` is dual-stack.
    #[arg(long, default_value = "[::]:2407", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// The key server's certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// The key server's own private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// CA certificates (PEM) that node certificates must chain to.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// The folder of signing keys: `NAME.key` (PEM, mode 0600 or stricter) and optional
    /// `NAME.nodes` (the node IDs allowed to use it, one per line).
    #[arg(long, value_name = "DIR")]
    pub keys: Option<PathBuf>,

    /// Trust domain of node identities (spiffe://DOMAIN/node/ID).
    #[arg(long, default_value = ztp_proto::names::DEFAULT_TRUST_DOMAIN, value_name = "DOMAIN")]
    pub trust_domain: String,

    /// Address of /healthz and /metrics (no token: keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:9792", value_name = "ADDR")]
    pub admin_listen: SocketAddr,

    /// Requests a connection may have read and not yet answered; past it, the connection
    /// is not read until answers go out.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536), value_name = "N")]
    pub max_inflight: u32,

    /// Concurrent client connections; more are closed at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000), value_name = "N")]
    pub max_connections: u32,

    /// Time a client has from connect to a completed handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,

    /// A connection that sends no request (or reads no answer) for this long is closed.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// On SIGTERM, time live connections get to answer what they sent.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,

    /// Async worker threads (default: the cores this process may run on).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024), value_name = "N")]
    pub threads: Option<u16>,

    /// Threads for the slow signatures, RSA and ECDSA P-384 (default: the cores this
    /// process may run on); ECDSA P-256 and Ed25519 are signed on the async workers.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024), value_name = "N")]
    pub sign_threads: Option<u16>,

    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], value_name = "FORMAT")]
    pub log_format: String,
}

/// A key server's validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub keys: PathBuf,
    pub trust_domain: String,
    pub admin_listen: SocketAddr,
    pub limits: Limits,
    pub threads: usize,
    pub sign_threads: usize,
}

/// The cores this process may run on (its CPU affinity, as `taskset` sets it).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Args {
    /// Checks what clap cannot: the files a key server needs.
    pub fn into_config(self) -> Result<Config, String> {
        let need = |v: Option<PathBuf>, flag: &str| {
            v.ok_or_else(|| format!("{flag} is required (see --help)"))
        };
        let cert = need(self.cert, "--cert")?;
        let key = need(self.key, "--key")?;
        let client_ca = need(self.client_ca, "--client-ca")?;
        let keys = need(self.keys, "--keys")?;
        if !keys.is_dir() {
            return Err(format!("--keys {}: not a folder", keys.display()));
        }
        if ztp_proto::names::node_id(
            &format!("spiffe://{}/node/x", self.trust_domain),
            &self.trust_domain,
        )
        .is_none()
        {
            return Err(format!(
                "--trust-domain {:?} is not a trust domain",
                self.trust_domain
            ));
        }
        for (flag, d) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--idle-timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{flag} must be more than 0"));
            }
        }
        Ok(Config {
            listen: self.listen,
            tls: TlsFiles {
                cert,
                key,
                client_ca,
            },
            keys,
            trust_domain: self.trust_domain,
            admin_listen: self.admin_listen,
            limits: Limits {
                max_inflight: self.max_inflight as usize,
                max_connections: self.max_connections as usize,
                handshake_timeout: self.handshake_timeout,
                idle_timeout: self.idle_timeout,
                drain_timeout: self.drain_timeout,
            },
            threads: self.threads.map_or_else(cores, usize::from),
            sign_threads: self.sign_threads.map_or_else(cores, usize::from),
        })
    }
}

//! Config sources and the published routing state.
//!
//! A snapshot (from a file, or from the control plane's gRPC stream) is validated,
//! compiled into a [`Policy`] of hash indexes, paired with TLS configs built for it, and
//! published as one `Arc<Active>` on a `tokio::sync::watch`. A connection clones the
//! `Arc` once per decision; swapping in a new snapshot never blocks a connection.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::server::ProducesTickets;
use tokio::sync::watch;
use ztp_proto::config::{Applied, Config};
use ztp_proto::digest::Digest;
use ztp_proto::names::Serial;
use ztp_proto::{Invalid, Snapshot};

use crate::authz::Directory;
use crate::handler::Registry;
use crate::routing::Routes;
use crate::tls::{TlsConfigs, TlsError, TlsMaterial};

pub mod background;
pub mod file;
pub mod grpc;

/// A configuration compiled for lookups.
#[derive(Debug)]
pub struct Policy {
    pub version: u64,
    pub routes: Arc<Routes>,
    pub directory: Arc<Directory>,
    pub revoked: Arc<HashSet<Serial>>,
    /// Users in the configuration.
    pub users: usize,
    /// The connectors that may hold tunnels to this node.
    pub connectors: Arc<HashSet<String>>,
    /// For a snapshot from the control plane's stream: the SHA-256 of everything in it
    /// but its version, schema and revoked serials, as it arrived (see
    /// `grpc::config_digest`). A next snapshot with the same digest differs at most in
    /// those, and reuses this one's validated, compiled services and users.
    pub config_digest: Option<[u8; 32]>,
    /// The configuration's digest (`ztp_proto::digest`), sent with each ack.
    pub digest: Digest,
}

impl Policy {
    /// The policy of a node that holds no snapshot yet: no service, so every client is
    /// refused at the ClientHello.
    pub fn empty() -> Policy {
        Policy {
            version: 0,
            routes: Arc::default(),
            directory: Arc::default(),
            revoked: Arc::default(),
            users: 0,
            connectors: Arc::default(),
            config_digest: None,
            digest: Digest::default(),
        }
    }

    /// Validates and indexes a snapshot, resolving handler names in `registry`.
    pub fn compile(snap: &Snapshot, registry: &Registry) -> Result<Policy, Invalid> {
        Self::from_config(&Config::new(snap.clone())?, registry)
    }

    /// Indexes a snapshot that has just passed [`Snapshot::validate`]: what
    /// `Snapshot::from_yaml` and the wire conversion return (validating 100,000 users
    /// again would cost as much as indexing them).
    pub fn compile_validated(snap: Snapshot, registry: &Registry) -> Result<Policy, Invalid> {
        Self::from_config(&Config::from_validated(snap)?, registry)
    }

    /// Indexes a validated configuration.
    pub fn from_config(config: &Config, registry: &Registry) -> Result<Policy, Invalid> {
        Ok(Policy {
            version: config.version(),
            routes: Arc::new(Routes::from_config(config, registry)?),
            directory: Arc::new(Directory::from_config(config)),
            revoked: Arc::new(config.revoked().clone()),
            users: config.user_count(),
            connectors: Arc::new(config.connector_names().map(str::to_owned).collect()),
            config_digest: None,
            digest: config.digest(),
        })
    }

    /// This policy updated with what a delta changed, `config` being the configuration
    /// after it: the routes and the directory are copies sharing what the delta left
    /// alone, so the cost grows with the delta, not with the configuration.
    pub fn update(
        &self,
        config: &Config,
        applied: &Applied,
        registry: &Registry,
    ) -> Result<Policy, Invalid> {
        Ok(Policy {
            version: config.version(),
            routes: if applied.services.is_empty() {
                self.routes.clone()
            } else {
                Arc::new(self.routes.update(&applied.services, registry)?)
            },
            directory: if applied.users.is_empty() {
                self.directory.clone()
            } else {
                Arc::new(self.directory.update(&applied.users))
            },
            revoked: if applied.revoked {
                Arc::new(config.revoked().clone())
            } else {
                self.revoked.clone()
            },
            users: config.user_count(),
            connectors: if applied.connectors {
                Arc::new(config.connector_names().map(str::to_owned).collect())
            } else {
                self.connectors.clone()
            },
            // A delta's configuration has no wire form of its own to compare.
            config_digest: None,
            digest: config.digest(),
        })
    }

    /// This policy at `config`'s version and revoked serials: services, users and
    /// groups shared, not compiled again (`config` differs from this policy's only in
    /// those).
    pub fn with_revoked(&self, config: &Config) -> Policy {
        Policy {
            version: config.version(),
            routes: self.routes.clone(),
            directory: self.directory.clone(),
            revoked: Arc::new(config.revoked().clone()),
            users: self.users,
            connectors: self.connectors.clone(),
            config_digest: self.config_digest,
            digest: config.digest(),
        }
    }
}

/// Whether the node is ready for traffic: it holds a snapshot, and (with
/// `--max-snapshot-age`) has not been out of reach of the control plane for too long.
#[derive(Debug)]
pub struct Readiness {
    ready: AtomicBool,
    /// The bound of `--max-snapshot-age`.
    max_age: Option<Duration>,
    /// Milliseconds since `base` when contact with the control plane was lost, plus
    /// one; 0 while in contact (or when no control plane is used).
    lost_at: AtomicU64,
    base: Instant,
    /// With `--control`: the instance in use (or being tried) and whether its config
    /// stream is up.
    control: Mutex<Option<(String, bool)>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new(None)
    }
}

impl Readiness {
    pub fn new(max_age: Option<Duration>) -> Self {
        Readiness {
            ready: AtomicBool::new(false),
            max_age,
            lost_at: AtomicU64::new(0),
            base: Instant::now(),
            control: Mutex::new(None),
        }
    }

    /// The control-plane instance in use (or being tried), and whether its config stream
    /// is up.
    pub fn set_control(&self, url: &str, subscribed: bool) {
        let mut c = self.control.lock().unwrap_or_else(|p| p.into_inner());
        match c.as_mut() {
            Some((u, s)) if u == url => *s = subscribed,
            _ => *c = Some((url.to_owned(), subscribed)),
        }
    }

    /// What [`Readiness::set_control`] set last; `None` without a control plane.
    pub fn control(&self) -> Option<(String, bool)> {
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Ready, and the snapshot not stale.
    pub fn get(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.stale()
    }

    /// The config stream is up: the snapshot held is the control plane's latest.
    pub fn in_contact(&self) {
        self.lost_at.store(0, Ordering::Release);
    }

    /// The config stream ended; the clock of `--max-snapshot-age` starts (if not already).
    pub fn lost_contact(&self) {
        let now = self.base.elapsed().as_millis() as u64 + 1;
        let _ = self
            .lost_at
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Out of reach of the control plane for longer than `--max-snapshot-age`: new
    /// connections are refused (fail closed).
    pub fn stale(&self) -> bool {
        let Some(max) = self.max_age else {
            return false;
        };
        let lost = self.lost_at.load(Ordering::Acquire);
        lost != 0 && self.base.elapsed().as_millis() as u64 + 1 - lost > max.as_millis() as u64
    }
}

/// What connections decide against: a policy and the TLS configs built for it.
#[derive(Debug)]
pub struct Active {
    pub policy: Arc<Policy>,
    pub tls: TlsConfigs,
    /// Unix seconds when this state was published.
    pub applied_at: u64,
    /// The drain deadline has come: every live session is to end (the pipeline ends
    /// it, like a later refusal). Published on the same channel, so that a session
    /// watches one thing.
    pub draining: bool,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Owns the watch channel; rebuilds [`Active`] when the policy or the TLS material
/// changes.
pub struct Publisher {
    tx: watch::Sender<Arc<Active>>,
    material: TlsMaterial,
    sessions: Arc<dyn ProducesTickets>,
    provider: Arc<CryptoProvider>,
}

impl Publisher {
    pub fn new(
        policy: Policy,
        material: TlsMaterial,
        provider: Arc<CryptoProvider>,
    ) -> Result<(Publisher, watch::Receiver<Arc<Active>>), TlsError> {
        let sessions = crate::tls::session_cache();
        let policy = Arc::new(policy);
        let tls = TlsConfigs::build(
            &material,
            policy.revoked.clone(),
            sessions.clone(),
            provider.clone(),
        )?;
        let (tx, rx) = watch::channel(Arc::new(Active {
            policy,
            tls,
            applied_at: now_secs(),
            draining: false,
        }));
        Ok((
            Publisher {
                tx,
                material,
                sessions,
                provider,
            },
            rx,
        ))
    }

    /// The state being served.
    pub fn current(&self) -> Arc<Active> {
        self.tx.borrow().clone()
    }

    /// Publishes a new policy, new TLS material, or both, as one new state;
    /// connections see it on their next decision. On error nothing changes.
    pub fn apply(
        &mut self,
        policy: Option<Policy>,
        material: Option<TlsMaterial>,
    ) -> Result<(), TlsError> {
        let policy = match policy {
            Some(p) => Arc::new(p),
            None => self.current().policy.clone(),
        };
        self.publish(policy, material.as_ref().unwrap_or(&self.material))?;
        if let Some(m) = material {
            self.material = m;
        }
        Ok(())
    }

    fn publish(&self, policy: Arc<Policy>, material: &TlsMaterial) -> Result<(), TlsError> {
        let tls = TlsConfigs::build(
            material,
            policy.revoked.clone(),
            self.sessions.clone(),
            self.provider.clone(),
        )?;
        let draining = self.tx.borrow().draining;
        self.tx.send_replace(Arc::new(Active {
            policy,
            tls,
            applied_at: now_secs(),
            draining,
        }));
        Ok(())
    }

    /// Marks the state draining: every live session is ended by the pipeline.
    pub fn drain(&self) {
        self.tx.send_modify(|active| {
            *active = Arc::new(Active {
                policy: active.policy.clone(),
                tls: active.tls.clone(),
                applied_at: active.applied_at,
                draining: true,
            })
        });
    }
}

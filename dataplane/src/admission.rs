//! Admission: every decision from identity to protocol choice, as one pure function of
//! (policy, peer facts).
//!
//! The TLS listener calls [`decide`] after its handshake; a QUIC listener or a tunnel
//! calls it unchanged with its own facts. The `reauth` stage calls [`decide_for`]
//! again on every snapshot for a live session. No I/O here: table-driven tests cover it.

use std::net::IpAddr;
use std::sync::Arc;

use ztp_proto::Protocol;

use crate::authz::{self, Denial, DirUser, Permit};
use crate::handler::DGRAM_ALPN;
use crate::identity::{self, ClientIdentity};
use crate::protocol;
use crate::refusal::Refusal;
use crate::routing::Route;
use crate::snapshot::Policy;

/// What the transport knows of a peer once its handshake is done. The chain was
/// verified by the transport.
#[derive(Debug, Clone, Copy)]
pub struct PeerFacts<'a> {
    /// The end-entity certificate's DER, if the peer presented one.
    pub leaf: Option<&'a [u8]>,
    pub sni: &'a str,
    pub source: IpAddr,
    /// The ALPN protocol negotiated, if any.
    pub alpn: Option<&'a [u8]>,
}

/// How the session's protocol is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Declared by the service (or implied by a named handler, which speaks over the
    /// stream): used as is.
    Declared(Protocol),
    /// `auto` with the forwarder to choose: peek at the client's first bytes.
    Detect,
}

/// An admitted peer: who it is, the user and route it may use, and how to serve it.
#[derive(Debug, Clone)]
pub struct Admission {
    pub identity: ClientIdentity,
    pub permit: Permit,
    pub choice: Choice,
    /// The client negotiated the framed-datagram extension for a udp or quic service.
    pub framed: bool,
}

/// Why a peer is refused; each cause maps to one refusal and one constant reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    NoCertificate,
    NoIdentity,
    Revoked,
    /// The SNI names no service (any more).
    UnknownService,
    SourceNotAllowed,
    UnknownIdentity,
    UserDisabled,
    NotInGroup,
}

impl Cause {
    pub fn refusal(self) -> Refusal {
        match self {
            Cause::UnknownService => Refusal::Misdirected,
            _ => Refusal::Forbidden,
        }
    }

    /// The reason recorded for a refusal at admission.
    pub fn reason(self) -> &'static str {
        match self {
            Cause::NoCertificate => "no client certificate",
            Cause::NoIdentity => "no identity",
            Cause::Revoked => "certificate revoked",
            Cause::UnknownService => "service vanished",
            Cause::SourceNotAllowed => "source not allowed",
            Cause::UnknownIdentity => "unknown identity",
            Cause::UserDisabled => "user disabled",
            Cause::NotInGroup => "not in group",
        }
    }

    /// The reason recorded when a later decision ends a live session.
    pub fn live_reason(self) -> &'static str {
        match self {
            Cause::UnknownService => "service removed",
            Cause::UnknownIdentity => "user removed",
            other => other.reason(),
        }
    }
}

/// A refused peer, with what was learnt before the refusal (for the record).
#[derive(Debug, Clone)]
pub struct Denied {
    pub cause: Cause,
    pub identity: Option<String>,
    pub service: Option<String>,
    pub user: Option<String>,
}

impl Denied {
    fn new(cause: Cause) -> Self {
        Denied {
            cause,
            identity: None,
            service: None,
            user: None,
        }
    }
}

/// Decides a peer: identity from the leaf, then [`decide_for`].
pub fn decide(policy: &Policy, facts: &PeerFacts<'_>) -> Result<Admission, Denied> {
    let Some(leaf) = facts.leaf else {
        return Err(Denied::new(Cause::NoCertificate));
    };
    let identity = match identity::extract(leaf) {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(error = %e, "no identity");
            return Err(Denied::new(Cause::NoIdentity));
        }
    };
    decide_for(policy, identity, facts.sni, facts.source, facts.alpn)
}

/// Decides a peer whose identity is known: revocation, service lookup, source ranges,
/// authorization, then the protocol choice.
pub fn decide_for(
    policy: &Policy,
    identity: ClientIdentity,
    sni: &str,
    source: IpAddr,
    alpn: Option<&[u8]>,
) -> Result<Admission, Denied> {
    let permit = match judge(policy, &identity, sni, source) {
        Ok(p) => p,
        Err(refused) => {
            return Err(Denied {
                cause: refused.cause,
                identity: Some(identity.id),
                service: refused.route.map(|r| r.name.clone()),
                user: refused.user.map(|u| u.name.clone()),
            })
        }
    };
    let route = &permit.route;
    let framed =
        matches!(route.protocol, Protocol::Udp | Protocol::Quic) && alpn == Some(DGRAM_ALPN);
    let choice = match (protocol::declared(route.protocol), &route.handler) {
        (Some(p), _) => Choice::Declared(p),
        // A named handler speaks over the stream itself.
        (None, Some(_)) => Choice::Declared(Protocol::Tcp),
        (None, None) => Choice::Detect,
    };
    Ok(Admission {
        identity,
        permit,
        choice,
        framed,
    })
}

/// A refusal as [`judge`] finds it: nothing copied.
struct Refused<'a> {
    cause: Cause,
    route: Option<&'a Arc<Route>>,
    user: Option<Arc<DirUser>>,
}

/// The decision proper, allocation-free (it runs for every live session on every
/// snapshot): revoked, route, source, authorization.
fn judge<'p>(
    policy: &'p Policy,
    identity: &ClientIdentity,
    sni: &str,
    source: IpAddr,
) -> Result<Permit, Refused<'p>> {
    let refused = |cause, route, user| Refused { cause, route, user };
    if policy.revoked.contains(&identity.serial) {
        return Err(refused(Cause::Revoked, None, None));
    }
    let Some(route) = policy.routes.lookup(sni) else {
        return Err(refused(Cause::UnknownService, None, None));
    };
    if !route.admits_source(source) {
        return Err(refused(Cause::SourceNotAllowed, Some(route), None));
    }
    authz::authorize(&policy.directory, identity, route).map_err(|(denial, user)| {
        let cause = match denial {
            Denial::UnknownIdentity => Cause::UnknownIdentity,
            Denial::UserDisabled => Cause::UserDisabled,
            Denial::NotInGroup => Cause::NotInGroup,
        };
        refused(cause, Some(route), user)
    })
}

/// Whether a live session admitted as `admitted` may go on under `policy`: `Err` with
/// the reason it must end. The service must still send the session where it was sent
/// (same backend, protocol and handler), and the admission decision must still hold.
/// (The framed choice cannot change without the protocol changing.)
pub fn still_admitted(
    policy: &Policy,
    admitted: &Admission,
    sni: &str,
    source: IpAddr,
) -> Result<(), &'static str> {
    if policy.revoked.contains(&admitted.identity.serial) {
        return Err(Cause::Revoked.live_reason());
    }
    let Some(now) = policy.routes.lookup(sni) else {
        return Err(Cause::UnknownService.live_reason());
    };
    let was = &admitted.permit.route;
    if !Arc::ptr_eq(was, now)
        && (now.backend != was.backend
            || now.protocol != was.protocol
            || now.handler.as_ref().map(|h| h.name()) != was.handler.as_ref().map(|h| h.name())
            || now.connector != was.connector)
    {
        return Err("service retargeted");
    }
    judge(policy, &admitted.identity, sni, source)
        .map(drop)
        .map_err(|r| r.cause.live_reason())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Registry;
    use crate::identity::IdentityKind;
    use ztp_proto::names::Serial;
    use ztp_proto::Snapshot;

    const SNAP: &str = r#"
version: 1
services:
  - { name: tcp.svc, protocol: tcp, address: ":1", groups: [g] }
  - { name: udp.svc, protocol: udp, address: ":2" }
  - { name: auto.svc, address: ":3" }
  - { name: echo.svc, handler: identity-echo }
  - { name: lan.svc, protocol: tcp, address: ":4", allow: ["10.0.0.0/8"] }
users:
  - { name: alice, identities: [alice@x], groups: [g] }
  - { name: bob, identities: [bob@x] }
  - { name: dave, identities: [dave@x], groups: [g], disabled: true }
groups: [{ name: g }]
revoked: ["0bad"]
"#;

    fn policy() -> Policy {
        Policy::compile(&Snapshot::from_yaml(SNAP).unwrap(), &Registry::builtin()).unwrap()
    }

    fn id(name: &str, serial: &str) -> ClientIdentity {
        ClientIdentity {
            id: name.into(),
            kind: IdentityKind::Email,
            serial: Serial::parse_hex(serial).unwrap(),
            not_after: i64::MAX,
        }
    }

    #[test]
    fn decisions() {
        let p = policy();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let ten: IpAddr = "10.1.2.3".parse().unwrap();
        type Want = Result<(Choice, bool), Cause>;
        /// identity, serial, SNI, source, ALPN, decision
        type Row<'a> = (&'a str, &'a str, &'a str, IpAddr, Option<&'a [u8]>, Want);
        use Cause::*;
        let tcp = Protocol::Tcp;
        let table: &[Row] = &[
            (
                "alice@x",
                "01",
                "tcp.svc",
                lo,
                None,
                Ok((Choice::Declared(tcp), false)),
            ),
            (
                "ALICE@x",
                "01",
                "TCP.svc",
                lo,
                None,
                Ok((Choice::Declared(tcp), false)),
            ),
            ("alice@x", "0bad", "tcp.svc", lo, None, Err(Revoked)),
            ("alice@x", "00:0b:ad", "tcp.svc", lo, None, Err(Revoked)),
            ("bob@x", "01", "tcp.svc", lo, None, Err(NotInGroup)),
            ("dave@x", "01", "tcp.svc", lo, None, Err(UserDisabled)),
            ("eve@x", "01", "tcp.svc", lo, None, Err(UnknownIdentity)),
            ("alice@x", "01", "gone.svc", lo, None, Err(UnknownService)),
            ("alice@x", "01", "lan.svc", lo, None, Err(SourceNotAllowed)),
            (
                "alice@x",
                "01",
                "lan.svc",
                ten,
                None,
                Ok((Choice::Declared(tcp), false)),
            ),
            // Framed only where it applies; other ALPNs are ignored.
            (
                "bob@x",
                "01",
                "udp.svc",
                lo,
                Some(DGRAM_ALPN),
                Ok((Choice::Declared(Protocol::Udp), true)),
            ),
            (
                "bob@x",
                "01",
                "udp.svc",
                lo,
                Some(b"h2"),
                Ok((Choice::Declared(Protocol::Udp), false)),
            ),
            (
                "bob@x",
                "01",
                "udp.svc",
                lo,
                None,
                Ok((Choice::Declared(Protocol::Udp), false)),
            ),
            (
                "alice@x",
                "01",
                "tcp.svc",
                lo,
                Some(DGRAM_ALPN),
                Ok((Choice::Declared(tcp), false)),
            ),
            (
                "bob@x",
                "01",
                "auto.svc",
                lo,
                None,
                Ok((Choice::Detect, false)),
            ),
            (
                "bob@x",
                "01",
                "echo.svc",
                lo,
                None,
                Ok((Choice::Declared(tcp), false)),
            ),
        ];
        for (who, serial, sni, src, alpn, want) in table {
            let got = decide_for(&p, id(who, serial), sni, *src, *alpn)
                .map(|a| (a.choice, a.framed))
                .map_err(|d| d.cause);
            assert_eq!(&got, want, "{who} ({serial}) -> {sni} from {src}");
        }
    }

    #[test]
    fn a_denial_carries_what_was_learnt() {
        let p = policy();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let d = decide_for(&p, id("bob@x", "01"), "tcp.svc", lo, None).unwrap_err();
        assert_eq!(d.identity.as_deref(), Some("bob@x"));
        assert_eq!(d.service.as_deref(), Some("tcp.svc"));
        assert_eq!(d.user.as_deref(), Some("bob"));
        assert_eq!(d.cause.refusal(), Refusal::Forbidden);
        let d = decide_for(&p, id("bob@x", "01"), "nope.svc", lo, None).unwrap_err();
        assert_eq!(d.cause.refusal(), Refusal::Misdirected);
        assert_eq!(d.service, None);
    }

    #[test]
    fn a_peer_without_a_usable_certificate_is_refused() {
        let p = policy();
        let facts = PeerFacts {
            leaf: None,
            sni: "tcp.svc",
            source: "127.0.0.1".parse().unwrap(),
            alpn: None,
        };
        assert_eq!(decide(&p, &facts).unwrap_err().cause, Cause::NoCertificate);
        let garbage = [0x30u8, 0x03, 0x02, 0x01, 0x01];
        let facts = PeerFacts {
            leaf: Some(&garbage),
            ..facts
        };
        assert_eq!(decide(&p, &facts).unwrap_err().cause, Cause::NoIdentity);
    }
}

//! `identity-echo`: answers who the gateway thinks the caller is, then closes. A gateway
//! example that is not a forwarder, and a debugging aid. It speaks over the stream, so it
//! serves stream protocols only.

use ztp_proto::Protocol;

use super::{BoxOutcome, Handler, Outcome, Session};
use crate::authz::Permit;
use crate::identity::ClientIdentity;
use crate::refusal;

#[derive(Debug)]
pub struct IdentityEcho;

/// The answer: one `key: value` per line; groups comma-separated.
pub fn answer(permit: &Permit, identity: &ClientIdentity) -> String {
    format!(
        "identity: {}\nuser: {}\ngroups: {}\nservice: {}\n",
        identity.id,
        permit.user.name,
        permit.user.groups.join(","),
        permit.route.name
    )
}

impl Handler for IdentityEcho {
    fn name(&self) -> &'static str {
        "identity-echo"
    }

    fn supports(&self, protocol: Protocol) -> bool {
        matches!(protocol, Protocol::Tcp | Protocol::Auto)
    }

    fn serve<'a>(&'a self, mut s: Session<'a>) -> BoxOutcome<'a> {
        Box::pin(async move {
            let text = answer(s.permit, s.identity);
            refusal::send_and_close(&mut s.client, text.as_bytes()).await;
            Outcome {
                bytes_down: text.len() as u64,
                ..Outcome::ended("answered")
            }
        })
    }
}

//! `identity-echo`: answers who the gateway thinks the caller is, then closes. A gateway
//! example that is not a forwarder, and a debugging aid. It speaks over the stream, so it
//! serves stream protocols only.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use ztp_proto::Protocol;

use super::{BoxOutcome, Caller, Client, Handler, Outcome, Session, Target};

#[derive(Debug)]
pub struct IdentityEcho;

/// A client that does not read its answer does not hold the session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The answer: one `key: value` per line; groups comma-separated.
pub fn answer(caller: &Caller<'_>, target: &Target<'_>) -> String {
    format!(
        "identity: {}\nuser: {}\ngroups: {}\nservice: {}\n",
        caller.identity.id,
        caller.user,
        caller.groups.join(","),
        target.service
    )
}

impl Handler for IdentityEcho {
    fn name(&self) -> &'static str {
        "identity-echo"
    }

    fn supports(&self, protocol: Protocol) -> bool {
        matches!(protocol, Protocol::Tcp | Protocol::Auto)
    }

    fn serve<'a>(&'a self, s: Session<'a>) -> BoxOutcome<'a> {
        Box::pin(async move {
            let Client::Stream(client) = s.client else {
                return Outcome::ended("not a stream");
            };
            let text = answer(&s.caller, &s.target);
            let written = async {
                client.write_all(text.as_bytes()).await?;
                client.flush().await
            };
            match tokio::time::timeout(WRITE_TIMEOUT, written).await {
                Ok(Ok(())) => Outcome::answered("answered"),
                _ => Outcome::aborted("connection error"),
            }
        })
    }
}

//! `identity-echo`: answers who the gateway thinks the caller is, then closes. A gateway
//! example that is not a forwarder, and a debugging aid.

use super::{ClientStream, Outcome};
use crate::authz::Permit;
use crate::identity::ClientIdentity;
use crate::refusal;

/// The answer: one `key: value` per line.
pub fn answer(permit: &Permit, identity: &ClientIdentity) -> String {
    format!(
        "identity: {}\nuser: {}\ngroups: {}\nservice: {}\n",
        identity.id,
        permit.user.name,
        permit.user.groups.join(","),
        permit.route.name
    )
}

pub async fn serve(
    mut client: ClientStream,
    permit: &Permit,
    identity: &ClientIdentity,
) -> Outcome {
    let text = answer(permit, identity);
    refusal::send_and_close(&mut client, text.as_bytes()).await;
    Outcome {
        bytes_down: text.len() as u64,
        end: "answered",
        ..Outcome::default()
    }
}

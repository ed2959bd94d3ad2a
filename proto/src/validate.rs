//! Snapshot validation: every rule that keeps a snapshot from weakening policy by
//! accident. Each error names the field by its path (`services[2].groups[0]`), the form
//! the REST API's problem documents use too.

use std::collections::HashMap;
use std::fmt;

use crate::model::{Service, Snapshot};
use crate::names::{
    identity_key, is_node_uri, parse_source_range, BackendAddr, Serial, ServiceName,
};

/// Handlers a service may name. Data planes register exactly these.
pub const KNOWN_HANDLERS: &[&str] = &["identity-echo"];

/// Handlers that serve the client themselves and need no backend address.
const SELF_CONTAINED_HANDLERS: &[&str] = &["identity-echo"];

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `services[0].address`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a snapshot was refused: every problem found, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid(pub Vec<FieldError>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

const MAX_NAME_LEN: usize = 128;
const MAX_IDENTITY_LEN: usize = 1024;

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Names of users and groups: short, printable, no spaces, so that they survive tables,
/// URLs and log lines unchanged.
fn check_plain_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
    {
        return Err(format!(
            "{name:?} may hold only letters, digits and '-', '_', '.', '@'"
        ));
    }
    Ok(())
}

impl Snapshot {
    /// Checks every rule; returns all problems found.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut errs = Errors::default();

        let mut groups: HashMap<&str, usize> = HashMap::new();
        for (i, g) in self.groups.iter().enumerate() {
            let field = format!("groups[{i}].name");
            if let Err(e) = check_plain_name(&g.name) {
                errs.push(field, e);
            } else if let Some(j) = groups.insert(&g.name, i) {
                errs.push(field, format!("duplicate of groups[{j}]"));
            }
        }
        let check_group_refs = |errs: &mut Errors, prefix: &str, refs: &[String]| {
            for (k, g) in refs.iter().enumerate() {
                if !groups.contains_key(g.as_str()) {
                    errs.push(
                        format!("{prefix}.groups[{k}]"),
                        format!("unknown group {g:?}"),
                    );
                }
            }
        };

        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let prefix = format!("services[{i}]");
            match ServiceName::parse(&s.name) {
                Ok(n) => {
                    if let Some(j) = names.insert(n.key(), i) {
                        errs.push(
                            format!("{prefix}.name"),
                            format!("duplicate of services[{j}]"),
                        );
                    }
                }
                Err(e) => errs.push(format!("{prefix}.name"), e),
            }
            check_service_target(&mut errs, &prefix, s);
            check_group_refs(&mut errs, &prefix, &s.groups);
            for (k, r) in s.allow.iter().enumerate() {
                if let Err(e) = parse_source_range(r) {
                    errs.push(format!("{prefix}.allow[{k}]"), e);
                }
            }
        }

        let mut users: HashMap<&str, usize> = HashMap::new();
        let mut claimed: HashMap<String, usize> = HashMap::new();
        for (i, u) in self.users.iter().enumerate() {
            let prefix = format!("users[{i}]");
            if let Err(e) = check_plain_name(&u.name) {
                errs.push(format!("{prefix}.name"), e);
            } else if let Some(j) = users.insert(&u.name, i) {
                errs.push(format!("{prefix}.name"), format!("duplicate of users[{j}]"));
            }
            for (k, id) in u.identities.iter().enumerate() {
                let field = format!("{prefix}.identities[{k}]");
                if id.trim().is_empty() {
                    errs.push(field, "must not be empty");
                } else if id.len() > MAX_IDENTITY_LEN {
                    errs.push(field, format!("longer than {MAX_IDENTITY_LEN} characters"));
                } else if id.chars().any(char::is_control) {
                    errs.push(field, "must not hold control characters");
                } else if is_node_uri(id) {
                    errs.push(
                        field,
                        "\"/node/\" URIs identify data-plane nodes, not users",
                    );
                } else if let Some(j) = claimed.insert(identity_key(id), i) {
                    if j != i {
                        errs.push(
                            field,
                            format!("identity {id:?} is already claimed by users[{j}]"),
                        );
                    }
                }
            }
            check_group_refs(&mut errs, &prefix, &u.groups);
        }

        for (i, r) in self.revoked.iter().enumerate() {
            if let Err(e) = Serial::parse_hex(r) {
                errs.push(format!("revoked[{i}]"), e);
            }
        }

        if errs.0.is_empty() {
            Ok(())
        } else {
            Err(Invalid(errs.0))
        }
    }
}

fn check_service_target(errs: &mut Errors, prefix: &str, s: &Service) {
    if let Some(h) = &s.handler {
        if !KNOWN_HANDLERS.contains(&h.as_str()) {
            errs.push(
                format!("{prefix}.handler"),
                format!(
                    "unknown handler {h:?} (known: {})",
                    KNOWN_HANDLERS.join(", ")
                ),
            );
        }
    }
    let needs_backend = s
        .handler
        .as_deref()
        .is_none_or(|h| !SELF_CONTAINED_HANDLERS.contains(&h));
    match &s.address {
        Some(a) => {
            if let Err(e) = BackendAddr::parse(a) {
                errs.push(format!("{prefix}.address"), e);
            }
        }
        None if needs_backend => errs.push(
            format!("{prefix}.address"),
            "required: the backend host:port (\":port\" for localhost)",
        ),
        None => {}
    }
}

//! Snapshot validation: every rule that keeps a snapshot from weakening policy by
//! accident. Each error names the field by its path (`services[2].groups[0]`), the form
//! the REST API's problem documents use too.

use std::collections::HashMap;
use std::fmt;

use crate::model::{Connector, Group, Service, Snapshot, User};
use crate::names::{
    identity_key, is_connector_uri, is_node_uri, parse_source_range, BackendAddr, Serial,
    ServiceName,
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

/// Where a record sits in a snapshot: `services[0]`; or nowhere, for a record checked
/// alone. Formatted only when a problem is reported (validating 100,000 records must
/// not format 100,000 paths).
#[derive(Clone, Copy)]
struct Prefix {
    list: &'static str,
    index: Option<usize>,
}

impl Prefix {
    const NONE: Prefix = Prefix {
        list: "",
        index: None,
    };

    fn at(list: &'static str, index: usize) -> Prefix {
        Prefix {
            list,
            index: Some(index),
        }
    }
}

/// Joins a record's path prefix and a field name: `services[0]` + `name`.
fn path(prefix: &Prefix, field: &str) -> String {
    match prefix.index {
        None => field.to_owned(),
        Some(i) => format!("{}[{i}].{field}", prefix.list),
    }
}

fn finish(errs: Errors) -> Result<(), Invalid> {
    if errs.0.is_empty() {
        Ok(())
    } else {
        Err(Invalid(errs.0))
    }
}

impl Service {
    /// The rules of one service alone (group references are checked where the groups
    /// are known). Fields are named without a prefix: `name`, `address`.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut errs = Errors::default();
        check_service(&mut errs, &Prefix::NONE, self);
        finish(errs)
    }
}

impl User {
    /// The rules of one user alone (group references and identity conflicts are checked
    /// where the other records are known).
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut errs = Errors::default();
        check_user(&mut errs, &Prefix::NONE, self);
        finish(errs)
    }
}

impl Group {
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut errs = Errors::default();
        check_group(&mut errs, &Prefix::NONE, self);
        finish(errs)
    }
}

fn check_service(errs: &mut Errors, prefix: &Prefix, s: &Service) {
    if let Err(e) = ServiceName::parse(&s.name) {
        errs.push(path(prefix, "name"), e);
    }
    check_service_target(errs, prefix, s);
    for (field, ranges) in [("allow", &s.allow), ("deny", &s.deny)] {
        for (k, r) in ranges.iter().enumerate() {
            if let Err(e) = parse_source_range(r) {
                errs.push(path(prefix, &format!("{field}[{k}]")), e);
            }
        }
    }
    check_group_names(errs, prefix, &s.groups);
}

fn check_user(errs: &mut Errors, prefix: &Prefix, u: &User) {
    if let Err(e) = check_plain_name(&u.name) {
        errs.push(path(prefix, "name"), e);
    }
    for (k, id) in u.identities.iter().enumerate() {
        if let Err(e) = check_identity(id) {
            errs.push(path(prefix, &format!("identities[{k}]")), e);
        }
    }
    check_group_names(errs, prefix, &u.groups);
}

fn check_group(errs: &mut Errors, prefix: &Prefix, g: &Group) {
    if let Err(e) = check_plain_name(&g.name) {
        errs.push(path(prefix, "name"), e);
    }
}

/// Group references must at least be possible group names.
fn check_group_names(errs: &mut Errors, prefix: &Prefix, groups: &[String]) {
    for (k, g) in groups.iter().enumerate() {
        if let Err(e) = check_plain_name(g) {
            errs.push(path(prefix, &format!("groups[{k}]")), e);
        }
    }
}

/// One identity as a user may claim it.
pub fn check_identity(id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        Err("must not be empty".into())
    } else if id.len() > MAX_IDENTITY_LEN {
        Err(format!("longer than {MAX_IDENTITY_LEN} characters"))
    } else if id.chars().any(char::is_control) {
        Err("must not hold control characters".into())
    } else if is_node_uri(id) {
        Err("\"/node/\" URIs identify data-plane nodes, not users".into())
    } else if is_connector_uri(id) {
        Err("\"/connector/\" URIs identify connectors, not users".into())
    } else {
        Ok(())
    }
}

impl Snapshot {
    /// Checks every rule, each record's and those across records; returns all problems
    /// found.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut errs = Errors::default();

        let mut groups: HashMap<&str, usize> = HashMap::with_capacity(self.groups.len());
        for (i, g) in self.groups.iter().enumerate() {
            let prefix = Prefix::at("groups", i);
            let before = errs.0.len();
            check_group(&mut errs, &prefix, g);
            if errs.0.len() == before {
                if let Some(j) = groups.insert(&g.name, i) {
                    errs.push(path(&prefix, "name"), format!("duplicate of groups[{j}]"));
                }
            }
        }
        let check_group_refs = |errs: &mut Errors, prefix: &Prefix, refs: &[String]| {
            for (k, g) in refs.iter().enumerate() {
                if !groups.contains_key(g.as_str()) {
                    errs.push(
                        path(prefix, &format!("groups[{k}]")),
                        format!("unknown group {g:?}"),
                    );
                }
            }
        };

        let mut connectors: HashMap<&str, usize> = HashMap::with_capacity(self.connectors.len());
        for (i, c) in self.connectors.iter().enumerate() {
            let prefix = Prefix::at("connectors", i);
            let before = errs.0.len();
            check_connector(&mut errs, &prefix, c);
            if errs.0.len() == before {
                if let Some(j) = connectors.insert(&c.name, i) {
                    errs.push(
                        path(&prefix, "name"),
                        format!("duplicate of connectors[{j}]"),
                    );
                }
            }
        }

        let mut names: HashMap<String, usize> = HashMap::with_capacity(self.services.len());
        for (i, s) in self.services.iter().enumerate() {
            let prefix = Prefix::at("services", i);
            if let Ok(n) = ServiceName::parse(&s.name) {
                if let Some(j) = names.insert(n.key(), i) {
                    errs.push(path(&prefix, "name"), format!("duplicate of services[{j}]"));
                }
            }
            check_service(&mut errs, &prefix, s);
            check_group_refs(&mut errs, &prefix, &s.groups);
            if let Some(c) = &s.connector {
                if check_connector_name(c).is_ok() && !connectors.contains_key(c.as_str()) {
                    errs.push(
                        path(&prefix, "connector"),
                        format!("unknown connector {c:?}"),
                    );
                }
            }
        }

        let mut users: HashMap<&str, usize> = HashMap::with_capacity(self.users.len());
        let mut claimed: HashMap<String, usize> = HashMap::with_capacity(self.users.len());
        for (i, u) in self.users.iter().enumerate() {
            let prefix = Prefix::at("users", i);
            let before = errs.0.len();
            check_user(&mut errs, &prefix, u);
            if check_plain_name(&u.name).is_ok() {
                if let Some(j) = users.insert(&u.name, i) {
                    errs.push(path(&prefix, "name"), format!("duplicate of users[{j}]"));
                }
            }
            if errs.0.len() == before {
                for (k, id) in u.identities.iter().enumerate() {
                    if let Some(j) = claimed.insert(identity_key(id), i) {
                        if j != i {
                            errs.push(
                                path(&prefix, &format!("identities[{k}]")),
                                format!("identity {id:?} is already claimed by users[{j}]"),
                            );
                        }
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
        finish(errs)
    }
}

/// The rules of one connector alone.
fn check_connector(errs: &mut Errors, prefix: &Prefix, c: &Connector) {
    if let Err(e) = check_connector_name(&c.name) {
        errs.push(path(prefix, "name"), e);
    }
    if c.description.len() > MAX_DESCRIPTION_LEN {
        errs.push(
            path(prefix, "description"),
            format!("longer than {MAX_DESCRIPTION_LEN} bytes"),
        );
    } else if c.description.chars().any(char::is_control) {
        errs.push(
            path(prefix, "description"),
            "must not hold control characters",
        );
    }
}

/// A connector's name is the last segment of its certificate's URI
/// (`spiffe://DOMAIN/connector/NAME`): letters, digits, `-`, `_` and `.`, at most 128.
pub fn check_connector_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    if name == "." || name == ".." {
        return Err("must not be \".\" or \"..\"".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(
            "letters, digits, '-', '_' and '.' only (it is a certificate URI's last segment)"
                .into(),
        );
    }
    Ok(())
}

/// Longest connector description.
const MAX_DESCRIPTION_LEN: usize = 1024;

impl Connector {
    /// The rules of one connector alone (whether services name it is checked where they
    /// are known).
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut errs = Errors::default();
        check_connector(&mut errs, &Prefix::NONE, self);
        finish(errs)
    }
}

fn check_service_target(errs: &mut Errors, prefix: &Prefix, s: &Service) {
    if let Some(c) = &s.connector {
        if let Err(e) = check_connector_name(c) {
            errs.push(path(prefix, "connector"), e);
        }
        // The connector dials the address: nothing else may serve the session.
        if s.handler.is_some() {
            errs.push(
                path(prefix, "handler"),
                "a service served by a connector forwards to its address; it names no handler",
            );
        }
        if s.address.is_none() {
            errs.push(
                path(prefix, "address"),
                "required: the backend host:port the connector dials",
            );
        }
    }
    if let Some(h) = &s.handler {
        if !KNOWN_HANDLERS.contains(&h.as_str()) {
            errs.push(
                path(prefix, "handler"),
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
                errs.push(path(prefix, "address"), e);
            }
        }
        None if needs_backend => errs.push(
            path(prefix, "address"),
            "required: the backend host:port (\":port\" for localhost)",
        ),
        None => {}
    }
}

/// One record's own rules (not those across records), its fields named under
/// `list[index]`: for checking the records of a delta.
pub(crate) enum One<'a> {
    Service(&'a Service),
    User(&'a User),
    Group(&'a Group),
    Connector(&'a Connector),
}

pub(crate) fn record_errors(list: &'static str, index: usize, r: One<'_>) -> Vec<FieldError> {
    let mut errs = Errors::default();
    let prefix = Prefix::at(list, index);
    match r {
        One::Service(s) => check_service(&mut errs, &prefix, s),
        One::User(u) => check_user(&mut errs, &prefix, u),
        One::Group(g) => check_group(&mut errs, &prefix, g),
        One::Connector(c) => check_connector(&mut errs, &prefix, c),
    }
    errs.0
}

//! Admin commands over the REST API. Updates read the record, change what was asked,
//! and write it back with `If-Match`, so a concurrent change is never overwritten
//! silently. Lists given on `update` replace, they do not merge.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};
use ztp_proto::{Group, Protocol, Service, User};

use crate::client::{check, Client};
use crate::{clock, table, Output};

pub mod connector;

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Add a service: `ztpctl service add quic.svc.internal --proto quic --addr :4433`.
    Add {
        /// SNI name; `*.svc.internal` matches one label.
        name: String,
        /// tcp, udp, quic or auto.
        #[arg(long = "proto", value_parser = parse_protocol, default_value = "auto")]
        protocol: Protocol,
        /// Backend host:port; `:port` means the data plane's own host.
        #[arg(long = "addr")]
        address: Option<String>,
        /// Groups admitted (repeat); none admits every enabled user.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// A handler instead of forwarding, e.g. identity-echo.
        #[arg(long)]
        handler: Option<String>,
        /// Source ranges admitted (repeat), e.g. 10.0.0.0/8; none admits any.
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Source ranges refused (repeat), whatever --allow says.
        #[arg(long = "deny")]
        deny: Vec<String>,
        /// Serve it only through this connector's tunnels (`ztpctl connector add`): the
        /// connector dials --addr, never a data plane.
        #[arg(long, value_name = "NAME")]
        connector: Option<String>,
    },
    /// List services.
    #[command(visible_alias = "ls")]
    List,
    /// Show a service.
    Get {
        /// The service's SNI name.
        name: String,
    },
    /// Change a service; lists given replace the old ones.
    Update {
        /// The service's SNI name.
        name: String,
        /// tcp, udp, quic or auto.
        #[arg(long = "proto", value_parser = parse_protocol)]
        protocol: Option<Protocol>,
        /// Backend host:port; `:port` means the data plane's own host.
        #[arg(long = "addr")]
        address: Option<String>,
        /// Groups admitted (repeat); replaces the old ones.
        #[arg(long = "group", conflicts_with = "clear_groups")]
        groups: Vec<String>,
        /// Remove every group (admits every enabled user).
        #[arg(long)]
        clear_groups: bool,
        /// A handler instead of forwarding, e.g. identity-echo.
        #[arg(long)]
        handler: Option<String>,
        /// Source ranges admitted (repeat); replaces the old ones.
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Source ranges refused (repeat); replaces the old ones.
        #[arg(long = "deny")]
        deny: Vec<String>,
        /// Serve it only through this connector's tunnels: the connector dials the
        /// address, never a data plane.
        #[arg(long, value_name = "NAME", conflicts_with = "clear_connector")]
        connector: Option<String>,
        /// Serve it without a connector: the data planes dial its address themselves.
        #[arg(long)]
        clear_connector: bool,
    },
    /// Remove a service.
    #[command(alias = "remove", alias = "delete")]
    Rm {
        /// The service's SNI name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user with its certificate identities.
    Add {
        /// The user's name.
        name: String,
        /// SAN email, SAN URI or subject CN (repeat).
        #[arg(long = "identity", required = true)]
        identities: Vec<String>,
        /// Groups the user is in (repeat).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// List users.
    #[command(visible_alias = "ls")]
    List,
    /// Show a user.
    Get {
        /// The user's name.
        name: String,
    },
    /// Change a user; lists given replace the old ones.
    Update {
        /// The user's name.
        name: String,
        /// SAN email, SAN URI or subject CN (repeat); replaces the old ones.
        #[arg(long = "identity")]
        identities: Vec<String>,
        /// Groups (repeat); replaces the old ones.
        #[arg(long = "group", conflicts_with = "clear_groups")]
        groups: Vec<String>,
        /// Remove the user from every group.
        #[arg(long)]
        clear_groups: bool,
    },
    /// Disable a user: their connections are refused.
    Disable {
        /// The user's name.
        name: String,
    },
    /// Enable a disabled user.
    Enable {
        /// The user's name.
        name: String,
    },
    /// Remove a user.
    #[command(alias = "remove", alias = "delete")]
    Rm {
        /// The user's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Add a group.
    Add {
        /// The group's name.
        name: String,
    },
    /// List groups.
    #[command(visible_alias = "ls")]
    List,
    /// Remove a group (refused while in use, unless --cascade).
    #[command(alias = "remove", alias = "delete")]
    Rm {
        /// The group's name.
        name: String,
        /// Also remove it from users and services (never leaving a service with none).
        #[arg(long)]
        cascade: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List data-plane replicas: applied version, lag, last nack.
    #[command(visible_alias = "ls")]
    List,
    /// Forget a node that is gone for good (refused while it is connected).
    #[command(visible_alias = "remove")]
    Rm {
        /// The node's id (see `node list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Print the whole configuration (YAML, or JSON with -o json).
    Export,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        /// What the token is for, e.g. ci or an operator's name.
        name: String,
        /// What it may do: viewer (reads, audit, metrics), operator (configuration, no
        /// tokens) or admin (everything). Admin by default, as every token was before
        /// roles existed, so that existing scripts keep working.
        #[arg(long, default_value = "admin", value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
    /// List tokens (never their secrets).
    #[command(visible_alias = "ls")]
    List,
    /// Revoke a token by id.
    #[command(alias = "rm")]
    Revoke {
        /// The token's id (see `token list`).
        id: String,
    },
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "quic" => Ok(Protocol::Quic),
        "auto" => Ok(Protocol::Auto),
        other => Err(format!("{other:?} is not tcp, udp, quic or auto")),
    }
}

/// Path segment escaping for names (`*` and `@` are the interesting ones).
fn seg(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn get(c: &Client, path: &str) -> anyhow::Result<(Value, Option<String>)> {
    let r = check(c.request(Method::GET, path, None, None).await?)?;
    Ok((r.json()?, r.etag))
}

async fn send(
    c: &Client,
    method: Method,
    path: &str,
    body: &Value,
    etag: Option<&str>,
) -> anyhow::Result<Value> {
    let bytes = serde_json::to_vec(body)?;
    let r = check(
        c.request(method, path, Some((bytes, "application/json")), etag)
            .await?,
    )?;
    if r.body.is_empty() {
        Ok(Value::Null)
    } else {
        r.json()
    }
}

async fn delete(c: &Client, path: &str) -> anyhow::Result<()> {
    check(c.request(Method::DELETE, path, None, None).await?)?;
    Ok(())
}

/// Every item of a paginated listing.
async fn list_all(c: &Client, path: &str) -> anyhow::Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(cur) => format!("{path}?limit=1000&cursor={}", seg(cur)),
            None => format!("{path}?limit=1000"),
        };
        let (page, _) = get(c, &url).await?;
        if let Some(a) = page["items"].as_array() {
            items.extend(a.iter().cloned());
        }
        match page["next"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => return Ok(items),
        }
    }
}

/// `v` as scripts read it (json, yaml: the values the API sent, epoch milliseconds
/// included); `None` for the outputs meant for people.
fn for_scripts(out: Output, v: &Value) -> anyhow::Result<Option<String>> {
    Ok(match out {
        Output::Json => Some(serde_json::to_string_pretty(v)? + "\n"),
        Output::Yaml => Some(serde_yaml_ng::to_string(v)?),
        Output::Table | Output::Wide => None,
    })
}

/// Prints `v` for scripts, or hands it to `people` with whether to print the wide table.
fn show(
    out: Output,
    v: &Value,
    people: impl FnOnce(bool) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match for_scripts(out, v)? {
        Some(text) => {
            print!("{text}");
            Ok(())
        }
        None => people(out == Output::Wide),
    }
}

/// The items of a listing shown by [`show`].
fn items(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn join(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn services_table(items: &[Value], wide: bool) -> anyhow::Result<()> {
    print!("{}", services_table_text(items, wide));
    Ok(())
}

fn services_table_text(items: &[Value], wide: bool) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|v| {
            let mut row = vec![
                s(&v["name"]),
                s(&v["protocol"]),
                s(&v["address"]),
                join(&v["groups"]),
                s(&v["handler"]),
                s(&v["connector"]),
            ];
            if wide {
                row.extend([or_dash(join(&v["allow"])), or_dash(join(&v["deny"]))]);
            }
            row
        })
        .collect();
    let mut header = vec!["NAME", "PROTO", "ADDRESS", "GROUPS", "HANDLER", "CONNECTOR"];
    if wide {
        header.extend(["ALLOW", "DENY"]);
    }
    table::render(&header, &rows)
}

fn or_dash(s: String) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

fn users_table(items: &[Value]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|v| {
            vec![
                s(&v["name"]),
                join(&v["identities"]),
                join(&v["groups"]),
                if v["disabled"].as_bool() == Some(true) {
                    "disabled"
                } else {
                    "enabled"
                }
                .into(),
            ]
        })
        .collect();
    table::print(&["NAME", "IDENTITIES", "GROUPS", "STATUS"], &rows);
    Ok(())
}

fn done(out: Output, v: &Value, what: &str) -> anyhow::Result<()> {
    show(out, v, |_| {
        println!("{what}");
        Ok(())
    })
}

pub async fn service(c: &Client, cmd: ServiceCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Add {
            name,
            protocol,
            address,
            groups,
            handler,
            allow,
            deny,
            connector,
        } => {
            let svc = Service {
                name: name.clone(),
                protocol,
                address,
                groups,
                allow,
                deny,
                handler,
                connector,
            };
            let v = send(
                c,
                Method::POST,
                "/v1/services",
                &serde_json::to_value(&svc)?,
                None,
            )
            .await?;
            done(out, &v, &format!("service {name} added"))
        }
        ServiceCmd::List => {
            let all = Value::Array(list_all(c, "/v1/services").await?);
            show(out, &all, |wide| services_table(items(&all), wide))
        }
        ServiceCmd::Get { name } => {
            let (v, _) = get(c, &format!("/v1/services/{}", seg(&name))).await?;
            show(out, &v, |wide| {
                services_table(std::slice::from_ref(&v), wide)
            })
        }
        ServiceCmd::Update {
            name,
            protocol,
            address,
            groups,
            clear_groups,
            handler,
            allow,
            deny,
            connector,
            clear_connector,
        } => {
            let path = format!("/v1/services/{}", seg(&name));
            let (v, etag) = get(c, &path).await?;
            let mut svc: Service =
                serde_json::from_value(v).context("the server sent an unexpected service")?;
            if let Some(p) = protocol {
                svc.protocol = p;
            }
            if address.is_some() {
                svc.address = address;
            }
            if clear_groups {
                svc.groups.clear();
            } else if !groups.is_empty() {
                svc.groups = groups;
            }
            if handler.is_some() {
                svc.handler = handler;
            }
            if !allow.is_empty() {
                svc.allow = allow;
            }
            if !deny.is_empty() {
                svc.deny = deny;
            }
            if clear_connector {
                svc.connector = None;
            } else if connector.is_some() {
                svc.connector = connector;
            }
            let v = send(
                c,
                Method::PUT,
                &path,
                &serde_json::to_value(&svc)?,
                etag.as_deref(),
            )
            .await?;
            done(out, &v, &format!("service {name} updated"))
        }
        ServiceCmd::Rm { name } => {
            delete(c, &format!("/v1/services/{}", seg(&name))).await?;
            done(
                out,
                &json!({"removed": name}),
                &format!("service {name} removed"),
            )
        }
    }
}

pub async fn user(c: &Client, cmd: UserCmd, out: Output) -> anyhow::Result<()> {
    let path_of = |name: &str| format!("/v1/users/{}", seg(name));
    // Read, change, write back conditionally.
    async fn modify(c: &Client, path: &str, f: impl FnOnce(&mut User)) -> anyhow::Result<Value> {
        let (v, etag) = get(c, path).await?;
        let mut user: User =
            serde_json::from_value(v).context("the server sent an unexpected user")?;
        f(&mut user);
        send(
            c,
            Method::PUT,
            path,
            &serde_json::to_value(&user)?,
            etag.as_deref(),
        )
        .await
    }
    match cmd {
        UserCmd::Add {
            name,
            identities,
            groups,
        } => {
            let user = User {
                name: name.clone(),
                identities,
                groups,
                disabled: false,
            };
            let v = send(
                c,
                Method::POST,
                "/v1/users",
                &serde_json::to_value(&user)?,
                None,
            )
            .await?;
            done(out, &v, &format!("user {name} added"))
        }
        UserCmd::List => {
            let all = Value::Array(list_all(c, "/v1/users").await?);
            show(out, &all, |_| users_table(items(&all)))
        }
        UserCmd::Get { name } => {
            let (v, _) = get(c, &path_of(&name)).await?;
            show(out, &v, |_| users_table(std::slice::from_ref(&v)))
        }
        UserCmd::Update {
            name,
            identities,
            groups,
            clear_groups,
        } => {
            let v = modify(c, &path_of(&name), |u| {
                if !identities.is_empty() {
                    u.identities = identities;
                }
                if clear_groups {
                    u.groups.clear();
                } else if !groups.is_empty() {
                    u.groups = groups;
                }
            })
            .await?;
            done(out, &v, &format!("user {name} updated"))
        }
        UserCmd::Disable { name } => {
            let v = modify(c, &path_of(&name), |u| u.disabled = true).await?;
            done(out, &v, &format!("user {name} disabled"))
        }
        UserCmd::Enable { name } => {
            let v = modify(c, &path_of(&name), |u| u.disabled = false).await?;
            done(out, &v, &format!("user {name} enabled"))
        }
        UserCmd::Rm { name } => {
            delete(c, &path_of(&name)).await?;
            done(
                out,
                &json!({"removed": name}),
                &format!("user {name} removed"),
            )
        }
    }
}

pub async fn group(c: &Client, cmd: GroupCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        GroupCmd::Add { name } => {
            let v = send(
                c,
                Method::POST,
                "/v1/groups",
                &serde_json::to_value(Group { name: name.clone() })?,
                None,
            )
            .await?;
            done(out, &v, &format!("group {name} added"))
        }
        GroupCmd::List => {
            let all = Value::Array(list_all(c, "/v1/groups").await?);
            show(out, &all, |_| {
                let rows: Vec<Vec<String>> =
                    items(&all).iter().map(|v| vec![s(&v["name"])]).collect();
                table::print(&["NAME"], &rows);
                Ok(())
            })
        }
        GroupCmd::Rm { name, cascade } => {
            let q = if cascade { "?cascade=true" } else { "" };
            delete(c, &format!("/v1/groups/{}{q}", seg(&name))).await?;
            done(
                out,
                &json!({"removed": name}),
                &format!("group {name} removed"),
            )
        }
    }
}

pub async fn node(c: &Client, cmd: NodeCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::List => {
            let (v, _) = get(c, "/v1/nodes").await?;
            let all = Value::Array(v["items"].as_array().cloned().unwrap_or_default());
            show(out, &all, |wide| {
                print!("{}", nodes_table(items(&all), clock::now_ms(), wide));
                Ok(())
            })
        }
        NodeCmd::Rm { id } => {
            delete(c, &format!("/v1/nodes/{}", seg(&id))).await?;
            done(out, &json!({"removed": id}), &format!("node {id} removed"))
        }
    }
}

fn nodes_table(items: &[Value], now_ms: u64, wide: bool) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|n| {
            let seen = n["last_seen_ms"].as_u64().unwrap_or(0);
            let nack = match &n["last_nack"] {
                Value::Null => "-".to_owned(),
                v => format!("v{}: {}", s(&v["version"]), s(&v["reason"])),
            };
            let up = n["connected"].as_bool() == Some(true);
            let mut state = if up { "up" } else { "down" }.to_owned();
            // Its configuration differs from the control plane's (by digest).
            if n["diverged"].as_bool() == Some(true) {
                state.push_str(",diverged");
            }
            let mut row = vec![
                s(&n["id"]),
                s(&n["listen"]),
                s(&n["peer"]),
                s(&n["applied"]),
                s(&n["lag"]),
                state,
                // A node whose subscription is open is seen now, however idle it is.
                if up {
                    "now".into()
                } else {
                    clock::age(now_ms, seen)
                },
            ];
            if wide {
                let digest = match &n["digest"] {
                    Value::String(d) => d.clone(),
                    _ => "-".to_owned(),
                };
                row.extend([clock::local(seen), s(&n["schema"]), digest]);
            }
            row.push(nack);
            row
        })
        .collect();
    let mut header = vec![
        "ID",
        "LISTEN",
        "PEER",
        "APPLIED",
        "LAG",
        "STATE",
        "LAST SEEN",
    ];
    if wide {
        header.extend(["SEEN AT", "SCHEMA", "DIGEST"]);
    }
    header.push("LAST NACK");
    table::render(&header, &rows)
}

pub async fn snapshot(c: &Client, cmd: SnapshotCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Export => {
            // The server's own rendering: yaml for people too (it is the file format).
            let format = if out == Output::Json { "json" } else { "yaml" };
            let r = check(
                c.request(
                    Method::GET,
                    &format!("/v1/snapshot?format={format}"),
                    None,
                    None,
                )
                .await?,
            )?;
            use std::io::Write;
            std::io::stdout().write_all(&r.body)?;
            if out == Output::Json {
                println!();
            }
            Ok(())
        }
    }
}

pub async fn import(c: &Client, file: &Path, out: Output) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    if file == Path::new("-") {
        std::io::stdin().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    }
    let text = String::from_utf8_lossy(&bytes);
    let is_json = text.trim_start().starts_with('{');
    let ct = if is_json {
        "application/json"
    } else {
        "application/yaml"
    };
    let r = check(
        c.request(Method::POST, "/v1/import", Some((bytes, ct)), None)
            .await?,
    )?;
    let v = r.json()?;
    // A control plane from before connectors sends no count of them.
    let connectors = match v["connectors"].as_u64() {
        Some(n) if n > 0 => format!(", {n} connectors"),
        _ => String::new(),
    };
    done(
        out,
        &v,
        &format!(
            "imported as version {}: {} services, {} users, {} groups{connectors}",
            s(&v["version"]),
            s(&v["services"]),
            s(&v["users"]),
            s(&v["groups"])
        ),
    )
}

pub async fn token(c: &Client, cmd: TokenCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { name, role } => {
            let v = send(
                c,
                Method::POST,
                "/v1/tokens",
                &json!({"name": name, "role": role}),
                None,
            )
            .await?;
            show(out, &v, |_| {
                let Some(t) = v["token"].as_str() else {
                    bail!("the server did not return a token");
                };
                eprintln!(
                    "token {} ({}, {}) created; it is shown only now:",
                    s(&v["id"]),
                    s(&v["name"]),
                    s(&v["role"])
                );
                println!("{t}");
                Ok(())
            })
        }
        TokenCmd::List => {
            let all = Value::Array(list_all(c, "/v1/tokens").await?);
            show(out, &all, |_| {
                print!("{}", tokens_table(items(&all), clock::now_ms()));
                Ok(())
            })
        }
        TokenCmd::Revoke { id } => {
            delete(c, &format!("/v1/tokens/{}", seg(&id))).await?;
            done(out, &json!({"revoked": id}), &format!("token {id} revoked"))
        }
    }
}

fn tokens_table(items: &[Value], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|t| {
            let created = t["created_ms"].as_u64().unwrap_or(0);
            vec![
                s(&t["id"]),
                s(&t["name"]),
                // A server from before roles lists none: its tokens are all admin.
                t["role"].as_str().unwrap_or("admin").to_owned(),
                clock::local(created),
                clock::age(now_ms, created),
            ]
        })
        .collect();
    table::render(&["ID", "NAME", "ROLE", "CREATED", "AGE"], &rows)
}

pub async fn revoke(c: &Client, serials: &[String], out: Output) -> anyhow::Result<()> {
    let v = send(
        c,
        Method::POST,
        "/v1/revoked",
        &json!({ "serials": serials }),
        None,
    )
    .await?;
    done(
        out,
        &v,
        &format!(
            "revoked {} serial(s) in version {}",
            serials.len(),
            s(&v["version"])
        ),
    )
}

/// Filters of `ztpctl audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Only connections of this client identity.
    #[arg(long)]
    pub identity: Option<String>,
    /// Only connections to this service.
    #[arg(long)]
    pub service: Option<String>,
    /// allow or deny.
    #[arg(long)]
    pub decision: Option<String>,
    /// Only the last DURATION (e.g. 15m, 1h).
    #[arg(long, value_parser = ztp_proto::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Records shown at most.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Admin changes (who, what, version) instead of connections.
    #[arg(long, conflicts_with_all = ["identity", "service", "decision", "since"])]
    pub admin: bool,
}

pub async fn audit(c: &Client, a: AuditArgs, out: Output) -> anyhow::Result<()> {
    if a.admin {
        let (v, _) = get(c, &format!("/v1/audit/admin?limit={}", a.limit)).await?;
        let all = Value::Array(v["items"].as_array().cloned().unwrap_or_default());
        return show(out, &all, |_| {
            print!("{}", admin_audit_table(items(&all)));
            Ok(())
        });
    }
    let mut q = vec![format!("limit={}", a.limit)];
    for (k, v) in [
        ("identity", &a.identity),
        ("service", &a.service),
        ("decision", &a.decision),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", seg(v)));
        }
    }
    let now_ms = clock::now_ms();
    if let Some(d) = a.since {
        let d = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        q.push(format!("since={}", now_ms.saturating_sub(d)));
    }
    let (v, _) = get(c, &format!("/v1/audit?{}", q.join("&"))).await?;
    let all = Value::Array(v["items"].as_array().cloned().unwrap_or_default());
    show(out, &all, |wide| {
        print!("{}", audit_table(items(&all), now_ms, wide));
        Ok(())
    })
}

fn admin_audit_table(items: &[Value]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            vec![
                s(&r["seq"]),
                clock::local(r["time_ms"].as_u64().unwrap_or(0)),
                s(&r["actor"]["token_name"]),
                r["actor"]["role"].as_str().unwrap_or("admin").to_owned(),
                s(&r["action"]),
                s(&r["target"]),
                s(&r["version"]),
            ]
        })
        .collect();
    table::render(
        &["SEQ", "TIME", "WHO", "ROLE", "ACTION", "TARGET", "VERSION"],
        &rows,
    )
}

fn audit_table(items: &[Value], now_ms: u64, wide: bool) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let at = r["time_ms"].as_u64().unwrap_or(0);
            let mut row = vec![clock::age(now_ms, at)];
            if wide {
                row.push(clock::local(at));
            }
            // A refused certificate's claim is marked: it was not proven.
            let identity = if r["identity_unverified"] == true {
                format!("{} (unverified)", s(&r["identity"]))
            } else {
                s(&r["identity"])
            };
            row.extend([s(&r["node"]), s(&r["peer"]), identity]);
            if wide {
                let transport = r["transport"].as_str().unwrap_or("tcp").to_owned();
                row.extend([s(&r["user"]), s(&r["sni"]), transport]);
            }
            row.extend([s(&r["service"]), s(&r["decision"]), s(&r["reason"])]);
            if wide {
                row.push(s(&r["code"]));
            }
            row.extend([
                format!("{}/{}", s(&r["bytes_up"]), s(&r["bytes_down"])),
                format!("{}ms", s(&r["duration_ms"])),
            ]);
            row
        })
        .collect();
    let mut header = vec!["WHEN"];
    if wide {
        header.push("TIME");
    }
    header.extend(["NODE", "PEER", "IDENTITY"]);
    if wide {
        header.extend(["USER", "SNI", "TRANSPORT"]);
    }
    header.extend(["SERVICE", "DECISION", "REASON"]);
    if wide {
        header.push("CODE");
    }
    header.extend(["BYTES UP/DOWN", "DURATION"]);
    table::render(&header, &rows)
}

#[cfg(test)]
mod tests;

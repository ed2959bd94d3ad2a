//! `ztpctl connector add|list|rm`: the connector registry (`/v1/connectors`). A
//! connector runs next to backends no data plane can reach and holds tunnels to the
//! replicas; a service that names it (`service add ... --connector NAME`) is served only
//! through those tunnels. Its certificate comes from `ztpctl pki connector NAME`.
//!
//! `list` shows each connector's live tunnels (replica, transport, since), as the
//! replicas report them: a connector with none serves nothing (clients of its services
//! get `ZTP-ERROR 503 unavailable`).

use clap::Args;
use hyper::Method;
use serde_json::{json, Value};

use super::{delete, done, items, list_all, s, seg, send, show};
use crate::client::Client;
use crate::{clock, table, Output};

/// `connector add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The connector's name (letters, digits, `-`, `_`, `.`): its certificate carries
    /// spiffe://TRUST_DOMAIN/connector/NAME.
    pub name: String,
    /// What it serves, where it runs.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
}

/// `connector rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// The connector's name.
    pub name: String,
}

/// The registry commands, their control-plane flags taken out.
#[derive(Debug)]
pub enum Cmd {
    Add(AddArgs),
    List,
    Rm(RmArgs),
}

pub async fn connector(c: &Client, cmd: Cmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        Cmd::Add(AddArgs { name, description }) => {
            let mut body = json!({ "name": name });
            if let Some(d) = description {
                body["description"] = Value::String(d);
            }
            let v = send(c, Method::POST, "/v1/connectors", &body, None).await?;
            done(out, &v, &format!("connector {name} added"))
        }
        Cmd::List => {
            let all = Value::Array(list_all(c, "/v1/connectors").await?);
            show(out, &all, |wide| {
                print!("{}", connectors_table(items(&all), clock::now_ms(), wide));
                Ok(())
            })
        }
        Cmd::Rm(RmArgs { name }) => {
            delete(c, &format!("/v1/connectors/{}", seg(&name))).await?;
            done(
                out,
                &json!({"removed": name}),
                &format!("connector {name} removed"),
            )
        }
    }
}

/// One row per live tunnel (a connector with none gets one row, `TUNNELS 0`): its
/// replica, transport and age; `wide` adds when it was established. The name is on
/// every row, the count and description on the connector's first.
pub(super) fn connectors_table(items: &[Value], now_ms: u64, wide: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for c in items {
        let tunnels = c["tunnels"].as_array().map_or(&[][..], Vec::as_slice);
        let description = c["description"].as_str().unwrap_or("").to_owned();
        let mut cells = |first: bool, t: Option<&Value>| {
            let mut row = vec![
                s(&c["name"]),
                if first {
                    tunnels.len().to_string()
                } else {
                    String::new()
                },
            ];
            match t {
                Some(t) => {
                    let since = t["since_ms"].as_u64().unwrap_or(0);
                    row.extend([
                        s(&t["replica"]),
                        s(&t["transport"]),
                        clock::age(now_ms, since),
                    ]);
                    if wide {
                        row.push(clock::local(since));
                    }
                }
                None => {
                    row.extend(["-".into(), "-".into(), "-".into()]);
                    if wide {
                        row.push("-".into());
                    }
                }
            }
            row.push(if first {
                description.clone()
            } else {
                String::new()
            });
            rows.push(row);
        };
        if tunnels.is_empty() {
            cells(true, None);
        }
        for (i, t) in tunnels.iter().enumerate() {
            cells(i == 0, Some(t));
        }
    }
    let mut header = vec!["NAME", "TUNNELS", "REPLICA", "TRANSPORT", "SINCE"];
    if wide {
        header.push("SINCE AT");
    }
    header.push("DESCRIPTION");
    table::render(&header, &rows)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{Cli, Command, ConnectorCmd};
    use clap::Parser;

    const NOW: u64 = 1_700_000_000_000;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ztpctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_registry_commands_parse_with_the_control_plane_flags() {
        let cli = parse(&[
            "connector",
            "add",
            "lab",
            "--description",
            "the lab's rack",
            "--server",
            "http://127.0.0.1:9780",
        ])
        .unwrap();
        let Command::Connector(ConnectorCmd::Add { args, api }) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(
            (args.name.as_str(), args.description.as_deref()),
            ("lab", Some("the lab's rack"))
        );
        assert_eq!(api.server.as_deref(), Some("http://127.0.0.1:9780"));
        for ls in ["list", "ls"] {
            let mut cli = parse(&["-o", "json", "connector", ls]).unwrap();
            let top = std::mem::take(&mut cli.top);
            assert!(
                matches!(cli.command, Command::Connector(ConnectorCmd::List { .. })),
                "{ls}"
            );
            let api = std::mem::take(cli.command.api().expect("talks to the control plane"));
            assert_eq!(api.or(top).output, Some(Output::Json), "{ls}");
        }
        for rm in ["rm", "remove", "delete"] {
            let cli = parse(&["connector", rm, "lab", "-o", "yaml"]).unwrap();
            assert!(
                matches!(&cli.command, Command::Connector(ConnectorCmd::Rm { args, api })
                    if args.name == "lab" && api.output == Some(Output::Yaml)),
                "{rm}"
            );
        }
        // No cascade: a connector's services are changed one by one.
        assert!(parse(&["connector", "rm", "lab", "--cascade"]).is_err());
        assert!(parse(&["connector", "add"]).is_err(), "a name is needed");
    }

    #[test]
    fn a_service_names_its_connector_or_clears_it() {
        let cli = parse(&[
            "service",
            "add",
            "db.svc.internal",
            "--proto",
            "tcp",
            "--addr",
            "10.1.2.3:5432",
            "--connector",
            "lab",
        ])
        .unwrap();
        let Command::Service {
            cmd: crate::admin::ServiceCmd::Add { connector, .. },
            ..
        } = cli.command
        else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(connector.as_deref(), Some("lab"));
        let cli = parse(&["service", "update", "db.svc.internal", "--clear-connector"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Service {
                cmd: crate::admin::ServiceCmd::Update {
                    clear_connector: true,
                    connector: None,
                    ..
                },
                ..
            }
        ));
        let e = parse(&[
            "service",
            "update",
            "db.svc.internal",
            "--connector",
            "lab",
            "--clear-connector",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn the_list_shows_each_live_tunnel_and_connectors_without_one() {
        let list = [
            json!({"name": "edge", "tunnels": []}),
            json!({"name": "lab", "description": "the lab's rack", "tunnels": [
                {"replica": "n1", "transport": "quic", "since_ms": NOW - 3 * 60_000},
                {"replica": "n2", "transport": "tcp", "since_ms": NOW - 12_000},
            ]}),
        ];
        let t = connectors_table(&list, NOW, false);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines,
            [
                vec![
                    "NAME",
                    "TUNNELS",
                    "REPLICA",
                    "TRANSPORT",
                    "SINCE",
                    "DESCRIPTION"
                ],
                vec!["edge", "0", "-", "-", "-"],
                vec!["lab", "2", "n1", "quic", "3m", "ago", "the", "lab's", "rack"],
                vec!["lab", "n2", "tcp", "12s", "ago"],
            ],
            "{t}"
        );
        let w = connectors_table(&list, NOW, true);
        assert!(w.contains("SINCE AT") && w.contains("2023-11-14"), "{w}");
        for word in w.split(|c: char| !c.is_ascii_digit()) {
            assert!(word.len() < 13, "raw epoch milliseconds in:\n{w}");
        }
        // A server that sends no tunnels yet: none.
        let t = connectors_table(&[json!({"name": "old"})], NOW, false);
        assert!(t.lines().nth(1).unwrap().starts_with("old   0"), "{t}");
    }
}

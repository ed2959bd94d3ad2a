//! The command line itself: aliases, completions, help on every flag, and the control
//! plane's flags offered only where they are used.

use clap::CommandFactory;

use super::*;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("ztpctl").chain(args.iter().copied()))
}

#[test]
fn the_command_line_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn ls_is_list_everywhere() {
    for what in ["service", "user", "group", "node", "token"] {
        let cli = parse(&[what, "ls"]).unwrap_or_else(|e| panic!("{what} ls: {e}"));
        let listed = matches!(
            cli.command,
            Command::Service {
                cmd: admin::ServiceCmd::List,
                ..
            } | Command::User {
                cmd: admin::UserCmd::List,
                ..
            } | Command::Group {
                cmd: admin::GroupCmd::List,
                ..
            } | Command::Node {
                cmd: admin::NodeCmd::List,
                ..
            } | Command::Token {
                cmd: admin::TokenCmd::List,
                ..
            }
        );
        assert!(listed, "{what} ls is not {what} list");
        // Shown in the help, as an alias.
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut(what)
            .unwrap()
            .render_help()
            .to_string();
        assert!(
            help.contains("ls"),
            "{what} --help does not show ls:\n{help}"
        );
    }
}

#[test]
fn completion_scripts() {
    for shell in ["bash", "zsh", "fish"] {
        let cli = parse(&["completion", shell]).unwrap();
        let Command::Completion { shell } = cli.command else {
            panic!("completion {shell} parsed as {:?}", cli.command);
        };
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "ztpctl", &mut buf);
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("ztpctl"), "{shell}: {text}");
        for sub in ["service", "pki", "connect", "completion"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    assert!(parse(&["completion", "tcsh"]).is_err());
}

/// Every argument of every command, with the command's path.
fn every_arg(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
    for a in cmd.get_arguments() {
        out.push((path.to_owned(), a.clone()));
    }
    for sub in cmd.get_subcommands() {
        every_arg(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn every_flag_has_help() {
    let mut cmd = Cli::command();
    cmd.build();
    let mut args = Vec::new();
    every_arg(&cmd, "ztpctl", &mut args);
    let missing: Vec<String> = args
        .iter()
        .filter(|(_, a)| a.get_help().is_none_or(|h| h.to_string().trim().is_empty()))
        .map(|(path, a)| format!("{path}: {}", a.get_id()))
        .collect();
    assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    assert!(args.len() > 60, "only {} arguments seen", args.len());
}

/// The flags of the control plane are on the commands that talk to it, and only there.
#[test]
fn control_plane_flags_only_where_used() {
    let mut cmd = Cli::command();
    cmd.build();
    let mut args = Vec::new();
    every_arg(&cmd, "ztpctl", &mut args);
    let mut on: Vec<String> = args
        .iter()
        .filter(|(_, a)| a.get_id() == "server")
        .map(|(path, _)| path.clone())
        .collect();
    on.sort();
    for path in &on {
        let used = [
            "service", "user", "group", "node", "snapshot", "import", "token", "audit",
        ]
        .iter()
        .any(|c| path.starts_with(&format!("ztpctl {c}")))
            || path == "ztpctl pki revoke"
            || [
                "ztpctl connector add",
                "ztpctl connector list",
                "ztpctl connector rm",
            ]
            .contains(&path.as_str())
            || path == "ztpctl";
        assert!(used, "--server offered on `{path}`, which does not use it");
    }
    for path in [
        "ztpctl service list",
        "ztpctl pki revoke",
        "ztpctl audit",
        "ztpctl import",
        "ztpctl connector list",
    ] {
        assert!(
            on.iter().any(|p| p == path),
            "--server missing on `{path}`: {on:?}"
        );
    }
    for args in [
        &["pki", "init", "d", "--server", "http://x"][..],
        &["pki", "issue", "a@b", "--token", "t"],
        &["connect", "s.svc.internal", "--server", "http://x"],
        &["up", "--token", "t"],
        &["completion", "bash", "-o", "json"],
    ] {
        let e = parse(args).err();
        assert!(
            e.as_ref().map(clap::Error::kind) == Some(clap::error::ErrorKind::UnknownArgument),
            "{args:?}: {e:?}"
        );
    }
}

#[test]
fn control_plane_flags_before_or_after_the_command() {
    for args in [
        &["-o", "json", "--server", "http://a", "group", "list"][..],
        &["group", "list", "-o", "json", "--server", "http://a"],
        &["group", "--server", "http://a", "-o", "json", "list"],
        &[
            "-o", "yaml", "group", "list", "-o", "json", "--server", "http://a",
        ],
    ] {
        let mut cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let top = std::mem::take(&mut cli.top);
        let api = std::mem::take(cli.command.api().unwrap()).or(top);
        assert_eq!(api.output, Some(Output::Json), "{args:?}");
        assert_eq!(api.server.as_deref(), Some("http://a"), "{args:?}");
    }
    let cli = parse(&["--token", "t", "pki", "revoke", "01ab"]).unwrap();
    assert!(cli.top.token.is_some());
    for o in ["table", "wide", "json", "yaml"] {
        parse(&["service", "get", "x", "-o", o]).unwrap_or_else(|e| panic!("-o {o}: {e}"));
    }
    // Before the command, they are refused for commands that do not use them (main).
    let mut cli = parse(&["--server", "http://a", "pki", "init", "d"]).unwrap();
    assert!(cli.command.api().is_none() && !cli.top.is_empty());
}

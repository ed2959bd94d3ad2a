//! `ztpctl` as a command line (DESIGN.md "Processes and flags"): the config file is TOML
//! and a broken one only matters when it is needed; `-o table|wide|json|yaml`; `ls` for
//! `list`; times for people, never epoch milliseconds; completion scripts; the control
//! plane's flags only on the commands that use them.

use std::path::Path;

use serde_json::Value;
use ztp_tests::{Control, TempDir, TestPki};

use crate::plane::assert_one_line_error;

/// Writes `XDG/ztp/config.toml`.
fn write_config(xdg: &Path, text: &str) -> std::path::PathBuf {
    let dir = xdg.join("ztp");
    std::fs::create_dir_all(&dir).expect("mkdir xdg/ztp");
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config.toml");
    path
}

/// The config file, in TOML (comments, single quotes, sections), gives the server and
/// token; flags and the environment beat it. A broken file (bad TOML) is one warning
/// naming it when flags and the environment give all a command needs, and one error line
/// naming it (and what is missing) when they do not; `connect` likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_is_toml_and_a_broken_one_only_matters_when_needed() {
    let pki = TestPki::new();
    let control = Control::start_api_only(&pki).await;
    let work = TempDir::new("ztpctl-config");
    let xdg = work.join("xdg");
    let xdg_s = xdg.display().to_string();
    control.ztpctl_ok(["group", "add", "ops"]).await;

    // Only the file: no ZTP_SERVER, no ZTP_TOKEN.
    let only_file = [
        ("XDG_CONFIG_HOME", xdg_s.as_str()),
        ("ZTP_SERVER", ""),
        ("ZTP_TOKEN", ""),
    ];
    write_config(
        &xdg,
        &format!(
            "# ztpctl settings\n\n[api]\nserver = '{}'   # single quotes\ntoken = \"{}\"\n\n\
             [connect]\nvia = 'gw.example.com:9743'\n",
            control.api_url(),
            control.token()
        ),
    );
    let out = control
        .ztpctl_env(["-o", "json", "group", "list"], &only_file)
        .await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ops\""));
    assert!(out.stderr.is_empty(), "{out:?}");

    // A broken file, everything given by the environment: works, one warning naming it.
    let path = write_config(&xdg, "server = http://unquoted\n");
    let path_s = path.display().to_string();
    let env_and_file = [("XDG_CONFIG_HOME", xdg_s.as_str())];
    let out = control
        .ztpctl_env(["-o", "json", "group", "list"], &env_and_file)
        .await;
    assert!(
        out.status.success(),
        "broken file, full environment: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(
        stderr.contains("warning") && stderr.contains(&path_s) && stderr.contains("line 1"),
        "{stderr:?}"
    );
    // ... or by flags.
    let out = control
        .ztpctl_env(
            [
                "group",
                "list",
                "--server",
                &control.api_url(),
                "--token",
                control.token(),
            ],
            &only_file,
        )
        .await;
    assert!(out.status.success(), "broken file, full flags: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ops"));

    // A broken file and no server: one line naming the file and the missing flag.
    let out = control.ztpctl_env(["group", "list"], &only_file).await;
    assert_one_line_error(
        &out,
        "broken file, no server",
        &[&path_s, "--server", "line 1"],
    );
    let no_server = [
        ("XDG_CONFIG_HOME", xdg_s.as_str()),
        ("ZTP_SERVER", ""),
        ("ZTP_TOKEN", control.token()),
    ];
    let out = control.ztpctl_env(["group", "list"], &no_server).await;
    assert_one_line_error(&out, "broken file, no server", &[&path_s, "--server"]);
    // `connect` without --via and a broken file: the same.
    let out = control
        .ztpctl_env(
            [
                "connect",
                "echo.svc.internal",
                "--cert",
                "c",
                "--key",
                "k",
                "--ca",
                "a",
            ],
            &only_file,
        )
        .await;
    assert_one_line_error(&out, "connect, broken file, no via", &[&path_s, "--via"]);
    // An unknown key is a broken file too, named with its line.
    write_config(&xdg, "server = 'x'\nsever = 'y'\n");
    let out = control.ztpctl_env(["group", "list"], &only_file).await;
    assert_one_line_error(&out, "unknown key", &[&path_s, "line 2", "sever"]);
}

/// `-o json` and `-o yaml` (before or after the command) carry the API's values; `-o
/// wide` adds columns; `ls` is `list`; tables show times as ages or date-times, never
/// epoch milliseconds; `completion bash|zsh|fish` print scripts; `--server`/`--token` are
/// refused on commands that do not talk to the control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_aliases_times_and_completions() {
    let pki = TestPki::new();
    let control = Control::start_api_only(&pki).await;
    control.ztpctl_ok(["group", "add", "ops"]).await;
    control
        .ztpctl_ok([
            "service",
            "add",
            "db.svc.internal",
            "--proto",
            "tcp",
            "--addr",
            "127.0.0.1:5432",
            "--group",
            "ops",
            "--allow",
            "10.0.0.0/8",
        ])
        .await;
    control.ztpctl_ok(["token", "create", "ci"]).await;

    // json, before and after the command.
    let before = control.ztpctl_json(["service", "list"]).await;
    let after: Value =
        serde_json::from_str(&control.ztpctl_ok(["service", "list", "-o", "json"]).await)
            .expect("service list -o json is JSON");
    assert_eq!(before, after);
    assert_eq!(after[0]["name"], "db.svc.internal");
    // yaml: the same values, as YAML.
    let yaml = control.ztpctl_ok(["service", "ls", "-o", "yaml"]).await;
    assert!(
        yaml.contains("name: db.svc.internal") && yaml.contains("- 10.0.0.0/8"),
        "{yaml}"
    );
    let one = control
        .ztpctl_ok(["service", "get", "db.svc.internal", "-o", "yaml"])
        .await;
    assert!(one.contains("name: db.svc.internal"), "{one}");
    // wide: the source ranges too.
    let table = control.ztpctl_ok(["service", "list"]).await;
    let wide = control.ztpctl_ok(["service", "list", "-o", "wide"]).await;
    assert!(!table.contains("10.0.0.0/8"), "{table}");
    assert!(
        wide.contains("ALLOW") && wide.contains("10.0.0.0/8"),
        "{wide}"
    );

    // ls everywhere list is.
    for what in ["service", "user", "group", "node", "token"] {
        let listed = control.ztpctl_json([what, "list"]).await;
        let ls = control.ztpctl_json([what, "ls"]).await;
        assert_eq!(listed, ls, "{what} ls");
    }

    // Times: json keeps epoch milliseconds, tables never show them.
    let tokens = control.ztpctl_json(["token", "list"]).await;
    let admin = control.ztpctl_json(["audit", "--admin"]).await;
    let epochs: Vec<String> = tokens
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| &t["created_ms"])
        .chain(
            admin
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| &r["time_ms"]),
        )
        .map(|v| v.as_u64().expect("epoch ms").to_string())
        .collect();
    assert!(epochs.len() >= 4, "tokens {tokens}, admin audit {admin}");
    for args in [
        &["token", "list"][..],
        &["token", "list", "-o", "wide"],
        &["audit", "--admin"],
        &["audit", "--admin", "-o", "wide"],
    ] {
        let table = control.ztpctl_ok(args.iter().copied()).await;
        for e in &epochs {
            assert!(!table.contains(e), "{args:?} shows epoch ms {e}:\n{table}");
        }
    }
    let tokens = control.ztpctl_ok(["token", "list"]).await;
    assert!(
        tokens.contains("AGE") && tokens.contains(" ago"),
        "{tokens}"
    );

    // Completions.
    for shell in ["bash", "zsh", "fish"] {
        let out = control.ztpctl(["completion", shell]).await;
        assert!(out.status.success(), "completion {shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("ztpctl") && script.contains("service") && script.contains("pki"),
            "completion {shell}: {script}"
        );
    }

    // The control plane's flags where they are not used: usage errors (64).
    for args in [
        &["pki", "init", "pki", "--server", "http://127.0.0.1:1"][..],
        &["--server", "http://127.0.0.1:1", "pki", "init", "pki"],
        &["connect", "x.svc.internal", "--token", "t"],
        &["-o", "json", "completion", "bash"],
    ] {
        let out = control.ztpctl(args.iter().copied()).await;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
    }
    // And where they are: after the command, too.
    let out = control
        .ztpctl_env(
            [
                "group",
                "list",
                "--server",
                &control.api_url(),
                "--token",
                control.token(),
            ],
            &[("ZTP_SERVER", "http://127.0.0.1:1"), ("ZTP_TOKEN", "")],
        )
        .await;
    assert!(out.status.success(), "flags after the command: {out:?}");
}

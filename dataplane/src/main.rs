//! `ztp-dataplane`: see `--help` and README.md.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use ztp_dataplane::config::{Args, Config};
use ztp_dataplane::node::{self, EX_USAGE};
use ztp_dataplane::snapshot::file;
use ztp_infra::trace::{self, LogFormat};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind::*;
            let code = match e.kind() {
                DisplayHelp | DisplayVersion => 0,
                _ => EX_USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Some(path) = &args.check {
        return check(path);
    }
    let format = if args.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztp-dataplane: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    trace::init(format, "info");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ztp-dataplane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

fn check(path: &std::path::Path) -> ExitCode {
    match file::load(path) {
        Ok(snap) => {
            println!(
                "ok: {}: version {}, {} services, {} users, {} groups, {} revoked",
                path.display(),
                snap.version,
                snap.services.len(),
                snap.users.len(),
                snap.groups.len(),
                snap.revoked.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> ExitCode {
    let stop = async {
        let sig = ztp_infra::signal::stop().await;
        tracing::info!(signal = sig, "signal received");
    };
    match node::run(config, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            for line in e.lines {
                eprintln!("ztp-dataplane: {line}");
            }
            ExitCode::from(e.code)
        }
    }
}

//! `ztp-keyserver`: see `--help` and the crate docs.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use ztp_infra::trace::{self, LogFormat};
use ztp_keyserver::config::Args;
use ztp_keyserver::EX_USAGE;

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
    let format = if args.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztp-keyserver: {e}");
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
            eprintln!("ztp-keyserver: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let stop = async {
            let sig = ztp_infra::signal::stop().await;
            tracing::info!(signal = sig, "signal received");
        };
        match ztp_keyserver::run(config, stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ztp-keyserver: {}", e.line);
                ExitCode::from(e.code)
            }
        }
    })
}

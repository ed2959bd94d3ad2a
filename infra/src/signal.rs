//! Process signals: SIGTERM or SIGINT asks a binary to stop; SIGHUP, where a binary
//! reloads, asks it to read its files again. What a signal then does stays with the
//! binary.

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Completes on the first SIGTERM or SIGINT, with its name. The handlers are installed
/// when this is first polled; where they cannot be, it never completes (the process runs
/// until killed).
pub async fn stop() -> &'static str {
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => std::future::pending().await,
    }
}

/// The SIGHUPs this process receives from now on.
#[derive(Debug)]
pub struct Hangups(Signal);

/// Starts listening for SIGHUP (from then on, a SIGHUP no longer ends the process).
pub fn hangups() -> io::Result<Hangups> {
    signal(SignalKind::hangup()).map(Hangups)
}

impl Hangups {
    /// Waits for the next SIGHUP (several before a call count as one); `None` once no
    /// more can arrive.
    pub async fn recv(&mut self) -> Option<()> {
        self.0.recv().await
    }
}

//! Shutdown: on SIGTERM or SIGINT (`ztp_infra::signal::stop`, in `main`) the node stops
//! accepting, then connections drain.

use tokio::sync::watch;

/// A shutdown signal any number of tasks can wait on.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Triggers [`Shutdown`].
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Completes once shutdown was triggered (or the trigger dropped).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

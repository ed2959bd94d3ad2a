//! Snapshot work off the connections' threads, at the lowest CPU priority.
//!
//! Reading, converting, validating and indexing a large snapshot, and dropping the state
//! it replaces, take long enough (hundreds of milliseconds at 100,000 users) to stall the
//! connections in flight if they ran on a worker, or beside the workers at the same
//! priority on a busy core. They run one at a time on one thread of their own, niced to
//! 19: whenever a worker has something to do, it gets the core.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

fn queue() -> &'static Mutex<mpsc::Sender<Job>> {
    static QUEUE: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ztp-snapshot".into())
            .spawn(move || {
                // Linux: the nice value is per thread (PRIO_PROCESS of the caller).
                if let Err(e) = rustix::process::setpriority_process(None, 19) {
                    tracing::debug!(error = %e, "cannot lower the snapshot thread's priority");
                }
                for job in rx {
                    job();
                }
            })
            .expect("spawn the snapshot thread");
        Mutex::new(tx)
    })
}

/// Runs `f` on the snapshot thread; `None` if it panicked.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        if let Ok(v) = out {
            let _ = tx.send(v);
        }
    });
    let sent = queue().lock().unwrap_or_else(|e| e.into_inner()).send(job);
    if sent.is_err() {
        return None;
    }
    rx.await.ok()
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn runs_jobs_in_order_and_survives_a_panic() {
        assert_eq!(super::run(|| 1 + 1).await, Some(2));
        assert_eq!(super::run(|| -> u8 { panic!("bad snapshot") }).await, None);
        let name = super::run(|| std::thread::current().name().map(String::from)).await;
        assert_eq!(name.flatten().as_deref(), Some("ztp-snapshot"));
    }
}

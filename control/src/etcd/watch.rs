//! Watches: one gRPC stream per watch, created on the first endpoint that serves it.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};

use super::client::{require_leader, unreachable_error, Etcd, MAX_DECODE_BYTES};
use super::error::{self, Fate};
use super::kv::Kv;
use super::pb::{etcdserverpb as rpc, mvccpb};
use super::EtcdError;

use rpc::watch_client::WatchClient;
use rpc::watch_request::RequestUnion;

/// A quiet watch stream is probed after this long (a progress request, which etcd 3.4
/// answers at once, with watch id -1)…
const PROBE_AFTER: Duration = Duration::from_secs(1);
/// …and declared dead after this long without any message: a frozen or cut-off member
/// is noticed within seconds. (HTTP/2 pings cannot do it on a plain-HTTP endpoint: there
/// etcd's gRPC server sends GOAWAY "too_many_pings" after three pings less than 5 s
/// apart with no data sent in between; the answers to the probes are such data.)
const SILENCE_LIMIT: Duration = Duration::from_secs(3);

/// What to watch besides the key.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// `[key, range_end)`; empty: the key alone; `[0]`: every key from `key`. See
    /// [`prefix_end`](super::prefix_end).
    pub range_end: Vec<u8>,
    /// The first revision to report (inclusive); 0: from now.
    pub start_revision: i64,
    /// Include each event's previous key-value.
    pub prev_kv: bool,
    /// Ask etcd for periodic progress notifications (empty batches with
    /// `progress: true`) while nothing changes.
    pub progress_notify: bool,
}

/// The kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. For a delete, `kv` has the key and `mod_revision` is the deletion's
/// revision; its value is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: Kv,
    /// The key-value before the change, if asked for and not compacted.
    pub prev_kv: Option<Kv>,
}

/// Events etcd sent together, in revision order. A batch never splits one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// The header revision: the store's revision when etcd sent the batch.
    pub revision: i64,
    pub events: Vec<Event>,
    /// A progress notification (no events): etcd says the watch has seen everything up
    /// to `revision`. On etcd 3.4 events of that same revision may still follow
    /// (DESIGN stack notes): treat it as a hint, not as a resume point.
    pub progress: bool,
}

/// A live watch. Dropping it cancels the watch.
pub struct Watcher {
    endpoint: String,
    watch_id: i64,
    /// The stream's request half, kept open; also carries probes.
    requests: mpsc::Sender<rpc::WatchRequest>,
    stream: Streaming<rpc::WatchResponse>,
    progress_notify: bool,
    /// The revision the watch was created at.
    created_revision: i64,
    last_heard: Instant,
    probed: bool,
    failed: bool,
}

impl Etcd {
    /// Watches `key` (or a range, see [`WatchOptions`]). The stream is created on the
    /// first endpoint that serves it; once it breaks, [`Watcher::next`] fails and the
    /// caller watches again from the revision after the last one it saw (or resyncs
    /// after [`EtcdError::Compacted`]).
    pub async fn watch(
        &self,
        key: impl Into<Vec<u8>>,
        options: WatchOptions,
    ) -> Result<Watcher, EtcdError> {
        let create = rpc::WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(rpc::WatchCreateRequest {
                key: key.into(),
                range_end: options.range_end.clone(),
                start_revision: options.start_revision,
                progress_notify: options.progress_notify,
                prev_kv: options.prev_kv,
            })),
        };
        let ((requests, stream, created), endpoint) = self
            .with_failover(true, |channel, _| open(channel, create.clone()))
            .await?;
        let header = created.header.unwrap_or_default();
        Ok(Watcher {
            endpoint,
            watch_id: created.watch_id,
            requests,
            stream,
            progress_notify: options.progress_notify,
            created_revision: header.revision,
            last_heard: Instant::now(),
            probed: false,
            failed: false,
        })
    }
}

/// Opens a watch stream on one member and waits for etcd to confirm the watch.
async fn open(
    channel: tonic::transport::Channel,
    create: rpc::WatchRequest,
) -> Result<
    (
        mpsc::Sender<rpc::WatchRequest>,
        Streaming<rpc::WatchResponse>,
        rpc::WatchResponse,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(4);
    // The channel is empty and open.
    let _ = tx.try_send(create);
    let mut req = Request::new(ReceiverStream::new(rx));
    require_leader(&mut req);
    let mut stream = WatchClient::new(channel)
        .max_decoding_message_size(MAX_DECODE_BYTES)
        .watch(req)
        .await?
        .into_inner();
    loop {
        match stream.message().await? {
            Some(resp) if resp.created => {
                if resp.canceled {
                    return Err(Status::failed_precondition(format!(
                        "watch refused: {}",
                        resp.cancel_reason
                    )));
                }
                return Ok((tx, stream, resp));
            }
            Some(_) => continue,
            None => {
                return Err(Status::unavailable(
                    "watch stream closed before the watch was created",
                ))
            }
        }
    }
}

impl Watcher {
    /// The endpoint serving the watch.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The store's revision when the watch was created.
    pub fn created_revision(&self) -> i64 {
        self.created_revision
    }

    /// The next batch of events (or progress notification). Fails with
    /// [`EtcdError::Compacted`] when the start revision is compacted, with
    /// [`EtcdError::Unavailable`] when the stream breaks or its member stops answering,
    /// and keeps failing afterwards: watch again.
    pub async fn next(&mut self) -> Result<WatchBatch, EtcdError> {
        if self.failed {
            return Err(EtcdError::Unavailable(format!(
                "{}: the watch has already failed",
                self.endpoint
            )));
        }
        let result = self.next_inner().await;
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    async fn next_inner(&mut self) -> Result<WatchBatch, EtcdError> {
        loop {
            let wake = if self.probed {
                self.last_heard + SILENCE_LIMIT
            } else {
                self.last_heard + PROBE_AFTER
            };
            let message = tokio::select! {
                m = self.stream.message() => m,
                () = tokio::time::sleep_until(wake) => {
                    if self.probed {
                        return Err(EtcdError::Unavailable(format!(
                            "{}: watch stream silent for {SILENCE_LIMIT:?}",
                            self.endpoint
                        )));
                    }
                    let probe = rpc::WatchRequest {
                        request_union: Some(RequestUnion::ProgressRequest(
                            rpc::WatchProgressRequest {},
                        )),
                    };
                    // A full queue means probes are already waiting to go.
                    let _ = self.requests.try_send(probe);
                    self.probed = true;
                    continue;
                }
            };
            self.last_heard = Instant::now();
            self.probed = false;
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return Err(EtcdError::Unavailable(format!(
                        "{}: etcd closed the watch stream",
                        self.endpoint
                    )))
                }
                Err(status) => {
                    return Err(match error::fate(&status) {
                        Fate::Final => error::final_error(status),
                        _ => unreachable_error(&self.endpoint, &status),
                    })
                }
            };
            if resp.compact_revision != 0 {
                return Err(EtcdError::Compacted {
                    compact_revision: resp.compact_revision,
                });
            }
            if resp.canceled {
                return Err(EtcdError::WatchCanceled(format!(
                    "{}: {}",
                    self.endpoint,
                    if resp.cancel_reason.is_empty() {
                        "no reason given"
                    } else {
                        &resp.cancel_reason
                    }
                )));
            }
            let revision = resp.header.as_ref().map_or(0, |h| h.revision);
            if resp.events.is_empty() {
                // An answer to a probe (watch id -1 on etcd 3.4) or etcd's periodic
                // notification.
                if self.progress_notify && resp.watch_id == self.watch_id && !resp.created {
                    return Ok(WatchBatch {
                        revision,
                        events: Vec::new(),
                        progress: true,
                    });
                }
                continue;
            }
            return Ok(WatchBatch {
                revision,
                events: resp.events.into_iter().map(event).collect(),
                progress: false,
            });
        }
    }
}

fn event(e: mvccpb::Event) -> Event {
    Event {
        kind: match e.r#type() {
            mvccpb::event::EventType::Put => EventKind::Put,
            mvccpb::event::EventType::Delete => EventKind::Delete,
        },
        kv: e.kv.map(Kv::from).unwrap_or_default(),
        prev_kv: e.prev_kv.map(Kv::from),
    }
}

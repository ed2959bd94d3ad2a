//! The pipeline ends sessions itself, whatever the handler does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use ztp_proto::names::Serial;
use ztp_proto::Protocol;

use super::*;
use crate::handler::BoxOutcome;
use crate::identity::{ClientIdentity, IdentityKind};

/// A transport for tests: a message is whatever one read returns.
impl ClientIo for DuplexStream {
    fn read_message(&mut self) -> BoxIo<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let mut buf = vec![0u8; 4096];
            let n = tokio::io::AsyncReadExt::read(self, &mut buf).await?;
            buf.truncate(n);
            Ok((n > 0).then_some(buf))
        })
    }
}

/// What the rude handler does before ignoring everything.
#[derive(Debug, Clone, Copy)]
enum Rude {
    /// Nothing: it waits forever.
    Silent,
    /// Writes a greeting to the client, then waits forever.
    Greets,
    /// Reads one message, then waits forever.
    Listens,
    /// Returns at once without closing anything.
    Leaves,
    /// Returns a 502 refusal for the pipeline to deliver.
    Refuses,
    /// Writes a greeting, then says the session was cut.
    Fails,
    /// Writes an answer and asks for a lingering close.
    Answers,
}

/// A handler that ignores every signal and never closes the client.
#[derive(Debug)]
struct RudeHandler {
    mode: Rude,
    dropped: Arc<AtomicBool>,
}

/// Notes that the handler's future was dropped (as its backend connection would be).
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Handler for RudeHandler {
    fn name(&self) -> &'static str {
        "rude"
    }

    fn supports(&self, _: Protocol) -> bool {
        true
    }

    fn serve<'a>(&'a self, s: Session<'a>) -> BoxOutcome<'a> {
        let flag = DropFlag(self.dropped.clone());
        Box::pin(async move {
            let _flag = flag;
            let Client::Stream(client) = s.client else {
                std::future::pending::<()>().await;
                unreachable!()
            };
            match self.mode {
                Rude::Silent => {}
                Rude::Greets => {
                    client.write_all(b"hello").await.unwrap();
                    client.flush().await.unwrap();
                }
                Rude::Listens => {
                    client.read_message().await.unwrap();
                }
                Rude::Leaves => return Outcome::ended("left"),
                Rude::Refuses => {
                    return Outcome::refused(Refusal::BadGateway, "backend unreachable")
                }
                Rude::Fails => {
                    client.write_all(b"partial").await.unwrap();
                    return Outcome::aborted("connection error");
                }
                Rude::Answers => {
                    client.write_all(b"answer").await.unwrap();
                    return Outcome::answered("answered");
                }
            }
            std::future::pending::<()>().await;
            unreachable!()
        })
    }
}

/// Alice on `a.svc`, with long timeouts: only the pipeline ends these sessions.
fn setup<'a>(framed: bool, id: &'a ClientIdentity, groups: &'a [String]) -> Box<Setup<'a>> {
    Box::new(Setup {
        framed,
        target: Target {
            service: "a.svc",
            backend: None,
            protocol: Protocol::Tcp,
            connector: None,
        },
        caller: Caller {
            identity: id,
            user: "alice",
            groups,
        },
        limits: HandlerLimits {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3600),
            udp_timeout: Duration::from_secs(1),
        },
    })
}

fn identity() -> ClientIdentity {
    ClientIdentity {
        id: "alice@x".into(),
        kind: IdentityKind::Email,
        serial: Serial::parse_hex("01").unwrap(),
        not_after: i64::MAX,
    }
}

/// Runs a rude handler on one end of a pipe until `stop` fires; returns the record,
/// everything the client read to its end of stream, and whether the handler's future was
/// dropped.
async fn rude(
    mode: Rude,
    framed: bool,
    client_sends: &[u8],
    stop: impl Future<Output = Stop> + Send + 'static,
) -> (Ended, Vec<u8>, bool) {
    let (ended, got, dropped, _) = rude_shut(mode, framed, client_sends, stop).await;
    (ended, got, dropped)
}

/// [`rude`], and whether the pipeline shut the client's stream cleanly (close_notify).
async fn rude_shut(
    mode: Rude,
    framed: bool,
    client_sends: &[u8],
    stop: impl Future<Output = Stop> + Send + 'static,
) -> (Ended, Vec<u8>, bool, bool) {
    let (mut peer, server) = duplex(64 * 1024);
    peer.write_all(client_sends).await.unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let handler = RudeHandler {
        mode,
        dropped: dropped.clone(),
    };
    let id = identity();
    let groups = vec!["g".to_string()];
    let mut client = Metered::new(server);
    let setup = setup(framed, &id, &groups);
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        got
    });
    let ended = run(&mut client, &handler, setup, Box::pin(stop)).await;
    let shut = client.shut;
    drop(client);
    let got = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the client sees the end of the session")
        .unwrap();
    (ended, got, dropped.load(Ordering::SeqCst), shut)
}

async fn after_a_while(stop: Stop) -> Stop {
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop
}

#[tokio::test]
async fn a_revoked_session_with_nothing_forwarded_gets_the_403_line() {
    let stop = after_a_while(Stop::Revoked("user disabled"));
    let (ended, got, dropped) = rude(Rude::Silent, false, b"", stop).await;
    assert_eq!(got, Refusal::Forbidden.line().as_bytes());
    assert_eq!(ended.refusal, Some(Refusal::Forbidden));
    assert_eq!(ended.end, "user disabled");
    assert!(dropped, "the handler's future (and its backend) is dropped");
}

#[tokio::test]
async fn a_revoked_session_that_moved_bytes_gets_only_a_clean_close() {
    let stop = after_a_while(Stop::Revoked("certificate revoked"));
    let (ended, got, dropped) = rude(Rude::Greets, false, b"", stop).await;
    assert_eq!(
        got, b"hello",
        "no line after forwarded bytes: a clean end of stream"
    );
    assert_eq!(ended.refusal, None);
    assert_eq!(ended.end, "certificate revoked");
    assert_eq!((ended.bytes_up, ended.bytes_down), (0, 5));
    assert!(dropped);

    let stop = after_a_while(Stop::Revoked("not in group"));
    let (ended, got, _) = rude(Rude::Listens, false, b"ping", stop).await;
    assert!(got.is_empty(), "bytes went up: no line, {got:?}");
    assert_eq!(ended.refusal, None);
    assert_eq!((ended.bytes_up, ended.bytes_down), (4, 0));
}

#[tokio::test]
async fn drain_ends_a_session_that_ignores_it() {
    let stop = after_a_while(Stop::Drain);
    let (ended, got, dropped) = rude(Rude::Greets, false, b"", stop).await;
    assert_eq!(got, b"hello");
    assert_eq!(ended.end, "drained");
    assert_eq!(ended.refusal, None);
    assert!(dropped);
}

#[tokio::test]
async fn a_datagram_session_is_ended_too() {
    let stop = after_a_while(Stop::Revoked("user disabled"));
    let (ended, got, dropped) = rude(Rude::Silent, true, b"", stop).await;
    // The line is sent on a framed session too: a reader tells `ZT` from a length.
    assert_eq!(got, Refusal::Forbidden.line().as_bytes());
    assert_eq!(ended.refusal, Some(Refusal::Forbidden));
    assert!(dropped);
}

#[tokio::test]
async fn a_handler_that_leaves_without_closing_is_closed_for_it() {
    let (ended, got, _) = rude(Rude::Leaves, false, b"", std::future::pending()).await;
    assert!(got.is_empty());
    assert_eq!(ended.end, "left");
}

#[tokio::test]
async fn a_stop_that_never_comes_lets_the_handler_finish() {
    // Sanity: the race does not end sessions by itself.
    let quiet = tokio::time::timeout(
        Duration::from_millis(200),
        rude(Rude::Silent, false, b"", std::future::pending()),
    )
    .await;
    assert!(quiet.is_err(), "a silent session with no stop stays open");
}

#[tokio::test]
async fn a_refusal_from_the_handler_is_delivered_by_the_pipeline_and_not_counted() {
    let (ended, got, _, shut) = rude_shut(Rude::Refuses, false, b"", std::future::pending()).await;
    assert_eq!(got, Refusal::BadGateway.line().as_bytes());
    assert_eq!(ended.refusal, Some(Refusal::BadGateway));
    assert_eq!(
        (ended.bytes_up, ended.bytes_down),
        (0, 0),
        "the line is not traffic"
    );
    assert!(shut);
}

#[tokio::test]
async fn a_cut_session_gets_no_clean_close() {
    let (ended, got, _, shut) = rude_shut(Rude::Fails, false, b"", std::future::pending()).await;
    assert_eq!(got, b"partial");
    assert_eq!(ended.end, "connection error");
    assert!(
        !shut,
        "a clean close would tell the client it got everything"
    );
}

#[tokio::test]
async fn an_answer_is_closed_cleanly_and_what_the_client_sends_after_is_not_counted() {
    let (ended, got, _, shut) =
        rude_shut(Rude::Answers, false, b"ignored", std::future::pending()).await;
    assert_eq!(got, b"answer");
    assert!(shut);
    assert_eq!((ended.bytes_up, ended.bytes_down), (0, 6));
}

#[tokio::test]
async fn a_revocation_after_the_client_was_closed_writes_no_line() {
    // The handler closed its side (as a backend's end of stream would), then a later
    // decision comes: no line after close_notify.
    let (mut peer, server) = duplex(1024);
    let mut client = Metered::new(server);
    client.shutdown().await.unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let handler = RudeHandler {
        mode: Rude::Silent,
        dropped,
    };
    let id = identity();
    let setup = setup(false, &id, &[]);
    let ended = run(
        &mut client,
        &handler,
        setup,
        Box::pin(after_a_while(Stop::Revoked("user disabled"))),
    )
    .await;
    drop(client);
    let mut got = Vec::new();
    peer.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(ended.refusal, None);
}

#[tokio::test]
async fn the_first_bytes_are_kept_across_reads_and_messages() {
    let (mut peer, server) = duplex(1024);
    let mut client = Metered::new(server);
    peer.write_all(b"SSH").await.unwrap();
    let mut buf = [0u8; 3];
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(client.first_bytes(), b"SSH");
    peer.write_all(b"-2.0-OpenSSH_9.2\r\n").await.unwrap();
    client.read_message().await.unwrap();
    assert_eq!(
        client.first_bytes(),
        b"SSH-2.0-",
        "at most PEEK_MAX bytes, in order"
    );
    assert_eq!(client.up, 21);
    assert_eq!(
        crate::protocol::detect(client.first_bytes()),
        Some(crate::protocol::Detected::Ssh)
    );
    assert!(Metered::new(duplex(8).1).first_bytes().is_empty());
}

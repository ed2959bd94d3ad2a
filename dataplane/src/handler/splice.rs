//! Copying both directions of a forwarded connection.
//!
//! Unlike `tokio::io::copy_bidirectional`, which allocates two buffers per connection up
//! front, a direction takes a buffer from a per-thread pool only when bytes are ready to
//! be read, and gives it back once they are written: an idle connection holds no copy
//! buffer at all. A half-close (end of stream on one side) is passed on as a shutdown of
//! the other side's write half; an error on either side ends both.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Size of a copy buffer: four full TLS records of plaintext, so that a busy stream
/// moves 64 KiB per system call each way (16 KiB, one record, quadruples the calls).
const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per thread between uses (512 KiB).
const POOL_MAX: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    })
}

enum State {
    /// Waiting for bytes; holds no buffer.
    Reading,
    Writing {
        buf: Box<[u8]>,
        pos: usize,
        len: usize,
    },
    ShuttingDown,
    Done,
}

/// One direction of the copy.
struct Pipe {
    state: State,
    /// Written bytes not yet flushed.
    need_flush: bool,
    /// The reader ended after the bytes being written.
    eof: bool,
    bytes: u64,
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            state: State::Reading,
            need_flush: false,
            eof: false,
            bytes: 0,
        }
    }

    fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Moves bytes from `r` to `w` until it would block; `progress` is set when any byte
    /// moved (for the idle timer).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        progress: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match &mut self.state {
                State::Reading => {
                    let mut buf = take_buf();
                    let mut rb = ReadBuf::new(&mut buf);
                    // Fill the buffer with what is ready now (a TLS stream yields one
                    // record per read), so the other side gets it in one write.
                    let mut ended = false;
                    let mut pending = false;
                    while rb.remaining() > 0 {
                        let before = rb.filled().len();
                        match r.as_mut().poll_read(cx, &mut rb) {
                            Poll::Pending => {
                                pending = true;
                                break;
                            }
                            Poll::Ready(Err(e)) => {
                                give_buf(buf);
                                return Poll::Ready(Err(e));
                            }
                            Poll::Ready(Ok(())) if rb.filled().len() == before => {
                                ended = true;
                                break;
                            }
                            Poll::Ready(Ok(())) => {}
                        }
                    }
                    let len = rb.filled().len();
                    if len == 0 {
                        give_buf(buf);
                        if pending {
                            if self.need_flush {
                                ready!(w.as_mut().poll_flush(cx))?;
                                self.need_flush = false;
                            }
                            return Poll::Pending;
                        }
                        self.state = State::ShuttingDown;
                    } else {
                        *progress = true;
                        self.eof = ended;
                        self.state = State::Writing { buf, pos: 0, len };
                    }
                }
                State::Writing { buf, pos, len } => {
                    while *pos < *len {
                        let n = ready!(w.as_mut().poll_write(cx, &buf[*pos..*len]))?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        *pos += n;
                        self.bytes += n as u64;
                        *progress = true;
                    }
                    self.need_flush = true;
                    let next = if self.eof {
                        State::ShuttingDown
                    } else {
                        State::Reading
                    };
                    if let State::Writing { buf, .. } = std::mem::replace(&mut self.state, next) {
                        give_buf(buf);
                    }
                }
                State::ShuttingDown => {
                    ready!(w.as_mut().poll_shutdown(cx))?;
                    self.state = State::Done;
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides closed their write halves.
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// An I/O error on either side.
    Error(io::ErrorKind),
}

/// Bytes moved each way and how it ended.
#[derive(Debug, Clone, Copy)]
pub struct SpliceResult {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
    pub end: SpliceEnd,
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended, an error, `idle`
/// passes with no byte moved. (Revocation and drain end the whole session, in the
/// pipeline.)
///
/// Not an `async fn`: the returned future is the copy loop's state alone (an idle
/// session keeps it for its whole life), not that state plus the arguments and
/// references to it.
pub fn splice<'a, A, B>(
    a: &'a mut A,
    b: &'a mut B,
    idle: Duration,
) -> impl Future<Output = SpliceResult> + Send + 'a
where
    A: AsyncRead + AsyncWrite + Unpin + Send + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + Send + ?Sized,
{
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    // The timer is moved only when it fires: a busy stream must not touch the timer
    // wheel on every read.
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(idle));
    let mut last_progress = Instant::now();
    poll_fn(move |cx| {
        let end = step(
            cx,
            &mut up,
            &mut down,
            &mut *a,
            &mut *b,
            &mut timer,
            &mut last_progress,
            idle,
        );
        end.map(|end| SpliceResult {
            a_to_b: up.bytes,
            b_to_a: down.bytes,
            end,
        })
    })
}

/// One poll of both directions and the idle timer.
#[allow(clippy::too_many_arguments)]
fn step<A, B>(
    cx: &mut Context<'_>,
    up: &mut Pipe,
    down: &mut Pipe,
    a: &mut A,
    b: &mut B,
    timer: &mut Pin<Box<Sleep>>,
    last_progress: &mut Instant,
    idle: Duration,
) -> Poll<SpliceEnd>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut progress = false;
    let up_res = if up.is_done() {
        Poll::Ready(Ok(()))
    } else {
        up.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b), &mut progress)
    };
    if let Poll::Ready(Err(e)) = up_res {
        return Poll::Ready(SpliceEnd::Error(e.kind()));
    }
    let down_res = if down.is_done() {
        Poll::Ready(Ok(()))
    } else {
        down.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a), &mut progress)
    };
    if let Poll::Ready(Err(e)) = down_res {
        return Poll::Ready(SpliceEnd::Error(e.kind()));
    }
    if up.is_done() && down.is_done() {
        return Poll::Ready(SpliceEnd::Closed);
    }
    if progress {
        *last_progress = Instant::now();
    }
    loop {
        match timer.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(()) if last_progress.elapsed() >= idle => {
                return Poll::Ready(SpliceEnd::Idle)
            }
            Poll::Ready(()) => timer.as_mut().reset(*last_progress + idle),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_passes_half_close() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let task =
            tokio::spawn(async move { splice(&mut a, &mut b, Duration::from_secs(5)).await });

        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, data,
            "client half-close reaches the server as end of stream"
        );
        server.write_all(b"reply after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        let res = task.await.unwrap();
        assert_eq!(res.end, SpliceEnd::Closed);
        assert_eq!(res.a_to_b, data.len() as u64);
        assert_eq!(res.b_to_a, 22);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connection_times_out() {
        let (_client, mut a) = duplex(64);
        let (mut b, _server) = duplex(64);
        let res = splice(&mut a, &mut b, Duration::from_secs(60)).await;
        assert_eq!(res.end, SpliceEnd::Idle);
    }

    #[tokio::test]
    async fn idle_pipe_holds_no_buffer() {
        POOL.with(|p| p.borrow_mut().clear());
        let (_client, mut a) = duplex(64);
        let (mut b, _server) = duplex(64);
        let mut fut = Box::pin(splice(&mut a, &mut b, Duration::from_secs(60)));
        assert!(futures_poll_once(fut.as_mut()).await.is_none());
        // Both directions polled, found nothing, and returned their buffers.
        assert_eq!(POOL.with(|p| p.borrow().len()), 1);
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
        poll_fn(|cx| match Pin::new(&mut f).poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }
}

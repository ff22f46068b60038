//! A session's outbound queue: bounded in frames and in bytes, and the writer task that drains
//! it into the socket.
//!
//! Three kinds of producers share it:
//! - **chat frames** (events, replies): wait for room, but only for the configured grace; a
//!   client that cannot take them in that time is closed with 4008 and resumes by sequence;
//! - **ephemeral frames** (typing, presence): never wait; dropped when the queue is more than
//!   half full, so a slow reader loses them first and never a chat event;
//! - **closes**: after the queued frames (drain, token expiry), or at once, discarding what is
//!   queued (too slow, flooding).
//!
//! Memory per session is bounded by the queue's byte limit (one frame larger than the limit
//! counts as the limit) plus the socket's write buffer.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::SplitSink;
use futures::SinkExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::protocol::close_code;
use crate::EdgeStats;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The session is closing (or closed); nothing more goes out.
    Closed,
    /// The client did not make room within the grace: the session is being closed with 4008.
    TooSlow,
}

enum Item {
    Frame(Message, Bytes),
    Close(u16, String),
}

/// A queued frame's share of the byte budget, returned when the writer has sent it.
struct Bytes {
    _permit: Option<OwnedSemaphorePermit>,
    len: u64,
    stats: Arc<EdgeStats>,
}

impl Drop for Bytes {
    fn drop(&mut self) {
        self.stats
            .queued_bytes
            .fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// Limits of one session's queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutboxLimits {
    pub frames: usize,
    pub bytes: usize,
    /// How long a chat frame may wait for room before the client counts as too slow.
    pub grace: Duration,
    /// WebSocket pings this often.
    pub ping_every: Duration,
    /// How long a socket gets to take its close frame (a client that stopped reading must
    /// drain what the kernel holds first).
    pub close_timeout: Duration,
}

/// The producers' side of a session's queue. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Item>,
    budget: Arc<Semaphore>,
    limits: OutboxLimits,
    /// Cancelled when the session must stop at once; the code and reason are in `abort`.
    stop: CancellationToken,
    abort: Arc<Mutex<Option<(u16, String)>>>,
    stats: Arc<EdgeStats>,
}

impl Outbox {
    /// A queue and the writer task that drains it into `sink`.
    pub(crate) fn start(
        sink: SplitSink<WebSocket, Message>,
        limits: OutboxLimits,
        stats: Arc<EdgeStats>,
    ) -> (Outbox, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(limits.frames.max(16));
        let outbox = Outbox {
            tx,
            budget: Arc::new(Semaphore::new(limits.bytes.max(1))),
            limits,
            stop: CancellationToken::new(),
            abort: Arc::new(Mutex::new(None)),
            stats,
        };
        // The writer holds no sender: it ends when every producer is gone.
        let writer = tokio::spawn(write_loop(
            sink,
            rx,
            outbox.stop.clone(),
            outbox.abort.clone(),
            limits,
        ));
        (outbox, writer)
    }

    /// Resolves when the session must stop at once (too slow, flooding, or told to).
    pub(crate) async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// Stops the writer at once (without a close code of its own: it closes the socket).
    pub(crate) fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Queues a chat frame (an event or a reply), waiting at most the grace for room.
    pub(crate) async fn push(&self, frame: impl Into<Utf8Bytes>) -> Result<(), Refused> {
        if self.stop.is_cancelled() {
            return Err(Refused::Closed);
        }
        let frame: Utf8Bytes = frame.into();
        let cost = self.cost(frame.len());
        let room = async {
            let permit = self.budget.clone().acquire_many_owned(cost).await.ok()?;
            let slot = self.tx.reserve().await.ok()?;
            Some((permit, slot))
        };
        let waited = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Err(Refused::Closed),
            waited = tokio::time::timeout(self.limits.grace, room) => waited,
        };
        match waited {
            Ok(Some((permit, slot))) => {
                slot.send(self.item(frame, Some(permit)));
                Ok(())
            }
            Ok(None) => Err(Refused::Closed),
            Err(_) => {
                self.stats.slow_closes.fetch_add(1, Ordering::Relaxed);
                self.abort(
                    close_code::TOO_SLOW,
                    "too slow to keep up; resume by sequence",
                );
                Err(Refused::TooSlow)
            }
        }
    }

    /// Queues an ephemeral frame if the queue is at most half full; otherwise drops it.
    /// Returns whether it was queued.
    pub(crate) fn push_ephemeral(&self, frame: impl Into<Utf8Bytes>) -> bool {
        let frame: Utf8Bytes = frame.into();
        let cost = self.cost(frame.len());
        let half_free = self.budget.available_permits() >= self.limits.bytes / 2
            && self.tx.capacity() >= self.tx.max_capacity() / 2;
        let queued = half_free
            && match (
                self.budget.clone().try_acquire_many_owned(cost),
                self.tx.try_reserve(),
            ) {
                (Ok(permit), Ok(slot)) => {
                    slot.send(self.item(frame, Some(permit)));
                    true
                }
                _ => false,
            };
        if !queued {
            self.stats.ephemeral_dropped.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }

    /// Counts ephemeral frames lost before they reached this queue (the session fell behind).
    pub(crate) fn dropped_ephemeral(&self, n: u64) {
        self.stats.ephemeral_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Closes the session after what is queued (waiting at most the grace for room).
    pub(crate) async fn close(&self, code: u16, reason: &str) {
        if self.stop.is_cancelled() {
            return;
        }
        let sent = tokio::time::timeout(self.limits.grace, self.tx.reserve()).await;
        match sent {
            Ok(Ok(slot)) => slot.send(Item::Close(code, reason.to_owned())),
            Ok(Err(_)) => {}
            // Nothing moves: close at once instead.
            Err(_) => self.abort(code, reason),
        }
    }

    /// Closes the session at once: what is queued is discarded (the client resumes by
    /// sequence), the close frame goes out next.
    pub(crate) fn abort(&self, code: u16, reason: &str) {
        if let Ok(mut abort) = self.abort.lock() {
            abort.get_or_insert_with(|| (code, reason.to_owned()));
        }
        self.stop.cancel();
    }

    fn cost(&self, len: usize) -> u32 {
        len.clamp(1, self.limits.bytes.max(1))
            .min(u32::MAX as usize) as u32
    }

    fn item(&self, frame: Utf8Bytes, permit: Option<OwnedSemaphorePermit>) -> Item {
        let len = frame.len() as u64;
        let queued = self.stats.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        self.stats
            .queued_bytes_peak
            .fetch_max(queued, Ordering::Relaxed);
        Item::Frame(
            Message::Text(frame),
            Bytes {
                _permit: permit,
                len,
                stats: self.stats.clone(),
            },
        )
    }
}

/// Frames written together before one flush, at most.
const BATCH: usize = 64;

/// Sends what the session queues, pings on an interval, and closes the socket.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Item>,
    stop: CancellationToken,
    abort: Arc<Mutex<Option<(u16, String)>>>,
    limits: OutboxLimits,
) {
    let mut ping = tokio::time::interval(limits.ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        let message = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            item = rx.recv() => match item {
                None => break,
                Some(Item::Frame(message, _bytes)) => message,
                Some(Item::Close(code, reason)) => {
                    close(&mut sink, code, reason, limits.close_timeout).await;
                    return;
                }
            },
            _ = ping.tick() => Message::Ping(Default::default()),
        };
        // Everything already queued goes out with this frame in one flush (one write where
        // the socket takes it), rather than a write per frame.
        let mut close_after = None;
        let sent = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            sent = async {
                sink.feed(message).await?;
                for _ in 0..BATCH {
                    match rx.try_recv() {
                        Ok(Item::Frame(message, _bytes)) => sink.feed(message).await?,
                        Ok(Item::Close(code, reason)) => {
                            close_after = Some((code, reason));
                            break;
                        }
                        Err(_) => break,
                    }
                }
                sink.flush().await
            } => sent,
        };
        if sent.is_err() {
            return;
        }
        if let Some((code, reason)) = close_after {
            close(&mut sink, code, reason, limits.close_timeout).await;
            return;
        }
    }
    // Discard what is queued: its byte shares return as the items drop.
    rx.close();
    while rx.try_recv().is_ok() {}
    let abort = abort.lock().ok().and_then(|mut a| a.take());
    match abort {
        Some((code, reason)) => close(&mut sink, code, reason, limits.close_timeout).await,
        None => {
            let _ = tokio::time::timeout(limits.close_timeout, sink.close()).await;
        }
    }
}

/// Sends a close frame, giving a jammed socket at most `timeout` to take it.
async fn close(
    sink: &mut SplitSink<WebSocket, Message>,
    code: u16,
    reason: String,
    timeout: Duration,
) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(timeout, async {
        let _ = sink.send(frame).await;
        let _ = sink.close().await;
    })
    .await;
}

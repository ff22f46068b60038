//! A session's outbound queue: bounded in frames and in bytes, and the writer task that drains
//! it, and the session's room feeds, into the socket.
//!
//! What goes out:
//! - **replies** (acks, errors, answers): queued; they wait for room, but only for the
//!   configured grace; a client that cannot take them in that time is closed with 4008;
//! - **ephemeral frames** (typing, presence): queued, never waiting; dropped when the queue is
//!   more than half full, so a slow reader loses them first and never a chat event; once it has
//!   room again it gets a `changed` presence frame per room that lost some, and each typist's
//!   last lost typing frame (one per room and typist, for at most `MISSED_TYPING_MAX` of them);
//! - **room events**: not queued. The writer pulls them from the session's followers (one per
//!   subscribed room) whenever the socket takes more, so an event costs one task wake-up, not
//!   two, and a subscription no task of its own. A follower that falls behind its room's feed
//!   reads the rest from the log: a slow reader holds no backlog in memory. A socket that takes
//!   nothing for the grace is closed with 4008, and the client resumes by sequence;
//! - **closes**: after the queued frames (drain, token expiry), or at once, discarding what is
//!   queued (too slow, flooding).
//!
//! Memory per session is bounded by the queue's byte limit (one frame larger than the limit
//! counts as the limit) plus the socket's write buffer and one batch of events. The queue
//! itself is a deque that grows with what is queued: an idle session's queue holds no buffer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use chat_model::{RoomId, UserId};
use serde_json::json;
use tungstenite::Utf8Bytes;

use crate::socket::{FrameWriter, GATHER};
use crate::source::Pick;
use futures::stream::{BoxStream, SelectAll};
use futures::task::AtomicWaker;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Semaphore, TryAcquireError};
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

/// A room's events for one session, as the writer pulls them: rendered frames, in order. It
/// ends when the subscription does.
pub(crate) type Source = BoxStream<'static, Pick>;

enum Item {
    /// A text frame holding one slot and `cost` bytes of the budget.
    Frame(Utf8Bytes, u32),
    /// Holds one slot.
    Close(u16, String),
    /// A room feed the writer pulls from after what is queued before it (so a `subscribed`
    /// reply precedes the room's events). Holds no room in the budget.
    Follow(Source),
}

/// What a session's producers and its writer share.
///
/// The writer looks at the flags and registers its waker on every turn, once per event it
/// sends: they are atomics, not locks (a `Notify` or a `CancellationToken` takes a lock each
/// time it is polled).
struct Queue {
    items: Mutex<VecDeque<Item>>,
    /// The writer's waker: woken when something is queued, the last producer leaves, or the
    /// session is stopped.
    writer: AtomicWaker,
    /// Set with every item queued (the writer clears it before it looks at the queue).
    queued: AtomicBool,
    /// Set when the session must stop at once, just before `stop` is cancelled.
    stopped: AtomicBool,
    /// For the other waiters on the stop (the session's read loop).
    stop: CancellationToken,
    /// Free room, in frames.
    slots: Semaphore,
    /// Free room, in bytes.
    bytes: Semaphore,
    /// `Outbox` handles alive; the writer ends once none is left and the queue is empty.
    producers: AtomicUsize,
    stats: Arc<EdgeStats>,
    /// Rooms whose presence frames were dropped, and how many: once the queue has room again,
    /// each gets one `changed` frame (the client reads who is online from the endpoint).
    missed_presence: Mutex<Vec<(RoomId, u32)>>,
    /// The last typing frame dropped for each room and typist, while no later one of theirs was
    /// queued: sent once the queue has room again, so that an indicator shown before the drop
    /// is ended (or shown) as it stands.
    missed_typing: Mutex<Vec<(RoomId, UserId, Utf8Bytes)>>,
    /// Set while `missed_presence` or `missed_typing` holds any.
    missed: AtomicBool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Item>> {
        // A deque of frames holds no invariant a panicking holder could break half-way.
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an item whose room (slot, bytes) is already taken.
    fn put(&self, item: Item) {
        if let Item::Frame(frame, _) = &item {
            let len = frame.len() as u64;
            let queued = self.stats.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
            if queued > self.stats.queued_bytes_peak.load(Ordering::Relaxed) {
                self.stats
                    .queued_bytes_peak
                    .fetch_max(queued, Ordering::Relaxed);
            }
        }
        self.lock().push_back(item);
        self.queued.store(true, Ordering::Release);
        self.writer.wake();
    }

    /// Stops the session at once: the writer closes, the producers are refused.
    fn halt(&self) {
        self.stopped.store(true, Ordering::Release);
        self.stop.cancel();
        self.writer.wake();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// The next item, its room given back.
    fn take(&self) -> Option<Item> {
        let item = {
            let mut items = self.lock();
            let item = items.pop_front();
            if items.is_empty() && items.capacity() > KEEP_CAPACITY {
                // A burst (a presence flush, a replay) is over: an idle session keeps no
                // buffer sized for it.
                *items = VecDeque::new();
            }
            item
        }?;
        match &item {
            Item::Frame(frame, cost) => {
                self.slots.add_permits(1);
                self.bytes.add_permits(*cost as usize);
                self.stats
                    .queued_bytes
                    .fetch_sub(frame.len() as u64, Ordering::Relaxed);
            }
            Item::Close(..) => self.slots.add_permits(1),
            Item::Follow(_) => {}
        }
        Some(item)
    }

    /// No more frames: producers are refused from now on, and what is queued is dropped.
    fn shut(&self) {
        self.slots.close();
        self.bytes.close();
        while self.take().is_some() {}
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.shut();
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
pub(crate) struct Outbox {
    queue: Arc<Queue>,
    limits: OutboxLimits,
    /// When the session must stop at once (`Queue::halt`): the close code and reason.
    abort: Arc<Mutex<Option<(u16, String)>>>,
}

/// Closes a session at once with a code, from outside its producers (see [`Outbox::abort`]).
pub(crate) struct Aborter {
    queue: Arc<Queue>,
    abort: Arc<Mutex<Option<(u16, String)>>>,
}

impl Aborter {
    pub(crate) fn abort(&self, code: u16, reason: &str) {
        abort_with(&self.abort, &self.queue, code, reason);
    }
}

/// Stops a session's writer at once (without a close code of its own: it closes the socket).
pub(crate) struct Stopper(Arc<Queue>);

impl Stopper {
    pub(crate) fn stop(&self) {
        self.0.halt();
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.queue.producers.fetch_add(1, Ordering::Relaxed);
        Outbox {
            queue: self.queue.clone(),
            limits: self.limits,
            abort: self.abort.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.queue.producers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.queue.writer.wake();
        }
    }
}

impl Outbox {
    /// A queue and the writer task that drains it into `sink`.
    pub(crate) fn start(
        sink: FrameWriter,
        limits: OutboxLimits,
        stats: Arc<EdgeStats>,
    ) -> (Outbox, tokio::task::JoinHandle<()>) {
        let queue = Arc::new(Queue {
            items: Mutex::new(VecDeque::new()),
            writer: AtomicWaker::new(),
            queued: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stop: CancellationToken::new(),
            slots: Semaphore::new(limits.frames.max(16)),
            bytes: Semaphore::new(limits.bytes.max(1)),
            producers: AtomicUsize::new(1),
            stats,
            missed_presence: Mutex::new(Vec::new()),
            missed_typing: Mutex::new(Vec::new()),
            missed: AtomicBool::new(false),
        });
        let outbox = Outbox {
            queue: queue.clone(),
            limits,
            abort: Arc::new(Mutex::new(None)),
        };
        // The writer is no producer: it ends when every producer is gone.
        let writer = tokio::spawn(write_loop(sink, queue, outbox.abort.clone(), limits));
        (outbox, writer)
    }

    /// Resolves when the session must stop at once (too slow, flooding, or told to).
    pub(crate) async fn stopped(&self) {
        self.queue.stop.cancelled().await
    }

    /// Stops the writer at once (without a close code of its own: it closes the socket).
    pub(crate) fn stopper(&self) -> Stopper {
        Stopper(self.queue.clone())
    }

    pub(crate) fn aborter(&self) -> Aborter {
        Aborter {
            queue: self.queue.clone(),
            abort: self.abort.clone(),
        }
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.queue.is_stopped()
    }

    /// Queues a chat frame (an event or a reply), waiting at most the grace for room.
    pub(crate) async fn push(&self, frame: impl Into<Utf8Bytes>) -> Result<(), Refused> {
        if self.is_stopped() {
            return Err(Refused::Closed);
        }
        let frame: Utf8Bytes = frame.into();
        let cost = self.cost(frame.len());
        let queue = &self.queue;
        // Room now (the usual case): no timer, no wait registered.
        match queue.bytes.try_acquire_many(cost) {
            Ok(bytes) => match queue.slots.try_acquire() {
                Ok(slot) => {
                    bytes.forget();
                    slot.forget();
                    queue.put(Item::Frame(frame, cost));
                    return Ok(());
                }
                Err(TryAcquireError::Closed) => return Err(Refused::Closed),
                Err(TryAcquireError::NoPermits) => {}
            },
            Err(TryAcquireError::Closed) => return Err(Refused::Closed),
            Err(TryAcquireError::NoPermits) => {}
        }
        let room = async {
            let bytes = queue.bytes.acquire_many(cost).await.ok()?;
            let slot = queue.slots.acquire().await.ok()?;
            bytes.forget();
            slot.forget();
            Some(())
        };
        let waited = tokio::select! {
            biased;
            _ = self.queue.stop.cancelled() => return Err(Refused::Closed),
            waited = tokio::time::timeout(self.limits.grace, room) => waited,
        };
        match waited {
            Ok(Some(())) => {
                queue.put(Item::Frame(frame, cost));
                Ok(())
            }
            Ok(None) => Err(Refused::Closed),
            Err(_) => {
                queue.stats.slow_closes.fetch_add(1, Ordering::Relaxed);
                self.abort(close_code::TOO_SLOW, TOO_SLOW_REASON);
                Err(Refused::TooSlow)
            }
        }
    }

    /// A handle for ephemeral frames that does not keep the session's writer going (a room's
    /// feed holds one per following session).
    pub(crate) fn ephemeral_handle(&self) -> EphemeralOutbox {
        EphemeralOutbox {
            queue: Arc::downgrade(&self.queue),
            limits: self.limits,
        }
    }

    /// Hands the writer a room's events to pull from, after what is queued now.
    pub(crate) fn follow(&self, source: Source) {
        if !self.is_stopped() {
            self.queue.put(Item::Follow(source));
        }
    }

    /// Closes the session after what is queued (waiting at most the grace for room).
    pub(crate) async fn close(&self, code: u16, reason: &str) {
        if self.is_stopped() {
            return;
        }
        let slot = tokio::time::timeout(self.limits.grace, self.queue.slots.acquire()).await;
        match slot {
            Ok(Ok(slot)) => {
                slot.forget();
                self.queue.put(Item::Close(code, reason.to_owned()));
            }
            Ok(Err(_)) => {}
            // Nothing moves: close at once instead.
            Err(_) => self.abort(code, reason),
        }
    }

    /// Closes the session at once: what is queued is discarded (the client resumes by
    /// sequence), the close frame goes out next.
    pub(crate) fn abort(&self, code: u16, reason: &str) {
        abort_with(&self.abort, &self.queue, code, reason);
    }

    fn cost(&self, len: usize) -> u32 {
        cost(&self.limits, len)
    }
}

/// The close reason of a client too slow to keep up.
const TOO_SLOW_REASON: &str = "too slow to keep up; resume by sequence";

/// Records the first close code asked for and stops the session at once.
fn abort_with(abort: &Mutex<Option<(u16, String)>>, queue: &Queue, code: u16, reason: &str) {
    if let Ok(mut abort) = abort.lock() {
        abort.get_or_insert_with(|| (code, reason.to_owned()));
    }
    queue.halt();
}

fn cost(limits: &OutboxLimits, len: usize) -> u32 {
    len.clamp(1, limits.bytes.max(1)).min(u32::MAX as usize) as u32
}

fn push_ephemeral(queue: &Queue, limits: &OutboxLimits, frame: Utf8Bytes) -> bool {
    let cost = cost(limits, frame.len());
    let half_free = queue.bytes.available_permits() >= limits.bytes / 2
        && queue.slots.available_permits() >= limits.frames.max(16) / 2;
    let queued = half_free
        && match (
            queue.bytes.try_acquire_many(cost),
            queue.slots.try_acquire(),
        ) {
            (Ok(bytes), Ok(slot)) => {
                bytes.forget();
                slot.forget();
                queue.put(Item::Frame(frame, cost));
                true
            }
            _ => false,
        };
    if !queued {
        queue
            .stats
            .ephemeral_dropped
            .fetch_add(1, Ordering::Relaxed);
    }
    queued
}

/// After a flush: a `changed` presence frame for each room whose presence frames were dropped,
/// and the last dropped typing frame of each typist, as far as the queue has room for them (the
/// rest wait for the next flush).
fn repair_ephemeral(queue: &Queue, limits: &OutboxLimits) {
    if !queue.missed.load(Ordering::Acquire) {
        return;
    }
    let (Ok(mut presence), Ok(mut typing)) =
        (queue.missed_presence.lock(), queue.missed_typing.lock())
    else {
        return;
    };
    presence.retain(|(room, dropped)| {
        let frame = json!({"type": "presence", "room": room, "changed": dropped});
        !push_ephemeral(queue, limits, frame.to_string().into())
    });
    typing.retain(|(_, _, frame)| !push_ephemeral(queue, limits, frame.clone()));
    queue.missed.store(
        !presence.is_empty() || !typing.is_empty(),
        Ordering::Release,
    );
}

/// Ephemeral frames into a session's queue, without keeping the session alive.
#[derive(Clone)]
pub(crate) struct EphemeralOutbox {
    queue: Weak<Queue>,
    limits: OutboxLimits,
}

impl EphemeralOutbox {
    /// Queues the frame if the session is still there and its queue at most half full.
    pub(crate) fn push(&self, frame: Utf8Bytes) {
        if let Some(queue) = self.queue.upgrade() {
            if !queue.slots.is_closed() {
                push_ephemeral(&queue, &self.limits, frame);
            }
        }
    }

    /// A typing frame of `room` about `typist`, as [`EphemeralOutbox::push`]; the last one
    /// dropped is sent once the queue has room, unless a later one of the typist's was queued.
    pub(crate) fn push_typing(&self, room: &RoomId, typist: &UserId, frame: Utf8Bytes) {
        let Some(queue) = self.queue.upgrade() else {
            return;
        };
        if queue.slots.is_closed() {
            return;
        }
        if !queue.missed.load(Ordering::Acquire) {
            if push_ephemeral(&queue, &self.limits, frame.clone()) {
                return;
            }
        } else if let Ok(mut missed) = queue.missed_typing.lock() {
            // Queued under the lock, so that a repair cannot queue an older frame after it.
            let queued = push_ephemeral(&queue, &self.limits, frame.clone());
            if queued {
                missed.retain(|(r, t, _)| !(r == room && t == typist));
                return;
            }
        }
        let Ok(mut missed) = queue.missed_typing.lock() else {
            return;
        };
        match missed.iter_mut().find(|(r, t, _)| r == room && t == typist) {
            Some((_, _, last)) => *last = frame,
            None => {
                if missed.len() >= MISSED_TYPING_MAX {
                    // The oldest goes: the client's own timeout ends that indicator.
                    missed.remove(0);
                }
                missed.push((room.clone(), typist.clone(), frame));
            }
        }
        queue.missed.store(true, Ordering::Release);
    }

    /// Nothing more of `room`: the frames dropped for it are not made up for (the session no
    /// longer follows it).
    pub(crate) fn forget(&self, room: &RoomId) {
        let Some(queue) = self.queue.upgrade() else {
            return;
        };
        if !queue.missed.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut presence) = queue.missed_presence.lock() {
            presence.retain(|(r, _)| r != room);
        }
        if let Ok(mut typing) = queue.missed_typing.lock() {
            typing.retain(|(r, _, _)| r != room);
        };
    }

    /// A presence frame of `room`, as [`EphemeralOutbox::push`]; one that is dropped is made up
    /// for by a `changed` frame once the queue has room.
    pub(crate) fn push_presence(&self, room: &RoomId, frame: Utf8Bytes) {
        let Some(queue) = self.queue.upgrade() else {
            return;
        };
        if queue.slots.is_closed() || push_ephemeral(&queue, &self.limits, frame) {
            return;
        }
        if let Ok(mut missed) = queue.missed_presence.lock() {
            match missed.iter_mut().find(|(r, _)| r == room) {
                Some((_, dropped)) => *dropped = dropped.saturating_add(1),
                None => missed.push((room.clone(), 1)),
            }
            queue.missed.store(true, Ordering::Release);
        };
    }
}

/// Typists whose last lost typing frame a session keeps, at most (its memory stays bounded
/// however many rooms and typists it follows).
const MISSED_TYPING_MAX: usize = 256;

/// Frames written together before one flush, at most.
const BATCH: usize = 64;

/// A queue emptied while holding room for more frames than this gives its buffer back.
const KEEP_CAPACITY: usize = 8;

/// The rooms a session's writer pulls events from. A session following one room (the usual
/// case) polls its source directly; more go into a `SelectAll`, which polls only those whose
/// feed has something but re-queues a source (an allocation) for every event it yields.
#[derive(Default)]
struct Sources {
    one: Option<Source>,
    many: SelectAll<Source>,
}

impl Sources {
    fn push(&mut self, source: Source) {
        if self.one.is_none() && self.many.is_empty() {
            self.one = Some(source);
            return;
        }
        if let Some(one) = self.one.take() {
            self.many.push(one);
        }
        self.many.push(source);
    }

    /// The next event of any room; pending while there is none (also with no room at all).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Pick> {
        if let Some(one) = self.one.as_mut() {
            return match one.poll_next_unpin(cx) {
                Poll::Ready(Some(frame)) => Poll::Ready(frame),
                Poll::Ready(None) => {
                    self.one = None;
                    Poll::Pending
                }
                Poll::Pending => Poll::Pending,
            };
        }
        match self.many.poll_next_unpin(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(frame),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    /// An event available now, if any (without a waker of the writer's: the writer polls again
    /// before it waits).
    fn ready_now(&mut self) -> Option<Pick> {
        let waker = futures::task::noop_waker_ref();
        match self.poll_next(&mut Context::from_waker(waker)) {
            Poll::Ready(frame) => Some(frame),
            Poll::Pending => None,
        }
    }
}

/// What woke an idle writer.
enum Wake {
    Stop,
    /// Something may be queued (or the last producer left).
    Queued,
    Event(Pick),
    Ping,
    /// The WebSocket layer wrote a pong or the reply to the client's close frame.
    Control,
}

/// Resolves when the session is stopped (the writer's own wait for it: see [`Queue`]).
fn halted(queue: &Queue, cx: &mut Context<'_>) -> Poll<()> {
    if queue.is_stopped() {
        return Poll::Ready(());
    }
    queue.writer.register(cx.waker());
    if queue.is_stopped() {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

/// Sends what the session queues and the events of its rooms, pings on an interval, and
/// closes the socket. (A function returning the future rather than an `async fn`, which would
/// hold its arguments twice for the session's whole life; the close, once at the end, is
/// boxed for the same reason.)
#[allow(clippy::manual_async_fn)] // deliberately not `async fn`: see above
fn write_loop(
    mut sink: FrameWriter,
    queue: Arc<Queue>,
    abort: Arc<Mutex<Option<(u16, String)>>>,
    limits: OutboxLimits,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let mut ping = tokio::time::interval(limits.ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        // The followed rooms: each is polled only when its feed has something (its own waker).
        let mut sources = Sources::default();
        let control = sink.control();
        loop {
            if queue.is_stopped() {
                break;
            }
            if sink.is_closed() {
                // The reply to the client's close frame went out: nothing more can.
                queue.shut();
                return;
            }
            // What is queued goes first: replies keep their place before the events that follow a
            // `subscribed`.
            match queue.take() {
                Some(Item::Frame(frame, _)) => sink.text(&frame),
                Some(Item::Close(code, reason)) => {
                    queue.shut();
                    Box::pin(close(&mut sink, code, reason, limits.close_timeout)).await;
                    return;
                }
                Some(Item::Follow(source)) => {
                    sources.push(source);
                    continue;
                }
                None if queue.producers.load(Ordering::Acquire) == 0 => break,
                None => {
                    let wake = std::future::poll_fn(|cx| {
                        if halted(&queue, cx).is_ready() {
                            return Poll::Ready(Wake::Stop);
                        }
                        // Registered above: a put after this look wakes the writer.
                        if queue.queued.load(Ordering::Acquire) {
                            queue.queued.store(false, Ordering::Release);
                            return Poll::Ready(Wake::Queued);
                        }
                        if queue.producers.load(Ordering::Acquire) == 0 {
                            return Poll::Ready(Wake::Queued);
                        }
                        if let Poll::Ready(frame) = sources.poll_next(cx) {
                            return Poll::Ready(Wake::Event(frame));
                        }
                        if control.poll_pending(cx).is_ready() {
                            return Poll::Ready(Wake::Control);
                        }
                        if ping.poll_tick(cx).is_ready() {
                            return Poll::Ready(Wake::Ping);
                        }
                        Poll::Pending
                    });
                    match wake.await {
                        Wake::Stop => break,
                        Wake::Queued => continue,
                        Wake::Event(pick) => sink.framed(pick.frame()),
                        Wake::Ping => sink.ping(),
                        Wake::Control => {}
                    }
                }
            }
            // Everything already waiting goes out with this frame in one flush (one write where the
            // socket takes it), rather than a write per frame.
            let mut close_after = None;
            for _ in 0..BATCH {
                if sink.gathered() >= GATHER {
                    break;
                }
                match queue.take() {
                    Some(Item::Frame(frame, _)) => sink.text(&frame),
                    Some(Item::Close(code, reason)) => {
                        close_after = Some((code, reason));
                        break;
                    }
                    Some(Item::Follow(source)) => sources.push(source),
                    None => match sources.ready_now() {
                        Some(pick) => sink.framed(pick.frame()),
                        None => break,
                    },
                }
            }
            // Pongs (and the reply to a client's close frame) go out with the batch.
            sink.take_control();
            let sent = {
                let mut flush = std::future::poll_fn(|cx| sink.poll_flush(cx));
                // A socket that takes the batch at once (the usual case) needs no timer.
                match (&mut flush).now_or_never() {
                    Some(sent) => Ok(sent),
                    None => tokio::select! {
                        biased;
                        _ = std::future::poll_fn(|cx| halted(&queue, cx)) => break,
                        sent = tokio::time::timeout(limits.grace, flush) => sent,
                    },
                }
            };
            match sent {
                Ok(Ok(())) => repair_ephemeral(&queue, &limits),
                Ok(Err(_)) => {
                    queue.shut();
                    return;
                }
                // The socket took nothing for the whole grace: the client is too slow to keep up.
                // It resumes by sequence when it reconnects.
                Err(_) => {
                    queue.stats.slow_closes.fetch_add(1, Ordering::Relaxed);
                    abort_with(&abort, &queue, close_code::TOO_SLOW, TOO_SLOW_REASON);
                    break;
                }
            }
            if let Some((code, reason)) = close_after {
                queue.shut();
                Box::pin(close(&mut sink, code, reason, limits.close_timeout)).await;
                return;
            }
        }
        // Discard what is queued: the client resumes by sequence.
        drop(sources);
        queue.shut();
        let abort = abort.lock().ok().and_then(|mut a| a.take());
        match abort {
            Some((code, reason)) => {
                Box::pin(close(&mut sink, code, reason, limits.close_timeout)).await
            }
            None => {
                // The reply to the client's close frame, if it closed; else a close frame of ours.
                sink.take_control();
                sink.close_without_code();
                let _ = tokio::time::timeout(limits.close_timeout, sink.flush()).await;
            }
        }
    }
}

/// Sends a close frame, giving a jammed socket at most `timeout` to take it (and what was
/// gathered before it).
async fn close(sink: &mut FrameWriter, code: u16, reason: String, timeout: Duration) {
    sink.close(code, &reason);
    let _ = tokio::time::timeout(timeout, sink.flush()).await;
}

//! Fan-out of rooms' live events to this edge's sessions.
//!
//! One NATS subscription per room per edge, shared by every local session following the room
//! (reference-counted: the last follower to leave releases it). Each event is rendered to its
//! JSON frame once, and the frame's bytes are shared by all sessions.
//!
//! A follower first reads what it missed from the log, then follows the shared feed, deduping
//! by sequence at the seam. Whenever it falls behind the feed (a sequence jump, or a lagged
//! broadcast) it reads the missing range from the log again, so every follower sees every event
//! once, in order, whatever its speed.
//!
//! The feed also carries the room's typing indicators (see [`crate::typing`]): the same task
//! follows the room's typing subject, so a user's message and the end of their indicator are
//! decided in one place. Ephemeral frames (typing, presence) go straight into the queues of the
//! sessions following the room (see [`Follower::listen`]), dropped where a queue is half full.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use chat_log::{LogError, RangeReader, RawEntry, RoomBounds, RoomLog};
use chat_model::{RoomId, UserId};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::task::JoinHandle;
use tokio_util::sync::ReusableBoxFuture;
use tungstenite::Utf8Bytes;

use crate::frame::Framed;
use crate::outbox::EphemeralOutbox;
use crate::render::delivery;
use crate::typing::{self, Ephemeral, Signal, Typists};

/// One event as every follower receives it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub seq: u64,
    /// The rendered `event` frame, framed for the socket once for every session.
    pub frame: Framed,
    /// For a `member_left` event: who left (their sessions stop following the room after it).
    pub left: Option<UserId>,
    /// For a `message` event: its author (their typing indicator ends with it).
    pub message_by: Option<UserId>,
    /// Who appended the event (`None` for an entry this build cannot decode).
    pub author: Option<UserId>,
    /// For a message or an edit: the frame a reader who blocks `author` gets instead, rendered
    /// once like `frame` (see `Delivery::frame_for`).
    pub hidden: Option<Framed>,
    /// When it was rendered: the time a session's block list is judged fresh at.
    pub rendered: std::time::Instant,
}

/// This edge's room feeds.
pub struct Hub {
    log: RoomLog,
    /// Live feeds by room; a feed lives while some follower holds it.
    feeds: Mutex<HashMap<RoomId, Weak<Feed>>>,
    /// Frames buffered per feed for followers that are a little behind.
    capacity: usize,
    /// A typing indicator without a renewal ends after this long.
    typing_expiry: Duration,
}

/// One room's live feed: the NATS subscription and the task that renders and broadcasts.
/// Deliveries are shared (`Arc`): a follower's copy costs one reference, not one per field.
struct Feed {
    tx: broadcast::Sender<Arc<Delivery>>,
    /// Where the room's ephemeral frames go: the sessions following it here.
    listeners: Arc<Listeners>,
    /// Stops the subscription when the last follower drops the feed.
    task: JoinHandle<()>,
}

/// The sessions that take a room's ephemeral frames, by a key their follower holds.
struct Listeners {
    room: RoomId,
    by_key: Mutex<Listening>,
}

#[derive(Default)]
struct Listening {
    next_key: u64,
    sessions: HashMap<u64, (UserId, EphemeralOutbox)>,
}

impl Listeners {
    fn new(room: RoomId) -> Listeners {
        Listeners {
            room,
            by_key: Mutex::new(Listening::default()),
        }
    }

    /// Queues a typing frame for every listening session but those of the typist (lossy: a
    /// session whose queue is half full drops it, and gets the typist's last dropped one once
    /// it has room again). False when nobody listens.
    fn pass_typing(&self, e: &Ephemeral) -> bool {
        let Ok(listening) = self.by_key.lock() else {
            return false;
        };
        for (user, out) in listening.sessions.values() {
            match &e.exclude {
                Some(typist) if typist == user => {}
                Some(typist) => out.push_typing(&self.room, typist, e.frame.clone()),
                None => out.push(e.frame.clone()),
            }
        }
        !listening.sessions.is_empty()
    }

    /// Queues a presence frame of `room` for every listening session (lossy, and a session
    /// that drops one is told later that presence changed). False when nobody listens.
    fn pass_presence(&self, room: &RoomId, frame: &Utf8Bytes) -> bool {
        let Ok(listening) = self.by_key.lock() else {
            return false;
        };
        for (_, out) in listening.sessions.values() {
            out.push_presence(room, frame.clone());
        }
        !listening.sessions.is_empty()
    }

    fn add(&self, user: UserId, out: EphemeralOutbox) -> u64 {
        let Ok(mut listening) = self.by_key.lock() else {
            return u64::MAX;
        };
        listening.next_key += 1;
        let key = listening.next_key;
        listening.sessions.insert(key, (user, out));
        key
    }

    fn remove(&self, key: u64) {
        let removed = match self.by_key.lock() {
            Ok(mut listening) => listening.sessions.remove(&key),
            Err(_) => None,
        };
        if let Some((_, out)) = removed {
            out.forget(&self.room);
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hub {
    /// A hub over `log`, buffering up to `capacity` frames per room for slow followers.
    pub fn new(log: RoomLog, capacity: usize) -> Arc<Hub> {
        Hub::with_typing_expiry(log, capacity, Duration::from_secs(5))
    }

    /// A hub whose typing indicators end after `typing_expiry` without a renewal.
    pub fn with_typing_expiry(log: RoomLog, capacity: usize, typing_expiry: Duration) -> Arc<Hub> {
        Arc::new(Hub {
            log,
            feeds: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            typing_expiry,
        })
    }

    /// Tells every edge following `room` that `user` is (or stopped) typing. Core NATS: at most
    /// once, never stored.
    pub async fn publish_typing(
        &self,
        room: &RoomId,
        user: &UserId,
        active: bool,
    ) -> Result<(), LogError> {
        let signal = Signal {
            user: user.clone(),
            active,
        };
        let payload = serde_json::to_vec(&signal).unwrap_or_default();
        self.log
            .client()
            .publish(self.typing_subject(room), payload.into())
            .await
            .map_err(|e| LogError::Unavailable {
                room: room.clone(),
                op: "typing",
                reason: e.to_string(),
            })
    }

    /// The room log this hub follows.
    pub fn log(&self) -> &RoomLog {
        &self.log
    }

    /// Hands a presence frame to the sessions following `room` on this edge (lossy: a session
    /// that is behind drops it, and gets a `changed` frame for the room once it has room
    /// again). False when nobody here follows the room.
    pub(crate) fn presence(&self, room: &RoomId, frame: Utf8Bytes) -> bool {
        self.existing(room)
            .is_some_and(|feed| feed.listeners.pass_presence(room, &frame))
    }

    fn typing_subject(&self, room: &RoomId) -> String {
        format!("{}.typing.{}", self.log.config().prefix, room)
    }

    /// Follows `room` from after `after`: every event with a greater sequence, once, in order.
    pub async fn follow(&self, room: &RoomId, after: u64) -> Result<Follower, LogError> {
        let feed = self.feed(room).await?;
        // Subscribe to the feed before reading the log, so nothing falls between the two.
        let rx = feed.tx.subscribe();
        let catch_up = Some(self.log.read_range(room, after + 1, u64::MAX));
        Ok(Follower::new(
            self.log.clone(),
            room,
            feed,
            rx,
            after,
            catch_up,
        ))
    }

    /// Follows `room` from after `from` (its head when `None`), and says what the log held when
    /// the follower began: the first and last sequences, read once the follower listens to the
    /// room's feed (so what comes after them reaches it live, and the catch-up needs no other
    /// request for the head).
    pub async fn follow_from(
        &self,
        room: &RoomId,
        from: Option<u64>,
    ) -> Result<(Follower, RoomBounds), LogError> {
        let feed = self.feed(room).await?;
        let rx = feed.tx.subscribe();
        let bounds = self.log.bounds(room).await?;
        let after = from.unwrap_or(bounds.last);
        let catch_up =
            (after < bounds.last).then(|| self.log.read_known_range(room, after + 1, bounds.last));
        let follower = Follower::new(self.log.clone(), room, feed, rx, after, catch_up);
        Ok((follower, bounds))
    }

    /// How many rooms have a live feed on this edge.
    pub fn live_rooms(&self) -> usize {
        self.feeds
            .lock()
            .map(|f| f.values().filter(|w| w.strong_count() > 0).count())
            .unwrap_or(0)
    }

    async fn feed(&self, room: &RoomId) -> Result<Arc<Feed>, LogError> {
        if let Some(feed) = self.existing(room) {
            return Ok(feed);
        }
        // Start a feed from the current head; followers read anything older from the log.
        let head = self.log.head(room).await?;
        let live = self.log.subscribe_live(room, head).await?;
        let typing = self
            .log
            .client()
            .subscribe(self.typing_subject(room))
            .await
            .map_err(|e| LogError::Unavailable {
                room: room.clone(),
                op: "follow typing",
                reason: e.to_string(),
            })?;
        let mut feeds = self.feeds.lock().map_err(|_| poisoned(room))?;
        // Another session may have started one meanwhile: use it (ours is dropped unused).
        if let Some(feed) = feeds.get(room).and_then(Weak::upgrade) {
            return Ok(feed);
        }
        let (tx, _) = broadcast::channel(self.capacity);
        let listeners = Arc::new(Listeners::new(room.clone()));
        let task = tokio::spawn(run_feed(
            room.clone(),
            live,
            tx.clone(),
            typing,
            listeners.clone(),
            Typists::new(self.typing_expiry),
        ));
        let feed = Arc::new(Feed {
            tx,
            listeners,
            task,
        });
        feeds.retain(|_, weak| weak.strong_count() > 0);
        feeds.insert(room.clone(), Arc::downgrade(&feed));
        Ok(feed)
    }

    fn existing(&self, room: &RoomId) -> Option<Arc<Feed>> {
        self.feeds.lock().ok()?.get(room).and_then(Weak::upgrade)
    }
}

fn poisoned(room: &RoomId) -> LogError {
    LogError::Unavailable {
        room: room.clone(),
        op: "follow",
        reason: "hub lock poisoned".to_owned(),
    }
}

/// Live events rendered before any of them is broadcast, at most.
const BURST: usize = 64;

/// Renders each live event once and broadcasts it; retries while NATS is away. Decides the
/// room's typing indicators alongside.
async fn run_feed(
    room: RoomId,
    live: chat_log::LiveSubscription,
    tx: broadcast::Sender<Arc<Delivery>>,
    mut typing: async_nats::Subscriber,
    listeners: Arc<Listeners>,
    mut typists: Typists,
) {
    // As a stream, so that a typing signal or an expiry taking its turn in the `select!` below
    // does not cancel a head check or a range read the subscription has under way.
    let mut live = futures::stream::unfold(live, |mut live| async move {
        let entry = live.next().await;
        Some((entry, live))
    })
    .boxed();
    let mut pause = Duration::from_millis(50);
    let mut typing_open = true;
    // Nobody receiving right now is fine: followers catch up from the log, and typing is
    // ephemeral.
    let show = |user: &UserId, active: bool| {
        listeners.pass_typing(&typing::frame(&room, user, active));
    };
    loop {
        let due = typists.next_due();
        tokio::select! {
            message = typing.next(), if typing_open => match message {
                Some(message) => decide_typing(&room, &mut typists, &message, &show),
                None => typing_open = false,
            },
            Some(entry) = live.next() => match entry {
                Ok(entry) => {
                    pause = Duration::from_millis(50);
                    // Render what else already arrived before broadcasting any of it: the
                    // sessions woken by the first then find the whole burst, and write it in one
                    // batch rather than one write per event.
                    // A message ends its author's indicator as it is rendered, and the typing
                    // signals that reached this edge before an event are decided before it: a
                    // signal published before a message arrives before the message's
                    // republished event, and a renewal sent just before the message would
                    // otherwise show the indicator again after the message ended it.
                    drain_typing(&room, &mut typing, &mut typing_open, &mut typists, &show);
                    let first = Arc::new(delivery(&room, &entry));
                    end_typing(&mut typists, &first, &show);
                    let mut burst = vec![first];
                    while burst.len() < BURST {
                        drain_typing(&room, &mut typing, &mut typing_open, &mut typists, &show);
                        match live.next().now_or_never() {
                            Some(Some(Ok(entry))) => {
                                let next = Arc::new(delivery(&room, &entry));
                                end_typing(&mut typists, &next, &show);
                                burst.push(next);
                            }
                            // An error is met again (and handled) at the next wait.
                            Some(Some(Err(_)) | None) | None => break,
                        }
                    }
                    for delivery in burst {
                        let _ = tx.send(delivery);
                    }
                }
                Err(e) => {
                    tracing::warn!(room = %room, error = %e, "live feed interrupted; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                for (user, active) in typists.tick(tokio::time::Instant::now()) {
                    show(&user, active);
                }
            }
        }
    }
}

/// A typing signal from some edge, decided for this edge's sessions.
fn decide_typing(
    room: &RoomId,
    typists: &mut Typists,
    message: &async_nats::Message,
    show: &impl Fn(&UserId, bool),
) {
    match serde_json::from_slice::<Signal>(&message.payload) {
        Ok(signal) => {
            if let Some(active) = typists.signal(&signal, tokio::time::Instant::now()) {
                show(&signal.user, active);
            }
        }
        Err(e) => tracing::debug!(room = %room, error = %e, "malformed typing signal"),
    }
}

/// Typing signals waiting to be decided, at most [`TYPING_PER_EVENT`] of them (so a flood of
/// signals cannot hold the room's events back).
fn drain_typing(
    room: &RoomId,
    typing: &mut async_nats::Subscriber,
    open: &mut bool,
    typists: &mut Typists,
    show: &impl Fn(&UserId, bool),
) {
    for _ in 0..TYPING_PER_EVENT {
        if !*open {
            return;
        }
        match typing.next().now_or_never() {
            Some(Some(message)) => decide_typing(room, typists, &message, show),
            Some(None) => *open = false,
            None => return,
        }
    }
}

/// Typing signals decided before each live event, at most.
const TYPING_PER_EVENT: usize = 256;

/// A message ends its author's indicator.
fn end_typing(typists: &mut Typists, delivery: &Delivery, show: &impl Fn(&UserId, bool)) {
    if let Some(user) = &delivery.message_by {
        if typists.sent(user) {
            show(user, false);
        }
    }
}

/// The live feed's receiver while a follower waits on it: the pending receive owns the receiver,
/// in a box reused from one wait to the next.
type LiveRecv = ReusableBoxFuture<
    'static,
    (
        Result<Arc<Delivery>, RecvError>,
        broadcast::Receiver<Arc<Delivery>>,
    ),
>;

async fn receive(
    mut rx: broadcast::Receiver<Arc<Delivery>>,
) -> (
    Result<Arc<Delivery>, RecvError>,
    broadcast::Receiver<Arc<Delivery>>,
) {
    let received = rx.recv().await;
    (received, rx)
}

/// A range being read from the log, as a stream (boxed: reading the log is a large future,
/// needed only while catching up; a follower waiting on the live feed keeps no room for it).
type CatchUp = BoxStream<'static, Result<RawEntry, LogError>>;

fn catch_up(reader: RangeReader) -> CatchUp {
    futures::stream::unfold(reader, |mut reader| async move {
        let entry = reader.next().await?;
        Some((entry, reader))
    })
    .boxed()
}

/// One session's view of a room: every event after its starting point, once, in order.
pub struct Follower {
    log: RoomLog,
    room: RoomId,
    /// Keeps the room's feed (and its NATS subscription) alive.
    _feed: Arc<Feed>,
    /// The feed's receiver, held here while events are there to take (each taken without a
    /// future); `None` while a wait in `live` holds it.
    rx: Option<broadcast::Receiver<Arc<Delivery>>>,
    /// The wait for the feed's next event (a finished one while `rx` is here).
    live: LiveRecv,
    /// The last sequence handed out.
    delivered: u64,
    /// A range being read from the log (the initial catch-up, or a gap).
    catch_up: Option<CatchUp>,
    /// This follower's session takes the room's ephemeral frames under this key.
    listening: Option<u64>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

impl Follower {
    fn new(
        log: RoomLog,
        room: &RoomId,
        feed: Arc<Feed>,
        rx: broadcast::Receiver<Arc<Delivery>>,
        after: u64,
        reader: Option<RangeReader>,
    ) -> Follower {
        Follower {
            log,
            room: room.clone(),
            _feed: feed,
            rx: Some(rx),
            live: ReusableBoxFuture::new(std::future::pending()),
            delivered: after,
            catch_up: reader.map(catch_up),
            listening: None,
        }
    }

    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// The last sequence handed out.
    pub fn position(&self) -> u64 {
        self.delivered
    }

    /// From now until this follower is dropped, the room's ephemeral frames (typing, presence)
    /// go to `out`, but not those that exclude `user`.
    pub(crate) fn listen(&mut self, user: UserId, out: EphemeralOutbox) {
        self.stop_listening();
        self.listening = Some(self._feed.listeners.add(user, out));
    }

    /// From now on, no ephemeral frames of the room for this follower's session (it is no
    /// longer a member: they are for members only).
    pub(crate) fn stop_listening(&mut self) {
        if let Some(key) = self.listening.take() {
            self._feed.listeners.remove(key);
        }
    }

    /// The next event. Cancel-safe; after an error, calling again resumes where it was.
    pub async fn next(&mut self) -> Result<Arc<Delivery>, LogError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Follower::next`], polled: a session's writer pulls events this way, without a future
    /// made per event.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Arc<Delivery>, LogError>> {
        loop {
            if let Some(reader) = self.catch_up.as_mut() {
                match ready!(reader.poll_next_unpin(cx)) {
                    Some(Ok(entry)) => {
                        if entry.seq > self.delivered {
                            self.delivered = entry.seq;
                            return Poll::Ready(Ok(Arc::new(delivery(&self.room, &entry))));
                        }
                        continue;
                    }
                    Some(Err(e)) => {
                        // Read again from where we are next time.
                        self.catch_up = Some(self.read_from(u64::MAX));
                        return Poll::Ready(Err(e));
                    }
                    None => self.catch_up = None,
                }
            }
            match ready!(self.poll_live(cx)) {
                Ok(d) if d.seq <= self.delivered => continue,
                Ok(d) if d.seq == self.delivered + 1 => {
                    self.delivered = d.seq;
                    return Poll::Ready(Ok(d));
                }
                // Behind the feed: read what lies between from the log (this one included).
                Ok(d) => self.catch_up = Some(self.read_from(d.seq)),
                Err(RecvError::Lagged(_)) => self.catch_up = Some(self.read_from(u64::MAX)),
                Err(RecvError::Closed) => {
                    return Poll::Ready(Err(LogError::Unavailable {
                        room: self.room.clone(),
                        op: "follow",
                        reason: "room feed stopped".to_owned(),
                    }))
                }
            }
        }
    }

    /// The feed's next event: taken at once while there are some (a burst costs no future per
    /// event), else waited for with the receiver moved into `live`.
    fn poll_live(&mut self, cx: &mut Context<'_>) -> Poll<Result<Arc<Delivery>, RecvError>> {
        if let Some(rx) = self.rx.as_mut() {
            match rx.try_recv() {
                Ok(delivery) => return Poll::Ready(Ok(delivery)),
                Err(TryRecvError::Lagged(n)) => return Poll::Ready(Err(RecvError::Lagged(n))),
                Err(TryRecvError::Closed) => return Poll::Ready(Err(RecvError::Closed)),
                Err(TryRecvError::Empty) => {}
            }
            if let Some(rx) = self.rx.take() {
                self.live.set(receive(rx));
            }
        }
        let (received, rx) = ready!(self.live.poll(cx));
        self.rx = Some(rx);
        Poll::Ready(received)
    }

    /// The log from after the last event handed out, up to `to`.
    fn read_from(&self, to: u64) -> CatchUp {
        catch_up(self.log.read_range(&self.room, self.delivered + 1, to))
    }
}

//! The room service: what a client may do to a room, checked against the room as its log
//! defines it, appended to the log; and what it may read, from the store.
//!
//! Both the HTTP API and the WebSocket edge go through [`Rooms`], so a rule holds the same way
//! whichever door a request comes in by.
//!
//! - **Membership comes from the log.** A room's state is the store's snapshot (as of its
//!   checkpoint) with every later log entry folded in; it is cached for a short time
//!   ([`RoomsConfig::membership_ttl`]), and a refusal is always re-checked against the log
//!   before it is given, so a new member is never refused by a stale cache. This process's own
//!   appends, acked right after the cached state's head, renew it without a read (see
//!   `Rooms::appended`).
//! - **Idempotency.** The client's id is the `Nats-Msg-Id`: within the stream's duplicate
//!   window JetStream answers a resend with the original sequence. Past the window the store's
//!   (room, id) index answers it, which holds while projection lag stays below the window; when
//!   it does not (or no projector has reported for longer than the window, or, in a process
//!   without a projector of its own, none ever has), appends are refused with `unavailable`
//!   rather than risk a duplicate.
//! - **Read-your-writes.** History the store does not hold yet is read from the log.
//! - **Roles.** The creator is the room's admin: removes members, deletes any message, makes
//!   the room read-only (`room_updated`); while it is, only the admin posts.
//! - **Blocking.** Block lists live in the user log ([`chat_log::UserLog`]), cached per process
//!   and invalidated by the log's change notices (see `blocks.rs`). A direct room is closed to
//!   posts while either of its pair blocks the other; elsewhere, a reader who blocks an author
//!   gets that author's messages as `hidden` placeholders and does not count them as unread.
#![forbid(unsafe_code)]

mod blocks;
mod error;
mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chat_log::{LogError, RoomLog, UserLog, UserLogError};
use chat_model::{
    decide_block_change, decide_direct_contact, direct_room_id, BlockChange, BlockEvent, Event,
    EventBody, PairBlocks, Refusal, RoomId, RoomKind, RoomState, UserId,
};
use chat_store::{
    add_receipts, apply_unstored, authors, hide_blocked_authors, render_entry, unstored_deletes,
    wants_receipts, ChangeRights, MemberCursors, Page, PageQuery, ReceiptIndex, Receipts,
    RoomSummary, Store, ThreadPage,
};
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

use crate::blocks::{BlockCache, Lookup};

pub use error::RoomError;
pub use validate::{validate_emoji, validate_text, Limits};

/// Distinct cursor targets of one `delivered` flush checked for crossing a message (one store
/// read each); targets past these are appended unchecked.
const RECEIPT_LOOKUPS: usize = 16;

/// How often a block-list change is re-decided after losing a race before giving up.
const CHANGE_ATTEMPTS: u32 = 16;

/// How far behind the log the store may be for a page to wait for the projector: a commit or
/// two of live events. Further behind, the projector is catching up a backlog and a page would
/// only wait out `history_wait` before reading the log anyway.
const COMMIT_AWAY: u64 = 4_000;

/// The most events not yet stored that a history or thread page reads from the log to apply
/// their edits and deletes to the page (further behind, a page waits for the projector or
/// answers `unavailable`), and that a refused append reads looking for an original with its id.
const UNSTORED_SCAN: u64 = 1_000;

/// Settings of the room service.
#[derive(Debug, Clone)]
pub struct RoomsConfig {
    /// How long a room's cached membership is trusted before it is re-read from the log.
    pub membership_ttl: Duration,
    /// The streams' duplicate window: past it, the store's id index must answer resends.
    pub dedup_window: Duration,
    /// How long to wait for the projector to store a membership change before answering, so
    /// that the room lists the next request reads include it.
    pub projection_wait: Duration,
    /// Text and emoji limits.
    pub limits: Limits,
    /// How long a cached block list is trusted without a change notice: the safety net for a
    /// notice lost without a reconnect or slow-consumer report (which drop the whole cache).
    pub block_list_ttl: Duration,
    /// The commits of a projector writing the store in this process: history and thread pages
    /// then wait (at most `history_wait`) for the events the log already has, so that what a
    /// client just did (an edit, a delete, a reply) shows as the store renders it.
    pub commits: Option<Arc<chat_store::Commits>>,
    /// How long a history or thread page waits for the projector in this process.
    pub history_wait: Duration,
    /// Whether a projector runs in this process. Without one, appends wait until some
    /// projector has reported to the store: until then nothing says the store's id index
    /// answers resends past the duplicate window (it may be a store no projector fills).
    pub projector_here: bool,
    /// Rooms (streams of the NATS account) past which no new room is created; 0: no cap. Each
    /// room is a stream, and a server holds tens of thousands at most.
    pub max_rooms: u64,
    /// A user who is a member of this many rooms creates no more; 0: no cap. With `max_rooms`
    /// it keeps one user from taking every room there can be.
    pub max_rooms_per_user: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            membership_ttl: Duration::from_millis(250),
            dedup_window: Duration::from_secs(600),
            projection_wait: Duration::from_secs(2),
            limits: Limits::default(),
            block_list_ttl: Duration::from_secs(10),
            commits: None,
            history_wait: Duration::from_millis(250),
            projector_here: true,
            max_rooms: 0,
            max_rooms_per_user: 0,
        }
    }
}

/// The outcome of an append, as an `ack` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
    pub ts: i64,
    pub duplicate: bool,
}

/// The outcome of creating a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub room: RoomId,
    pub seq: u64,
    /// False when the direct room of this pair already existed.
    pub new: bool,
}

/// A block list one reader keeps between lookups (see [`Rooms::blocked_held`]); the default
/// holds nothing yet.
#[derive(Default)]
pub struct HeldBlocks {
    blocked: Arc<HashSet<UserId>>,
    /// The cache's change counter when it was looked up.
    changes: u64,
    /// When the cache would stop answering with it; `None`: never looked up.
    until: Option<Instant>,
}

impl HeldBlocks {
    /// The block list last looked up, however old: what a reader falls back on while a new
    /// lookup fails. `None` if none ever succeeded.
    pub fn last_known(&self) -> Option<&HashSet<UserId>> {
        self.until.is_some().then_some(&*self.blocked)
    }
}

/// An append checked against the room's rules, not sent yet (see [`Rooms::decide_append`]).
#[derive(Debug)]
pub enum DecidedAppend {
    /// The id is already in the room (the store's index knows it): nothing to send.
    Known(Ack),
    /// The event to append.
    Event { room: RoomId, event: Event },
}

/// An append sent to the log, its outcome not known yet (see [`Rooms::send_append`]).
pub enum PendingAck {
    Known(Ack),
    Sent {
        log: RoomLog,
        room: RoomId,
        /// The event's time (a duplicate's is read back from the log).
        ts: i64,
        pending: chat_log::PendingAppend,
        /// Told of the new sequence if the event changes nothing of the room's state (see
        /// [`Rooms::appended`]).
        rooms: Option<Weak<Rooms>>,
        /// Just before the event was sent.
        sent: Instant,
    },
}

impl PendingAck {
    /// Waits for the log's answer: the `ack` to give.
    pub async fn ack(self) -> Result<Ack, RoomError> {
        let (log, room, ts, pending, rooms, sent) = match self {
            PendingAck::Known(ack) => return Ok(ack),
            PendingAck::Sent {
                log,
                room,
                ts,
                pending,
                rooms,
                sent,
            } => (log, room, ts, pending, rooms, sent),
        };
        let appended = pending.appended().await?;
        if !appended.duplicate {
            if let Some(rooms) = rooms.and_then(|r| r.upgrade()) {
                rooms.appended(&room, appended.seq, sent);
            }
            return Ok(Ack {
                seq: appended.seq,
                ts,
                duplicate: false,
            });
        }
        // A resend within the window: the original's time, from the log.
        let original = log
            .get(&room, appended.seq)
            .await?
            .and_then(|entry| entry.decode().ok());
        Ok(Ack {
            seq: appended.seq,
            ts: original.map_or(ts, |e| e.ts),
            duplicate: true,
        })
    }
}

struct Cached {
    state: Arc<RoomState>,
    /// The log up to here is folded into `state`: the entries after `state.head` change nothing
    /// of it (they are this process's own appends, see [`Rooms::appended`]).
    head: u64,
    /// The state is the room's as the log held it at this time.
    checked: Instant,
    /// A background refresh of this entry is under way (see `Rooms::cached_renewing`).
    renewing: bool,
    /// This process's own appends acked past a gap after `head` (acks of concurrent appends
    /// are not seen in sequence order), with when each was sent: folded in once the gap closes.
    ahead: BTreeMap<u64, Instant>,
}

/// The most acks past a gap a cached room state keeps (see [`Cached::ahead`]); a gap that stays
/// open longer is left to the TTL renewal.
const MAX_AHEAD: usize = 4_096;

impl Cached {
    /// Folds in the entries of `ahead` that now follow `head`, and forgets those behind it.
    fn advance(&mut self) {
        while let Some(entry) = self.ahead.first_entry() {
            let seq = *entry.key();
            if seq > self.head + 1 {
                break;
            }
            let sent = entry.remove();
            if seq == self.head + 1 {
                self.head = seq;
                self.checked = self.checked.max(sent);
            }
        }
    }
}

/// What a user asks to append to a room (the client frames that append).
#[derive(Debug, Clone)]
pub enum Command {
    Send {
        text: String,
        thread: Option<u64>,
        reply_to: Option<u64>,
    },
    Edit {
        target: u64,
        text: String,
    },
    Delete {
        target: u64,
    },
    React {
        target: u64,
        emoji: String,
        on: bool,
    },
}

impl Command {
    /// The client frame's type: `send`, `edit`, `delete` or `react`.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Send { .. } => "send",
            Command::Edit { .. } => "edit",
            Command::Delete { .. } => "delete",
            Command::React { .. } => "react",
        }
    }
}

/// A refresh of a room's state that failed for want of NATS, and when it ended.
struct Failed {
    at: Instant,
    error: RoomError,
}

/// The room service. Cheap to share (`Arc`).
pub struct Rooms {
    log: RoomLog,
    /// Block lists (and whatever else belongs to a user rather than a room).
    users: UserLog,
    store: Arc<dyn Store>,
    config: RoomsConfig,
    /// Room states folded from the log, by room.
    cache: Mutex<HashMap<RoomId, Cached>>,
    /// One refresh at a time per room: concurrent callers wait for it and share its result.
    refreshing: Mutex<HashMap<RoomId, Arc<tokio::sync::Mutex<Option<Failed>>>>>,
    /// Block lists read recently, kept current by the invalidator.
    blocks: Arc<BlockCache>,
    /// Follows the user log's change notices; stopped when the service is dropped.
    invalidator: Option<JoinHandle<()>>,
    /// The last projector lag check: when, and whether appends were safe then.
    lag_check: Mutex<LagCheck>,
    /// This service, for the background refreshes it starts.
    this: Weak<Rooms>,
    /// Background refreshes of cached room states; aborted when the service is dropped.
    renewals: Mutex<JoinSet<()>>,
}

/// The projector lag check's last result, shared by every append.
#[derive(Default)]
struct LagCheck {
    /// When it was made, and whether appends were safe then.
    last: Option<(Instant, Result<(), String>)>,
    /// Someone is asking the store again (the others go on with `last` meanwhile).
    asking: bool,
}

impl Drop for Rooms {
    fn drop(&mut self) {
        if let Some(task) = self.invalidator.take() {
            task.abort();
        }
    }
}

impl Rooms {
    /// The room service over `log` and `store`. Called inside a Tokio runtime it starts the task
    /// that keeps cached block lists current (without one, they expire by TTL only).
    pub fn new(log: RoomLog, store: Arc<dyn Store>, config: RoomsConfig) -> Arc<Rooms> {
        let users = UserLog::new(&log);
        let blocks = Arc::new(BlockCache::new(config.block_list_ttl));
        let invalidator = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            runtime.spawn(blocks::run_invalidator(
                users.clone(),
                Arc::downgrade(&blocks),
            ))
        });
        Arc::new_cyclic(|this| Rooms {
            log,
            users,
            store,
            config,
            cache: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(HashMap::new()),
            blocks,
            invalidator,
            lag_check: Mutex::new(LagCheck::default()),
            this: this.clone(),
            renewals: Mutex::new(JoinSet::new()),
        })
    }

    pub fn log(&self) -> &RoomLog {
        &self.log
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn config(&self) -> &RoomsConfig {
        &self.config
    }

    /// The room's state, at most `membership_ttl` old.
    pub async fn state(&self, room: &RoomId) -> Result<RoomState, RoomError> {
        Ok(RoomState::clone(&*self.shared_state(room).await?))
    }

    /// `state` without copying it.
    async fn shared_state(&self, room: &RoomId) -> Result<Arc<RoomState>, RoomError> {
        if let Some(state) = self.cached_renewing(room, self.config.membership_ttl) {
            return Ok(state);
        }
        // Boxed: a cache hit, the usual case, keeps no room in its caller's future for the
        // read (thousands of sessions subscribing at once each hold one of these futures).
        Box::pin(self.refresh_shared(room)).await
    }

    /// The cached state if it is at most `ttl` old. Past half of that, one refresh starts in
    /// the background, so a busy room's state is renewed before anyone has to wait for it.
    fn cached_renewing(&self, room: &RoomId, ttl: Duration) -> Option<Arc<RoomState>> {
        let mut cache = self.cache.lock().ok()?;
        let cached = cache.get_mut(room)?;
        let age = cached.checked.elapsed();
        if age > ttl {
            return None;
        }
        if age > ttl / 2 && !cached.renewing {
            if let (Some(rooms), Ok(mut renewals)) = (self.this.upgrade(), self.renewals.lock()) {
                cached.renewing = true;
                while renewals.try_join_next().is_some() {}
                let room = room.clone();
                renewals.spawn(async move {
                    if let Err(e) = rooms.refresh_shared(&room).await {
                        tracing::debug!(room = %room, error = %e, "background membership refresh failed");
                        if let Some(cached) = rooms.cache.lock().ok().as_mut().and_then(|c| c.get_mut(&room)) {
                            cached.renewing = false;
                        }
                    }
                });
            }
        }
        Some(cached.state.clone())
    }

    /// The room's state folded through `seq` at least: the cached one if it is (whatever its
    /// age), else read from the log now. For a caller that goes on from `seq` and must not
    /// miss a change at or below it.
    pub async fn state_through(
        &self,
        room: &RoomId,
        seq: u64,
    ) -> Result<Arc<RoomState>, RoomError> {
        let cached = self.cache.lock().ok().and_then(|cache| {
            let cached = cache.get(room)?;
            (cached.head >= seq).then(|| cached.state.clone())
        });
        match cached {
            Some(state) => Ok(state),
            None => Box::pin(self.refresh_shared(room)).await,
        }
    }

    /// The cached state if it was read from the log after `since`.
    fn cached_since(&self, room: &RoomId, since: Instant) -> Option<Arc<RoomState>> {
        let cache = self.cache.lock().ok()?;
        let cached = cache.get(room)?;
        (cached.checked >= since).then(|| cached.state.clone())
    }

    /// Reads the room from the log (after the cached or stored state) and caches it.
    pub async fn refresh(&self, room: &RoomId) -> Result<RoomState, RoomError> {
        Ok(RoomState::clone(&*self.refresh_shared(room).await?))
    }

    async fn refresh_shared(&self, room: &RoomId) -> Result<Arc<RoomState>, RoomError> {
        let asked = Instant::now();
        // Single flight per room: a busy room's appends would otherwise each read and decode
        // the same new log entries when the cache expires. A refresh that began after this
        // call did is as good as our own.
        let gate = self.refreshing.lock().ok().map(|mut gates| {
            if gates.len() > 4_096 {
                gates.retain(|_, gate| Arc::strong_count(gate) > 1);
            }
            gates.entry(room.clone()).or_default().clone()
        });
        let mut turn = match &gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        };
        if let Some(state) = self.cached_since(room, asked) {
            return Ok(state);
        }
        // So is a failure: while NATS is away, the callers queued behind a refresh that timed
        // out get its answer at once instead of each waiting out a timeout of their own (a
        // session's pipelined appends were answered one timeout apart).
        if let Some(Failed { at, error }) = turn.as_deref().and_then(Option::as_ref) {
            if *at >= asked {
                return Err(error.clone());
            }
        }
        // Boxed: callers waiting for another's refresh (every session of a room whose state
        // just expired) hold only the small future above.
        let result = Box::pin(self.read_state(room)).await;
        if let Some(turn) = turn.as_deref_mut() {
            *turn = match &result {
                Err(error @ RoomError::Unavailable(_)) => Some(Failed {
                    at: Instant::now(),
                    error: error.clone(),
                }),
                _ => None,
            };
        }
        result
    }

    /// This process appended, at `seq`, an event that changes nothing of the room's state,
    /// and sent it at `sent`. A cached state folded up to `seq - 1` is then the room's state as
    /// the log held it at `sent` (nothing came between, and `seq` was given after `sent`): it
    /// moves to `seq` and counts as checked then. A room whose appends all go through this
    /// process keeps its cached state fresh this way without reading the log back; an append
    /// from elsewhere leaves a gap, and the state is renewed from the log as before. Acks of
    /// concurrent appends come in any order: one past a gap waits until the gap closes.
    fn appended(&self, room: &RoomId, seq: u64, sent: Instant) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if let Some(cached) = cache.get_mut(room) {
            if seq == cached.head + 1 || (seq > cached.head && cached.ahead.len() < MAX_AHEAD) {
                cached.ahead.insert(seq, sent);
                cached.advance();
            }
        }
    }

    /// Reads the room from the log, after the cached or stored state, and caches it.
    async fn read_state(&self, room: &RoomId) -> Result<Arc<RoomState>, RoomError> {
        let checked = Instant::now();
        let cached = self.cache.lock().ok().and_then(|cache| {
            let cached = cache.get(room)?;
            Some((cached.state.clone(), cached.head))
        });
        let mut state = match cached {
            Some((state, head)) => {
                let mut state = RoomState::clone(&state);
                // The entries between change nothing: the state is the same at `head`.
                state.head = head;
                Some(state)
            }
            None => self.store.room_state(room).await?,
        };
        let from = state.as_ref().map_or(1, |s| s.head + 1);
        let mut reader = self.log.read_range(room, from, u64::MAX);
        while let Some(entry) = reader.next().await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(LogError::RoomNotFound { .. }) => return Err(RoomError::NotFound),
                Err(e) => return Err(e.into()),
            };
            let Ok(event) = entry.decode() else {
                continue; // not a membership change we can read; the projector dead-letters it
            };
            match &mut state {
                Some(state) => state.apply(entry.seq, &event),
                None => state = RoomState::created(entry.seq, &event),
            }
        }
        let Some(state) = state else {
            return Err(RoomError::NotFound);
        };
        let state = Arc::new(state);
        if let Ok(mut cache) = self.cache.lock() {
            if let Some(old) = cache.get_mut(room).filter(|old| old.head > state.head) {
                // Acks moved the cached state past what the read reached, meanwhile: it is the
                // later of the two.
                old.renewing = false;
                return Ok(old.state.clone());
            }
            // Acks past a gap that the read did not reach stay (the read may close the gap).
            let ahead = cache.remove(room).map(|old| old.ahead).unwrap_or_default();
            let mut cached = Cached {
                head: state.head,
                state: state.clone(),
                checked,
                renewing: false,
                ahead,
            };
            cached.advance();
            cache.insert(room.clone(), cached);
        }
        Ok(state)
    }

    /// The room's state if `user` is a member; a refusal is re-checked against the log first.
    pub async fn member_state(
        &self,
        room: &RoomId,
        user: &UserId,
    ) -> Result<Arc<RoomState>, RoomError> {
        let state = self.shared_state(room).await?;
        if state.is_member(user) {
            return Ok(state);
        }
        let state = Box::pin(self.refresh_shared(room)).await?;
        if state.is_member(user) {
            Ok(state)
        } else {
            Err(RoomError::Forbidden("not a member of this room".into()))
        }
    }

    /// Creates a group room whose first event carries its members; `id` makes a retried
    /// request idempotent.
    pub async fn create_group(
        &self,
        actor: &UserId,
        room: &RoomId,
        name: &str,
        members: Vec<UserId>,
        id: Option<Uuid>,
    ) -> Result<Created, RoomError> {
        if room.is_direct() {
            return Err(RoomError::BadRequest(
                "room ids starting with dm- are reserved for direct rooms".into(),
            ));
        }
        validate::validate_name(name)?;
        let members = validate::members(actor, members)?;
        self.check_room_caps(actor, room).await?;
        let event = Event {
            id: id.unwrap_or_else(Uuid::new_v4),
            user: actor.clone(),
            ts: now_ms(),
            body: EventBody::RoomCreated {
                name: name.to_owned(),
                room_kind: RoomKind::Group,
                members,
            },
        };
        self.log.ensure_room(room).await?;
        let exists = || RoomError::Conflict(format!("room {room} already exists"));
        let seq = match self.log.append_if_last(room, &event, 0).await {
            Ok(appended) if !appended.duplicate => {
                self.await_projection(room, appended.seq).await;
                return Ok(Created {
                    room: room.clone(),
                    seq: appended.seq,
                    new: true,
                });
            }
            Ok(appended) => appended.seq,
            Err(LogError::WrongLastSequence { .. }) if id.is_some() => 1,
            Err(LogError::WrongLastSequence { .. }) => return Err(exists()),
            Err(e) => return Err(e.into()),
        };
        // The id was used before: a retry only if it is this user's own creation, whenever it
        // comes (the log's duplicate window does not bound it). The same id from someone else
        // is another request that happens to carry it.
        let retry = match self.log.get(room, seq).await? {
            Some(entry) => entry
                .decode()
                .is_ok_and(|first| first.id == event.id && first.user == *actor),
            None => false,
        };
        if !retry {
            return Err(exists());
        }
        self.await_projection(room, seq).await;
        Ok(Created {
            room: room.clone(),
            seq,
            new: false,
        })
    }

    /// The direct room of `actor` and `other`: created the first time, the same one after.
    pub async fn create_direct(
        &self,
        actor: &UserId,
        other: &UserId,
    ) -> Result<Created, RoomError> {
        if actor == other {
            return Err(RoomError::BadRequest(
                "a direct room needs another user".into(),
            ));
        }
        decide_direct_contact(self.pair_blocks(actor, other).await?)?;
        let room = direct_room_id(actor, other);
        self.check_room_caps(actor, &room).await?;
        // The same id whoever asks: concurrent first requests from both users make one event.
        let id = Uuid::new_v5(&Uuid::NAMESPACE_OID, room.as_str().as_bytes());
        let event = Event {
            id,
            user: actor.clone(),
            ts: now_ms(),
            body: EventBody::RoomCreated {
                name: String::new(),
                room_kind: RoomKind::Direct,
                members: vec![other.clone()],
            },
        };
        self.log.ensure_room(&room).await?;
        let (seq, new) = match self.log.append_if_last(&room, &event, 0).await {
            Ok(appended) => (appended.seq, !appended.duplicate),
            Err(LogError::WrongLastSequence { .. }) => (1, false),
            Err(e) => return Err(e.into()),
        };
        if !new {
            // Opening it again brings back whichever of the two left it: the room is theirs
            // for good, and a leave is not a block (blocking is checked above).
            let state = self.refresh(&room).await?;
            for user in [actor, other] {
                if state.is_member(user) {
                    continue;
                }
                match self
                    .change_room(actor, &room, |state| state.decide_invite(actor, user))
                    .await
                {
                    // Conflict: brought back meanwhile by the other's request.
                    Ok(_) | Err(RoomError::Conflict(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.await_projection(&room, seq).await;
        Ok(Created { room, seq, new })
    }

    /// Adds `user` to a group room (any member may), or brings one of a direct room's pair
    /// back (either of the two may, unless one of them blocks the other, as for opening it).
    pub async fn invite(
        &self,
        actor: &UserId,
        room: &RoomId,
        user: &UserId,
    ) -> Result<u64, RoomError> {
        let state = self.shared_state(room).await?;
        if let Some([a, b]) = state.pair.as_ref().filter(|pair| pair.contains(actor)) {
            let (me, peer) = if a == actor { (a, b) } else { (b, a) };
            decide_direct_contact(self.pair_blocks(me, peer).await?)?;
        }
        self.change_room(actor, room, |state| state.decide_invite(actor, user))
            .await
    }

    /// Removes `user` from a room (themself, or the admin).
    pub async fn remove(
        &self,
        actor: &UserId,
        room: &RoomId,
        user: &UserId,
    ) -> Result<u64, RoomError> {
        self.change_room(actor, room, |state| state.decide_remove(actor, user))
            .await
    }

    /// Makes a group room read-only, or not (its admin only): a `room_updated` event. Setting
    /// the value it already has is allowed and recorded like any other change.
    pub async fn set_read_only(
        &self,
        actor: &UserId,
        room: &RoomId,
        read_only: bool,
    ) -> Result<u64, RoomError> {
        self.change_room(actor, room, |state| state.decide_update(actor, read_only))
            .await
    }

    /// Decides against the current state and appends only if no other change of membership or
    /// settings has been appended since, so two concurrent changes cannot both be decided on
    /// the same old state. Messages appended meanwhile do not make it try again: in a busy room
    /// the log moves on between any read and the next append.
    async fn change_room(
        &self,
        actor: &UserId,
        room: &RoomId,
        decide: impl Fn(&RoomState) -> Result<EventBody, Refusal>,
    ) -> Result<u64, RoomError> {
        for _ in 0..8 {
            // Read first: a refresh asked for after it covers that change.
            let last_change = self.log.last_change(room).await?;
            let state = self.refresh(room).await?;
            if state.head < last_change {
                continue;
            }
            let body = decide(&state)?;
            let event = Event {
                id: Uuid::new_v4(),
                user: actor.clone(),
                ts: now_ms(),
                body,
            };
            match self.log.append_change(room, &event, last_change).await {
                Ok(appended) => {
                    let _ = self.refresh(room).await;
                    self.await_projection(room, appended.seq).await;
                    return Ok(appended.seq);
                }
                Err(LogError::WrongLastSequence { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RoomError::Unavailable(
            "the room changes too fast; try again".into(),
        ))
    }

    /// Waits (bounded) until the store holds `seq` of `room`.
    async fn await_projection(&self, room: &RoomId, seq: u64) {
        if !self
            .await_stored(room, seq, self.config.projection_wait)
            .await
        {
            tracing::debug!(room = %room, seq, "projection not there yet; answering anyway");
        }
    }

    /// Waits at most `wait` until the store holds `seq` of `room`, and says whether it does. With
    /// the projector in this process, it is asked to write at once and each of its commits is a
    /// cue to look again; otherwise the checkpoint is polled.
    async fn await_stored(&self, room: &RoomId, seq: u64, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut commits = self.config.commits.as_ref().map(|commits| {
            let watch = commits.watch();
            commits.request_flush();
            watch
        });
        let mut pause = Duration::from_millis(1);
        loop {
            match self.store.checkpoint(room).await {
                Ok(stored) if stored >= seq => return true,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(room = %room, error = %e, "checkpoint read failed");
                    return false;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            match &mut commits {
                Some(watch) => {
                    match tokio::time::timeout_at(deadline.into(), watch.changed()).await {
                        Ok(Ok(())) => {}
                        // The projector is gone: poll.
                        Ok(Err(_)) => commits = None,
                        Err(_) => return false,
                    }
                }
                None => {
                    tokio::time::sleep(pause.min(deadline - Instant::now())).await;
                    pause = (pause * 2).min(Duration::from_millis(25));
                }
            }
        }
    }

    /// Appends what `actor` asks, idempotently by `id`.
    pub async fn append(
        &self,
        actor: &UserId,
        room: &RoomId,
        id: Uuid,
        command: Command,
    ) -> Result<Ack, RoomError> {
        self.append_traced(actor, room, id, command, None).await
    }

    /// [`Rooms::append`], the event carrying a W3C `traceparent` (see [`Rooms::send_append`]).
    pub async fn append_traced(
        &self,
        actor: &UserId,
        room: &RoomId,
        id: Uuid,
        command: Command,
        traceparent: Option<String>,
    ) -> Result<Ack, RoomError> {
        let decided = self.decide_append(actor, room, id, command).await?;
        self.send_append(decided, traceparent).await?.ack().await
    }

    /// The first half of [`Rooms::append`]: checks what `actor` asks against the room's rules
    /// and turns it into the event to append (or finds that `id` is already in the room).
    /// Nothing is appended yet: see [`Rooms::send_append`].
    pub async fn decide_append(
        &self,
        actor: &UserId,
        room: &RoomId,
        id: Uuid,
        command: Command,
    ) -> Result<DecidedAppend, RoomError> {
        let mut state = self.member_state(room, actor).await?;
        // Past the stream's duplicate window only the store knows this id.
        self.check_projection_lag().await?;
        if let Some(hit) = self.store.find_id(room, id).await? {
            return Ok(DecidedAppend::Known(Ack {
                seq: hit.seq,
                ts: hit.ts,
                duplicate: true,
            }));
        }
        let posting = !matches!(command, Command::Delete { .. });
        if posting && state.decide_post(actor).is_err() {
            // A refusal is given on the log's word, not the cache's (the admin may have just
            // lifted read-only).
            state = self.refresh_shared(room).await?;
        }
        let body = match self.decide(actor, room, &state, command).await {
            Ok(body) => body,
            Err(
                refusal @ (RoomError::BadRequest(_)
                | RoomError::Forbidden(_)
                | RoomError::NotFound
                | RoomError::Conflict(_)
                | RoomError::TooLarge(_)),
            ) => {
                // A resend answers as its original did, whatever else it says: one refused
                // now (its text emptied, its target deleted since, the room made read-only)
                // may have an original in the log that the store does not hold yet.
                if let Some(ack) = self.known_once_stored(room, id).await? {
                    return Ok(DecidedAppend::Known(ack));
                }
                return Err(refusal);
            }
            Err(e) => return Err(e),
        };
        Ok(DecidedAppend::Event {
            room: room.clone(),
            event: Event {
                id,
                user: actor.clone(),
                ts: now_ms(),
                body,
            },
        })
    }

    /// The outcome of an earlier append of `id` in `room`: from the store's id index, or from
    /// the log's entries the store does not hold yet (up to [`UNSTORED_SCAN`] of them; with more,
    /// once the projector has stored what the log held just now, waiting at most
    /// `history_wait`). `None`: there was none. `unavailable` if the store does not catch up in
    /// time: the original may be in what it has not stored, and a refusal could contradict an
    /// append that landed.
    async fn known_once_stored(&self, room: &RoomId, id: Uuid) -> Result<Option<Ack>, RoomError> {
        let known = |hit: chat_store::IdHit| Ack {
            seq: hit.seq,
            ts: hit.ts,
            duplicate: true,
        };
        // The checkpoint first: the id index is written in the same transaction, so an
        // original at or below it is found next, and one above it is in the range scanned.
        let stored = self.store.checkpoint(room).await?;
        if let Some(hit) = self.store.find_id(room, id).await? {
            return Ok(Some(known(hit)));
        }
        let head = self.log.head(room).await?;
        if stored >= head {
            return Ok(None);
        }
        if head - stored <= UNSTORED_SCAN {
            // (An entry this build cannot decode is not one it appended.)
            let unstored = self.unstored(room, stored, head).await?;
            return Ok(unstored
                .into_iter()
                .find(|(_, event)| event.id == id)
                .map(|(seq, event)| known(chat_store::IdHit { seq, ts: event.ts })));
        }
        if !self
            .await_stored(room, head, self.config.history_wait)
            .await
        {
            return Err(RoomError::Unavailable(
                "the store is behind the log (this id's original may be there); retry with the \
                 same id"
                    .into(),
            ));
        }
        Ok(self.store.find_id(room, id).await?.map(known))
    }

    /// The second half of [`Rooms::append`]: sends a decided event to the room's log without
    /// waiting for the log's answer. Appends sent one after another are stored in that order,
    /// so a caller may keep several in flight (then await each [`PendingAck`]). `traceparent`
    /// (W3C) goes with the event, so readers of the log can link to the appending request.
    pub async fn send_append(
        &self,
        decided: DecidedAppend,
        traceparent: Option<String>,
    ) -> Result<PendingAck, RoomError> {
        match decided {
            DecidedAppend::Known(ack) => Ok(PendingAck::Known(ack)),
            DecidedAppend::Event { room, event } => {
                let sent = Instant::now();
                let pending = self.log.send_traced(&room, &event, traceparent).await?;
                Ok(PendingAck::Sent {
                    log: self.log.clone(),
                    rooms: (!RoomState::changed_by(&event.body)).then(|| self.this.clone()),
                    room,
                    ts: event.ts,
                    pending,
                    sent,
                })
            }
        }
    }

    /// Appends a `read` event moving `actor`'s cursor to `up_to`, unless the cursor is already
    /// there. Returns the appended sequence, if any.
    pub async fn read(
        &self,
        actor: &UserId,
        room: &RoomId,
        up_to: u64,
    ) -> Result<Option<u64>, RoomError> {
        let state = self.check_read(actor, room, up_to).await?;
        self.read_checked(actor, room, up_to, &state).await
    }

    /// [`Rooms::read`] for a caller that [`Rooms::check_read`] has just let through, with the
    /// state it returned: the membership and the head are not looked up again.
    pub async fn read_checked(
        &self,
        actor: &UserId,
        room: &RoomId,
        up_to: u64,
        state: &RoomState,
    ) -> Result<Option<u64>, RoomError> {
        let joined = state.members.get(actor).copied().unwrap_or(0);
        // One point read (not the user's whole room list with its unread counts).
        let stored = self.store.read_cursor(room, actor).await?;
        if up_to <= joined.max(stored) {
            return Ok(None);
        }
        let event = Event {
            id: Uuid::new_v4(),
            user: actor.clone(),
            ts: now_ms(),
            body: EventBody::Read { up_to },
        };
        Ok(Some(self.append_unchanging(room, &event).await?))
    }

    /// Appends `event`, which changes nothing of the room's state (a read or delivered
    /// cursor), keeping the cached state fresh as a message's ack does (see
    /// [`Rooms::appended`]); its sequence.
    async fn append_unchanging(&self, room: &RoomId, event: &Event) -> Result<u64, RoomError> {
        debug_assert!(!RoomState::changed_by(&event.body));
        let sent = Instant::now();
        let appended = self.log.append(room, event).await?;
        if !appended.duplicate {
            self.appended(room, appended.seq, sent);
        }
        Ok(appended.seq)
    }

    /// Whether `actor` may move their read cursor in `room` to `up_to` now: a member (checked
    /// first, so a stranger learns nothing of the room), and `up_to` not above the head.
    /// Returns the room's state.
    pub async fn check_read(
        &self,
        actor: &UserId,
        room: &RoomId,
        up_to: u64,
    ) -> Result<Arc<RoomState>, RoomError> {
        let state = self.member_state(room, actor).await?;
        // The state's head is the log's at some recent moment, so never above it: a seq at or
        // below it needs no question to NATS (one less round trip per `read` frame, and none
        // to wait out while NATS is away).
        if up_to <= state.head {
            return Ok(state);
        }
        let head = self.log.head(room).await?;
        if up_to > head {
            return Err(RoomError::BadRequest(format!(
                "seq {up_to} is above the room's head {head}"
            )));
        }
        Ok(state)
    }

    /// Appends one `delivered` event carrying the delivered cursors an edge gathered for `room`
    /// (each user was a member when their cursor was recorded). Left out: users no longer in
    /// the room, cursors that would not move the user's stored delivered cursor forward, and
    /// cursors that move it across no message. The last rule is what keeps receipts from
    /// feeding themselves: a client that acknowledges the room's head, which is often a
    /// `delivered` or `read` event, moves its cursor over events no receipt counts, and
    /// appending that would raise the head again, every interval, for ever. Nothing is appended
    /// when no cursor is left. Returns the appended sequence, if any.
    pub async fn delivered(
        &self,
        room: &RoomId,
        cursors: Vec<(UserId, u64)>,
    ) -> Result<Option<u64>, RoomError> {
        let stored: HashMap<UserId, u64> = self
            .store
            .member_cursors(room)
            .await?
            .into_iter()
            .map(|c| (c.user, c.delivered))
            .collect();
        let state = self.shared_state(room).await?;
        // A member the store does not know yet (just joined) is checked against the log.
        let moving: Vec<(UserId, u64, u64)> = cursors
            .into_iter()
            .filter(|(user, _)| state.is_member(user))
            .map(|(user, seq)| {
                let from = stored.get(&user).copied().unwrap_or(0);
                (user, from, seq)
            })
            .filter(|(_, from, seq)| seq > from)
            .collect();
        // Whether a move crosses a message is known for what the store holds; a move beyond it
        // is kept. One read per distinct target seq (clients mostly acknowledge the same recent
        // heads), the newest first, at most `RECEIPT_LOOKUPS`; moves past that are kept.
        let checkpoint = self.store.checkpoint(room).await?;
        let mut lowest_from: BTreeMap<u64, u64> = BTreeMap::new();
        for (_, from, seq) in moving.iter().filter(|(_, _, seq)| *seq <= checkpoint) {
            let low = lowest_from.entry(*seq).or_insert(*from);
            *low = (*low).min(*from);
        }
        let mut last_message: HashMap<u64, Option<u64>> = HashMap::new();
        for (&seq, &low) in lowest_from.iter().rev().take(RECEIPT_LOOKUPS) {
            let last = self.store.last_message_in(room, low, seq).await?;
            last_message.insert(seq, last);
        }
        let cursors: Vec<(UserId, u64)> = moving
            .into_iter()
            .filter(|(_, from, seq)| match last_message.get(seq) {
                // The newest message in (lowest from, seq] is after this one's start.
                Some(last) => last.is_some_and(|last| last > *from),
                None => true,
            })
            .map(|(user, _, seq)| (user, seq))
            .collect();
        let Some((first, _)) = cursors.first() else {
            return Ok(None);
        };
        let event = Event {
            id: Uuid::new_v4(),
            user: first.clone(),
            ts: now_ms(),
            body: EventBody::Delivered { cursors },
        };
        Ok(Some(self.append_unchanging(room, &event).await?))
    }

    /// The receipts of the message at `seq` for a member: how many of the other members it was
    /// delivered to and read by.
    pub async fn receipts(
        &self,
        viewer: &UserId,
        room: &RoomId,
        seq: u64,
    ) -> Result<Receipts, RoomError> {
        let state = self.member_state(room, viewer).await?;
        let (author, _) = self
            .message_at(room, seq)
            .await?
            .ok_or(RoomError::NotFound)?;
        let cursors = self.cursors_of_members(room, &state).await?;
        Ok(ReceiptIndex::new(&cursors).receipts(seq, author.as_str()))
    }

    /// The cursors of the room's current members (as its log says): the store's, and for a
    /// member it does not hold yet (just joined, or the store behind), the seq they joined at.
    async fn cursors_of_members(
        &self,
        room: &RoomId,
        state: &RoomState,
    ) -> Result<Vec<MemberCursors>, RoomError> {
        let mut stored: HashMap<UserId, MemberCursors> = self
            .store
            .member_cursors(room)
            .await?
            .into_iter()
            .map(|c| (c.user.clone(), c))
            .collect();
        Ok(state
            .members
            .iter()
            .map(|(user, &joined)| match stored.remove(user) {
                Some(c) => MemberCursors {
                    read: c.read.max(joined),
                    delivered: c.delivered.max(c.read).max(joined),
                    user: c.user,
                },
                None => MemberCursors {
                    user: user.clone(),
                    read: joined,
                    delivered: joined,
                },
            })
            .collect())
    }

    /// Turns a command into the event to append, by the contract's rules.
    async fn decide(
        &self,
        actor: &UserId,
        room: &RoomId,
        state: &RoomState,
        command: Command,
    ) -> Result<EventBody, RoomError> {
        let limits = &self.config.limits;
        Ok(match command {
            Command::Send {
                text,
                thread,
                reply_to,
            } => {
                state.decide_post(actor)?;
                self.check_direct(actor, state).await?;
                validate_text(&text, limits)?;
                if let Some(root) = thread {
                    match self.message_at(room, root).await? {
                        Some((_, None)) => {}
                        Some((_, Some(_))) => {
                            return Err(RoomError::BadRequest(
                                "a thread's root cannot be a reply in another thread".into(),
                            ))
                        }
                        None => {
                            return Err(RoomError::NotFound);
                        }
                    }
                }
                if let Some(target) = reply_to {
                    if self.message_at(room, target).await?.is_none() {
                        return Err(RoomError::NotFound);
                    }
                }
                EventBody::Message {
                    text,
                    thread,
                    reply_to,
                }
            }
            Command::Edit { target, text } => {
                validate_text(&text, limits)?;
                let (author, _) = self
                    .message_at(room, target)
                    .await?
                    .ok_or(RoomError::NotFound)?;
                state.decide_edit(actor, &author)?;
                self.check_direct(actor, state).await?;
                self.check_not_deleted(room, target).await?;
                EventBody::Edit { target, text }
            }
            Command::Delete { target } => {
                let (author, _) = self
                    .message_at(room, target)
                    .await?
                    .ok_or(RoomError::NotFound)?;
                state.decide_delete(actor, &author)?;
                self.check_not_deleted(room, target).await?;
                EventBody::Delete { target }
            }
            Command::React { target, emoji, on } => {
                state.decide_post(actor)?;
                self.check_direct(actor, state).await?;
                validate_emoji(&emoji)?;
                self.message_at(room, target)
                    .await?
                    .ok_or(RoomError::NotFound)?;
                self.check_not_deleted(room, target).await?;
                EventBody::Reaction { target, emoji, on }
            }
        })
    }

    /// Refuses to edit, delete or react to a message the store holds as deleted: such an event
    /// would change nothing (the projection ignores it) yet be acknowledged. A delete the
    /// projector has not stored yet is not seen here; the projection still ignores what follows
    /// it.
    async fn check_not_deleted(&self, room: &RoomId, target: u64) -> Result<(), RoomError> {
        if self.store.is_deleted(room, target).await? {
            return Err(RoomError::NotFound);
        }
        Ok(())
    }

    /// The author and thread of the message at `seq`, `None` if that is not a message.
    async fn message_at(
        &self,
        room: &RoomId,
        seq: u64,
    ) -> Result<Option<(UserId, Option<u64>)>, RoomError> {
        if seq == 0 {
            return Ok(None);
        }
        let Some(entry) = self.log.get(room, seq).await? else {
            return Ok(None);
        };
        Ok(match entry.decode() {
            Ok(Event {
                user,
                body: EventBody::Message { thread, .. },
                ..
            }) => Some((user, thread)),
            _ => None,
        })
    }

    /// Refuses appends while the projector lags more than the duplicate window (checked at
    /// most once a second).
    async fn check_projection_lag(&self) -> Result<(), RoomError> {
        if let Ok(mut check) = self.lag_check.lock() {
            if let Some((at, result)) = check.last.as_ref() {
                // Past a second one caller asks the store again; the others go on with the last
                // answer meanwhile (for a few seconds at most: the window is minutes long).
                let age = at.elapsed();
                if age < Duration::from_secs(1) || (check.asking && age < Duration::from_secs(5)) {
                    return result.clone().map_err(RoomError::Unavailable);
                }
            }
            check.asking = true;
        }
        let result = self.ask_projection_lag().await;
        if let Ok(mut check) = self.lag_check.lock() {
            check.asking = false;
            if let Ok(result) = &result {
                check.last = Some((Instant::now(), result.clone()));
            }
        }
        result?.map_err(RoomError::Unavailable)
    }

    /// Whether projection lags past the duplicate window (`Err` with why), from the store.
    async fn ask_projection_lag(&self) -> Result<Result<(), String>, RoomError> {
        let reports = self.store.projectors().await?;
        Ok(judge_projection(
            reports,
            now_ms(),
            self.config.dedup_window.as_millis() as i64,
            self.config.projector_here,
        ))
    }

    /// Whether `actor` may create `room` under the caps on rooms (`max_rooms`,
    /// `max_rooms_per_user`): a room that exists already is not a new one.
    async fn check_room_caps(&self, actor: &UserId, room: &RoomId) -> Result<(), RoomError> {
        let (max_rooms, per_user) = (self.config.max_rooms, self.config.max_rooms_per_user);
        if max_rooms == 0 && per_user == 0 {
            return Ok(());
        }
        match self.log.head(room).await {
            Ok(_) => return Ok(()),
            Err(LogError::RoomNotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if per_user > 0 && self.rooms_of(actor).await?.len() >= per_user {
            return Err(RoomError::Forbidden(format!(
                "a member of {per_user} rooms or more creates no more (CHAT_MAX_ROOMS_PER_USER)"
            )));
        }
        if max_rooms > 0 && self.log.stream_count().await? >= max_rooms {
            return Err(RoomError::Forbidden(format!(
                "this deployment holds its most rooms, {max_rooms} (CHAT_MAX_ROOMS)"
            )));
        }
        Ok(())
    }

    /// The rooms `user` is in, with head, last read and unread count (not counting the
    /// messages of users they block).
    pub async fn rooms_of(&self, user: &UserId) -> Result<Vec<RoomSummary>, RoomError> {
        let blocked = self.blocked(user).await?;
        Ok(self.store.rooms_of(user, &blocked).await?)
    }

    /// A page of history for a member, as they see it: messages of users they block are
    /// `hidden` placeholders, and their own messages carry `receipts`.
    pub async fn history(
        &self,
        viewer: &UserId,
        room: &RoomId,
        query: PageQuery,
    ) -> Result<Page, RoomError> {
        let mut page = self.history_page(viewer, room, query).await?;
        hide_blocked_authors(&mut page.events, &*self.blocked(viewer).await?);
        // The viewer's own messages show their receipts: the room's cursors read once a page.
        if wants_receipts(&page.events, viewer) {
            let state = self.member_state(room, viewer).await?;
            let cursors = self.cursors_of_members(room, &state).await?;
            add_receipts(&mut page.events, viewer, &ReceiptIndex::new(&cursors));
        }
        Ok(page)
    }

    /// The store's rows, and newer events the store does not hold yet straight from the log.
    async fn history_page(
        &self,
        viewer: &UserId,
        room: &RoomId,
        query: PageQuery,
    ) -> Result<Page, RoomError> {
        let rights = ChangeRights::of(&*self.member_state(room, viewer).await?);
        let limit = query.clamped_limit();
        let before = query.before.unwrap_or(u64::MAX);
        let mut stored = self.store.checkpoint(room).await?;
        let head = self.log.head(room).await?;
        let top = head.min(before.saturating_sub(1));
        if top > stored && top - stored <= COMMIT_AWAY && self.config.commits.is_some() {
            // The projector is here: what it holds back is a commit away.
            self.await_stored(room, top, self.config.history_wait).await;
            stored = self.store.checkpoint(room).await?;
        }
        // Everything the store does not hold yet: its edits and deletes apply to the page,
        // wherever their targets are in it.
        let unstored = self.page_unstored(room, &mut stored, head).await?;
        let mut events = Vec::new();
        if top > stored {
            let from = (stored + 1).max(top.saturating_sub(limit as u64 - 1));
            if unstored.is_empty() {
                let mut reader = self.log.read_range(room, from, top);
                while let Some(entry) = reader.next().await {
                    let entry = entry?;
                    if let Ok(event) = entry.decode() {
                        events.push(render_entry(entry.seq, &event));
                    }
                }
            } else {
                events.extend(
                    unstored
                        .iter()
                        .filter(|(seq, _)| (from..=top).contains(seq))
                        .map(|(seq, event)| render_entry(*seq, event)),
                );
            }
            events.reverse();
            if from > stored + 1 || events.len() >= limit {
                events.truncate(limit);
                apply_unstored(&mut events, &unstored, &rights);
                // Older events exist unless this page reaches the room's first.
                return Ok(Page {
                    events,
                    more: from > 1,
                });
            }
        }
        let rest = self
            .store
            .history(
                room,
                PageQuery {
                    before: Some(before.min(stored + 1)),
                    limit: limit - events.len(),
                },
            )
            .await?;
        if events.len() == limit {
            apply_unstored(&mut events, &unstored, &rights);
            return Ok(Page {
                more: !rest.events.is_empty(),
                events,
            });
        }
        events.extend(rest.events);
        apply_unstored(&mut events, &unstored, &rights);
        Ok(Page {
            events,
            more: rest.more,
        })
    }

    /// What a page applies to the store's rows: the entries after `stored` up to `head`. With
    /// more than [`UNSTORED_SCAN`] of them (a projector down or catching up), waits at most
    /// `history_wait` for the store to come that close (`stored` follows it), else
    /// `unavailable`: a page without them could show text its author deleted.
    async fn page_unstored(
        &self,
        room: &RoomId,
        stored: &mut u64,
        head: u64,
    ) -> Result<Vec<(u64, Event)>, RoomError> {
        if head.saturating_sub(*stored) > UNSTORED_SCAN {
            self.await_stored(room, head - UNSTORED_SCAN, self.config.history_wait)
                .await;
            *stored = self.store.checkpoint(room).await?;
            let behind = head.saturating_sub(*stored);
            if behind > UNSTORED_SCAN {
                return Err(RoomError::Unavailable(format!(
                    "this room's history is catching up ({behind} events not stored yet); \
                     retry shortly"
                )));
            }
        }
        self.unstored(room, *stored, head).await
    }

    /// The entries after `stored` up to `head` (decoded; those that do not decode are left
    /// out), when there are at most [`UNSTORED_SCAN`] of them; else none.
    async fn unstored(
        &self,
        room: &RoomId,
        stored: u64,
        head: u64,
    ) -> Result<Vec<(u64, Event)>, RoomError> {
        let mut unstored = Vec::new();
        if head > stored && head - stored <= UNSTORED_SCAN {
            let mut reader = self.log.read_range(room, stored + 1, head);
            while let Some(entry) = reader.next().await {
                let entry = entry?;
                if let Ok(event) = entry.decode() {
                    unstored.push((entry.seq, event));
                }
            }
        }
        Ok(unstored)
    }

    /// A thread (its root and a page of replies) for a member: the store's, with what the log
    /// holds and the store not yet (a root or replies just appended, edits and deletes of
    /// them), as a history page has.
    pub async fn thread(
        &self,
        viewer: &UserId,
        room: &RoomId,
        root: u64,
        query: PageQuery,
    ) -> Result<ThreadPage, RoomError> {
        let rights = ChangeRights::of(&*self.member_state(room, viewer).await?);
        let limit = query.clamped_limit();
        let before = query.before.unwrap_or(u64::MAX);
        let mut stored = self.store.checkpoint(room).await?;
        let head = self.log.head(room).await?;
        if self.config.commits.is_some() && head > stored && head - stored <= COMMIT_AWAY {
            // The projector is here: what it holds back is a commit away.
            self.await_stored(room, head, self.config.history_wait)
                .await;
            stored = self.store.checkpoint(room).await?;
        }
        let unstored = self.page_unstored(room, &mut stored, head).await?;
        let mut page = self.store.thread(room, root, query).await?;
        if page.root.is_none() {
            page.root = unstored
                .iter()
                .find(|(seq, event)| {
                    *seq == root && matches!(event.body, EventBody::Message { thread: None, .. })
                })
                .map(|(seq, event)| render_entry(*seq, event));
        }
        let Some(root_event) = page.root.as_mut() else {
            return Err(RoomError::NotFound);
        };
        let reply_of_root = |event: &Event| matches!(event.body, EventBody::Message { thread: Some(t), .. } if t == root);
        // Replies the store does not count on the root yet (after the last it counted), less
        // those deleted (the store counts no deleted reply).
        let deleted = unstored_deletes(&unstored, &rights, &authors(&[], &unstored));
        let counted_last = root_event["replies"]["last"].as_u64().unwrap_or(0);
        let (mut count, mut last) = (root_event["replies"]["count"].as_u64().unwrap_or(0), 0);
        for (seq, _) in unstored.iter().filter(|(seq, event)| {
            *seq > counted_last && reply_of_root(event) && !deleted.contains(seq)
        }) {
            count += 1;
            last = *seq;
        }
        if last > 0 {
            root_event["replies"] = serde_json::json!({"count": count, "last": last});
        }
        // Replies the store does not hold yet, in the page's order (newest first).
        let held: HashSet<u64> = page
            .replies
            .events
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .collect();
        let newer: Vec<serde_json::Value> = unstored
            .iter()
            .filter(|(seq, event)| *seq < before && !held.contains(seq) && reply_of_root(event))
            .map(|(seq, event)| render_entry(*seq, event))
            .collect();
        if !newer.is_empty() {
            let replies = &mut page.replies;
            replies.events.extend(newer);
            replies
                .events
                .sort_by_key(|e| std::cmp::Reverse(e["seq"].as_u64().unwrap_or(0)));
            if replies.events.len() > limit {
                replies.events.truncate(limit);
                replies.more = true;
            }
        }
        apply_unstored(std::slice::from_mut(root_event), &unstored, &rights);
        apply_unstored(&mut page.replies.events, &unstored, &rights);
        let blocked = self.blocked(viewer).await?;
        hide_blocked_authors(std::slice::from_mut(root_event), &blocked);
        hide_blocked_authors(&mut page.replies.events, &blocked);
        Ok(page)
    }

    /// The users `user` blocks: cached, and dropped from the cache as soon as this process
    /// hears of a change (see `blocks.rs`), else after `block_list_ttl`. Cheap enough to ask
    /// per event forwarded.
    pub async fn blocked(&self, user: &UserId) -> Result<Arc<HashSet<UserId>>, RoomError> {
        Ok(self.blocked_until(user).await?.0)
    }

    /// `blocked`, and until when it may be used without asking again (absent a change).
    async fn blocked_until(
        &self,
        user: &UserId,
    ) -> Result<(Arc<HashSet<UserId>>, Instant), RoomError> {
        let key = self.users.key(user);
        let epoch = match self.blocks.get(&key) {
            Lookup::Hit(blocked, until) => return Ok((blocked, until)),
            Lookup::Miss { epoch } => epoch,
        };
        // Boxed: a cache hit keeps no room for the read in its caller's future.
        let (seq, blocked) = match Box::pin(self.users.last_blocks(user, false)).await? {
            Some(entry) => (entry.seq, entry.event.blocked.into_iter().collect()),
            None => (0, HashSet::new()),
        };
        let blocked = Arc::new(blocked);
        self.blocks.put_read(key, seq, blocked.clone(), epoch);
        // Held for one use only: whether the cache took it is for the next lookup to find.
        Ok((blocked, Instant::now()))
    }

    /// `user`'s block list, from `held` while no block list changed and the cache would still
    /// answer with it, so a reader that needs it for every event (a session's room feed) costs
    /// the cache nothing per event; otherwise looked up (as [`Rooms::blocked`]) and held.
    pub async fn blocked_held<'a>(
        &self,
        user: &UserId,
        held: &'a mut HeldBlocks,
    ) -> Result<&'a HashSet<UserId>, RoomError> {
        if self.blocked_fresh(held, Instant::now()).is_none() {
            // Read before the lookup: a change during it makes the next call look again.
            let changes = self.blocks.changes();
            // Boxed: the lookup's future is large and rarely needed; a caller's own future
            // (held for a whole subscription) stays small.
            let (blocked, until) = Box::pin(self.blocked_until(user)).await?;
            *held = HeldBlocks {
                blocked,
                changes,
                until: Some(until),
            };
        }
        Ok(&held.blocked)
    }

    /// The block list in `held`, if [`Rooms::blocked_held`] would answer with it at `at`
    /// without a lookup: for a caller that cannot wait (a session's room feed, polled). The
    /// feed passes the time its event was rendered: it asks for every event of every session,
    /// and reading the clock each time cost a twentieth of an edge's CPU in fan-out.
    pub fn blocked_fresh<'a>(
        &self,
        held: &'a HeldBlocks,
        at: Instant,
    ) -> Option<&'a HashSet<UserId>> {
        let fresh = held
            .until
            .is_some_and(|until| held.changes == self.blocks.changes() && at < until);
        fresh.then_some(&*held.blocked)
    }

    /// `user`'s block list as the user log holds it now (not from the cache), sorted.
    pub async fn block_list(&self, user: &UserId) -> Result<Vec<UserId>, RoomError> {
        Ok(self
            .users
            .last_blocks(user, false)
            .await?
            .map(|entry| entry.event.blocked.into_iter().collect())
            .unwrap_or_default())
    }

    /// `actor` blocks `target`. Blocking someone already blocked is fine: nothing is appended
    /// and the answer is the sequence of the entry that holds the list.
    pub async fn block(&self, actor: &UserId, target: &UserId) -> Result<u64, RoomError> {
        self.change_blocks(actor, BlockChange::Block(target.clone()))
            .await
    }

    /// `actor` stops blocking `target` (fine if they did not).
    pub async fn unblock(&self, actor: &UserId, target: &UserId) -> Result<u64, RoomError> {
        self.change_blocks(actor, BlockChange::Unblock(target.clone()))
            .await
    }

    /// Read the list (from the stream leader), decide, append on the condition that the list
    /// is still the last entry; a lost race is re-decided on the newer list. So concurrent
    /// changes from several edges are all kept, and a retry after an unknown outcome is safe:
    /// it finds the change made, or makes it.
    async fn change_blocks(&self, actor: &UserId, change: BlockChange) -> Result<u64, RoomError> {
        let key = self.users.key(actor);
        for attempt in 0..CHANGE_ATTEMPTS {
            if attempt > 0 {
                // Contenders that lost together should not collide again in lockstep.
                let spread = 1u128 << attempt.min(5);
                let jitter = Uuid::new_v4().as_u128() % spread;
                tokio::time::sleep(Duration::from_millis(jitter as u64)).await;
            }
            let (expected, current) = match self.users.last_blocks(actor, true).await? {
                Some(entry) => (entry.seq, entry.event.blocked),
                None => (0, BTreeSet::new()),
            };
            let Some(next) = decide_block_change(actor, &current, &change)? else {
                let current = Arc::new(current.into_iter().collect());
                self.blocks.put_written(key, expected, current);
                return Ok(expected);
            };
            let event = BlockEvent {
                id: Uuid::new_v4(),
                user: actor.clone(),
                ts: now_ms(),
                change: change.clone(),
                blocked: next,
            };
            match self.users.append_blocks(&event, expected).await {
                Ok(seq) => {
                    let next = Arc::new(event.blocked.into_iter().collect());
                    self.blocks.put_written(key, seq, next);
                    return Ok(seq);
                }
                Err(UserLogError::WrongLastSequence { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RoomError::Unavailable(
            "the block list changes too fast; try again".into(),
        ))
    }

    /// Who of the pair blocks whom.
    async fn pair_blocks(&self, actor: &UserId, peer: &UserId) -> Result<PairBlocks, RoomError> {
        let (mine, theirs) = tokio::try_join!(self.blocked(actor), self.blocked(peer))?;
        Ok(PairBlocks {
            actor_blocks_peer: mine.contains(peer),
            peer_blocks_actor: theirs.contains(actor),
        })
    }

    /// Posting in a direct room needs neither of the pair to block the other.
    async fn check_direct(&self, actor: &UserId, state: &RoomState) -> Result<(), RoomError> {
        let Some(peer) = state.direct_peer(actor) else {
            return Ok(());
        };
        Ok(decide_direct_contact(self.pair_blocks(actor, peer).await?)?)
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Whether the projectors' reports (see [`Rooms::check_projection_lag`]) let appends through
/// at `now`: `Err` says why not.
///
/// Judged: the projectors of the current split (as many partitions as the latest report
/// says), and those of another split that still report (within the window). A report row stays
/// for each partition that ever ran, so after the projectors are split differently (`0/2`,
/// `1/2` become `0/3` … `2/3`), or an all-in-one process once ran on the store, the old rows
/// stop reporting; judged with the others they would refuse every append a duplicate window
/// later. A partition of the current split that has never reported holds back appends as one
/// that stopped does (its rooms' id index is not being kept), unless projectors of another
/// split still report: while a new split starts, the old one covers the rooms.
fn judge_projection(
    reports: Vec<chat_store::ProjectorStatus>,
    now: i64,
    window: i64,
    projector_here: bool,
) -> Result<(), String> {
    let split = |r: &chat_store::ProjectorStatus| {
        let (index, count) = r.partition.split_once('/')?;
        Some((index.parse::<u32>().ok()?, count.parse::<u32>().ok()?))
    };
    let latest = reports
        .iter()
        .max_by_key(|r| r.reported_at_ms)
        .and_then(&split)
        .map(|(_, count)| count);
    let current = |r: &chat_store::ProjectorStatus| match (latest, split(r)) {
        (Some(latest), Some((_, count))) => count == latest,
        _ => true,
    };
    let reports: Vec<_> = reports
        .into_iter()
        .filter(|r| current(r) || now - r.reported_at_ms < window)
        .collect();
    let other_split_reports = reports.iter().any(|r| !current(r));
    if let (Some(count), false) = (latest, other_split_reports) {
        let reported: HashSet<u32> = reports.iter().filter_map(split).map(|(i, _)| i).collect();
        if let Some(missing) = (0..count).find(|i| !reported.contains(i)) {
            return Err(format!(
                "projector {missing}/{count} has never reported, so its rooms' resends past the \
                 duplicate window could not be recognized"
            ));
        }
    }
    match reports.iter().map(|r| r.lag_ms as i64).max() {
        // No projector has ever reported: with one in this process (starting up), nothing to
        // judge by yet (see the crate docs); without, the store may be one no projector fills,
        // and a resend past the window would be appended again.
        None if projector_here => Ok(()),
        None => Err(
            "no projector has reported to this process's store yet, so a resend past the \
             duplicate window could not be recognized; appends wait for one (an edge or api \
             process reads the store a projector writes: with SQLite, run CHAT_ROLE=all)"
                .to_owned(),
        ),
        Some(lag) if lag >= window => Err(format!(
            "projection lags {lag} ms behind the log, more than the {window} ms duplicate window"
        )),
        Some(_) => match reports.iter().map(|r| r.reported_at_ms).min() {
            Some(oldest) if now - oldest >= window => Err(format!(
                "a projector has not reported for {} ms, more than the {window} ms duplicate window",
                now - oldest
            )),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(head: u64, checked: Instant) -> Cached {
        let admin = UserId::parse("admin").unwrap();
        let state = RoomState {
            kind: RoomKind::Group,
            name: "r".into(),
            creator: admin.clone(),
            members: BTreeMap::from([(admin, 1)]),
            head,
            read_only: false,
            pair: None,
        };
        Cached {
            state: Arc::new(state),
            head,
            checked,
            renewing: false,
            ahead: BTreeMap::new(),
        }
    }

    /// Acks of this process's appends that come past a gap wait for it; once it closes, the
    /// state counts as checked when the last of them was sent. A gap that stays open (another
    /// process's append) holds the head where it is.
    #[test]
    fn acks_out_of_order_advance_once_the_gap_closes() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut c = cached(5, t0);
        for (seq, sent) in [(7, at(30)), (8, at(20)), (10, at(50))] {
            c.ahead.insert(seq, sent);
            c.advance();
        }
        assert_eq!((c.head, c.checked), (5, t0), "nothing past the gap at 6");
        c.ahead.insert(6, at(10));
        c.advance();
        assert_eq!(c.head, 8, "6, 7 and 8 fold in; 10 waits for 9");
        assert_eq!(c.checked, at(30), "the latest send among them");
        assert_eq!(c.ahead.keys().copied().collect::<Vec<_>>(), [10]);

        // A refresh that read the log to 12 makes 10 old news.
        let mut refreshed = cached(12, at(60));
        refreshed.ahead = std::mem::take(&mut c.ahead);
        refreshed.advance();
        assert!(refreshed.ahead.is_empty());
        assert_eq!((refreshed.head, refreshed.checked), (12, at(60)));
    }

    fn report(partition: &str, lag_ms: u64, reported_at_ms: i64) -> chat_store::ProjectorStatus {
        chat_store::ProjectorStatus {
            partition: partition.into(),
            lag_ms,
            reported_at_ms,
        }
    }

    /// After the projectors are split three ways instead of two, the two old rows (which no
    /// longer report) do not hold back appends; a partition of the new split that stops, or
    /// never started, does.
    #[test]
    fn only_the_current_split_of_projectors_is_judged() {
        let (window, now) = (600_000, 10_000_000);
        let old = now - 3_600_000;
        let mut reports = vec![report("0/2", 0, old), report("1/2", 50, old)];
        assert!(judge_projection(reports.clone(), now, window, false)
            .unwrap_err()
            .contains("has not reported for"));
        reports.extend([
            report("0/3", 10, now - 1_000),
            report("1/3", 0, now - 500),
            report("2/3", 0, now - 200),
        ]);
        assert_eq!(
            judge_projection(reports.clone(), now, window, false),
            Ok(())
        );

        reports[3].reported_at_ms = old;
        assert!(judge_projection(reports.clone(), now, window, false)
            .unwrap_err()
            .contains("has not reported for"));
        reports.remove(3);
        let refused = judge_projection(reports.clone(), now, window, false).unwrap_err();
        assert!(
            refused.contains("projector 1/3 has never reported"),
            "{refused}"
        );
        // While the new split starts, the old one still reporting covers the rooms (and its
        // lag counts).
        reports[0].reported_at_ms = now - 100;
        reports[1].reported_at_ms = now - 100;
        assert_eq!(
            judge_projection(reports.clone(), now, window, false),
            Ok(())
        );
        reports[1].lag_ms = window as u64;
        assert!(judge_projection(reports, now, window, false)
            .unwrap_err()
            .contains("projection lags"));

        // An all-in-one process once ran on the store, then a split one took over (and the
        // other way round).
        let once = vec![
            report("0/1", 0, old),
            report("0/2", 0, now),
            report("1/2", 0, now),
        ];
        assert_eq!(judge_projection(once, now, window, false), Ok(()));
        let back = vec![
            report("0/2", 0, old),
            report("1/2", 0, old),
            report("0/1", 0, now),
        ];
        assert_eq!(judge_projection(back, now, window, false), Ok(()));
        assert!(judge_projection(Vec::new(), now, window, false).is_err());
        assert_eq!(judge_projection(Vec::new(), now, window, true), Ok(()));
    }
}

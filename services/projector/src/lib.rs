//! The projector: keeps the store up to date with every room's log.
//!
//! No consumer and no poll loop per room. One core NATS subscription to every room's live
//! subject (`<prefix>.live.*`) brings each stored event once it is persisted; the projector keeps
//! the rooms its [`Partition`] owns, applies each room's events in sequence order, and batches
//! whatever is ready for the store into one write. A room whose next event did not arrive (core
//! NATS is at-most-once) is read from its stream from the store's checkpoint on. A lost *last*
//! event has no successor to reveal it, so the stream list (one paged request per 256 rooms) is
//! compared with the checkpoints at start, after every reconnect and periodically, and any room
//! behind is caught up the same way.
//!
//! The store skips what its checkpoint already covers, so restarts, replays and duplicates
//! converge to the same rows; an entry that cannot be decoded is stored as a dead letter and the
//! room moves on.
#![forbid(unsafe_code)]

mod partition;
mod rebuild;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::NATS_SEQUENCE;
use chat_log::{ConnectionEvent, RawEntry, RoomLog, TRACEPARENT};
use chat_model::RoomId;
use chat_store::{Commits, Entry, ProjectorStatus, RoomBatch, Store};
use futures::{FutureExt, StreamExt};
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use partition::Partition;
pub use rebuild::{rebuild, RebuildError, RebuildReport};

/// Settings of a projector.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// The share of the rooms this process projects.
    pub partition: Partition,
    /// The most entries written to the store in one transaction.
    pub batch_max: usize,
    /// How often the stream list is compared with the checkpoints.
    pub reconcile_every: Duration,
    /// How often the projector reports its lag to the store.
    pub report_every: Duration,
    /// How many rooms are read from their streams at once.
    pub concurrent_fills: usize,
    /// While rooms are read from their streams, how long entries may wait for a fuller batch
    /// before they are written anyway. A stream read delivers far faster than one event at a
    /// time, and a transaction of a few hundred rows costs nearly as much as one of a few
    /// thousand (the id index takes random keys: each commit rewrites the index pages it touched).
    pub fill_linger: Duration,
    /// How long live entries may wait for a fuller batch while no stream is being read. Under a
    /// steady stream of appends the writer is otherwise free after every commit and writes a
    /// handful of events at a time, and commits cost more than the rows in them.
    pub live_linger: Duration,
    /// Commits announced to, and flushes asked by, readers in this process.
    pub commits: Arc<Commits>,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig {
            partition: Partition::ALL,
            batch_max: 2_000,
            reconcile_every: Duration::from_secs(30),
            report_every: Duration::from_secs(1),
            concurrent_fills: 8,
            fill_linger: Duration::from_millis(50),
            live_linger: Duration::from_millis(LIVE_LINGER_MS),
            commits: Arc::default(),
        }
    }
}

const LIVE_LINGER_MS: u64 = 20;

/// Live entries waiting that make the writer linger [`BUSY_LINGER_FACTOR`] times as long: about
/// 13,000 appends/s at the default linger. Measured with `chat-bench edge_send_ack` (about
/// 30,000 appends/s), where the writer committing every 100 ms instead of every 20 ms left the
/// edge about 10% more appends per second (BENCHMARKS.md).
const BUSY_OUTBOX: usize = 256;
const BUSY_LINGER_FACTOR: u32 = 5;

/// Counters a running projector exposes (for `/metrics`).
#[derive(Debug, Default)]
pub struct ProjectorStats {
    /// Entries written to the store.
    pub projected: AtomicU64,
    /// Entries that could not be decoded (stored as dead letters).
    pub dead_letters: AtomicU64,
    /// Ranges read from streams to fill gaps or catch up.
    pub fills: AtomicU64,
    /// Stream listings compared with what the projector holds.
    pub listings: AtomicU64,
    /// Age of the oldest known event not yet in the store, ms.
    pub lag_ms: AtomicU64,
    /// Store writes that failed (and were retried).
    pub store_errors: AtomicU64,
    /// Times the projector stopped on an error (or a panic) and was started again.
    pub restarts: AtomicU64,
    /// Time spent writing batches to the store (retries included), µs: against the time it took
    /// to project them, it says whether the store or the stream reads set the pace.
    pub store_write_us: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("subscribe to the live subjects: {0}")]
    Subscribe(String),
    #[error("read checkpoints: {0}")]
    Store(#[from] chat_store::StoreError),
}

/// Where one room stands.
#[derive(Debug)]
struct Track {
    /// The last sequence handed to the writer (everything up to it is on its way).
    queued: u64,
    /// The last sequence known to exist in the log.
    known: u64,
    /// The last sequence the store confirmed.
    stored: u64,
    /// Whether a range of this room is being read from its stream.
    filling: bool,
    /// Since when (ms since epoch) the room has held events not yet stored.
    behind_since: Option<i64>,
}

impl Track {
    fn new(checkpoint: u64) -> Track {
        Track {
            queued: checkpoint,
            known: checkpoint,
            stored: checkpoint,
            filling: false,
            behind_since: None,
        }
    }

    fn mark_behind(&mut self, since_ms: i64) {
        self.behind_since = Some(self.behind_since.map_or(since_ms, |b| b.min(since_ms)));
    }
}

/// Entries one stream read hands the loop at a time, at most (whatever is already there, up to
/// this many, goes as one input).
const FILL_CHUNK: usize = 512;

/// Inputs waiting for the loop, at most (each up to [`FILL_CHUNK`] entries).
const INPUT_CAPACITY: usize = 64;

/// What arrives at the projector's loop besides live messages.
enum Input {
    /// Consecutive entries read from a stream, decoded (dead letters not counted yet).
    Filled(RoomId, Vec<Entry>),
    /// A stream read ended (an error means: try again later).
    FillDone(RoomId, Result<(), String>),
    /// The stream list: every room's last sequence, and when the listing before it started
    /// (ms since the epoch; what it finds behind was appended after that).
    Heads(Vec<(RoomId, u64)>, i64),
}

/// Runs a projector until `shutdown` is cancelled, starting it again (after a pause that grows
/// to [`RESTART_PAUSE_MAX`]) whenever it stops on an error or a panic: the store unreachable at
/// start, the live subscription closed. A projector that stopped for good would leave the store
/// behind the log with nothing to say so but its reports going stale.
pub async fn run_supervised(
    log: RoomLog,
    store: Arc<dyn Store>,
    config: ProjectorConfig,
    stats: Arc<ProjectorStats>,
    shutdown: CancellationToken,
) {
    let mut pause = Duration::from_millis(200);
    loop {
        let running = tokio::spawn(run(
            log.clone(),
            store.clone(),
            config.clone(),
            stats.clone(),
            shutdown.clone(),
        ));
        let started = tokio::time::Instant::now();
        let why = match running.await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_panic() => format!("panicked: {e}"),
            Err(e) => e.to_string(),
        };
        if shutdown.is_cancelled() {
            return;
        }
        stats.restarts.fetch_add(1, Ordering::Relaxed);
        // A run that lasted a while is a new failure, not the same one again.
        if started.elapsed() > RESTART_PAUSE_MAX * 2 {
            pause = Duration::from_millis(200);
        }
        tracing::error!(partition = %config.partition, error = %why, retry_in = ?pause, "projector stopped; starting it again");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RESTART_PAUSE_MAX);
    }
}

/// The longest pause before a stopped projector is started again.
pub const RESTART_PAUSE_MAX: Duration = Duration::from_secs(10);

/// Runs a projector until `shutdown` is cancelled.
pub async fn run(
    log: RoomLog,
    store: Arc<dyn Store>,
    config: ProjectorConfig,
    stats: Arc<ProjectorStats>,
    shutdown: CancellationToken,
) -> Result<(), ProjectorError> {
    // Subscribe before reading checkpoints and heads, so nothing falls between them.
    let live = log
        .client()
        .subscribe(log.config().live_wildcard())
        .await
        .map_err(|e| ProjectorError::Subscribe(e.to_string()))?;
    let mut connection = log.connection_events();
    let mut live = LiveInput {
        subscription: live,
        prefix: format!("{}.live.", log.config().prefix),
        partition: config.partition,
        stats: stats.clone(),
        batch_max: config.batch_max,
    };

    let mut tracks: HashMap<RoomId, Track> = store
        .checkpoints()
        .await?
        .into_iter()
        .filter(|(room, _)| config.partition.owns(room))
        .map(|(room, seq)| (room, Track::new(seq)))
        .collect();
    tracing::info!(partition = %config.partition, rooms = tracks.len(), "projector starting");
    // What the log gained while no projector of this share ran is dated from this share's last
    // report, not from when this process learns of it: the edges judge resends past the
    // duplicate window by the lag reported, and a backlog dated "now" would read as fresh.
    let mut backlog_since = previous_backlog_floor(store.as_ref(), &config.partition).await;
    // Listings find what the live feed missed (a lost last event, a reconnect): appended after
    // the listing before them started, at the earliest.
    let mut listed_at: Option<i64> = None;

    let (input_tx, mut input_rx) = mpsc::channel::<Input>(INPUT_CAPACITY);
    let (write_tx, write_rx) = mpsc::channel::<Commit>(1);
    // Its own channel, never full: the writer must not wait for the loop, which may itself be
    // waiting to hand the writer a batch. It holds at most a couple of reports, because the loop
    // reads it before any other input and the writer takes one batch at a time.
    let (stored_tx, mut stored_rx) = mpsc::unbounded_channel::<Vec<(RoomId, u64)>>();
    let mut tasks = JoinSet::new();
    tasks.spawn(writer(
        store.clone(),
        write_rx,
        stored_tx,
        stats.clone(),
        config.commits.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(list_heads(log.clone(), input_tx.clone()));

    let mut out = Outbox::default();
    let mut writer_busy = false;
    // A reader asked for what is held to be written without lingering.
    let mut flush_now = false;
    // The last live batch came at BUSY_OUTBOX or more entries per `live_linger`; it counts for
    // the next only if that one started within a `live_linger` of it (not after a pause).
    let mut busy = false;
    // When the last batch went to the writer.
    let mut handed_at = tokio::time::Instant::now();
    // The last take from the live subscription stopped at a full batch: more may wait there.
    let mut backlog = false;
    let mut fill_queue: VecDeque<RoomId> = VecDeque::new();
    let mut fills_running = 0usize;
    let mut reconcile = tokio::time::interval(config.reconcile_every);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reconcile.tick().await; // the first tick is now: the list above covers it
    let mut report = tokio::time::interval(config.report_every);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let linger = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(linger);

    loop {
        // Until when the outbox waits for a fill to bring more before going to the free writer.
        let wait = if fills_running > 0 {
            config.fill_linger
        } else if out.filled {
            // The reads are over: nothing more is coming for these soon.
            Duration::ZERO
        } else if out.len >= BUSY_OUTBOX
            || (busy
                && out.since.is_some_and(|since| {
                    since.saturating_duration_since(handed_at) < config.live_linger
                }))
        {
            // Appends arrive faster than commits are worth making: each commit rewrites the
            // pages it touched (the id index's are all over the file), so fewer, fuller commits
            // leave the processes beside the writer more of the machine.
            config.live_linger.saturating_mul(BUSY_LINGER_FACTOR)
        } else {
            config.live_linger
        };
        let linger_until = out
            .since
            .filter(|_| !writer_busy && !flush_now)
            // A deadline already past stays: the sleep fires at once (with the live
            // subscription paused, nothing else may wake the loop).
            .map(|since| since + wait);
        if let Some(until) = linger_until {
            if linger.deadline() != until {
                linger.as_mut().reset(until);
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(rooms) = stored_rx.recv() => {
                writer_busy = false;
                for (room, seq) in rooms {
                    if let Some(track) = tracks.get_mut(&room) {
                        track.stored = track.stored.max(seq);
                        if track.stored >= track.known {
                            track.behind_since = None;
                        }
                    }
                }
            }
            input = input_rx.recv() => {
                let Some(input) = input else { break };
                match input {
                    Input::Filled(room, entries) => {
                        if let Some(track) = tracks.get_mut(&room) {
                            // A fill hands out what the log holds; a jump means the log no
                            // longer holds what lies between (retention), so move past it.
                            let queued = track.queued;
                            let fresh = entries.into_iter().filter(|entry| entry.seq > queued);
                            let mut last = queued;
                            out.filled = true;
                            out.extend(&room, fresh.inspect(|entry| {
                                last = entry.seq;
                                count_dead_letter(&room, entry, &stats);
                            }));
                            track.queued = last;
                            track.known = track.known.max(last);
                        }
                    }
                    Input::FillDone(room, result) => {
                        fills_running -= 1;
                        if let Some(track) = tracks.get_mut(&room) {
                            track.filling = false;
                            if let Err(e) = &result {
                                tracing::warn!(room = %room, error = %e, "reading the room's stream failed; retrying");
                            }
                            if track.known > track.queued {
                                track.filling = true;
                                fill_queue.push_back(room);
                            }
                        }
                    }
                    Input::Heads(heads, started_ms) => {
                        // Live messages waiting for the lingering batch first: a head they
                        // reach is not behind, and must not start a stream read.
                        backlog = live.take_ready(&mut tracks, &mut out, &mut fill_queue).await?;
                        stats.listings.fetch_add(1, Ordering::Relaxed);
                        let since = backlog_since.take().or(listed_at).unwrap_or(started_ms);
                        listed_at = Some(listed_at.map_or(started_ms, |at| at.max(started_ms)));
                        for (room, last) in heads {
                            if !config.partition.owns(&room) {
                                continue;
                            }
                            let track = tracks.entry(room.clone()).or_insert_with(|| Track::new(0));
                            track.known = track.known.max(last);
                            if track.known > track.queued {
                                track.mark_behind(since);
                                if !track.filling {
                                    track.filling = true;
                                    fill_queue.push_back(room);
                                }
                            }
                        }
                    }
                }
            }
            // While a batch lingers, live messages wait in the subscription and are taken all at
            // once when it is due (below): one wake-up per commit rather than one per event.
            message = live.subscription.next(), if out.since.is_none() || backlog => {
                let Some(message) = message else {
                    return Err(ProjectorError::Subscribe("live subscription closed".to_owned()));
                };
                live.take(message, &mut tracks, &mut out, &mut fill_queue);
                backlog = live.take_ready(&mut tracks, &mut out, &mut fill_queue).await?;
            }
            event = connection.recv() => {
                // After a reconnect, a slow-consumer notice (messages dropped, perhaps a
                // room's last) or lost notices, live messages may have been missed.
                if matches!(
                    event,
                    Ok(ConnectionEvent::Connected | ConnectionEvent::SlowConsumer) | Err(_)
                ) {
                    tasks.spawn(list_heads(log.clone(), input_tx.clone()));
                }
            }
            _ = reconcile.tick() => {
                tasks.spawn(list_heads(log.clone(), input_tx.clone()));
            }
            // Nothing to report until the first listing says what is behind (a restarted
            // projector knows of no backlog before it).
            _ = report.tick(), if listed_at.is_some() => {
                let now = now_ms();
                let lag = tracks
                    .values()
                    .filter_map(|t| t.behind_since)
                    .min()
                    .map_or(0, |since| (now - since).max(0) as u64);
                stats.lag_ms.store(lag, Ordering::Relaxed);
                let status = ProjectorStatus {
                    partition: config.partition.to_string(),
                    lag_ms: lag,
                    reported_at_ms: now,
                };
                let store = store.clone();
                tasks.spawn(async move {
                    if let Err(e) = store.report_projector(&status).await {
                        tracing::warn!(error = %e, "projector report failed");
                    }
                });
            }
            () = &mut linger, if linger_until.is_some() => {}
            () = config.commits.flush_requested(), if !flush_now => flush_now = true,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
        }
        // Start stream reads while slots are free.
        while fills_running < config.concurrent_fills.max(1) {
            let Some(room) = fill_queue.pop_front() else {
                break;
            };
            let Some(track) = tracks.get(&room) else {
                continue;
            };
            fills_running += 1;
            stats.fills.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(fill(
                log.clone(),
                room,
                track.queued + 1,
                track.known,
                input_tx.clone(),
            ));
        }
        // Hand what is ready to the writer when it is free and the oldest entry has waited
        // `fill_linger` (while a fill is about to bring more) or `live_linger`, or when the
        // batch is full.
        let Some(since) = out.since else { continue };
        let linger_over = flush_now || since + wait <= tokio::time::Instant::now();
        if !writer_busy && linger_over {
            // What arrived while the batch lingered goes with it.
            backlog = live
                .take_ready(&mut tracks, &mut out, &mut fill_queue)
                .await?;
        }
        if (!writer_busy && linger_over) || out.len >= config.batch_max {
            if !out.filled {
                let per_linger = out.len as u128 * config.live_linger.as_micros();
                busy = per_linger >= BUSY_OUTBOX as u128 * since.elapsed().as_micros().max(1);
            }
            handed_at = tokio::time::Instant::now();
            let batches = out.take();
            flush_now = false;
            writer_busy = true;
            if write_tx.send(batches).await.is_err() {
                break;
            }
        }
    }
    // Write what is queued (and what waits in the subscription), then stop.
    let _ = live
        .take_ready(&mut tracks, &mut out, &mut fill_queue)
        .await;
    if !out.is_empty() {
        let _ = write_tx.send(out.take()).await;
    }
    drop(write_tx);
    // The writer ends once it has written everything sent to it.
    while stored_rx.recv().await.is_some() {}
    drop(input_tx);
    tasks.shutdown().await;
    tracing::info!(partition = %config.partition, "projector stopped");
    Ok(())
}

/// Spans of appending requests one commit's span links to, at most (a commit may hold
/// thousands of events; the rest are not linked).
const MAX_LINKS: usize = 32;

/// One store transaction for the writer: the entries, and the spans of the requests that
/// appended them (from their `traceparent`), for its span to link to.
struct Commit {
    batches: Vec<RoomBatch>,
    links: Vec<SpanContext>,
}

/// Entries ready for the store, grouped by room in sequence order.
#[derive(Default)]
struct Outbox {
    rooms: HashMap<RoomId, Vec<Entry>>,
    /// Spans of the requests that appended them, up to [`MAX_LINKS`].
    links: Vec<SpanContext>,
    len: usize,
    /// When the oldest entry was queued.
    since: Option<tokio::time::Instant>,
    /// Whether some entries come from stream reads.
    filled: bool,
}

impl Outbox {
    /// Appends `entries` to the room's.
    fn extend(&mut self, room: &RoomId, entries: impl IntoIterator<Item = Entry>) {
        let queued = match self.rooms.get_mut(room) {
            Some(queued) => queued,
            None => self.rooms.entry(room.clone()).or_default(),
        };
        let before = queued.len();
        queued.extend(entries);
        self.len += queued.len() - before;
        if self.len > 0 && self.since.is_none() {
            self.since = Some(tokio::time::Instant::now());
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn link(&mut self, span: SpanContext) {
        if self.links.len() < MAX_LINKS {
            self.links.push(span);
        }
    }

    fn take(&mut self) -> Commit {
        self.len = 0;
        self.since = None;
        self.filled = false;
        Commit {
            batches: self
                .rooms
                .drain()
                .map(|(room, entries)| RoomBatch { room, entries })
                .collect(),
            links: std::mem::take(&mut self.links),
        }
    }
}

/// The live subscription, and what takes its messages into the loop's state.
struct LiveInput {
    subscription: async_nats::Subscriber,
    /// `<prefix>.live.`: what precedes the room in a live subject.
    prefix: String,
    partition: Partition,
    stats: Arc<ProjectorStats>,
    /// Entries a batch holds, at most (`ProjectorConfig::batch_max`).
    batch_max: usize,
}

impl LiveInput {
    /// Queues a live message's entry if it is the room's next; a gap queues a read of the
    /// room's stream instead.
    fn take(
        &self,
        message: async_nats::Message,
        tracks: &mut HashMap<RoomId, Track>,
        out: &mut Outbox,
        fill_queue: &mut VecDeque<RoomId>,
    ) {
        let Some(room) = message
            .subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| RoomId::parse(r).ok())
        else {
            return;
        };
        if !self.partition.owns(&room) {
            return;
        }
        let headers = message.headers.as_ref();
        let Some(seq) = headers
            .and_then(|h| h.get(NATS_SEQUENCE))
            .and_then(|v| v.as_str().parse::<u64>().ok())
        else {
            return;
        };
        let appended_by = headers
            .and_then(|h| h.get(TRACEPARENT))
            .and_then(|v| linked_span(v.as_str()));
        let entry = RawEntry {
            seq,
            payload: message.payload,
        };
        let track = tracks.entry(room.clone()).or_insert_with(|| Track::new(0));
        track.known = track.known.max(seq);
        if seq <= track.queued {
            return;
        }
        // Lag is measured on this process's clock from when the event reached it (an event's
        // own `ts` comes from another machine's clock).
        track.mark_behind(now_ms());
        if !track.filling && seq == track.queued + 1 {
            track.queued = seq;
            // Decoded (and a dead letter counted) only when queued: an entry dropped here is
            // decoded by the fill that covers it.
            let entry = decode(entry);
            count_dead_letter(&room, &entry, &self.stats);
            out.extend(&room, [entry]);
            if let Some(span) = appended_by {
                out.link(span);
            }
        } else if !track.filling {
            tracing::debug!(room = %room, expected = track.queued + 1, got = seq, "gap: reading the stream");
            track.filling = true;
            fill_queue.push_back(room);
        }
    }

    /// Takes the live messages already there until `out` holds a full batch, and says whether
    /// it stopped there (more may be waiting). Outside tokio's cooperative budget, which would
    /// otherwise end the take at 128 and leave the rest for the batch after; it yields to the
    /// other tasks every [`TAKE_CHUNK`] instead.
    async fn take_ready(
        &mut self,
        tracks: &mut HashMap<RoomId, Track>,
        out: &mut Outbox,
        fill_queue: &mut VecDeque<RoomId>,
    ) -> Result<bool, ProjectorError> {
        let mut taken = 0;
        while out.len < self.batch_max {
            if taken == TAKE_CHUNK {
                tokio::task::yield_now().await;
                taken = 0;
            }
            match tokio::task::unconstrained(self.subscription.next()).now_or_never() {
                Some(Some(message)) => self.take(message, tracks, out, fill_queue),
                Some(None) => {
                    return Err(ProjectorError::Subscribe(
                        "live subscription closed".to_owned(),
                    ))
                }
                None => return Ok(false),
            }
            taken += 1;
        }
        Ok(true)
    }
}

/// Live messages taken at once before the projector lets other tasks run.
const TAKE_CHUNK: usize = 256;

fn decode(entry: RawEntry) -> Entry {
    Entry {
        seq: entry.seq,
        event: entry.decode().map_err(|e| e.to_string()),
    }
}

/// Counts (and logs) an entry that is queued for the store as a dead letter.
fn count_dead_letter(room: &RoomId, entry: &Entry, stats: &ProjectorStats) {
    if let Err(e) = &entry.event {
        stats.dead_letters.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(room = %room, seq = entry.seq, error = %e, "undecodable entry: dead letter");
    }
}

/// The span a W3C `traceparent` header names (version 00), if it is well formed.
fn linked_span(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16)
        .ok()
        .filter(|_| flags.len() == 2)?;
    let span = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    span.is_valid().then_some(span)
}

/// Writes batches, retrying a failed write until it succeeds (nothing is dropped).
async fn writer(
    store: Arc<dyn Store>,
    mut commits_rx: mpsc::Receiver<Commit>,
    stored_tx: mpsc::UnboundedSender<Vec<(RoomId, u64)>>,
    stats: Arc<ProjectorStats>,
    commits: Arc<Commits>,
    shutdown: CancellationToken,
) {
    // A no-op unless the process set up a meter provider (chatd does: `/metrics`, OTLP).
    let commit_duration = opentelemetry::global::meter("chat-projector")
        .f64_histogram("chat.projector.commit.duration")
        .with_unit("s")
        .with_description("Store transactions of the projector, retries included.")
        .with_boundaries(vec![
            0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ])
        .build();
    while let Some(Commit {
        batches: batch,
        links,
    }) = commits_rx.recv().await
    {
        let started = std::time::Instant::now();
        let count: usize = batch.iter().map(|b| b.entries.len()).sum();
        let span = tracing::info_span!(
            "chat.projector.commit",
            // As `i64`: a `u64` would reach traces as a string.
            chat.rooms = batch.len() as i64,
            chat.events = count as i64,
            chat.retries = tracing::field::Empty,
        );
        if !span.is_disabled() {
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            // The appends it stores (those that came with a trace), as links: a commit is no
            // one request's child.
            for link in links {
                span.add_link(link);
            }
        }
        let mut pause = Duration::from_millis(50);
        let mut retries = 0u32;
        loop {
            match store.apply(&batch).instrument(span.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    // Stopping: what is not written is read from the log again at the next
                    // start (the store's checkpoints say where), so nothing waits for a store
                    // that does not answer.
                    if shutdown.is_cancelled() {
                        tracing::warn!(error = %e, events = count, "store write failed while stopping; the next start reads these events from the log again");
                        return;
                    }
                    retries += 1;
                    span.record("chat.retries", i64::from(retries));
                    tracing::error!(error = %e, "store write failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        commits.committed();
        drop(span);
        let elapsed = started.elapsed();
        commit_duration.record(elapsed.as_secs_f64(), &[]);
        let busy = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        stats.store_write_us.fetch_add(busy, Ordering::Relaxed);
        stats.projected.fetch_add(count as u64, Ordering::Relaxed);
        let stored = batch
            .into_iter()
            .filter_map(|b| Some((b.room, b.entries.last()?.seq)))
            .collect();
        if stored_tx.send(stored).is_err() {
            return;
        }
    }
}

/// Reads `from..=to` of a room's stream into the projector's loop, decoded here (off the loop),
/// in chunks of whatever has arrived.
async fn fill(log: RoomLog, room: RoomId, from: u64, to: u64, input: mpsc::Sender<Input>) {
    let mut reader = log.read_range(&room, from, to).bulk();
    let result = loop {
        let mut chunk = Vec::new();
        // Wait for one entry, then take what is already there (the reader is cancel-safe).
        let mut end = match reader.next().await {
            None => Some(Ok(())),
            Some(Ok(entry)) => {
                chunk.push(decode(entry));
                None
            }
            Some(Err(e)) => Some(Err(e.to_string())),
        };
        while end.is_none() && chunk.len() < FILL_CHUNK {
            match reader.next().now_or_never() {
                None => break,
                Some(None) => end = Some(Ok(())),
                Some(Some(Ok(entry))) => chunk.push(decode(entry)),
                Some(Some(Err(e))) => end = Some(Err(e.to_string())),
            }
        }
        if !chunk.is_empty()
            && input
                .send(Input::Filled(room.clone(), chunk))
                .await
                .is_err()
        {
            return;
        }
        if let Some(result) = end {
            break result;
        }
    };
    if result.is_err() {
        // Give NATS a moment before the loop asks again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = input.send(Input::FillDone(room, result)).await;
}

/// Lists every room's head into the projector's loop.
async fn list_heads(log: RoomLog, input: mpsc::Sender<Input>) {
    let started = now_ms();
    match log.rooms().await {
        Ok(rooms) => {
            let heads = rooms.into_iter().map(|(r, b)| (r, b.last)).collect();
            let _ = input.send(Input::Heads(heads, started)).await;
        }
        Err(e) => tracing::warn!(error = %e, "listing rooms failed; next reconcile retries"),
    }
}

/// The earliest the log's events not yet stored for `partition` can have been appended, by its
/// last report: nothing older than its lag then was missing, and what came after it is newer.
/// `None` when it never reported (or the store cannot say).
async fn previous_backlog_floor(store: &dyn Store, partition: &Partition) -> Option<i64> {
    let name = partition.to_string();
    match store.projectors().await {
        Ok(reports) => reports.into_iter().find(|r| r.partition == name).map(|r| {
            r.reported_at_ms
                .saturating_sub(r.lag_ms as i64)
                .min(now_ms())
        }),
        Err(e) => {
            tracing::warn!(error = %e, "reading the last projector report failed; backlog dated from now");
            None
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

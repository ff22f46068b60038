//! Read cursors, throttled per user: what the `read` frames of this edge's sessions become.
//!
//! The contract allows at most one `read` event per user per room per second, and a cursor
//! only moves forward. Every session of a user on this edge shares one gate per room: a frame
//! that finds the last append landed more than the interval ago (and none in flight) appends at
//! once; otherwise its seq waits here (the highest wins) and the flush task appends it when the
//! interval has passed. One append per gate is in flight at a time, each carries a higher seq
//! than the last, and the next starts an interval after the last one landed, so this edge's
//! `read` events of a user reach the log in increasing order, a second apart. A gate is kept
//! for [`RETAIN`] after its last append (a stale frame from another device arriving later is
//! still recognised as behind), then forgotten; by then the store holds the cursor, which
//! [`Rooms::read`] checks. (Two edges serving the same user each keep their own gates; the
//! stored cursor never moves back whatever the log holds, see the projector.)
//!
//! What waits is lost if the process is killed (the client's next `read` carries it again); a
//! drain appends it before the process exits; an append that fails for want of NATS or the
//! store is tried again at the next flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chat_model::{RoomId, RoomState, UserId};
use chat_rooms::{RoomError, Rooms};
use futures::stream::{self, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Read events per user per room: at most one per this interval (the contract's second).
pub const READ_INTERVAL: Duration = Duration::from_secs(1);
/// How often waiting cursors are looked at (a deferred cursor waits at most this much longer
/// than the interval).
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How long a gate is kept after its last append: far longer than the projector takes to store
/// a cursor, after which [`Rooms::read`] sees it in the store.
const RETAIN: Duration = Duration::from_secs(60);
/// Gates past which idle ones are forgotten at once (those within [`RETAIN`] included): what
/// the edge keeps stays bounded however many users read.
const MAX_GATES: usize = 200_000;
/// Appends one flush makes at once.
const APPENDS_IN_FLIGHT: usize = 16;

type Key = (RoomId, UserId);

/// The gates of every (room, user) that read on this edge lately.
pub struct ReadCursors {
    gates: Mutex<Gates>,
    interval: Duration,
}

#[derive(Default)]
struct Gates {
    map: HashMap<Key, Gate>,
    /// Gates with a cursor waiting (so a flush tick need not look at every gate).
    waiting: usize,
}

#[derive(Debug, Clone, Copy)]
struct Gate {
    /// The highest seq this edge appended (or is appending) for the user in the room.
    appended: u64,
    /// When the last append landed (or started, while it is in flight).
    at: Instant,
    /// An append of this gate is on its way to the log.
    in_flight: bool,
    /// The highest seq asked for since, above `appended`, waiting for the interval.
    waiting: Option<u64>,
}

impl Gates {
    /// Makes `seq` wait at `key` (the highest waiting wins).
    fn wait(&mut self, key: &Key, seq: u64) {
        if let Some(gate) = self.map.get_mut(key) {
            match gate.waiting {
                Some(w) => gate.waiting = Some(w.max(seq)),
                None => {
                    gate.waiting = Some(seq);
                    self.waiting += 1;
                }
            }
        }
    }

    /// Forgets idle gates whose last append landed longer than `retain` ago.
    fn prune(&mut self, retain: Duration) {
        let now = Instant::now();
        self.map
            .retain(|_, g| g.in_flight || g.waiting.is_some() || now < g.at + retain);
    }
}

/// What became of a `read` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Appended now.
    Appended,
    /// Held back by the interval: the flush task appends it (or a higher one).
    Waiting,
    /// At or below what this edge already appended or holds for the user: nothing to do.
    Behind,
}

/// Ends an append of a gate however its future ends: dropped (the session went away) or
/// panicking counts as not settled, so the seq waits again instead of leaving the gate in
/// flight for ever.
struct Landing<'a> {
    cursors: &'a ReadCursors,
    key: Key,
    previous: u64,
    seq: u64,
    settled: bool,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.cursors
            .landed(&self.key, self.previous, self.seq, self.settled);
    }
}

impl ReadCursors {
    pub fn new(interval: Duration) -> ReadCursors {
        ReadCursors {
            gates: Mutex::new(Gates::default()),
            interval,
        }
    }

    fn gates(&self) -> MutexGuard<'_, Gates> {
        self.gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves `user`'s cursor in `room` to `seq`, now or once the interval has passed.
    /// `checked` is the room's state from [`Rooms::check_read`] just now (a member, `seq`
    /// within the head): an append now is not checked again; one that waits is, when due.
    pub async fn read(
        &self,
        rooms: &Rooms,
        room: &RoomId,
        user: &UserId,
        seq: u64,
        checked: Arc<RoomState>,
    ) -> Result<ReadOutcome, RoomError> {
        let key = (room.clone(), user.clone());
        let previous = {
            let mut gates = self.gates();
            let now = Instant::now();
            let gate = gates.map.get(&key).copied();
            match gate {
                Some(gate) if seq <= gate.appended || gate.waiting.is_some_and(|w| seq <= w) => {
                    return Ok(ReadOutcome::Behind);
                }
                Some(gate) if gate.in_flight || now < gate.at + self.interval => {
                    gates.wait(&key, seq);
                    return Ok(ReadOutcome::Waiting);
                }
                _ => {}
            }
            if gate.is_none() && gates.map.len() >= MAX_GATES {
                gates.prune(self.interval);
            }
            if gate.is_some_and(|g| g.waiting.is_some()) {
                // Due and not flushed yet: this higher seq goes now instead.
                gates.waiting -= 1;
            }
            gates.map.insert(
                key.clone(),
                Gate {
                    appended: seq,
                    at: now,
                    in_flight: true,
                    waiting: None,
                },
            );
            gate.map_or(0, |g| g.appended)
        };
        self.append(rooms, key, previous, seq, Some(checked))
            .await
            .map(|_| ReadOutcome::Appended)
    }

    /// Appends the gate's `seq` (its append marked in flight, `previous` what it had before),
    /// then lands it, whatever becomes of this future. Checked first unless `checked` holds the
    /// state a check just returned.
    async fn append(
        &self,
        rooms: &Rooms,
        key: Key,
        previous: u64,
        seq: u64,
        checked: Option<Arc<RoomState>>,
    ) -> Result<Option<u64>, RoomError> {
        let mut landing = Landing {
            cursors: self,
            key,
            previous,
            seq,
            settled: false,
        };
        let (room, user) = (&landing.key.0, &landing.key.1);
        let result = match checked {
            Some(state) => rooms.read_checked(user, room, seq, &state).await,
            None => rooms.read(user, room, seq).await,
        };
        landing.settled = settled(&result);
        result
    }

    /// Ends a gate's append: the interval starts again now; one not `settled` waits again
    /// (unless a higher seq does).
    fn landed(&self, key: &Key, previous: u64, seq: u64, settled: bool) {
        let mut gates = self.gates();
        let Some(gate) = gates.map.get_mut(key) else {
            return;
        };
        gate.in_flight = false;
        gate.at = Instant::now();
        if !settled {
            gate.appended = previous;
            gates.wait(key, seq);
        }
    }

    /// Takes the waiting cursors whose interval has passed, marking their appends in flight.
    fn take_due(&self) -> Vec<(Key, u64, u64)> {
        let mut gates = self.gates();
        if gates.waiting == 0 {
            return Vec::new();
        }
        let now = Instant::now();
        let interval = self.interval;
        let mut due = Vec::new();
        for (key, gate) in gates.map.iter_mut() {
            if gate.in_flight || now < gate.at + interval {
                continue;
            }
            if let Some(seq) = gate.waiting.take() {
                due.push((key.clone(), gate.appended, seq));
                *gate = Gate {
                    appended: seq,
                    at: now,
                    in_flight: true,
                    waiting: None,
                };
            }
        }
        gates.waiting -= due.len();
        due
    }

    /// Appends the waiting cursors that are due. A cursor that failed for want of NATS or the
    /// store waits for the next flush; one refused for good (the user left the room) is dropped.
    pub async fn flush(&self, rooms: &Rooms) {
        let due = self.take_due();
        stream::iter(due)
            .for_each_concurrent(APPENDS_IN_FLIGHT, |(key, previous, seq)| async move {
                let (room, user) = (key.0.clone(), key.1.clone());
                if let Err(e) = self.append(rooms, key, previous, seq, None).await {
                    tracing::warn!(room = %room, user = %user, seq, error = %e, "read cursor not appended");
                }
            })
            .await;
    }

    /// The user's message at `seq` in `room` was acked through this edge: their cursor is
    /// there at least (a message moves it), before the store knows. `read` frames at or below
    /// it, from any of their sessions here, are behind from now on, and a cursor of theirs
    /// waiting at or below it is dropped (appended later, it would move the cursor back as the
    /// room sees it). A gate made for this holds back no `read` above it.
    pub fn sent(&self, room: &RoomId, user: &UserId, seq: u64) {
        let key = (room.clone(), user.clone());
        let mut gates = self.gates();
        match gates.map.get_mut(&key) {
            Some(gate) => {
                gate.appended = gate.appended.max(seq);
                if gate.waiting.is_some_and(|w| w <= seq) {
                    gate.waiting = None;
                    gates.waiting -= 1;
                }
            }
            None => {
                if gates.map.len() >= MAX_GATES {
                    gates.prune(self.interval);
                }
                let now = Instant::now();
                gates.map.insert(
                    key,
                    Gate {
                        appended: seq,
                        // As if its last append landed an interval ago: a higher `read` goes
                        // out at once.
                        at: now.checked_sub(self.interval).unwrap_or(now),
                        in_flight: false,
                        waiting: None,
                    },
                );
            }
        }
    }

    /// Whether any cursor waits.
    fn any_waiting(&self) -> bool {
        self.gates().waiting > 0
    }

    /// Forgets the gates idle for longer than [`RETAIN`].
    fn prune(&self) {
        self.gates().prune(RETAIN);
    }
}

/// Whether an append's outcome is final: done, or refused for good. Only a want of NATS or the
/// store is worth another try (an internal fault would only fail again, every second).
fn settled<T>(result: &Result<T, RoomError>) -> bool {
    !matches!(result, Err(RoomError::Unavailable(_)))
}

/// Flushes due cursors every [`FLUSH_EVERY`] and forgets idle gates now and then. After
/// `shutdown`, sessions may still record, so it goes on until `sessions` is closed and empty,
/// then, for one more interval at most, appends what still waits as it falls due.
pub(crate) async fn run(
    cursors: Arc<ReadCursors>,
    rooms: Arc<Rooms>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) {
    let mut every = tokio::time::interval(FLUSH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned = Instant::now();
    let mut draining = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                continue;
            }
            _ = sessions.wait(), if draining => break,
            _ = every.tick() => {}
        }
        if cursors.any_waiting() {
            cursors.flush(&rooms).await;
        }
        if pruned.elapsed() >= RETAIN / 4 {
            cursors.prune();
            pruned = Instant::now();
        }
    }
    let deadline = Instant::now() + cursors.interval + FLUSH_EVERY;
    while cursors.any_waiting() && Instant::now() < deadline {
        every.tick().await;
        cursors.flush(&rooms).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(room: &str, user: &str) -> Key {
        (RoomId::parse(room).unwrap(), UserId::parse(user).unwrap())
    }

    /// A gate with an append in flight for `seq`, as [`ReadCursors::read`] leaves it.
    fn in_flight(cursors: &ReadCursors, key: &Key, seq: u64) {
        cursors.gates().map.insert(
            key.clone(),
            Gate {
                appended: seq,
                at: Instant::now(),
                in_flight: true,
                waiting: None,
            },
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_cursors_fall_due_an_interval_after_the_last_append_landed() {
        let cursors = ReadCursors::new(READ_INTERVAL);
        let k = key("general", "bob");
        in_flight(&cursors, &k, 10);
        // While in flight and within the interval, higher seqs wait (the highest wins) and
        // lower ones are behind.
        cursors.gates().wait(&k, 12);
        cursors.gates().wait(&k, 11);
        assert_eq!(cursors.gates().map[&k].waiting, Some(12));
        assert!(cursors.take_due().is_empty(), "still in flight");
        tokio::time::advance(Duration::from_millis(700)).await;
        cursors.landed(&k, 0, 10, true);
        tokio::time::advance(Duration::from_millis(700)).await;
        assert!(
            cursors.take_due().is_empty(),
            "the interval counts from when the append landed"
        );
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(cursors.take_due(), vec![(k.clone(), 10, 12)]);
        assert!(!cursors.any_waiting());
        assert!(cursors.gates().map[&k].in_flight);
    }

    /// The user's own message moves the cursor: a cursor waiting at or below it is dropped
    /// (appended after the message it would move the cursor back), one above it stays.
    #[tokio::test(start_paused = true)]
    async fn a_message_drops_the_cursors_waiting_below_it() {
        let cursors = ReadCursors::new(READ_INTERVAL);
        let (k, other) = (key("general", "bob"), key("general", "carol"));
        in_flight(&cursors, &k, 10);
        cursors.landed(&k, 0, 10, true);
        cursors.gates().wait(&k, 12);
        cursors.sent(&k.0, &k.1, 14);
        let gate = cursors.gates().map[&k];
        assert_eq!((gate.appended, gate.waiting), (14, None));
        assert!(!cursors.any_waiting());
        cursors.gates().wait(&k, 20);
        cursors.sent(&k.0, &k.1, 15);
        assert_eq!(
            cursors.gates().map[&k].waiting,
            Some(20),
            "above the message"
        );
        tokio::time::advance(READ_INTERVAL).await;
        assert_eq!(cursors.take_due(), vec![(k.clone(), 15, 20)]);

        // A user with no gate gets one: reads at or below the message are behind, and one
        // above it is not held back.
        cursors.sent(&other.0, &other.1, 30);
        let gate = cursors.gates().map[&other];
        assert_eq!(
            (gate.appended, gate.in_flight, gate.waiting),
            (30, false, None)
        );
        assert!(cursors.take_due().is_empty());
        assert!(Instant::now() >= gate.at + READ_INTERVAL, "not held back");
    }

    #[tokio::test(start_paused = true)]
    async fn an_append_that_fails_for_want_of_nats_waits_again_and_one_dropped_is_not_stuck() {
        let cursors = ReadCursors::new(READ_INTERVAL);
        let k = key("general", "bob");
        in_flight(&cursors, &k, 20);
        cursors.landed(&k, 5, 20, false);
        let gate = cursors.gates().map[&k];
        assert_eq!(
            (gate.appended, gate.waiting, gate.in_flight),
            (5, Some(20), false)
        );
        assert!(cursors.any_waiting());
        // A future dropped mid-append (its session gone) does not leave the gate in flight.
        tokio::time::advance(READ_INTERVAL).await;
        let due = cursors.take_due();
        assert_eq!(due, vec![(k.clone(), 5, 20)]);
        drop(Landing {
            cursors: &cursors,
            key: k.clone(),
            previous: 5,
            seq: 20,
            settled: false,
        });
        let gate = cursors.gates().map[&k];
        assert_eq!((gate.in_flight, gate.waiting), (false, Some(20)));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_gates_are_kept_for_a_while_then_forgotten() {
        let cursors = ReadCursors::new(READ_INTERVAL);
        let (kept, busy) = (key("general", "bob"), key("general", "carol"));
        in_flight(&cursors, &kept, 30);
        cursors.landed(&kept, 0, 30, true);
        tokio::time::advance(RETAIN / 2).await;
        cursors.prune();
        assert!(
            cursors.gates().map.contains_key(&kept),
            "a stale 25 is still behind"
        );
        in_flight(&cursors, &busy, 3);
        tokio::time::advance(RETAIN).await;
        cursors.prune();
        assert!(!cursors.gates().map.contains_key(&kept));
        assert!(cursors.gates().map.contains_key(&busy), "in flight: kept");
    }
}

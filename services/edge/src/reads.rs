//! Read cursors, throttled per user: what the `read` frames of this edge's sessions become.
//!
//! The contract allows at most one `read` event per user per room per second, and a cursor
//! only moves forward. Every session of a user on this edge shares one gate per room: a frame
//! that finds the last append older than the interval (and none in flight) appends at once;
//! otherwise its seq waits here (the highest wins) and the flush task appends it when the
//! interval has passed. One append per gate is in flight at a time and each carries a higher
//! seq than the last, so this edge's `read` events of a user reach the log in increasing order.
//! (Two edges serving the same user each keep their own gates; the stored cursor never moves
//! back whatever the log holds, see the projector.)
//!
//! What waits is lost if the process is killed (the client's next `read` carries it again); a
//! drain appends it before the process exits; an append that fails for want of NATS is tried
//! again at the next flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_model::{RoomId, UserId};
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
/// Appends one flush makes at once.
const APPENDS_IN_FLIGHT: usize = 16;

/// The gates of every (room, user) that read on this edge within the last interval.
pub struct ReadCursors {
    gates: Mutex<HashMap<(RoomId, UserId), Gate>>,
    interval: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Gate {
    /// The highest seq this edge appended (or is appending) for the user in the room.
    appended: u64,
    /// When that append started.
    at: Instant,
    /// An append of this gate is on its way to the log.
    in_flight: bool,
    /// The highest seq asked for since, above `appended`, waiting for the interval.
    waiting: Option<u64>,
}

/// What became of a `read` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Appended now.
    Appended,
    /// Held back by the interval: the flush task appends it (or a higher one).
    Waiting,
    /// At or below what this edge already appended for the user: nothing to do.
    Behind,
}

impl ReadCursors {
    pub fn new(interval: Duration) -> ReadCursors {
        ReadCursors {
            gates: Mutex::new(HashMap::new()),
            interval,
        }
    }

    fn gates(&self) -> std::sync::MutexGuard<'_, HashMap<(RoomId, UserId), Gate>> {
        self.gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves `user`'s cursor in `room` to `seq` (already checked: a member, `seq` within the
    /// head), now or once the interval has passed.
    pub async fn read(
        &self,
        rooms: &Rooms,
        room: &RoomId,
        user: &UserId,
        seq: u64,
    ) -> Result<ReadOutcome, RoomError> {
        let key = (room.clone(), user.clone());
        let previous = {
            let mut gates = self.gates();
            let now = Instant::now();
            match gates.get_mut(&key) {
                Some(gate) if seq <= gate.appended || gate.waiting.is_some_and(|w| seq <= w) => {
                    return Ok(ReadOutcome::Behind);
                }
                Some(gate) if gate.in_flight || now < gate.at + self.interval => {
                    gate.waiting = Some(seq);
                    return Ok(ReadOutcome::Waiting);
                }
                Some(gate) => {
                    let previous = gate.appended;
                    *gate = Gate {
                        appended: seq,
                        at: now,
                        in_flight: true,
                        waiting: None,
                    };
                    previous
                }
                None => {
                    gates.insert(
                        key.clone(),
                        Gate {
                            appended: seq,
                            at: now,
                            in_flight: true,
                            waiting: None,
                        },
                    );
                    0
                }
            }
        };
        let result = rooms.read(user, room, seq).await;
        self.landed(&key, previous, seq, settled(&result));
        result.map(|_| ReadOutcome::Appended)
    }

    /// Ends a gate's append; one not `settled` waits again (unless a higher seq does).
    fn landed(&self, key: &(RoomId, UserId), previous: u64, seq: u64, settled: bool) {
        let mut gates = self.gates();
        if let Some(gate) = gates.get_mut(key) {
            gate.in_flight = false;
            if !settled {
                gate.appended = previous;
                gate.waiting = Some(gate.waiting.map_or(seq, |w| w.max(seq)));
            }
        }
    }

    /// Takes the cursors whose interval has passed, marking their appends in flight, and
    /// forgets gates with nothing left to do.
    fn take_due(&self) -> Vec<((RoomId, UserId), u64, u64)> {
        let now = Instant::now();
        let interval = self.interval;
        let mut due = Vec::new();
        self.gates().retain(|key, gate| {
            if gate.in_flight {
                return true;
            }
            let ready = now >= gate.at + interval;
            match gate.waiting {
                Some(seq) if ready => {
                    due.push((key.clone(), gate.appended, seq));
                    *gate = Gate {
                        appended: seq,
                        at: now,
                        in_flight: true,
                        waiting: None,
                    };
                    true
                }
                Some(_) => true,
                // Idle past the interval: the next frame appends at once without it.
                None => !ready,
            }
        });
        due
    }

    /// Appends the waiting cursors that are due. A cursor that failed for want of NATS or the
    /// store waits for the next flush; one refused (the user left the room) is dropped.
    pub async fn flush(&self, rooms: &Rooms) {
        let due = self.take_due();
        stream::iter(due)
            .for_each_concurrent(APPENDS_IN_FLIGHT, |(key, previous, seq)| async move {
                let result = rooms.read(&key.1, &key.0, seq).await;
                if let Err(e) = &result {
                    tracing::debug!(room = %key.0, user = %key.1, seq, error = %e, "read cursor not appended");
                }
                self.landed(&key, previous, seq, settled(&result));
            })
            .await;
    }

    /// Whether any cursor waits.
    fn any_waiting(&self) -> bool {
        self.gates().values().any(|g| g.waiting.is_some())
    }
}

/// Whether an append's outcome is final: done, or refused for good (the user left the room).
/// Only a want of NATS or the store is worth another try.
fn settled<T>(result: &Result<T, RoomError>) -> bool {
    !matches!(
        result,
        Err(RoomError::Unavailable(_) | RoomError::Internal(_))
    )
}

/// Flushes due cursors every [`FLUSH_EVERY`]. After `shutdown`, sessions may still record, so
/// it goes on until `sessions` is closed and empty, then, for one more interval at most,
/// appends what still waits as it falls due.
pub(crate) async fn run(
    cursors: Arc<ReadCursors>,
    rooms: Arc<Rooms>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) {
    let mut every = tokio::time::interval(FLUSH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
    }
    let deadline = Instant::now() + cursors.interval + FLUSH_EVERY;
    while cursors.any_waiting() && Instant::now() < deadline {
        every.tick().await;
        cursors.flush(&rooms).await;
    }
}

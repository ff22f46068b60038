//! Delivery cursors, coalesced: what the `delivered` frames of this edge's sessions become.
//!
//! A session only records (room, user, seq); the highest seq per user and room waits here. Once
//! per interval one task turns each room's waiting cursors into **one** `delivered` event (see
//! [`chat_rooms::Rooms::delivered`]), so a busy room costs one event per edge per interval,
//! not one per message per member. A cursor that would not move the user's stored cursor
//! forward is dropped there. Cursors are receipts, not messages: what waits is lost if the
//! process is killed (the client's next `delivered` or `read` frame carries it again), a drain
//! appends it before the process exits, and a flush that fails for want of NATS keeps them for
//! the next one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_model::{RoomId, UserId};
use chat_rooms::{RoomError, Rooms};
use futures::stream::{self, StreamExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Rooms whose events one flush appends at once.
const APPENDS_IN_FLIGHT: usize = 16;

/// Settings of delivery cursors.
#[derive(Debug, Clone, Copy)]
pub struct DeliveredConfig {
    /// Each room's waiting cursors are appended at most this often (one event per room).
    pub interval: Duration,
    /// Waiting (room, user) cursors past which a flush starts early, so what waits stays
    /// bounded however many users an interval brings.
    pub max_pending: usize,
}

impl Default for DeliveredConfig {
    fn default() -> Self {
        DeliveredConfig {
            interval: Duration::from_secs(2),
            max_pending: 100_000,
        }
    }
}

/// The cursors waiting to be appended, by room, then user.
pub struct DeliveredCursors {
    pending: Mutex<Pending>,
    max_pending: usize,
    /// Wakes the flush task early when `max_pending` is reached.
    full: Notify,
    /// A lower bound of each room's head, learnt this interval: a frame at or below it needs no
    /// head read from NATS (heads only grow), so a room's members acknowledging the same
    /// messages cost one read per new head, not one per frame. Emptied by every flush, so it
    /// holds only the rooms of one interval.
    heads: Mutex<HashMap<RoomId, u64>>,
}

#[derive(Default)]
struct Pending {
    rooms: HashMap<RoomId, HashMap<UserId, u64>>,
    /// (room, user) entries in `rooms`.
    len: usize,
}

impl DeliveredCursors {
    pub fn new(max_pending: usize) -> DeliveredCursors {
        DeliveredCursors {
            pending: Mutex::new(Pending::default()),
            max_pending: max_pending.max(1),
            full: Notify::new(),
            heads: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `seq` is known to be at or below `room`'s head without asking NATS.
    pub fn within_known_head(&self, room: &RoomId, seq: u64) -> bool {
        let heads = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        heads.get(room).is_some_and(|&head| seq <= head)
    }

    /// Notes a head just read from the log.
    pub fn note_head(&self, room: &RoomId, head: u64) {
        let mut heads = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        let known = heads.entry(room.clone()).or_insert(head);
        *known = (*known).max(head);
    }

    /// Records that `user` has received `room` up to `seq` (the highest one waiting wins).
    pub fn record(&self, room: &RoomId, user: &UserId, seq: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let users = pending.rooms.entry(room.clone()).or_default();
        let added = match users.get_mut(user) {
            Some(waiting) => {
                *waiting = (*waiting).max(seq);
                false
            }
            None => {
                users.insert(user.clone(), seq);
                true
            }
        };
        if added {
            pending.len += 1;
            if pending.len >= self.max_pending {
                self.full.notify_one();
            }
        }
    }

    /// Takes every waiting cursor: one batch per room, users in id order (so the event's
    /// envelope user, the batch's first, is predictable).
    pub fn take(&self) -> Vec<(RoomId, Vec<(UserId, u64)>)> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut batches: Vec<(RoomId, Vec<(UserId, u64)>)> = taken
            .rooms
            .into_iter()
            .map(|(room, users)| {
                let mut cursors: Vec<(UserId, u64)> = users.into_iter().collect();
                cursors.sort();
                (room, cursors)
            })
            .collect();
        batches.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        batches
    }

    /// Appends every room's waiting cursors as one event each. A room whose append could not be
    /// made for want of NATS or the store keeps its cursors for the next flush.
    pub async fn flush(&self, rooms: &Rooms) {
        let batches = self.take();
        stream::iter(batches)
            .for_each_concurrent(APPENDS_IN_FLIGHT, |(room, cursors)| async move {
                match rooms.delivered(&room, cursors.clone()).await {
                    Ok(_) => {}
                    Err(RoomError::Unavailable(message)) => {
                        tracing::debug!(room = %room, error = %message, "delivered cursors kept for the next flush");
                        for (user, seq) in cursors {
                            self.record(&room, &user, seq);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(room = %room, error = %e, "delivered cursors dropped");
                    }
                }
            })
            .await;
    }
}

/// Flushes `cursors` every interval (or early when too many wait). After `shutdown`, sessions
/// still finish the frame they are answering and may record more, so it goes on until
/// `sessions` is closed and empty, then flushes once more: what sessions recorded before a
/// drain is appended before the process exits (it waits for this task).
pub(crate) async fn run(
    cursors: Arc<DeliveredCursors>,
    rooms: Arc<Rooms>,
    interval: Duration,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) {
    let mut every = tokio::time::interval(interval);
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
            _ = cursors.full.notified() => {}
        }
        cursors.flush(&rooms).await;
    }
    cursors.flush(&rooms).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).unwrap()
    }

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn many_cursors_make_one_batch_per_room_with_each_users_highest() {
        let cursors = DeliveredCursors::new(1_000_000);
        let users = ["bob", "carol", "dave", "erin", "frank"];
        // A busy interval: every member acknowledges every message of two rooms, out of order.
        for seq in (1..=500u64).rev().chain(1..=500) {
            for (i, u) in users.iter().enumerate() {
                cursors.record(&room("general"), &user(u), seq - (i as u64).min(seq - 1));
                cursors.record(&room("random"), &user(u), seq / 2 + 1);
            }
        }
        let batches = cursors.take();
        assert_eq!(batches.len(), 2, "one event per room per flush");
        let (general, general_cursors) = &batches[0];
        assert_eq!(general.as_str(), "general");
        assert_eq!(
            general_cursors,
            &users
                .iter()
                .enumerate()
                .map(|(i, u)| (user(u), 500 - i as u64))
                .collect::<Vec<_>>(),
            "the highest seq per user, users in order"
        );
        let (random, random_cursors) = &batches[1];
        assert_eq!(random.as_str(), "random");
        assert!(random_cursors.iter().all(|(_, seq)| *seq == 251));
        assert!(cursors.take().is_empty(), "a flush takes everything");
        assert_eq!(cursors.pending.lock().unwrap().len, 0);
    }

    #[test]
    fn known_heads_spare_head_reads_until_the_next_flush() {
        let cursors = DeliveredCursors::new(10);
        let general = room("general");
        assert!(!cursors.within_known_head(&general, 1), "nothing known yet");
        cursors.note_head(&general, 7);
        cursors.note_head(&general, 5); // an older read does not lower it
        assert!(cursors.within_known_head(&general, 7));
        assert!(!cursors.within_known_head(&general, 8));
        assert!(!cursors.within_known_head(&room("random"), 1));
        cursors.take();
        assert!(
            !cursors.within_known_head(&general, 1),
            "forgotten at a flush"
        );
    }

    #[tokio::test]
    async fn reaching_the_bound_wakes_the_flush_early() {
        let cursors = DeliveredCursors::new(3);
        cursors.record(&room("a"), &user("bob"), 1);
        cursors.record(&room("a"), &user("bob"), 2); // same key: not counted again
        cursors.record(&room("b"), &user("bob"), 1);
        let woken = tokio::time::timeout(Duration::from_millis(50), cursors.full.notified());
        assert!(woken.await.is_err(), "not full yet");
        cursors.record(&room("c"), &user("bob"), 1);
        tokio::time::timeout(Duration::from_secs(5), cursors.full.notified())
            .await
            .expect("woken once full");
        assert_eq!(cursors.take().len(), 3);
    }
}

//! Typing indicators: ephemeral, over core NATS, never in a stream or a store.
//!
//! An edge publishes a user's `active:true` / `active:false` for a room on
//! `<prefix>.typing.<room>` (every `true` a session admits: the typing rate limit bounds them,
//! and each renewal must reach the others to move the expiry they keep). Every
//! edge with followers of the room subscribes to that subject, and one [`Typists`] per room
//! decides what its sessions see, so the contract holds however many sessions and edges the
//! typing user has:
//! - at most one `active:true` per user per room per [`DEBOUNCE`]: a renewal inside it only
//!   extends the indicator, and a new indicator inside it (the last one ended by a message or
//!   `active:false`) is shown when the debounce is over, if the user is still typing then;
//! - `active:false` when the user's message arrives, when the user says so, or when no renewal
//!   came within the expiry (5 s by default), so no indicator sticks when a client or its edge
//!   vanishes.

use std::collections::HashMap;
use std::time::Duration;

use chat_model::{RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;
use tungstenite::Utf8Bytes;

/// At most one `active:true` per user per room this often.
pub const DEBOUNCE: Duration = Duration::from_secs(2);

/// What edges publish on a room's typing subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Signal {
    pub user: UserId,
    pub active: bool,
}

/// An ephemeral frame (typing, presence) for a room's sessions.
#[derive(Debug, Clone)]
pub struct Ephemeral {
    pub frame: Utf8Bytes,
    /// This user's sessions do not get it (a typing user's own indicator).
    pub exclude: Option<UserId>,
}

pub(crate) fn frame(room: &RoomId, user: &UserId, active: bool) -> Ephemeral {
    let frame = json!({"type": "typing", "room": room, "user": user, "active": active});
    Ephemeral {
        frame: frame.to_string().into(),
        exclude: Some(user.clone()),
    }
}

struct Typist {
    /// When this edge last showed `active:true` for the user. Kept after the indicator ends, so
    /// that a new one waits out the debounce.
    shown: Instant,
    /// While the user types: when the indicator ends without a renewal.
    expires: Option<Instant>,
    /// Whether the room's sessions were told `active:true` (and not yet `false`). A user typing
    /// again within [`DEBOUNCE`] of the last one shown is not: they are told at its end.
    showing: bool,
}

impl Typist {
    /// The next time [`Typists::tick`] has something to do for this user.
    fn next_due(&self) -> Instant {
        match self.expires {
            Some(expires) if self.showing => expires,
            Some(expires) => expires.min(self.shown + DEBOUNCE),
            None => self.shown + DEBOUNCE,
        }
    }
}

/// Who is typing in one room, as this edge shows it.
pub(crate) struct Typists {
    expiry: Duration,
    typing: HashMap<UserId, Typist>,
}

impl Typists {
    pub(crate) fn new(expiry: Duration) -> Typists {
        Typists {
            expiry,
            typing: HashMap::new(),
        }
    }

    /// A signal from some edge; `Some(active)` when the room's sessions should be told.
    pub(crate) fn signal(&mut self, signal: &Signal, now: Instant) -> Option<bool> {
        if !signal.active {
            return self.end(&signal.user).then_some(false);
        }
        let expires = Some(now + self.expiry);
        match self.typing.get_mut(&signal.user) {
            Some(t) => {
                t.expires = expires;
                if now.duration_since(t.shown) < DEBOUNCE {
                    // A renewal (or, after an end, a start that waits for the debounce).
                    return None;
                }
                t.shown = now;
                t.showing = true;
                Some(true)
            }
            None => {
                self.typing.insert(
                    signal.user.clone(),
                    Typist {
                        shown: now,
                        expires,
                        showing: true,
                    },
                );
                Some(true)
            }
        }
    }

    /// The user's message arrived: true if their indicator was showing (it ends now).
    pub(crate) fn sent(&mut self, user: &UserId) -> bool {
        self.end(user)
    }

    /// Ends the user's indicator; true if it was showing.
    fn end(&mut self, user: &UserId) -> bool {
        let Some(t) = self.typing.get_mut(user) else {
            return false;
        };
        t.expires = None;
        std::mem::replace(&mut t.showing, false)
    }

    /// When [`Typists::tick`] next has something to do, if ever.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.typing.values().map(Typist::next_due).min()
    }

    /// What is due at `now`: `active:false` for indicators without a renewal in time,
    /// `active:true` for users who started typing again within the debounce and still are at
    /// its end. Forgets users who stopped a debounce ago.
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<(UserId, bool)> {
        let mut due = Vec::new();
        self.typing.retain(|user, t| {
            match t.expires {
                Some(expires) if expires <= now => {
                    if t.showing {
                        due.push((user.clone(), false));
                    }
                    t.expires = None;
                    t.showing = false;
                }
                Some(_) if !t.showing && t.shown + DEBOUNCE <= now => {
                    t.shown = now;
                    t.showing = true;
                    due.push((user.clone(), true));
                }
                _ => {}
            }
            t.expires.is_some() || t.shown + DEBOUNCE > now
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(user: &str, active: bool) -> Signal {
        Signal {
            user: UserId::parse(user).unwrap(),
            active,
        }
    }

    #[test]
    fn one_true_per_debounce_then_renewals_only_extend() {
        let mut t = Typists::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(t.signal(&signal("bob", true), t0), Some(true));
        assert_eq!(
            t.signal(&signal("bob", true), t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            t.next_due(),
            Some(t0 + Duration::from_secs(6)),
            "the renewal extended it"
        );
        assert_eq!(
            t.signal(&signal("bob", true), t0 + Duration::from_millis(2_100)),
            Some(true)
        );
        // Another user is independent.
        assert_eq!(t.signal(&signal("carol", true), t0), Some(true));
    }

    #[test]
    fn false_message_and_expiry_end_it_once() {
        let mut t = Typists::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let bob = UserId::parse("bob").unwrap();
        t.signal(&signal("bob", true), t0);
        assert!(t.sent(&bob));
        assert!(!t.sent(&bob), "only once");
        assert_eq!(t.signal(&signal("bob", false), t0), None, "nothing showing");

        // Shown a debounce after the last one: false ends it.
        assert_eq!(t.signal(&signal("bob", true), at(2_000)), Some(true));
        assert_eq!(t.signal(&signal("bob", false), at(2_100)), Some(false));

        // Not renewed: it expires once, and the user is forgotten a debounce after.
        assert_eq!(t.signal(&signal("bob", true), at(4_000)), Some(true));
        assert_eq!(t.next_due(), Some(at(9_000)));
        assert!(t.tick(at(8_999)).is_empty());
        assert_eq!(t.tick(at(9_000)), vec![(bob, false)]);
        assert!(t.tick(at(9_000)).is_empty(), "only once");
        assert_eq!(t.next_due(), None, "the last shown is over a debounce old");
    }

    /// The contract's one `active:true` per 2 s holds across an end: typing again just after a
    /// message is shown when the debounce is over, or not at all if it stopped before.
    #[test]
    fn a_new_indicator_within_the_debounce_waits_for_its_end() {
        let mut t = Typists::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let bob = UserId::parse("bob").unwrap();
        assert_eq!(t.signal(&signal("bob", true), t0), Some(true));
        assert!(t.sent(&bob));
        assert_eq!(t.signal(&signal("bob", true), at(500)), None, "within 2 s");
        assert_eq!(t.next_due(), Some(at(2_000)));
        assert!(t.tick(at(1_999)).is_empty());
        assert_eq!(t.tick(at(2_000)), vec![(bob.clone(), true)]);
        // Shown at 2 s: it expires 5 s after the last renewal (0.5 s), not after being shown.
        assert_eq!(t.next_due(), Some(at(5_500)));
        assert_eq!(t.tick(at(5_500)), vec![(bob.clone(), false)]);

        // Typing again within the debounce and stopping before its end: never shown.
        assert_eq!(t.signal(&signal("bob", true), at(6_000)), Some(true));
        assert_eq!(t.signal(&signal("bob", false), at(6_100)), Some(false));
        assert_eq!(t.signal(&signal("bob", true), at(6_200)), None);
        assert_eq!(
            t.signal(&signal("bob", false), at(6_300)),
            None,
            "nothing showing"
        );
        assert!(t.tick(at(8_000)).is_empty());
        assert_eq!(t.next_due(), None);
    }
}

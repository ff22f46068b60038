//! Typing indicators: ephemeral, over core NATS, never in a stream or a store.
//!
//! An edge publishes a user's `active:true` / `active:false` for a room on
//! `<prefix>.typing.<room>` (every `true` a session admits: the typing rate limit bounds them,
//! and each renewal must reach the others to move the expiry they keep). Every
//! edge with followers of the room subscribes to that subject, and one [`Typists`] per room
//! decides what its sessions see, so the contract holds however many sessions and edges the
//! typing user has:
//! - at most one `active:true` per user per room per [`DEBOUNCE`] (a renewal inside it only
//!   extends the indicator);
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
    /// When this edge last showed `active:true`.
    shown: Instant,
    /// When the indicator ends without a renewal.
    expires: Instant,
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
            return self.typing.remove(&signal.user).map(|_| false);
        }
        let expires = now + self.expiry;
        match self.typing.get_mut(&signal.user) {
            Some(t) if now.duration_since(t.shown) < DEBOUNCE => {
                t.expires = expires;
                None
            }
            Some(t) => {
                t.shown = now;
                t.expires = expires;
                Some(true)
            }
            None => {
                self.typing.insert(
                    signal.user.clone(),
                    Typist {
                        shown: now,
                        expires,
                    },
                );
                Some(true)
            }
        }
    }

    /// The user's message arrived: true if their indicator was showing (it ends now).
    pub(crate) fn sent(&mut self, user: &UserId) -> bool {
        self.typing.remove(user).is_some()
    }

    /// The earliest expiry, if anyone is typing.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.typing.values().map(|t| t.expires).min()
    }

    /// Removes and returns the users whose indicator has expired at `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<UserId> {
        let expired: Vec<UserId> = self
            .typing
            .iter()
            .filter(|(_, t)| t.expires <= now)
            .map(|(u, _)| u.clone())
            .collect();
        for user in &expired {
            self.typing.remove(user);
        }
        expired
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
            t.next_expiry(),
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
        let bob = UserId::parse("bob").unwrap();
        t.signal(&signal("bob", true), t0);
        assert!(t.sent(&bob));
        assert!(!t.sent(&bob), "only once");
        assert_eq!(t.signal(&signal("bob", false), t0), None, "nothing showing");

        t.signal(&signal("bob", true), t0);
        assert_eq!(t.signal(&signal("bob", false), t0), Some(false));

        t.signal(&signal("bob", true), t0);
        assert!(t.expire(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(t.expire(t0 + Duration::from_secs(5)), vec![bob]);
        assert_eq!(t.next_expiry(), None);
    }
}

//! Rate limits and connection caps of an edge.
//!
//! - **Per user** (shared by all of a user's sessions on this edge, and with the other edges
//!   through `shared_limits.rs`), one token bucket per kind of work: appends (`send`, `edit`,
//!   `delete`, `react`: the contract's `CHAT_SEND_RATE`), `typing`, `subscribe` and `history`
//!   frames, and the HTTP API's reads (`history`) and changes (`manage`).
//! - **Per connection**, one token bucket over every frame, whatever its type, so that no single
//!   socket can make the edge parse without bound (pings and malformed frames included).
//! - **Flooding**: a connection that has more frames refused by a limit than that limit's burst
//!   within the flood window is closed with 4029.
//! - **Connection caps**: total sockets on the edge, and authenticated sessions per user.
//!
//! The buckets are `governor`'s GCRA limiters.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_model::UserId;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A token bucket's settings: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    pub const fn new(per_second: u32, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    fn quota(self) -> Quota {
        let nz = |n: u32| NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
        Quota::per_second(nz(self.per_second)).allow_burst(nz(self.burst))
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    /// `PER_SECOND/BURST`, both positive integers.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected PER_SECOND/BURST with positive integers, got {s:?}");
        let (rate, burst) = s.split_once('/').ok_or_else(bad)?;
        let per_second: u32 = rate.trim().parse().map_err(|_| bad())?;
        let burst: u32 = burst.trim().parse().map_err(|_| bad())?;
        if per_second == 0 || burst == 0 {
            return Err(bad());
        }
        Ok(Rate { per_second, burst })
    }
}

/// The limits of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Appends per user (`CHAT_SEND_RATE`).
    pub send: Rate,
    /// `typing` frames per user.
    pub typing: Rate,
    /// `subscribe` frames per user.
    pub subscribe: Rate,
    /// `history` frames per user (and the HTTP API's reads).
    pub history: Rate,
    /// The HTTP API's changes per user: creating rooms, adding and removing members, room
    /// settings, blocks.
    pub manage: Rate,
    /// Frames of any type per connection.
    pub frames: Rate,
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            send: Rate::new(10, 20),
            typing: Rate::new(2, 5),
            // A client may subscribe room by room, and prefetch each room's history, at
            // connect: bursts sized for a hundred rooms.
            subscribe: Rate::new(10, 100),
            history: Rate::new(20, 100),
            manage: Rate::new(2, 20),
            frames: Rate::new(50, 100),
        }
    }
}

/// Which per-user bucket a frame (or an HTTP request) draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Send,
    Typing,
    Subscribe,
    History,
    Manage,
}

impl Work {
    const ALL: [Work; 5] = [
        Work::Send,
        Work::Typing,
        Work::Subscribe,
        Work::History,
        Work::Manage,
    ];

    fn index(self) -> usize {
        match self {
            Work::Send => 0,
            Work::Typing => 1,
            Work::Subscribe => 2,
            Work::History => 3,
            Work::Manage => 4,
        }
    }
}

/// Tokens drawn from one user's buckets, by [`Work`] (send, typing, subscribe, history,
/// manage).
pub(crate) type Used = [u32; 5];

/// The per-user buckets of a process, shared by every session of its edge and by its HTTP API,
/// and what they gave out since the other processes were last told (see `shared_limits.rs`).
pub struct UserLimits {
    rates: Rates,
    send: DefaultKeyedRateLimiter<UserId>,
    typing: DefaultKeyedRateLimiter<UserId>,
    subscribe: DefaultKeyedRateLimiter<UserId>,
    history: DefaultKeyedRateLimiter<UserId>,
    manage: DefaultKeyedRateLimiter<UserId>,
    /// Tokens given out here since the last [`UserLimits::take_used`]; `None` when the buckets
    /// are not shared with other edges.
    used: Option<Mutex<HashMap<UserId, Used>>>,
    /// Tokens drawn from these buckets for work done in other processes
    /// (`chat.edge.rate_charged`).
    pub charged: AtomicU64,
    /// HTTP requests refused by these buckets (`chat.http.rate_limited`).
    pub http_limited: AtomicU64,
}

/// A refusal: the limit's burst and how long until a frame would pass.
#[derive(Debug, Clone, Copy)]
pub struct Limited {
    pub burst: u32,
    pub retry_after: Duration,
}

impl UserLimits {
    /// Buckets of this process; `shared`: it records what they give out, for the others.
    pub(crate) fn new(rates: Rates, shared: bool) -> UserLimits {
        UserLimits {
            rates,
            send: RateLimiter::keyed(rates.send.quota()),
            typing: RateLimiter::keyed(rates.typing.quota()),
            subscribe: RateLimiter::keyed(rates.subscribe.quota()),
            history: RateLimiter::keyed(rates.history.quota()),
            manage: RateLimiter::keyed(rates.manage.quota()),
            used: shared.then(Mutex::default),
            charged: AtomicU64::new(0),
            http_limited: AtomicU64::new(0),
        }
    }

    /// The process's buckets, with a task that forgets idle users' state and, with `share`
    /// (`CHAT_RATE_SHARE`), one that keeps them in step with the other processes over `client`
    /// (subject `<prefix>.limits`), both until `shutdown`.
    pub fn start(
        rates: Rates,
        share: Option<Duration>,
        client: async_nats::Client,
        prefix: &str,
        shutdown: CancellationToken,
    ) -> Arc<UserLimits> {
        let limits = Arc::new(UserLimits::new(rates, share.is_some()));
        let forget = Arc::downgrade(&limits);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                match forget.upgrade() {
                    Some(limits) => limits.forget_idle(),
                    None => return,
                }
            }
        });
        if let Some(every) = share {
            tokio::spawn(crate::shared_limits::run(
                limits.clone(),
                client,
                format!("{prefix}.limits"),
                every,
                shutdown,
            ));
        }
        limits
    }

    fn bucket(&self, work: Work) -> (&DefaultKeyedRateLimiter<UserId>, Rate) {
        match work {
            Work::Send => (&self.send, self.rates.send),
            Work::Typing => (&self.typing, self.rates.typing),
            Work::Subscribe => (&self.subscribe, self.rates.subscribe),
            Work::History => (&self.history, self.rates.history),
            Work::Manage => (&self.manage, self.rates.manage),
        }
    }

    pub fn check(&self, work: Work, user: &UserId) -> Result<(), Limited> {
        self.check_n(work, user, 1)
    }

    /// Draws `n` tokens at once (a `subscribe` naming `n` rooms), at most the whole burst: work
    /// larger than the burst empties the bucket rather than never passing.
    pub fn check_n(&self, work: Work, user: &UserId, n: u32) -> Result<(), Limited> {
        let (limiter, rate) = self.bucket(work);
        let n = n.clamp(1, rate.burst.max(1));
        let tokens = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let limited = |retry_after| Limited {
            burst: rate.burst,
            retry_after,
        };
        match limiter.check_key_n(user, tokens) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                return Err(limited(
                    not_until.wait_time_from(DefaultClock::default().now()),
                ))
            }
            // More than the bucket holds when full (the burst was lowered under `n`): it
            // refills in a second at most.
            Err(_) => return Err(limited(Duration::from_secs(1))),
        }
        if let Some(used) = &self.used {
            if let Ok(mut used) = used.lock() {
                let counts = used.entry(user.clone()).or_default();
                counts[work.index()] = counts[work.index()].saturating_add(n);
            }
        }
        Ok(())
    }

    /// What the buckets gave out since the last call, per user.
    pub(crate) fn take_used(&self) -> HashMap<UserId, Used> {
        self.used
            .as_ref()
            .and_then(|used| used.lock().ok().map(|mut used| std::mem::take(&mut *used)))
            .unwrap_or_default()
    }

    /// Draws from `user`'s buckets what another edge gave out to them, as far as the buckets
    /// hold (an empty bucket stays empty: a user cannot owe). Returns the tokens drawn.
    pub(crate) fn charge(&self, user: &UserId, used: Used) -> u64 {
        let mut drawn = 0;
        for work in Work::ALL {
            let (limiter, rate) = self.bucket(work);
            // Past the burst the bucket is empty whatever else is owed.
            for _ in 0..used[work.index()].min(rate.burst) {
                if limiter.check_key(user).is_err() {
                    break;
                }
                drawn += 1;
            }
        }
        drawn
    }

    /// Forgets users whose buckets are full again (their state is the same as a new user's).
    pub(crate) fn forget_idle(&self) {
        for limiter in [
            &self.send,
            &self.typing,
            &self.subscribe,
            &self.history,
            &self.manage,
        ] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// One connection's bucket over all its frames, and its record of refusals.
pub(crate) struct ConnectionLimits {
    frames: DefaultDirectRateLimiter,
    frame_rate: Rate,
    flood_window: Duration,
    refusals: VecDeque<Instant>,
}

impl ConnectionLimits {
    pub(crate) fn new(frame_rate: Rate, flood_window: Duration) -> ConnectionLimits {
        ConnectionLimits {
            frames: RateLimiter::direct(frame_rate.quota()),
            frame_rate,
            flood_window,
            refusals: VecDeque::new(),
        }
    }

    pub(crate) fn check_frame(&self) -> Result<(), Limited> {
        self.frames.check().map_err(|not_until| Limited {
            burst: self.frame_rate.burst,
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }

    /// Records a refusal; true when the connection has now had more refusals than `burst`
    /// within the flood window (it keeps sending after being told to stop).
    pub(crate) fn refused(&mut self, burst: u32) -> bool {
        let now = Instant::now();
        while self
            .refusals
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.flood_window)
        {
            self.refusals.pop_front();
        }
        self.refusals.push_back(now);
        self.refusals.len() > burst as usize
    }
}

/// Connection caps: sockets on this edge, sockets still waiting for their `auth` frame, and
/// sessions per user.
pub(crate) struct Connections {
    max_total: usize,
    max_per_user: usize,
    /// Sockets that have not authenticated yet, at most: a sixteenth of the total (at least
    /// 64), so that sockets that never send a token cannot keep the edge full for everyone.
    max_unauthenticated: usize,
    total: AtomicUsize,
    unauthenticated: AtomicUsize,
    /// Where the open socket count is exported (`chat_edge_sockets`).
    stats: Arc<crate::EdgeStats>,
    per_user: Mutex<HashMap<UserId, usize>>,
}

/// A socket's place under the total cap; released on drop.
pub(crate) struct Socket {
    connections: Arc<Connections>,
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.connections.total.fetch_sub(1, Ordering::Relaxed);
        self.connections
            .stats
            .sockets
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket's place among those waiting for their `auth` frame; released on drop (once it
/// has authenticated, or been closed).
pub(crate) struct Unauthenticated {
    connections: Arc<Connections>,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.connections
            .unauthenticated
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A session's place under its user's cap; released on drop.
pub(crate) struct UserSlot {
    connections: Arc<Connections>,
    user: UserId,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Ok(mut per_user) = self.connections.per_user.lock() {
            if let Some(n) = per_user.get_mut(&self.user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_user.remove(&self.user);
                }
            }
        }
    }
}

impl Connections {
    pub(crate) fn new(
        max_total: usize,
        max_per_user: usize,
        stats: Arc<crate::EdgeStats>,
    ) -> Arc<Connections> {
        Arc::new(Connections {
            max_total,
            max_per_user,
            max_unauthenticated: (max_total / 16).max(64).min(max_total),
            total: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
            stats,
            per_user: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more socket, unless the edge is full.
    pub(crate) fn socket(self: &Arc<Self>) -> Option<Socket> {
        let taken = self
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_total).then_some(n + 1)
            });
        taken.ok().map(|_| {
            self.stats.sockets.fetch_add(1, Ordering::Relaxed);
            Socket {
                connections: self.clone(),
            }
        })
    }

    /// A place for one more socket waiting for its `auth` frame, unless that many wait.
    pub(crate) fn unauthenticated(self: &Arc<Self>) -> Option<Unauthenticated> {
        self.unauthenticated
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_unauthenticated).then_some(n + 1)
            })
            .ok()
            .map(|_| Unauthenticated {
                connections: self.clone(),
            })
    }

    pub(crate) fn max_unauthenticated(&self) -> usize {
        self.max_unauthenticated
    }

    /// A place for one more session of `user`, unless they have the most allowed.
    pub(crate) fn user(self: &Arc<Self>, user: &UserId) -> Option<UserSlot> {
        let mut per_user = self.per_user.lock().ok()?;
        let n = per_user.entry(user.clone()).or_insert(0);
        if *n >= self.max_per_user {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            connections: self.clone(),
            user: user.clone(),
        })
    }

    pub(crate) fn max_per_user(&self) -> usize {
        self.max_per_user
    }

    pub(crate) fn max_total(&self) -> usize {
        self.max_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[test]
    fn a_user_gets_the_burst_then_waits() {
        let limits = UserLimits::new(
            Rates {
                send: Rate::new(1, 3),
                ..Rates::default()
            },
            false,
        );
        let alice = user("alice");
        for _ in 0..3 {
            limits.check(Work::Send, &alice).unwrap();
        }
        let refused = limits.check(Work::Send, &alice).unwrap_err();
        assert_eq!(refused.burst, 3);
        assert!(refused.retry_after > Duration::ZERO);
        // Buckets are per user and per kind of work.
        limits.check(Work::Send, &user("bob")).unwrap();
        limits.check(Work::History, &alice).unwrap();
    }

    #[test]
    fn what_one_edge_gave_out_is_drawn_from_the_others_buckets() {
        let rates = Rates {
            send: Rate::new(1, 3),
            ..Rates::default()
        };
        let (here, there) = (UserLimits::new(rates, true), UserLimits::new(rates, true));
        let alice = user("alice");
        here.check(Work::Send, &alice).unwrap();
        here.check(Work::Send, &alice).unwrap();
        here.check(Work::Typing, &alice).unwrap();
        let used = here.take_used();
        assert_eq!(used.get(&alice), Some(&[2, 1, 0, 0, 0]));
        assert!(here.take_used().is_empty(), "taken once");

        assert_eq!(there.charge(&alice, used[&alice]), 3);
        assert!(
            there.take_used().is_empty(),
            "a charge is not passed on again"
        );
        there.check(Work::Send, &alice).unwrap();
        assert!(
            there.check(Work::Send, &alice).is_err(),
            "one of three left"
        );
        // A charge beyond what a bucket holds leaves it empty, no more.
        assert_eq!(there.charge(&user("bob"), [50, 0, 0, 0, 0]), 3);
        assert!(there.check(Work::Send, &user("bob")).is_err());
        // Unshared buckets record nothing.
        let alone = UserLimits::new(rates, false);
        alone.check(Work::Send, &alice).unwrap();
        assert!(alone.take_used().is_empty());
    }

    #[test]
    fn more_refusals_than_the_burst_in_the_window_is_flooding() {
        let mut conn = ConnectionLimits::new(Rate::new(1, 2), Duration::from_secs(10));
        assert!(!conn.refused(2));
        assert!(!conn.refused(2));
        assert!(conn.refused(2), "the third refusal within the window");
    }

    #[test]
    fn caps_count_and_release() {
        let connections = Connections::new(2, 1, Arc::default());
        let a = connections.socket().unwrap();
        let _b = connections.socket().unwrap();
        assert!(connections.socket().is_none(), "the edge is full");
        drop(a);
        assert!(connections.socket().is_some());

        let alice = user("alice");
        let slot = connections.user(&alice).unwrap();
        assert!(
            connections.user(&alice).is_none(),
            "one session per user here"
        );
        assert!(connections.user(&user("bob")).is_some());
        drop(slot);
        assert!(connections.user(&alice).is_some());
    }

    #[test]
    fn rates_parse() {
        assert_eq!("10/20".parse::<Rate>().unwrap(), Rate::new(10, 20));
        for bad in ["10", "0/5", "5/0", "a/b", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }
}

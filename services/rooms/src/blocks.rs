//! Every process's cache of block lists, kept honest by the user log's change notices.
//!
//! Block lists are read on hot paths (every history page, every room list, every live message
//! a session forwards), so each process caches them per user. The truth is the user log; a
//! change appended anywhere is republished by the stream to `<prefix>.blocks.<user key>`
//! (headers only, with `Nats-Sequence`), and a background task ([`run_invalidator`]) drops the
//! cached list of that user. Core NATS delivery is at-most-once, so:
//!
//! - after a reconnect or a slow-consumer notice (notices may have been lost) the whole cache
//!   is dropped;
//! - every entry also expires after a TTL, a safety net for a notice lost without either;
//! - a read that was under way while a notice arrived does not cache what it read (it may be
//!   the list from before the change): every notice bumps an epoch, and a read caches its
//!   result only if the epoch did not move meanwhile.
//!
//! A change made by this process is cached at once with its sequence, and the notice of that
//! same change (same sequence) leaves it in place.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::header::NATS_SEQUENCE;
use chat_log::{ConnectionEvent, UserLog};
use chat_model::UserId;
use futures::StreamExt;
use tokio::sync::broadcast::error::RecvError;

/// Beyond this many cached users, an insert first sweeps out the expired ones (and if that is
/// not enough, everything): the cache is bounded whatever the number of users.
const MAX_CACHED_USERS: usize = 100_000;

/// One user's cached list.
struct Cached {
    blocked: Arc<HashSet<UserId>>,
    /// The user-log sequence of the entry it was read from (0: the user has none).
    seq: u64,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    /// By user key (the digest the user log names subjects with, which notices carry).
    by_key: HashMap<String, Cached>,
    /// Bumped by every notice and every drop of the whole cache.
    epoch: u64,
}

/// The block lists this process has read recently.
pub(crate) struct BlockCache {
    ttl: Duration,
    inner: Mutex<Inner>,
    /// Bumped by every notice, every drop of the whole cache and every change this process
    /// makes: a list held outside the cache (see `HeldBlocks`) is good while this stands still.
    changes: AtomicU64,
}

/// A cache lookup: the list, or the epoch to hand back with what the caller reads instead.
pub(crate) enum Lookup {
    /// The list, and until when the cache vouches for it.
    Hit(Arc<HashSet<UserId>>, Instant),
    Miss {
        epoch: u64,
    },
}

impl BlockCache {
    pub fn new(ttl: Duration) -> BlockCache {
        BlockCache {
            ttl,
            inner: Mutex::new(Inner::default()),
            changes: AtomicU64::new(0),
        }
    }

    /// The change counter (see the field).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map holds no invariant a panicking holder could break half-way.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &str) -> Lookup {
        let inner = self.lock();
        match inner.by_key.get(key) {
            Some(c) if c.at.elapsed() < self.ttl => Lookup::Hit(c.blocked.clone(), c.at + self.ttl),
            _ => Lookup::Miss { epoch: inner.epoch },
        }
    }

    /// Caches what a read returned, unless a notice arrived since `epoch` (the read may predate
    /// the change it announces).
    pub fn put_read(&self, key: String, seq: u64, blocked: Arc<HashSet<UserId>>, epoch: u64) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        Self::put(&mut inner, self.ttl, key, seq, blocked);
    }

    /// Caches the list a change made by this process resulted in (the log's word as of `seq`).
    pub fn put_written(&self, key: String, seq: u64, blocked: Arc<HashSet<UserId>>) {
        let mut inner = self.lock();
        if inner.by_key.get(&key).is_some_and(|c| c.seq > seq) {
            return;
        }
        Self::put(&mut inner, self.ttl, key, seq, blocked);
        self.changed();
    }

    fn put(inner: &mut Inner, ttl: Duration, key: String, seq: u64, blocked: Arc<HashSet<UserId>>) {
        if inner.by_key.len() >= MAX_CACHED_USERS {
            inner.by_key.retain(|_, c| c.at.elapsed() < ttl);
            if inner.by_key.len() >= MAX_CACHED_USERS {
                inner.by_key.clear();
            }
        }
        inner.by_key.insert(
            key,
            Cached {
                blocked,
                seq,
                at: Instant::now(),
            },
        );
    }

    /// A change of the user with `key` was stored at `seq` (unknown: `None`).
    pub fn notice(&self, key: &str, seq: Option<u64>) {
        let mut inner = self.lock();
        inner.epoch += 1;
        self.changed();
        let stale = match (inner.by_key.get(key), seq) {
            (Some(c), Some(seq)) => c.seq < seq,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if stale {
            inner.by_key.remove(key);
        }
    }

    /// Forgets everything (notices may have been lost).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.epoch += 1;
        self.changed();
        inner.by_key.clear();
    }
}

/// Follows the change notices and the connection's events until the cache is dropped.
pub(crate) async fn run_invalidator(users: UserLog, cache: Weak<BlockCache>) {
    let mut events = users.connection_events();
    let mut pause = Duration::from_millis(50);
    loop {
        let mut notices = match users.subscribe_notices().await {
            Ok(notices) => notices,
            Err(e) => {
                tracing::warn!(error = %e, "block notices: subscribe failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        pause = Duration::from_millis(50);
        // Whatever happened while not subscribed is unknown.
        match cache.upgrade() {
            Some(cache) => cache.clear(),
            None => return,
        }
        loop {
            tokio::select! {
                notice = notices.next() => {
                    let Some(notice) = notice else { break };
                    let Some(cache) = cache.upgrade() else { return };
                    let Some(key) = UserLog::key_of_notice(notice.subject.as_str()) else {
                        continue;
                    };
                    let seq = notice
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(NATS_SEQUENCE))
                        .and_then(|v| v.as_str().parse().ok());
                    cache.notice(key, seq);
                }
                event = events.recv() => {
                    let Some(cache) = cache.upgrade() else { return };
                    match event {
                        Ok(ConnectionEvent::Connected | ConnectionEvent::SlowConsumer)
                        | Err(RecvError::Lagged(_)) => {
                            tracing::debug!("block notices may have been lost; cache dropped");
                            cache.clear();
                        }
                        Ok(ConnectionEvent::Disconnected | ConnectionEvent::Refused) => {}
                        // The sender lives as long as the connection: nothing left to follow.
                        Err(RecvError::Closed) => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(users: &[&str]) -> Arc<HashSet<UserId>> {
        Arc::new(users.iter().map(|u| UserId::parse(*u).unwrap()).collect())
    }

    fn hit(cache: &BlockCache, key: &str) -> Option<Arc<HashSet<UserId>>> {
        match cache.get(key) {
            Lookup::Hit(set, _) => Some(set),
            Lookup::Miss { .. } => None,
        }
    }

    fn epoch(cache: &BlockCache, key: &str) -> u64 {
        match cache.get(key) {
            Lookup::Miss { epoch } => epoch,
            Lookup::Hit(..) => panic!("expected a miss"),
        }
    }

    #[test]
    fn a_read_that_raced_a_notice_is_not_cached() {
        let cache = BlockCache::new(Duration::from_secs(60));
        let e = epoch(&cache, "a");
        cache.notice("a", Some(7)); // the change lands while the read is under way
        cache.put_read("a".into(), 6, list(&[]), e);
        assert!(
            hit(&cache, "a").is_none(),
            "the old list must not be cached"
        );
        let e = epoch(&cache, "a");
        cache.put_read("a".into(), 7, list(&["bob"]), e);
        assert_eq!(hit(&cache, "a"), Some(list(&["bob"])));
    }

    #[test]
    fn a_notice_drops_older_lists_but_not_the_one_it_announces() {
        let cache = BlockCache::new(Duration::from_secs(60));
        cache.put_written("a".into(), 7, list(&["bob"]));
        cache.notice("a", Some(7));
        assert_eq!(hit(&cache, "a"), Some(list(&["bob"])), "our own change");
        cache.notice("a", Some(9));
        assert!(hit(&cache, "a").is_none(), "a later change elsewhere");
        cache.put_written("b".into(), 3, list(&[]));
        cache.notice("b", None);
        assert!(
            hit(&cache, "b").is_none(),
            "no sequence: dropped to be safe"
        );
        // A write never replaces a newer cached list.
        cache.put_written("c".into(), 5, list(&["x"]));
        cache.put_written("c".into(), 4, list(&[]));
        assert_eq!(hit(&cache, "c"), Some(list(&["x"])));
    }

    #[test]
    fn entries_expire_and_clear_forgets_everything() {
        let cache = BlockCache::new(Duration::ZERO);
        cache.put_written("a".into(), 1, list(&["bob"]));
        assert!(hit(&cache, "a").is_none(), "expired at once");
        let cache = BlockCache::new(Duration::from_secs(60));
        cache.put_written("a".into(), 1, list(&["bob"]));
        let before = epoch(&cache, "z");
        cache.clear();
        assert!(hit(&cache, "a").is_none());
        assert_ne!(epoch(&cache, "z"), before);
    }
}

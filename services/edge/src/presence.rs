//! Presence: who is online in each room, across every edge. Ephemeral: core NATS only.
//!
//! A user is online in a room while at least one of their sessions, on any edge, is subscribed
//! to it. Each edge owns its own sessions' presence (see docs/decisions/0006-presence-owned-by-edges.md):
//! - on a local change (a user's first session here subscribes, their last one here leaves) it
//!   publishes a delta on `<prefix>.presence.<room>`;
//! - every heartbeat interval it publishes, per room where it has users, a snapshot of them:
//!   the snapshot renews its entries and replaces what the edge said before (anti-entropy, and
//!   late-joining edges learn the state within one interval);
//! - every edge follows `<prefix>.presence.>` and keeps the whole view: (room, user) → the edges
//!   that vouch for them, each until a deadline. An edge that stops (SIGKILL, partition) stops
//!   renewing; its users go offline everywhere once the expiry passes, with nothing left behind;
//! - what sessions see is coalesced: changes are collected and, once per flush interval, each
//!   user whose status differs from what the room was last shown gets one frame; a user who
//!   left and came back within the interval gets none. At most `max_frames` per room per flush;
//!   past that, one `{"type":"presence","room":…,"changed":N}` frame tells clients to read the
//!   presence endpoint instead.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_model::{RoomId, UserId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Hub;

/// Settings of presence.
#[derive(Debug, Clone, Copy)]
pub struct PresenceConfig {
    /// How often an edge renews its users (per room snapshot).
    pub heartbeat: Duration,
    /// An edge's users expire this long after its last renewal (the contract's 90 s).
    pub expiry: Duration,
    /// Changes shown to a room's sessions at most this often, coalesced.
    pub flush: Duration,
    /// At most this many presence frames per room per flush.
    pub max_frames: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            heartbeat: Duration::from_secs(30),
            expiry: Duration::from_secs(90),
            flush: Duration::from_secs(1),
            max_frames: 100,
        }
    }
}

/// What edges publish on a room's presence subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Signal {
    edge: String,
    users: Vec<UserId>,
    /// Delta: these users came online (true) or went offline (false) on `edge`.
    online: bool,
    /// A snapshot: exactly `users` are online on `edge` (their entries renewed).
    #[serde(default)]
    snapshot: bool,
    /// A snapshot too big for one message comes in `parts` (each renewing its users), all of the
    /// same `round` of the edge's heartbeats: what the edge said before is replaced once every
    /// part of a round has arrived.
    #[serde(default)]
    round: u64,
    #[serde(default)]
    part: u32,
    #[serde(default = "one_part")]
    parts: u32,
}

fn one_part() -> u32 {
    1
}

/// A snapshot's users as parts whose encoding stays under `max_bytes` each (one part, empty,
/// for no users).
fn parts_of(users: Vec<UserId>, max_bytes: usize) -> Vec<Vec<UserId>> {
    let mut parts = vec![Vec::new()];
    let mut bytes = 0;
    for user in users {
        // The id quoted, escaped at worst as `\uXXXX` per byte, and a comma.
        let cost = user.as_str().len() * 6 + 3;
        let current = parts.last_mut().expect("never empty");
        if !current.is_empty() && bytes + cost > max_bytes {
            parts.push(Vec::new());
            bytes = 0;
        }
        bytes += cost;
        parts.last_mut().expect("never empty").push(user);
    }
    parts
}

/// What a snapshot in parts has shown so far: its round, how many parts, and their users.
struct Partial {
    round: u64,
    seen: u32,
    listed: HashSet<UserId>,
    /// When its first part came: a round that never completes is dropped after
    /// [`PARTIAL_KEPT`].
    since: Instant,
}

enum Local {
    Join(RoomId, UserId),
    Leave(RoomId, UserId),
}

/// A session's presence in one room: online while held.
pub(crate) struct Here {
    room: RoomId,
    user: UserId,
    tx: mpsc::UnboundedSender<Local>,
}

impl Drop for Here {
    fn drop(&mut self) {
        let _ = self
            .tx
            .send(Local::Leave(self.room.clone(), self.user.clone()));
    }
}

/// A snapshot in parts that has not completed within this is dropped (its round replaces
/// nothing; the entries its parts renewed expire as usual).
const PARTIAL_KEPT: Duration = Duration::from_secs(600);

/// The most a snapshot's part carries, bytes of user ids (far below any nats-server's
/// `max_payload`, which is 1 MiB by default; less if the server's is smaller).
const PART_BYTES: usize = 32 * 1024;

#[derive(Default)]
struct View {
    /// (room, user) → edge → until when that edge vouches for them.
    online: HashMap<RoomId, HashMap<UserId, HashMap<String, Instant>>>,
    /// Per room: the online users as its sessions were last shown.
    shown: HashMap<RoomId, HashSet<UserId>>,
    /// Rooms with changes not shown yet.
    dirty: HashSet<RoomId>,
    /// (room, edge) → the snapshot in parts being received.
    partial: HashMap<(RoomId, String), Partial>,
}

impl View {
    fn vouch(&mut self, room: &RoomId, user: &UserId, edge: &str, until: Instant) {
        self.online
            .entry(room.clone())
            .or_default()
            .entry(user.clone())
            .or_default()
            .insert(edge.to_owned(), until);
        self.dirty.insert(room.clone());
    }

    fn withdraw(&mut self, room: &RoomId, user: &UserId, edge: &str) {
        if let Some(users) = self.online.get_mut(room) {
            if let Some(edges) = users.get_mut(user) {
                edges.remove(edge);
                if edges.is_empty() {
                    users.remove(user);
                }
            }
            if users.is_empty() {
                self.online.remove(room);
            }
        }
        self.dirty.insert(room.clone());
    }

    fn apply(&mut self, room: &RoomId, signal: &Signal, until: Instant) {
        if !signal.snapshot {
            for user in &signal.users {
                if signal.online {
                    self.vouch(room, user, &signal.edge, until);
                } else {
                    self.withdraw(room, user, &signal.edge);
                }
            }
            return;
        }
        for user in &signal.users {
            self.vouch(room, user, &signal.edge, until);
        }
        let listed = if signal.parts <= 1 {
            self.partial.remove(&(room.clone(), signal.edge.clone()));
            signal.users.iter().cloned().collect()
        } else {
            let key = (room.clone(), signal.edge.clone());
            let partial = self.partial.entry(key.clone()).or_insert_with(|| Partial {
                round: signal.round,
                seen: 0,
                listed: HashSet::new(),
                since: Instant::now(),
            });
            if partial.round != signal.round {
                // A part of the round before was lost: that round replaces nothing.
                *partial = Partial {
                    round: signal.round,
                    seen: 0,
                    listed: HashSet::new(),
                    since: Instant::now(),
                };
            }
            partial.seen += 1;
            partial.listed.extend(signal.users.iter().cloned());
            if partial.seen < signal.parts {
                return;
            }
            self.partial
                .remove(&key)
                .map(|partial| partial.listed)
                .unwrap_or_default()
        };
        let before: Vec<UserId> = self
            .online
            .get(room)
            .map(|users| {
                users
                    .iter()
                    .filter(|(u, edges)| edges.contains_key(&signal.edge) && !listed.contains(*u))
                    .map(|(u, _)| u.clone())
                    .collect()
            })
            .unwrap_or_default();
        for user in before {
            self.withdraw(room, &user, &signal.edge);
        }
    }

    /// Drops every entry whose edge stopped renewing it.
    fn expire(&mut self, now: Instant) {
        let mut changed = Vec::new();
        self.online.retain(|room, users| {
            users.retain(|_, edges| {
                let before = edges.len();
                edges.retain(|_, until| *until > now);
                if edges.len() != before {
                    changed.push(room.clone());
                }
                !edges.is_empty()
            });
            !users.is_empty()
        });
        self.dirty.extend(changed);
        // Rounds whose missing parts never came; `now` is later than any entry's `since` by
        // construction, so an expiry's worth of age is measured from it.
        self.partial
            .retain(|_, partial| now.saturating_duration_since(partial.since) < PARTIAL_KEPT);
    }

    fn online_in(&self, room: &RoomId) -> BTreeSet<UserId> {
        self.online
            .get(room)
            .map(|users| users.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// This edge's presence: its own sessions, and the whole view.
pub struct Presence {
    edge: String,
    subject_prefix: String,
    client: async_nats::Client,
    config: PresenceConfig,
    tx: mpsc::UnboundedSender<Local>,
    view: Mutex<View>,
    stats: Arc<crate::EdgeStats>,
}

impl Presence {
    /// Starts this edge's presence: follows every room's presence subject, renews its own users
    /// every heartbeat, shows changes to the hub's sessions every flush. Stops (telling the
    /// others its users are gone) when `shutdown` is cancelled.
    pub(crate) fn start(
        hub: Arc<Hub>,
        config: PresenceConfig,
        shutdown: CancellationToken,
        stats: Arc<crate::EdgeStats>,
    ) -> Arc<Presence> {
        let (tx, rx) = mpsc::unbounded_channel();
        let log = hub.log().clone();
        let presence = Arc::new(Presence {
            edge: uuid::Uuid::new_v4().simple().to_string(),
            subject_prefix: format!("{}.presence", log.config().prefix),
            client: log.client().clone(),
            config,
            tx,
            view: Mutex::new(View::default()),
            stats,
        });
        tokio::spawn(run(presence.clone(), hub, rx, shutdown));
        presence
    }

    /// Marks `user` online in `room` for as long as the returned guard lives.
    pub(crate) fn here(&self, room: &RoomId, user: &UserId) -> Here {
        let _ = self.tx.send(Local::Join(room.clone(), user.clone()));
        Here {
            room: room.clone(),
            user: user.clone(),
            tx: self.tx.clone(),
        }
    }

    /// Who is online in `room` as this edge last showed its sessions (at most one flush
    /// interval behind what it has heard): every presence frame it sends after is a change
    /// from this, so a client that reads it and then applies the frames ends up right.
    pub fn online(&self, room: &RoomId) -> Vec<UserId> {
        self.view
            .lock()
            .map(|view| {
                let mut online: Vec<UserId> = view
                    .shown
                    .get(room)
                    .map(|users| users.iter().cloned().collect())
                    .unwrap_or_default();
                online.sort();
                online
            })
            .unwrap_or_default()
    }

    fn subject(&self, room: &RoomId) -> String {
        format!("{}.{}", self.subject_prefix, room)
    }

    /// The most user-id bytes one signal carries: [`PART_BYTES`], or less under a small
    /// `max_payload`.
    fn part_bytes(&self) -> usize {
        PART_BYTES
            .min(self.client.server_info().max_payload / 2)
            .max(1)
    }

    /// `users` came online (`online`) or went offline on this edge: as many signals as their
    /// ids need.
    async fn publish_delta(&self, room: &RoomId, users: Vec<UserId>, online: bool) {
        for users in parts_of(users, self.part_bytes()) {
            if users.is_empty() {
                continue;
            }
            self.send(
                room,
                Signal {
                    edge: self.edge.clone(),
                    users,
                    online,
                    snapshot: false,
                    round: 0,
                    part: 0,
                    parts: 1,
                },
            )
            .await;
        }
    }

    /// Exactly `users` are online in `room` on this edge (none: the room emptied here), in one
    /// or more parts of heartbeat `round`.
    async fn publish_snapshot(&self, room: &RoomId, users: Vec<UserId>, round: u64) {
        let parts = parts_of(users, self.part_bytes());
        let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        for (part, users) in parts.into_iter().enumerate() {
            self.send(
                room,
                Signal {
                    edge: self.edge.clone(),
                    users,
                    online: true,
                    snapshot: true,
                    round,
                    part: u32::try_from(part).unwrap_or(u32::MAX),
                    parts: count,
                },
            )
            .await;
        }
    }

    async fn send(&self, room: &RoomId, signal: Signal) {
        let payload = serde_json::to_vec(&signal).unwrap_or_default();
        if let Err(e) = self
            .client
            .publish(self.subject(room), payload.into())
            .await
        {
            tracing::debug!(room = %room, error = %e, "presence not published");
        }
    }

    /// Shows each dirty room's net changes to its sessions (bounded per room).
    fn flush(&self, hub: &Hub) {
        let Ok(mut view) = self.view.lock() else {
            return;
        };
        view.expire(Instant::now());
        let dirty: Vec<RoomId> = view.dirty.drain().collect();
        for room in dirty {
            let now_online = view.online_in(&room);
            let shown = view.shown.entry(room.clone()).or_default();
            let mut frames: Vec<(UserId, bool)> = now_online
                .iter()
                .filter(|u| !shown.contains(*u))
                .map(|u| (u.clone(), true))
                .collect();
            frames.extend(
                shown
                    .iter()
                    .filter(|u| !now_online.contains(*u))
                    .map(|u| (u.clone(), false)),
            );
            *shown = now_online.into_iter().collect();
            if shown.is_empty() {
                view.shown.remove(&room);
            }
            if frames.is_empty() {
                continue;
            }
            let sent = if frames.len() > self.config.max_frames {
                let frame = json!({"type": "presence", "room": room, "changed": frames.len()});
                usize::from(hub.presence(&room, frame.to_string().into()))
            } else {
                frames
                    .iter()
                    .filter(|(user, online)| {
                        let status = if *online { "online" } else { "offline" };
                        let frame =
                            json!({"type": "presence", "room": room, "user": user, "status": status});
                        hub.presence(&room, frame.to_string().into())
                    })
                    .count()
            };
            self.stats
                .presence_frames
                .fetch_add(sent as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

async fn run(
    presence: Arc<Presence>,
    hub: Arc<Hub>,
    mut local_rx: mpsc::UnboundedReceiver<Local>,
    shutdown: CancellationToken,
) {
    let wildcard = format!("{}.>", presence.subject_prefix);
    let Some(mut signals) =
        crate::subscribe_retrying(&presence.client, &wildcard, "presence", &shutdown).await
    else {
        return;
    };
    // Local sessions per (room, user).
    let mut local: HashMap<RoomId, HashMap<UserId, usize>> = HashMap::new();
    // Rooms whose last local user left since the last heartbeat: an empty snapshot follows the
    // last `offline` delta, in case that one was lost (core NATS delivers at most once).
    let mut emptied: HashSet<RoomId> = HashSet::new();
    let mut round: u64 = 0;
    let mut heartbeat = tokio::time::interval(presence.config.heartbeat);
    let mut flush = tokio::time::interval(presence.config.flush);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let prefix_len = presence.subject_prefix.len() + 1;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            change = local_rx.recv() => match change {
                Some(Local::Join(room, user)) => {
                    let n = local.entry(room.clone()).or_default().entry(user.clone()).or_insert(0);
                    *n += 1;
                    if *n == 1 {
                        emptied.remove(&room);
                        presence.publish_delta(&room, vec![user], true).await;
                    }
                }
                Some(Local::Leave(room, user)) => {
                    let Some(users) = local.get_mut(&room) else { continue };
                    let Some(n) = users.get_mut(&user) else { continue };
                    *n -= 1;
                    if *n == 0 {
                        users.remove(&user);
                        if users.is_empty() {
                            local.remove(&room);
                            emptied.insert(room.clone());
                        }
                        presence.publish_delta(&room, vec![user], false).await;
                    }
                }
                None => break,
            },
            Some(message) = signals.next() => {
                let Some(room) = message.subject.get(prefix_len..).and_then(|r| RoomId::parse(r).ok()) else {
                    continue;
                };
                match serde_json::from_slice::<Signal>(&message.payload) {
                    Ok(signal) => {
                        let until = Instant::now() + presence.config.expiry;
                        if let Ok(mut view) = presence.view.lock() {
                            view.apply(&room, &signal, until);
                        }
                    }
                    Err(e) => tracing::debug!(room = %room, error = %e, "malformed presence signal"),
                }
            }
            _ = heartbeat.tick() => {
                round += 1;
                for (room, users) in &local {
                    presence.publish_snapshot(room, users.keys().cloned().collect(), round).await;
                }
                for room in emptied.drain() {
                    presence.publish_snapshot(&room, Vec::new(), round).await;
                }
            }
            _ = flush.tick() => presence.flush(&hub),
        }
    }
    // A clean stop: the other edges need not wait for the expiry.
    for (room, users) in local {
        presence
            .publish_delta(&room, users.into_keys().collect(), false)
            .await;
    }
    let _ = presence.client.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(u: &str) -> UserId {
        UserId::parse(u).unwrap()
    }

    fn signal(edge: &str, users: &[&str], online: bool, snapshot: bool) -> Signal {
        Signal {
            edge: edge.into(),
            users: users.iter().map(|u| user(u)).collect(),
            online,
            snapshot,
            round: 0,
            part: 0,
            parts: 1,
        }
    }

    #[test]
    fn online_while_any_edge_vouches_and_until_its_deadline() {
        let room = RoomId::parse("r").unwrap();
        let mut view = View::default();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(90);
        view.apply(&room, &signal("e1", &["alice"], true, false), later);
        view.apply(
            &room,
            &signal("e2", &["alice", "bob"], true, false),
            t0 + Duration::from_secs(10),
        );
        // alice leaves e1: still online through e2.
        view.apply(&room, &signal("e1", &["alice"], false, false), later);
        assert_eq!(view.online_in(&room), [user("alice"), user("bob")].into());
        // e2 stops renewing: its users expire.
        view.expire(t0 + Duration::from_secs(11));
        assert!(view.online_in(&room).is_empty());
    }

    #[test]
    fn a_snapshot_replaces_what_the_edge_said_before() {
        let room = RoomId::parse("r").unwrap();
        let mut view = View::default();
        let until = Instant::now() + Duration::from_secs(90);
        view.apply(&room, &signal("e1", &["alice", "bob"], true, false), until);
        view.apply(&room, &signal("e2", &["bob"], true, false), until);
        view.apply(&room, &signal("e1", &["carol"], true, true), until);
        assert_eq!(view.online_in(&room), [user("bob"), user("carol")].into());
    }

    fn part(edge: &str, users: &[&str], round: u64, part: u32, parts: u32) -> Signal {
        Signal {
            round,
            part,
            parts,
            ..signal(edge, users, true, true)
        }
    }

    #[test]
    fn a_snapshot_too_big_for_one_message_is_cut_into_parts_under_the_bound() {
        let users: Vec<UserId> = (0..1000).map(|i| user(&format!("user-{i:04}"))).collect();
        let parts = parts_of(users.clone(), 4096);
        assert!(parts.len() > 1, "{} parts", parts.len());
        for part in &parts {
            let signal = Signal {
                users: part.clone(),
                ..signal("0123456789abcdef0123456789abcdef", &[], true, true)
            };
            let bytes = serde_json::to_vec(&signal).unwrap().len();
            assert!(bytes < 4096 + 200, "a part of {bytes} bytes");
        }
        assert_eq!(parts.concat(), users, "every user once, in order");
        assert_eq!(parts_of(Vec::new(), 4096), vec![Vec::<UserId>::new()]);
    }

    #[test]
    fn a_snapshot_in_parts_replaces_what_the_edge_said_once_every_part_came() {
        let room = RoomId::parse("r").unwrap();
        let mut view = View::default();
        let until = Instant::now() + Duration::from_secs(90);
        view.apply(
            &room,
            &signal("e1", &["alice", "bob", "carol"], true, false),
            until,
        );
        // Round 1: bob and carol left; part 0 of 2 alone replaces nothing yet.
        view.apply(&room, &part("e1", &["alice"], 1, 0, 2), until);
        assert_eq!(view.online_in(&room).len(), 3);
        view.apply(&room, &part("e1", &["dave"], 1, 1, 2), until);
        assert_eq!(view.online_in(&room), [user("alice"), user("dave")].into());
        // Round 2 loses its first part: nothing is withdrawn on the strength of half a list.
        view.apply(&room, &part("e1", &["erin"], 2, 1, 2), until);
        assert_eq!(
            view.online_in(&room),
            [user("alice"), user("dave"), user("erin")].into()
        );
        // Round 3 whole: exactly its users.
        view.apply(&room, &part("e1", &["erin"], 3, 0, 2), until);
        view.apply(&room, &part("e1", &[], 3, 1, 2), until);
        assert_eq!(view.online_in(&room), [user("erin")].into());
        assert!(view.partial.is_empty(), "completed rounds are not kept");
    }

    /// An edge whose last user of a room left sends an empty snapshot at its next heartbeat:
    /// a lost `offline` for that user heals then, not at the expiry.
    #[test]
    fn an_empty_snapshot_withdraws_everyone_the_edge_vouched_for() {
        let room = RoomId::parse("r").unwrap();
        let mut view = View::default();
        let until = Instant::now() + Duration::from_secs(90);
        view.apply(&room, &signal("e1", &["alice"], true, false), until);
        view.apply(&room, &signal("e2", &["bob"], true, false), until);
        view.apply(&room, &part("e1", &[], 7, 0, 1), until);
        assert_eq!(view.online_in(&room), [user("bob")].into());
    }
}

//! The projector against a real nats-server and a real SQLite store.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use chat_log::{LogConfig, RoomLog};
use chat_model::{Event, EventBody, RoomId, RoomKind, UserId};
use chat_projector::{rebuild, Partition, ProjectorConfig, ProjectorStats, RebuildError};
use chat_store::{SqliteStore, Store};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn room(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

/// A random but plausible event for a room whose head is `head` (≥ 1).
fn random_event(rng: &mut StdRng, head: u64) -> Event {
    let by = USERS[rng.random_range(0..USERS.len())];
    let target = rng.random_range(1..=head);
    let body = match rng.random_range(0..11) {
        0..=3 => EventBody::Message {
            text: format!("text {}", rng.random::<u32>()),
            thread: rng.random_bool(0.2).then_some(target),
            reply_to: None,
        },
        4 => EventBody::Edit {
            target,
            text: format!("edited {}", rng.random::<u32>()),
        },
        5 => EventBody::Delete { target },
        6 => EventBody::Reaction {
            target,
            emoji: ["👍", "🎉"][rng.random_range(0..2)].into(),
            on: rng.random_bool(0.7),
        },
        7 => EventBody::Read {
            up_to: rng.random_range(1..=head),
        },
        8 => EventBody::MemberJoined {
            member: user(USERS[rng.random_range(0..USERS.len())]),
        },
        // By anyone: only the admin's take effect, identically live and rebuilt.
        9 => EventBody::RoomUpdated {
            read_only: rng.random_bool(0.5),
        },
        _ => EventBody::MemberLeft {
            member: user(USERS[rng.random_range(0..USERS.len())]),
        },
    };
    Event {
        id: Uuid::new_v4(),
        user: user(by),
        ts: 1_763_900_000_000 + head as i64,
        body,
    }
}

fn created(by: &str) -> Event {
    Event {
        id: Uuid::new_v4(),
        user: user(by),
        ts: 1_763_900_000_000,
        body: EventBody::RoomCreated {
            name: "Room".into(),
            room_kind: RoomKind::Group,
            members: vec![user("bob"), user("carol")],
        },
    }
}

/// Creates `room` and appends `count` random events after its `room_created`.
async fn fill_room(log: &RoomLog, room: &RoomId, count: u64, rng: &mut StdRng) {
    log.ensure_room(room).await.unwrap();
    log.append(room, &created("alice")).await.unwrap();
    for head in 1..=count {
        log.append(room, &random_event(rng, head)).await.unwrap();
    }
}

struct Running {
    store: Arc<dyn Store>,
    stats: Arc<ProjectorStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start(log: &RoomLog, partition: Partition) -> Running {
    start_with(log, partition, ProjectorConfig::default().batch_max)
}

fn start_with(log: &RoomLog, partition: Partition, batch_max: usize) -> Running {
    start_config(
        log,
        ProjectorConfig {
            partition,
            batch_max,
            ..test_config()
        },
    )
}

/// The projector's defaults with reconciles and reports frequent enough for tests.
fn test_config() -> ProjectorConfig {
    ProjectorConfig {
        reconcile_every: Duration::from_millis(300),
        report_every: Duration::from_millis(100),
        ..ProjectorConfig::default()
    }
}

fn start_config(log: &RoomLog, config: ProjectorConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    Running {
        _dir: dir,
        ..start_on(log, store, config)
    }
}

/// A fresh nats-server, a room log on it, and the room `name` with its `room_created`.
async fn with_created_room(name: &str) -> (chat_harness::NatsServer, RoomLog, RoomId) {
    let server = chat_harness::NatsServer::start();
    let log = RoomLog::connect(&server.url(), LogConfig::default())
        .await
        .unwrap();
    let r = room(name);
    log.ensure_room(&r).await.unwrap();
    log.append(&r, &created("alice")).await.unwrap();
    (server, log, r)
}

impl Running {
    async fn stop(self) -> (Arc<dyn Store>, tempfile::TempDir) {
        self.stop.cancel();
        self.task.await.unwrap();
        (self.store, self._dir)
    }
}

/// Waits until the store holds every room up to its head.
async fn caught_up(store: &Arc<dyn Store>, log: &RoomLog, rooms: &[RoomId]) {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let mut done = true;
            for room in rooms {
                if store.checkpoint(room).await.unwrap() < log.head(room).await.unwrap() {
                    done = false;
                }
            }
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("projector caught up within 30 s");
}

async fn rebuilt_digest(log: &RoomLog) -> String {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("r.db")).unwrap());
    rebuild(log, &store, None, Partition::ALL, false)
        .await
        .unwrap();
    store.digest(None).await.unwrap()
}

/// Republishes every stored entry of `room` on its live subject again, in a shuffled order,
/// as the stream's republish would (same headers): the projector sees each event at least
/// twice and out of order.
async fn replay_shuffled(log: &RoomLog, room: &RoomId, rng: &mut StdRng) {
    let head = log.head(room).await.unwrap();
    let mut seqs: Vec<u64> = (1..=head).collect();
    seqs.shuffle(rng);
    let subject = log.config().live_subject(room);
    for seq in seqs {
        let entry = log.get(room, seq).await.unwrap().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Sequence", seq.to_string().as_str());
        log.client()
            .publish_with_headers(subject.clone(), headers, entry.payload)
            .await
            .unwrap();
    }
    log.client().flush().await.unwrap();
}

#[tokio::test]
async fn duplicates_and_shuffled_order_converge_to_the_rebuilt_rows() {
    let server = chat_harness::NatsServer::start();
    for seed in [1u64, 2, 3] {
        // A deployment prefix per seed keeps each run's rooms apart.
        let config = LogConfig {
            prefix: format!("seed{seed}"),
            ..LogConfig::default()
        };
        let log = RoomLog::connect(&server.url(), config).await.unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let rooms: Vec<RoomId> = (0..3).map(|i| room(&format!("p{i}"))).collect();
        for r in &rooms {
            fill_room(&log, r, 60, &mut rng).await;
        }
        let running = start(&log, Partition::ALL);
        // While the projector catches up from the streams, the same events arrive again live,
        // shuffled; then more events are appended and also replayed shuffled.
        for r in &rooms {
            replay_shuffled(&log, r, &mut rng).await;
        }
        for r in &rooms {
            for head in 61..=90 {
                log.append(r, &random_event(&mut rng, head)).await.unwrap();
            }
            replay_shuffled(&log, r, &mut rng).await;
        }
        caught_up(&running.store, &log, &rooms).await;
        let live = running.store.digest(None).await.unwrap();
        let projected = running
            .stats
            .projected
            .load(std::sync::atomic::Ordering::Relaxed);
        running.stop().await;
        assert_eq!(
            live,
            rebuilt_digest(&log).await,
            "seed {seed}: live projection differs from a rebuild"
        );
        assert_eq!(projected, 3 * 91, "seed {seed}: each entry stored once");
    }
}

#[tokio::test]
async fn undecodable_entries_become_dead_letters_and_the_room_moves_on() {
    let server = chat_harness::NatsServer::start();
    let log = RoomLog::connect(&server.url(), LogConfig::default())
        .await
        .unwrap();
    let r = room("dead");
    log.ensure_room(&r).await.unwrap();
    let running = start(&log, Partition::ALL);
    log.append(&r, &created("alice")).await.unwrap();
    log.append_raw(
        &r,
        &Uuid::new_v4().to_string(),
        b"\x93not an event".to_vec().into(),
        None,
    )
    .await
    .unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    log.append(&r, &random_event(&mut rng, 2)).await.unwrap();
    caught_up(&running.store, &log, std::slice::from_ref(&r)).await;
    let dead = running.store.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].room.as_str(), dead[0].seq), ("dead", 2));
    assert_eq!(
        running
            .stats
            .dead_letters
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let (store, _dir) = running.stop().await;
    assert_eq!(store.checkpoint(&r).await.unwrap(), 3);
}

#[tokio::test]
async fn partitions_share_the_rooms_without_overlap() {
    let server = chat_harness::NatsServer::start();
    let log = RoomLog::connect(&server.url(), LogConfig::default())
        .await
        .unwrap();
    let rooms: Vec<RoomId> = (0..12).map(|i| room(&format!("part-{i}"))).collect();
    let halves = [
        Partition { index: 0, count: 2 },
        Partition { index: 1, count: 2 },
    ];
    let running: Vec<Running> = halves.iter().map(|p| start(&log, *p)).collect();
    let mut rng = StdRng::seed_from_u64(4);
    for r in &rooms {
        fill_room(&log, r, 5, &mut rng).await;
    }
    for (p, run) in halves.iter().zip(&running) {
        let owned: Vec<RoomId> = rooms.iter().filter(|r| p.owns(r)).cloned().collect();
        assert!(!owned.is_empty() && owned.len() < rooms.len());
        caught_up(&run.store, &log, &owned).await;
        let held: Vec<RoomId> = run
            .store
            .checkpoints()
            .await
            .unwrap()
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        assert!(held.iter().all(|r| p.owns(r)), "{p}: holds {held:?}");
        let report = run.store.projectors().await.unwrap();
        assert_eq!(report[0].partition, p.to_string());
    }
    for run in running {
        run.stop().await;
    }
}

#[tokio::test]
async fn a_lost_last_event_is_found_by_reconciling_with_the_stream_list() {
    let (server, log, r) = with_created_room("lost-last").await;
    let running = start(&log, Partition::ALL);
    caught_up(&running.store, &log, std::slice::from_ref(&r)).await;
    // Append through a second log whose stream does not republish: nothing reaches the live
    // subject, as when core NATS drops the last message.
    let quiet = RoomLog::connect(&server.url(), LogConfig::default())
        .await
        .unwrap();
    let mut config = quiet.stream_config(&r);
    config.republish = None;
    let reply = quiet
        .client()
        .request(
            format!("$JS.API.STREAM.UPDATE.{}", config.name),
            serde_json::to_vec(&config).unwrap().into(),
        )
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        reply.get("error").is_none(),
        "stream update refused: {reply}"
    );
    assert!(reply["config"].get("republish").is_none(), "{reply}");
    let mut rng = StdRng::seed_from_u64(5);
    quiet.append(&r, &random_event(&mut rng, 1)).await.unwrap();
    caught_up(&running.store, &log, std::slice::from_ref(&r)).await;
    assert_eq!(running.store.checkpoint(&r).await.unwrap(), 2);
    running.stop().await;
}

/// A backlog larger than every queue between the stream reads, the loop and the writer (the
/// loop once waited on the writer while the writer waited on the loop, and later the writer's
/// reports were starved by the loop's other input).
#[tokio::test]
async fn a_backlog_larger_than_the_projectors_queues_is_caught_up() {
    use futures::StreamExt;
    let (_server, log, r) = with_created_room("backlog").await;
    let mut rng = StdRng::seed_from_u64(6);
    let events: Vec<Event> = (1..=20_000).map(|h| random_event(&mut rng, h)).collect();
    futures::stream::iter(events.iter())
        .map(|e| log.append(&r, e))
        .buffer_unordered(256)
        .for_each(|a| async move {
            a.unwrap();
        })
        .await;
    // Small batches keep the writer busy, so the loop often waits to hand it the next one
    // while stream reads keep its input full.
    let running = start_with(&log, Partition::ALL, 16);
    caught_up(&running.store, &log, std::slice::from_ref(&r)).await;
    running.stop().await;
}

#[tokio::test]
async fn live_events_wait_for_a_fuller_commit_unless_a_reader_asks_for_it() {
    let (_server, log, r) = with_created_room("linger").await;
    let commits = Arc::new(chat_store::Commits::default());
    // Longer than this test may take: nothing live is written unless asked for.
    let running = start_config(
        &log,
        ProjectorConfig {
            live_linger: Duration::from_secs(600),
            report_every: Duration::from_millis(20),
            commits: commits.clone(),
            ..test_config()
        },
    );
    let (store, stats) = (running.store.clone(), running.stats.clone());
    // The room_created is caught up by the first stream listing (a fill, not lingering).
    caught_up(&store, &log, std::slice::from_ref(&r)).await;
    // No lag left from that fill: the lag seen below is the live event's.
    tokio::time::timeout(Duration::from_secs(10), async {
        while stats.lag_ms.load(std::sync::atomic::Ordering::Relaxed) != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("no lag once caught up");

    let mut rng = StdRng::seed_from_u64(9);
    let seq = log
        .append(&r, &random_event(&mut rng, 1))
        .await
        .unwrap()
        .seq;
    let mut watch = commits.watch();
    // The projector has the event (it reports it as lag) and holds it back.
    tokio::time::timeout(Duration::from_secs(10), async {
        while stats.lag_ms.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the live event reached the projector");
    // Many times the default linger (20 ms): without lingering it would be written by now.
    let window = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < window {
        assert!(
            !watch.has_changed().unwrap(),
            "committed without being asked"
        );
        assert!(store.checkpoint(&r).await.unwrap() < seq);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    commits.request_flush();
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.checkpoint(&r).await.unwrap() < seq {
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("written once asked");
    running.stop().await;
}

/// Events waiting for a lingering commit are not behind: a stream listing that covers them
/// starts no stream read.
#[tokio::test]
async fn a_listing_during_a_lingering_commit_reads_nothing_from_the_stream() {
    use std::sync::atomic::Ordering::Relaxed;
    let (_server, log, r) = with_created_room("listed").await;
    let running = start_config(
        &log,
        ProjectorConfig {
            // Longer than this test may take: the events below wait for the commit.
            live_linger: Duration::from_secs(600),
            reconcile_every: Duration::from_millis(50),
            ..test_config()
        },
    );
    let (store, stats) = (running.store.clone(), running.stats.clone());
    caught_up(&store, &log, std::slice::from_ref(&r)).await;
    let mut rng = StdRng::seed_from_u64(11);
    let mut head = 1;
    for _ in 0..5 {
        head = log
            .append(&r, &random_event(&mut rng, head))
            .await
            .unwrap()
            .seq;
    }
    // The first starts a lingering batch; the others wait in the subscription.
    tokio::time::timeout(Duration::from_secs(10), async {
        while stats.lag_ms.load(Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the live events reached the projector");
    let fills = stats.fills.load(Relaxed);
    // Listings that started after the appends.
    let listed = stats.listings.load(Relaxed);
    tokio::time::timeout(Duration::from_secs(10), async {
        while stats.listings.load(Relaxed) < listed + 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the stream is listed again");
    assert_eq!(
        stats.fills.load(Relaxed),
        fills,
        "a stream read for events held live"
    );
    assert!(
        store.checkpoint(&r).await.unwrap() < head,
        "committed while lingering"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_whole_rebuild_clears_rooms_no_log_has_any_more() {
    let (_server, log, r) = with_created_room("kept").await;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("r.db")).unwrap());
    // The store holds a room whose stream is gone (deleted, or another deployment's).
    let gone = room("gone");
    store
        .apply(&[chat_store::RoomBatch {
            room: gone.clone(),
            entries: vec![chat_store::Entry {
                seq: 1,
                event: Ok(Event {
                    id: Uuid::new_v4(),
                    user: user("alice"),
                    ts: 0,
                    body: EventBody::RoomCreated {
                        name: "Gone".into(),
                        room_kind: RoomKind::Group,
                        members: vec![user("bob")],
                    },
                }),
            }],
        }])
        .await
        .unwrap();
    assert_eq!(store.checkpoint(&gone).await.unwrap(), 1);

    // One room rebuilt: the others are left alone.
    rebuild(&log, &store, Some(&r), Partition::ALL, false)
        .await
        .unwrap();
    assert_eq!(store.checkpoint(&gone).await.unwrap(), 1);
    // A room no log has is cleared only when asked to, alone or with the whole store: the
    // usual cause is the wrong NATS or prefix.
    let refused = rebuild(&log, &store, Some(&gone), Partition::ALL, false).await;
    assert!(
        matches!(&refused, Err(RebuildError::Refused(m)) if m.contains("no log has room gone")),
        "{refused:?}"
    );
    let refused = rebuild(&log, &store, None, Partition::ALL, false).await;
    assert!(
        matches!(&refused, Err(RebuildError::Refused(m)) if m.contains("1 of the store's rooms have no log (gone)")),
        "{refused:?}"
    );
    assert_eq!(store.checkpoint(&gone).await.unwrap(), 1, "nothing cleared");
    // The whole store, forced: it ends as the logs say, as a rebuild into a fresh store does.
    rebuild(&log, &store, None, Partition::ALL, true)
        .await
        .unwrap();
    assert_eq!(store.checkpoint(&gone).await.unwrap(), 0);
    assert!(store.room_state(&gone).await.unwrap().is_none());
    assert_eq!(
        store.digest(None).await.unwrap(),
        rebuilt_digest(&log).await
    );
}

/// A projector on `store` (shared with a projector before it).
fn start_on(log: &RoomLog, store: Arc<dyn Store>, config: ProjectorConfig) -> Running {
    let stats = Arc::new(ProjectorStats::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (log, store, stats, stop) = (log.clone(), store.clone(), stats.clone(), stop.clone());
        async move {
            chat_projector::run(log, store, config, stats, stop)
                .await
                .unwrap()
        }
    });
    Running {
        store,
        stats,
        stop,
        task,
        _dir: tempfile::tempdir().unwrap(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// What the log gained while no projector ran is as old as the time since the last report, not
/// as old as the restarted projector's knowledge of it: the edges refuse a resend past the
/// duplicate window by this lag, and a backlog dated from the restart would let a resend whose
/// original is not stored yet through.
#[tokio::test]
async fn a_restarted_projector_dates_the_backlog_from_its_last_report() {
    let (_server, log, r) = with_created_room("restart").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let first = start_on(&log, store.clone(), test_config());
    caught_up(&store, &log, std::slice::from_ref(&r)).await;
    let reported = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let reports = store.projectors().await.unwrap();
            if let Some(report) = reports.into_iter().find(|p| p.partition == "0/1") {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the first projector reported");
    first.stop().await;
    // As if it had stopped a minute ago (its last report then, through the store's own
    // call), rather than waiting for a downtime to pass.
    let reported = chat_store::ProjectorStatus {
        reported_at_ms: reported.reported_at_ms - 60_000,
        ..reported
    };
    store.report_projector(&reported).await.unwrap();

    // While none runs: appends, and the store locked by another writer, so that the next
    // projector cannot catch up before it reports.
    let mut rng = StdRng::seed_from_u64(4);
    for head in 1..=3 {
        log.append(&r, &random_event(&mut rng, head)).await.unwrap();
    }
    let locker = rusqlite::Connection::open(&path).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let second = start_on(&log, store.clone(), test_config());
    let restarted_at = now_ms();
    let lag = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let lag = second
                .stats
                .lag_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            if lag > 0 {
                return lag as i64;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the restarted projector reports its lag");
    let floor = restarted_at - (reported.reported_at_ms - reported.lag_ms as i64);
    assert!(
        lag >= floor && floor >= 60_000,
        "lag {lag} ms reported after {floor} ms without a projector"
    );

    locker.execute_batch("ROLLBACK").unwrap();
    caught_up(&store, &log, std::slice::from_ref(&r)).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while second
            .stats
            .lag_ms
            .load(std::sync::atomic::Ordering::Relaxed)
            != 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("no lag once caught up");
    second.stop().await;
}

/// A projector that stops on an error is started again, and then catches up: the process
/// around it stays ready, so a projector that stayed down would leave history behind for good.
#[tokio::test]
async fn a_projector_that_stops_on_a_store_error_is_started_again() {
    let (_server, log, r) = with_created_room("supervised").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    // Another connection takes the checkpoints away: the projector's first read fails.
    let operator = rusqlite::Connection::open(&path).unwrap();
    operator
        .execute_batch("ALTER TABLE checkpoints RENAME TO checkpoints_away")
        .unwrap();

    let stats = Arc::new(ProjectorStats::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(chat_projector::run_supervised(
        log.clone(),
        store.clone(),
        test_config(),
        stats.clone(),
        stop.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(10), async {
        while stats.restarts.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the failed projector is counted as restarted");
    assert!(!task.is_finished(), "the supervisor gave up");

    operator
        .execute_batch("ALTER TABLE checkpoints_away RENAME TO checkpoints")
        .unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    for head in 1..=3 {
        log.append(&r, &random_event(&mut rng, head)).await.unwrap();
    }
    caught_up(&store, &log, std::slice::from_ref(&r)).await;
    assert_eq!(store.checkpoint(&r).await.unwrap(), 4);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the supervisor ends on shutdown")
        .unwrap();
}

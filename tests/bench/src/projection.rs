//! Projection benchmarks: the projector and the SQLite store against raw SQLite doing the same
//! writes and reads in the same run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_log::RoomLog;
use chat_model::{Event, EventBody, RoomId, RoomKind, UserId};
use chat_projector::{Partition, ProjectorConfig, ProjectorStats};
use chat_store::{Entry, PageQuery, RoomBatch, SqliteStore, Store};
use futures::StreamExt;
use rusqlite::{params, Connection};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{emit, event, median, ROUNDS};

/// Rows per transaction on both sides (the projector's default batch).
const BATCH: usize = 2_000;

fn created() -> Event {
    Event {
        id: uuid::Uuid::new_v4(),
        user: UserId::parse("bench-user").unwrap(),
        ts: 1_763_900_000_000,
        body: EventBody::RoomCreated {
            name: "bench".into(),
            room_kind: RoomKind::Group,
            members: vec![UserId::parse("reader").unwrap()],
        },
    }
}

/// Fills a fresh room with `room_created` and `n` messages, pipelined.
async fn fill(log: &RoomLog, room: &RoomId, n: usize) {
    log.ensure_room(room).await.unwrap();
    log.append(room, &created()).await.unwrap();
    let events: Vec<Event> = (0..n).map(event).collect();
    futures::stream::iter(events.iter())
        .map(|e| log.append(room, e))
        .buffer_unordered(256)
        .for_each(|r| async move {
            r.unwrap();
        })
        .await;
}

/// The raw side's table: the columns a message row has in the store.
fn raw_table(path: &std::path::Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE events (room TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,
             user TEXT NOT NULL, ts INTEGER NOT NULL, kind TEXT NOT NULL, text TEXT,
             PRIMARY KEY (room, seq)) WITHOUT ROWID;",
    )
    .unwrap();
    conn
}

/// Raw batched inserts of the same rows; rows/s.
fn raw_insert(dir: &std::path::Path, room: &RoomId, entries: &[(u64, Event)]) -> f64 {
    let mut conn = raw_table(&dir.join("raw.db"));
    let start = Instant::now();
    for chunk in entries.chunks(BATCH) {
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
                .unwrap();
            for (seq, e) in chunk {
                let text = match &e.body {
                    EventBody::Message { text, .. } => Some(text.as_str()),
                    _ => None,
                };
                insert
                    .execute(params![
                        room.as_str(),
                        *seq as i64,
                        e.id.hyphenated().to_string(),
                        e.user.as_str(),
                        e.ts,
                        e.body.kind(),
                        text
                    ])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    entries.len() as f64 / start.elapsed().as_secs_f64()
}

/// The store alone applying the same rows in batches of [`BATCH`]; events/s. A diagnostic: with
/// the projector's rate it shows what the stream reads add.
async fn store_alone(dir: &std::path::Path, room: &RoomId, entries: &[(u64, Event)]) -> f64 {
    let store = SqliteStore::open(&dir.join("alone.db")).unwrap();
    let batches: Vec<RoomBatch> = entries
        .chunks(BATCH)
        .map(|chunk| RoomBatch {
            room: room.clone(),
            entries: chunk
                .iter()
                .map(|(seq, e)| Entry {
                    seq: *seq,
                    event: Ok(e.clone()),
                })
                .collect(),
        })
        .collect();
    let start = Instant::now();
    for batch in &batches {
        store.apply(std::slice::from_ref(batch)).await.unwrap();
    }
    entries.len() as f64 / start.elapsed().as_secs_f64()
}

/// The projector catching a room up from its stream into a fresh store: events/s, and the
/// share of that time its writer spent in the store.
async fn ours_projection(log: &RoomLog, room: &RoomId, dir: &std::path::Path) -> (f64, f64) {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("ours.db")).unwrap());
    let head = log.head(room).await.unwrap();
    let stop = CancellationToken::new();
    let stats = Arc::new(ProjectorStats::default());
    let start = Instant::now();
    let task = tokio::spawn(chat_projector::run(
        log.clone(),
        store.clone(),
        ProjectorConfig {
            partition: Partition::ALL,
            ..ProjectorConfig::default()
        },
        stats.clone(),
        stop.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    while store.checkpoint(room).await.unwrap() < head {
        assert!(
            Instant::now() < deadline,
            "projector stalled at {} of {head}",
            store.checkpoint(room).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let busy = stats.store_write_us.load(Ordering::Relaxed) as f64 / 1e6 / elapsed;
    stop.cancel();
    task.await.unwrap().unwrap();
    (head as f64 / elapsed, busy)
}

/// Projection throughput (log → projector → SQLite) vs raw batched inserts of the same rows.
pub async fn projection_throughput(log: &RoomLog, n: usize) {
    let room = RoomId::parse(format!("proj-{}", uuid::Uuid::new_v4().simple())).unwrap();
    fill(log, &room, n).await;
    let mut entries = Vec::with_capacity(n + 1);
    let read_start = Instant::now();
    let mut reader = log.read_range(&room, 1, u64::MAX).bulk();
    while let Some(raw) = reader.next().await {
        let raw = raw.unwrap();
        entries.push((raw.seq, raw.decode().unwrap()));
    }
    // Diagnostics, not compared: one stream read alone (decoded), the store alone, and how busy
    // the projector's writer was.
    let read_rate = entries.len() as f64 / read_start.elapsed().as_secs_f64();
    let (mut ours, mut raw, mut alone, mut busy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS.min(5) {
        let dir = tempfile::tempdir().unwrap();
        let (rate, writer_busy) = ours_projection(log, &room, dir.path()).await;
        ours.push(rate);
        busy.push(writer_busy);
        let dir = tempfile::tempdir().unwrap();
        raw.push(raw_insert(dir.path(), &room, &entries));
        let dir = tempfile::tempdir().unwrap();
        alone.push(store_alone(dir.path(), &room, &entries).await);
    }
    let raw = median(raw);
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    emit(
        "projection_throughput",
        median(ours),
        raw,
        "events/s",
        json!({
            "events": n + 1,
            "batch": BATCH,
            "target": ">= 0.5",
            "store_alone_ratio": round2(median(alone) / raw),
            "writer_busy": round2(median(busy)),
            "stream_read_events_per_s": read_rate.round(),
        }),
    );
}

/// Stores `room` straight into `store`: `room_created` (with `reader` a member), then
/// `messages` messages by another user, in batches of [`BATCH`].
async fn store_room(store: &SqliteStore, room: &RoomId, messages: usize) {
    let mut entries = vec![Entry {
        seq: 1,
        event: Ok(created()),
    }];
    entries.extend((0..messages).map(|i| Entry {
        seq: i as u64 + 2,
        event: Ok(event(i + 2)),
    }));
    for chunk in entries.chunks(BATCH) {
        store
            .apply(&[RoomBatch {
                room: room.clone(),
                entries: chunk.to_vec(),
            }])
            .await
            .unwrap();
    }
}

/// History pages (50, newest first, random `before`) from the store vs a raw select of the
/// same rows.
pub async fn history_reads(pages: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hist.db")).unwrap();
    let room = RoomId::parse("history-bench").unwrap();
    let total = 20_000u64;
    store_room(&store, &room, total as usize - 1).await;
    let befores: Vec<u64> = (0..pages)
        .map(|i| 100 + (i as u64 * 7919) % (total - 100))
        .collect();
    let raw_conn = Connection::open(store.path()).unwrap();
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for &before in &befores {
            let page = store
                .history(
                    &room,
                    PageQuery {
                        before: Some(before),
                        limit: 50,
                    },
                )
                .await
                .unwrap();
            assert_eq!(page.events.len(), 50);
        }
        ours.push(pages as f64 / start.elapsed().as_secs_f64());

        let start = Instant::now();
        for &before in &befores {
            // The raw side reads the same rows and builds the same JSON, on a blocking thread
            // as the store does, without the store's decoration.
            let conn_rows = tokio::task::block_in_place(|| {
                let mut stmt = raw_conn
                    .prepare_cached(
                        "SELECT seq, ts, user, id, kind, text FROM events
                         WHERE room = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT 51",
                    )
                    .unwrap();
                stmt.query_map(params![room.as_str(), before as i64], |r| {
                    Ok(json!({
                        "seq": r.get::<_, i64>(0)?,
                        "ts": r.get::<_, i64>(1)?,
                        "user": r.get::<_, String>(2)?,
                        "id": r.get::<_, String>(3)?,
                        "kind": r.get::<_, String>(4)?,
                        "text": r.get::<_, Option<String>>(5)?,
                    }))
                })
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
            });
            assert_eq!(conn_rows.len(), 51);
        }
        raw.push(pages as f64 / start.elapsed().as_secs_f64());
    }
    emit(
        "history_page_reads",
        median(ours),
        median(raw),
        "pages/s",
        json!({"page": 50, "rows": total, "target": ">= 0.5"}),
    );
}

/// Projection lag (append acked → row stored) while appends run at half the measured maximum
/// pipelined rate.
pub async fn projection_lag(log: &RoomLog, max_rate: f64, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("lag.db")).unwrap());
    let room = RoomId::parse(format!("lag-{}", uuid::Uuid::new_v4().simple())).unwrap();
    log.ensure_room(&room).await.unwrap();
    log.append(&room, &created()).await.unwrap();
    let stop = CancellationToken::new();
    let stats = Arc::new(ProjectorStats::default());
    let projector = tokio::spawn(chat_projector::run(
        log.clone(),
        store.clone(),
        ProjectorConfig::default(),
        stats.clone(),
        stop.clone(),
    ));
    // Observe the checkpoint as closely as the store allows.
    let watcher = tokio::spawn({
        let (store, room) = (store.clone(), room.clone());
        async move {
            let mut seen: Vec<(u64, Instant)> = Vec::new();
            let mut last = 0;
            while last < n as u64 + 1 {
                let cp = store.checkpoint(&room).await.unwrap();
                if cp > last {
                    seen.push((cp, Instant::now()));
                    last = cp;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            seen
        }
    });
    let rate = max_rate / 2.0;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut acked: Vec<(u64, Instant)> = Vec::with_capacity(n);
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (log, room, e) = (log.clone(), room.clone(), event(i));
        pending.push(async move {
            let appended = log.append(&room, &e).await.unwrap();
            (appended.seq, Instant::now())
        });
        while let Some(Some(done)) = futures::FutureExt::now_or_never(pending.next()) {
            acked.push(done);
        }
    }
    while let Some(done) = pending.next().await {
        acked.push(done);
    }
    let seen = watcher.await.unwrap();
    stop.cancel();
    projector.await.unwrap().unwrap();
    let mut lags: Vec<f64> = acked
        .iter()
        .map(|(seq, at)| {
            let stored = seen
                .iter()
                .find(|(cp, _)| cp >= seq)
                .map(|(_, t)| *t)
                .unwrap();
            stored.saturating_duration_since(*at).as_secs_f64() * 1e3
        })
        .collect();
    lags.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
    println!(
        "{}",
        json!({
            "bench": "projection_lag",
            "p50_ms": (pct(0.5) * 100.0).round() / 100.0,
            "p99_ms": (pct(0.99) * 100.0).round() / 100.0,
            "rate": rate.round(),
            "max_rate": max_rate.round(),
            "events": n,
            "reported_lag_ms_at_end": stats.lag_ms.load(Ordering::Relaxed),
            "note": "ack to row visible in the store, appends at half the measured maximum rate",
        })
    );
}

/// The room list with unread counts (what `welcome` and `GET /v1/rooms` send) of a user in
/// `rooms` rooms with `unread` unread messages in each, vs a raw select of the same
/// membership rows without the counts: what counting the unread messages adds to listing.
pub async fn room_list_reads(rooms: usize, unread: usize, lists: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("rooms.db")).unwrap();
    let reader = UserId::parse("reader").unwrap();
    for r in 0..rooms {
        store_room(&store, &RoomId::parse(format!("list-{r}")).unwrap(), unread).await;
    }
    let blocked = std::collections::HashSet::new();
    let raw_conn = Connection::open(store.path()).unwrap();
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..lists {
            let list = store.rooms_of(&reader, &blocked).await.unwrap();
            assert_eq!(list.len(), rooms);
            assert!(list.iter().all(|r| r.unread == unread as u64));
        }
        ours.push(lists as f64 / start.elapsed().as_secs_f64());

        let start = Instant::now();
        for _ in 0..lists {
            let list = tokio::task::block_in_place(|| {
                let mut stmt = raw_conn
                    .prepare_cached(
                        "SELECT m.room, r.kind, r.name, c.seq, coalesce(cu.last_read, m.joined_seq)
                         FROM members m JOIN rooms r ON r.room = m.room
                         LEFT JOIN checkpoints c ON c.room = m.room
                         LEFT JOIN cursors cu ON cu.room = m.room AND cu.user = m.user
                         WHERE m.user = ?1 AND m.active = 1 ORDER BY m.room",
                    )
                    .unwrap();
                stmt.query_map([reader.as_str()], |r| {
                    Ok(json!({
                        "room": r.get::<_, String>(0)?,
                        "kind": r.get::<_, String>(1)?,
                        "name": r.get::<_, String>(2)?,
                        "head": r.get::<_, i64>(3)?,
                        "last_read": r.get::<_, i64>(4)?,
                    }))
                })
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
            });
            assert_eq!(list.len(), rooms);
        }
        raw.push(lists as f64 / start.elapsed().as_secs_f64());
    }
    emit(
        "room_list_reads",
        median(ours),
        median(raw),
        "lists/s",
        json!({"rooms": rooms, "unread_per_room": unread, "target": ">= 0.5"}),
    );
}

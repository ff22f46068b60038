//! The embedded backend: one SQLite file (WAL), one writer connection, a few readers.
//!
//! A batch of rooms is applied in one transaction together with the rooms' checkpoints, so the
//! file never holds rows without the checkpoint that covers them. Auditors can open the file with
//! the `sqlite3` tool; the schema is in `schema/sqlite.sql`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use chat_model::{Event, EventBody, RoomId, RoomKind, RoomState, UserId};
use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::idfilter::IdFilter;
use crate::render::{fields_of, StoredEvent};
use crate::{
    DeadLetter, IdHit, MemberCursors, Page, PageQuery, ProjectorStatus, Result, RoomBatch,
    RoomSummary, Store, StoreError, ThreadPage,
};

/// The schema, also shipped as `schema/sqlite.sql`.
pub const SCHEMA: &str = include_str!("../../../schema/sqlite.sql");

/// Tables and the order their rows are hashed in by [`Store::digest`].
const DIGEST_TABLES: &[(&str, &str)] = &[
    ("rooms", "room"),
    ("room_settings", "room"),
    ("members", "room, user"),
    ("cursors", "room, user"),
    ("delivered_cursors", "room, user"),
    ("events", "room, seq"),
    ("reactions", "room, target, emoji, user"),
    ("checkpoints", "room"),
    ("dead_letters", "room, seq"),
];

// Queries name their index (`INDEXED BY`): without statistics SQLite would rather scan a room's
// primary-key range than use a secondary index, which turns a lookup into a scan of the room.

/// The writer's page cache: 64 MiB instead of SQLite's 2 MiB. The id index takes random
/// client ids, so its inserts land all over it; with the default cache a large batch spills and
/// reads pages back from the file, which made writes several times slower than appends.
const WRITER_PRAGMAS: &str = "PRAGMA cache_size = -65536; PRAGMA wal_autocheckpoint = 8192;";

/// Read connections map the file (up to 256 MiB of it) instead of copying pages into a cache of
/// their own: SQLite's default 2 MiB per connection holds little of a large store, and a page
/// missing from it costs a `pread`. Unread counts look up a few rows in each of a user's rooms,
/// all over the file: with the map, a room list of 200 rooms took half the time
/// (`chat-bench room_list_reads`). Mapped pages are the operating system's page cache, shared by
/// every connection; what lies beyond the map is read as before.
const READER_PRAGMAS: &str = "PRAGMA mmap_size = 268435456;";

/// Read connections kept open between queries. Opening one costs far more than a query (the
/// pragmas, the schema parsed again, every statement prepared again): with only 4 kept, 64
/// clients appending at once opened and closed connections for a quarter of the edge's CPU.
const IDLE_READERS: usize = 32;

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    /// The one connection that writes (SQLite has one writer at a time anyway).
    writer: Arc<Mutex<Connection>>,
    /// Idle read connections; WAL lets them read while the writer writes.
    readers: Arc<Mutex<Vec<Connection>>>,
    /// The id index in memory, once [`SqliteStore::filter_ids`] turned it on.
    ids: Arc<RwLock<Option<IdFilter>>>,
}

fn backend_err(op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::Backend {
        op,
        message: e.to_string(),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend {
                op: "open",
                message: format!("create {}: {e}", dir.display()),
            })?;
        }
        let mut writer = Self::connect(path)?;
        writer
            .execute_batch(SCHEMA)
            .map_err(backend_err("create schema"))?;
        migrate_id_index(&mut writer).map_err(backend_err("migrate the id index"))?;
        migrate_message_numbers(&mut writer).map_err(backend_err("number the messages"))?;
        writer
            .execute_batch(WRITER_PRAGMAS)
            .map_err(backend_err("open"))?;
        Ok(SqliteStore {
            path: path.to_owned(),
            writer: Arc::new(Mutex::new(writer)),
            readers: Arc::new(Mutex::new(Vec::new())),
            ids: Arc::default(),
        })
    }

    /// Keeps the id index in memory too, as a Bloom filter, so that looking up an id the room
    /// never had (nearly every append) reads nothing from the file. Only for a process whose
    /// store no other process writes (`chatd` with every role: its own projector is the only
    /// writer), since the filter learns ids from this process's writes. Reads the whole index
    /// once, now.
    pub fn filter_ids(&self) -> Result<()> {
        let conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let filter = scan_ids(&conn, 0).map_err(backend_err("read the id index"))?;
        tracing::info!(ids = filter.added(), "id index kept in memory");
        *self.ids.write().unwrap_or_else(|p| p.into_inner()) = Some(filter);
        Ok(())
    }

    /// Whether the id may be in the room's index (`None`: no filter, ask the file).
    fn id_may_exist(&self, room: &str, head: [u8; 8]) -> Option<bool> {
        let ids = self.ids.read().unwrap_or_else(|p| p.into_inner());
        ids.as_ref()
            .map(|filter| filter.may_contain(IdFilter::key(room, head)))
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn connect(path: &Path) -> Result<Connection> {
        let conn = Connection::open(path).map_err(backend_err("open"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 10000;
             PRAGMA foreign_keys = OFF;",
        )
        .map_err(backend_err("open"))?;
        // Plans do not depend on bound values. Without this, a statement whose plan could
        // (a bound `LIMIT`, a bound value compared with an indexed column) is compiled again
        // every time that parameter is bound, which made every cached history query a fresh
        // parse. Queries here name their index where it matters, so nothing is lost.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(backend_err("open"))?;
        Ok(conn)
    }

    /// Runs `f` with the writer on a blocking thread.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Backend {
            op: "write",
            message: e.to_string(),
        })?
    }

    /// Runs `f` with a read connection, blocking in place on a multi-threaded runtime (a read
    /// takes well under a millisecond: handing it to the blocking pool and waking the task again
    /// cost as much as the query), on a blocking thread otherwise.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            return tokio::task::block_in_place(|| Self::with_reader(&self.readers, &self.path, f));
        }
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || Self::with_reader(&readers, &path, f))
            .await
            .map_err(|e| StoreError::Backend {
                op: "read",
                message: e.to_string(),
            })?
    }

    /// Runs a point lookup (a few microseconds, one index probe) on the calling thread: a hop to
    /// another thread, even `block_in_place`'s handing the worker's tasks over, costs more
    /// than the lookup and is paid on every append.
    fn read_point<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        Self::with_reader(&self.readers, &self.path, f)
    }

    /// Runs `f` with an idle read connection (or a new one) and keeps it for the next read.
    fn with_reader<T>(
        readers: &Mutex<Vec<Connection>>,
        path: &Path,
        f: impl FnOnce(&Connection) -> Result<T>,
    ) -> Result<T> {
        let idle = readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = Self::connect(path)?;
                conn.execute_batch(READER_PRAGMAS)
                    .map_err(backend_err("open"))?;
                conn
            }
        };
        let out = f(&conn);
        let mut idle = readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        out
    }
}

/// Moves a store made before `event_ids` existed to it: fills `room_keys` and `event_ids` from
/// `events` and drops the old index `events_by_id`, in one transaction, so a crash leaves the old
/// index (and the next open starts again). Keyed on the old index rather than on an empty
/// `event_ids`: a store written by an older version after this one had migrated it has the
/// index again, and its newer events are filled in the same way.
fn migrate_id_index(conn: &mut Connection) -> rusqlite::Result<()> {
    let old_index: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'events_by_id')",
        [],
        |r| r.get(0),
    )?;
    if !old_index {
        return Ok(());
    }
    let tx = conn.transaction()?;
    tx.execute_batch("INSERT OR IGNORE INTO room_keys (room) SELECT DISTINCT room FROM events;")?;
    {
        let mut rows = tx.prepare(
            "SELECT k.key, e.id, e.seq FROM events e JOIN room_keys k ON k.room = e.room",
        )?;
        let mut insert = tx.prepare(
            "INSERT OR IGNORE INTO event_ids (room_key, id_head, seq) VALUES (?1, ?2, ?3)",
        )?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            let (key, id, seq): (i64, String, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
            // Every stored id is a UUID (the edge refuses others); one that is not could never
            // be asked for.
            if let Ok(id) = Uuid::parse_str(&id) {
                insert.execute(params![key, &id_head(&id)[..], seq])?;
            }
        }
    }
    tx.execute_batch("DROP INDEX events_by_id;")?;
    tx.commit()
}

/// Gives a store made before `events.mnum` existed the column, numbered from its rows, in one
/// transaction.
fn migrate_message_numbers(conn: &mut Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('events') WHERE name = 'mnum')",
        [],
        |r| r.get(0),
    )?;
    if has {
        return Ok(());
    }
    // About 4 s per million events on a 2-core machine, once.
    tracing::info!("numbering the store's messages for unread counts (once)");
    let tx = conn.transaction()?;
    tx.execute_batch("ALTER TABLE events ADD COLUMN mnum INTEGER;")?;
    renumber_messages(&tx, None)?;
    tx.commit()?;
    tracing::info!("messages numbered");
    Ok(())
}

/// Sets `events.mnum` of every row of `room` (of every room with `None`) from the rows.
fn renumber_messages(tx: &Connection, room: Option<&str>) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE events SET mnum = w.n
         FROM (SELECT room, seq,
                      sum(kind = 'message') OVER (PARTITION BY room ORDER BY seq) AS n
               FROM events WHERE ?1 IS NULL OR room = ?1) AS w
         WHERE events.room = w.room AND events.seq = w.seq",
        [room],
    )?;
    Ok(())
}

/// How many messages `room` holds up to its newest stored event (`events.mnum` of that row),
/// numbering the room's rows first if a version that did not write the column added some.
fn message_count_in(tx: &Connection, room: &str) -> rusqlite::Result<i64> {
    let newest: Option<Option<i64>> = tx
        .prepare_cached("SELECT mnum FROM events WHERE room = ?1 ORDER BY seq DESC LIMIT 1")?
        .query_row([room], |r| r.get(0))
        .optional()?;
    match newest {
        None => Ok(0),
        Some(Some(n)) => Ok(n),
        Some(None) => {
            renumber_messages(tx, Some(room))?;
            tx.prepare_cached("SELECT mnum FROM events WHERE room = ?1 ORDER BY seq DESC LIMIT 1")?
                .query_row([room], |r| r.get(0))
        }
    }
}

/// A filter holding every entry of `event_ids`, sized for them (and at least `at_least`).
fn scan_ids(conn: &Connection, at_least: u64) -> rusqlite::Result<IdFilter> {
    let count: i64 = conn.query_row("SELECT count(*) FROM event_ids", [], |r| r.get(0))?;
    let mut filter = IdFilter::for_ids((count.max(0) as u64).max(at_least));
    let mut rows = conn.prepare(
        "SELECT k.room, i.id_head FROM event_ids i JOIN room_keys k ON k.key = i.room_key",
    )?;
    let mut rows = rows.query([])?;
    // Rows usually come a room at a time (`event_ids` is keyed by the room first): each room is
    // hashed once per run of its rows.
    let mut room: Option<(String, u64)> = None;
    while let Some(row) = rows.next()? {
        let name = row.get_ref(0)?.as_str()?;
        let hash = match &room {
            Some((last, hash)) if last == name => *hash,
            _ => room.insert((name.to_owned(), IdFilter::room_hash(name))).1,
        };
        let mut head = [0u8; 8];
        let blob = row.get_ref(1)?.as_blob()?;
        if blob.len() == head.len() {
            head.copy_from_slice(blob);
            filter.add(IdFilter::key_in(hash, head));
        }
    }
    Ok(filter)
}

/// The part of a client id `event_ids` keys on: 8 bytes of its SHA-256. Not the id's own
/// bytes: clients choose ids, and ids that share their leading bytes (time-ordered UUIDs, a
/// client's counter under a fixed prefix) would pile up under one key, so every lookup in the
/// room would read all of them. A digest spreads any choice of ids evenly.
fn id_head(id: &Uuid) -> [u8; 8] {
    let digest = Sha256::digest(id.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    head
}

/// The room's key in `event_ids`, given it one if it has none.
fn room_key_in(tx: &Connection, room: &str) -> rusqlite::Result<i64> {
    tx.prepare_cached("INSERT INTO room_keys (room) VALUES (?1) ON CONFLICT (room) DO NOTHING")?
        .execute([room])?;
    tx.prepare_cached("SELECT key FROM room_keys WHERE room = ?1")?
        .query_row([room], |r| r.get(0))
}

fn seq_sql(seq: u64) -> i64 {
    // Sequences are u64 in NATS but never near i64::MAX in practice.
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn checkpoint_in(tx: &Connection, room: &str) -> rusqlite::Result<u64> {
    let seq: Option<i64> = tx
        .prepare_cached("SELECT seq FROM checkpoints WHERE room = ?1")?
        .query_row([room], |r| r.get(0))
        .optional()?;
    Ok(seq.unwrap_or(0).max(0) as u64)
}

/// The cursor moves of one room's entries in a batch, written once per user when the room's
/// entries are done. Cursors only move forward (`max`) and nothing in a batch reads them, so one
/// upsert per user with the highest sequence leaves the same rows as one per event would.
#[derive(Default)]
struct CursorMoves<'a> {
    /// Read cursors: user → furthest sequence.
    read: HashMap<&'a str, u64>,
    /// Delivered cursors: user → furthest sequence.
    delivered: HashMap<&'a str, u64>,
}

impl<'a> CursorMoves<'a> {
    fn read(&mut self, user: &'a str, seq: u64) {
        let at = self.read.entry(user).or_insert(seq);
        *at = (*at).max(seq);
    }

    fn delivered(&mut self, user: &'a str, seq: u64) {
        let at = self.delivered.entry(user).or_insert(seq);
        *at = (*at).max(seq);
    }

    /// Writes the moves of `room` and forgets them.
    fn flush(&mut self, tx: &Transaction<'_>, room: &str) -> rusqlite::Result<()> {
        if !self.read.is_empty() {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO cursors (room, user, last_read) VALUES (?1, ?2, ?3)
                 ON CONFLICT (room, user) DO UPDATE SET last_read = max(last_read, excluded.last_read)",
            )?;
            for (user, seq) in self.read.drain() {
                stmt.execute(params![room, user, seq_sql(seq)])?;
            }
        }
        if !self.delivered.is_empty() {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO delivered_cursors (room, user, delivered) VALUES (?1, ?2, ?3)
                 ON CONFLICT (room, user) DO UPDATE SET delivered = max(delivered, excluded.delivered)",
            )?;
            for (user, seq) in self.delivered.drain() {
                stmt.execute(params![room, user, seq_sql(seq)])?;
            }
        }
        Ok(())
    }
}

/// Rows of `event_ids` written by one statement. Sorted and 64 to a statement, a batch's id
/// entries cost about a quarter less than one statement each (unsorted, many to a statement
/// cost more than one each); 64 rows × 3 values stay far below SQLite's parameter limit.
const ID_ROWS: usize = 64;

/// The statements every event runs, prepared once per batch, and the room's `event_ids`
/// entries, written together once the room's events are in.
struct Inserts<'tx> {
    message: rusqlite::CachedStatement<'tx>,
    /// Messages of the room being applied up to the last event applied (`events.mnum`).
    messages: i64,
    /// The `event_ids` entries (id head, seq) of the room being applied.
    ids: Vec<([u8; 8], i64)>,
}

impl<'tx> Inserts<'tx> {
    fn prepare(tx: &'tx Transaction<'_>) -> rusqlite::Result<Inserts<'tx>> {
        Ok(Inserts {
            message: tx.prepare_cached(
                "INSERT OR IGNORE INTO events
                 (room, seq, id, user, ts, kind, text, thread, reply_to, mnum)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'message', ?6, ?7, ?8, ?9)",
            )?,
            messages: 0,
            ids: Vec::new(),
        })
    }

    fn id(&mut self, id: &Uuid, seq: i64) {
        self.ids.push((id_head(id), seq));
    }

    /// Writes the pending `event_ids` entries of `room`, in key order (neighbouring inserts
    /// then find their pages where the previous one left them).
    fn flush_ids(
        &mut self,
        tx: &Transaction<'_>,
        room: &str,
        filter: &RwLock<Option<IdFilter>>,
    ) -> rusqlite::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        // Into the filter before the transaction commits: a lookup never finds the file ahead of
        // it (an id added here whose transaction then fails is only a needless read later).
        if let Some(filter) = filter.write().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let room = IdFilter::room_hash(room);
            for (head, _) in &self.ids {
                filter.add(IdFilter::key_in(room, *head));
            }
        }
        let key = room_key_in(tx, room)?;
        self.ids.sort_unstable();
        let mut chunks = self.ids.chunks_exact(ID_ROWS);
        if chunks.len() > 0 {
            let values = vec!["(?, ?, ?)"; ID_ROWS].join(", ");
            let mut many = tx.prepare_cached(&format!(
                "INSERT OR IGNORE INTO event_ids (room_key, id_head, seq) VALUES {values}"
            ))?;
            for chunk in chunks.by_ref() {
                for (i, (head, seq)) in chunk.iter().enumerate() {
                    many.raw_bind_parameter(3 * i + 1, key)?;
                    many.raw_bind_parameter(3 * i + 2, &head[..])?;
                    many.raw_bind_parameter(3 * i + 3, *seq)?;
                }
                many.raw_execute()?;
            }
        }
        let mut one = tx.prepare_cached(
            "INSERT OR IGNORE INTO event_ids (room_key, id_head, seq) VALUES (?1, ?2, ?3)",
        )?;
        for (head, seq) in chunks.remainder() {
            one.execute(params![key, &head[..], seq])?;
        }
        self.ids.clear();
        Ok(())
    }
}

/// Applies one decoded event at `seq` of `room`; its cursor moves go to `moves`.
fn apply_event<'a>(
    tx: &Transaction<'_>,
    inserts: &mut Inserts<'_>,
    moves: &mut CursorMoves<'a>,
    room: &str,
    seq: u64,
    event: &'a Event,
) -> rusqlite::Result<()> {
    let user = event.user.as_str();
    let mut id_buf = Uuid::encode_buffer();
    let id: &str = event.id.hyphenated().encode_lower(&mut id_buf);
    let kind = event.body.kind();
    let s = seq_sql(seq);
    inserts.id(&event.id, s);
    match &event.body {
        EventBody::Message {
            text,
            thread,
            reply_to,
        } => {
            inserts.messages += 1;
            inserts.message.execute(params![
                room,
                s,
                id,
                user,
                event.ts,
                text,
                thread.map(seq_sql),
                reply_to.map(seq_sql),
                inserts.messages
            ])?;
            // Writing a message reads the room up to it (contract: cursors), and so has it.
            moves.read(user, seq);
            moves.delivered(user, seq);
            return Ok(());
        }
        EventBody::Edit { target, text } => {
            // Author only; a deleted message stays deleted.
            tx.prepare_cached(
                "UPDATE events SET original_text = coalesce(original_text, text), text = ?3,
                        edit_seq = ?4
                 WHERE room = ?1 AND seq = ?2 AND kind = 'message' AND deleted = 0 AND user = ?5",
            )?
            .execute(params![room, seq_sql(*target), text, s, user])?;
        }
        EventBody::Delete { target } => {
            // Author, or the admin of a group room (the creator, while a member), as the room
            // aggregate decides it. The tombstone keeps no text, nor do edits of it.
            let changed = tx
                .prepare_cached(
                    "UPDATE events SET deleted = 1, text = NULL, original_text = NULL
                 WHERE room = ?1 AND seq = ?2 AND kind = 'message' AND deleted = 0
                   AND (user = ?3
                        OR (EXISTS (SELECT 1 FROM rooms r
                                    WHERE r.room = ?1 AND r.kind = 'group' AND r.creator = ?3)
                            AND EXISTS (SELECT 1 FROM members m
                                        WHERE m.room = ?1 AND m.user = ?3 AND m.active = 1)))",
                )?
                .execute(params![room, seq_sql(*target), user])?;
            if changed > 0 {
                tx.prepare_cached("UPDATE events INDEXED BY events_by_target SET fields = json_remove(fields, '$.text')
                     WHERE room = ?1 AND kind = 'edit' AND target = ?2 AND target IS NOT NULL")?.execute(
                    params![room, seq_sql(*target)],
                )?;
            }
        }
        EventBody::Reaction { target, emoji, on } => {
            if *on {
                tx.prepare_cached("INSERT INTO reactions (room, target, emoji, user, seq) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (room, target, emoji, user) DO NOTHING")?.execute(
                    params![room, seq_sql(*target), emoji, user, s],
                )?;
            } else {
                tx.prepare_cached("DELETE FROM reactions WHERE room = ?1 AND target = ?2 AND emoji = ?3 AND user = ?4")?.execute(
                    params![room, seq_sql(*target), emoji, user],
                )?;
            }
        }
        EventBody::Read { up_to } => {
            // Reading implies having received.
            moves.read(user, (*up_to).min(seq));
            moves.delivered(user, (*up_to).min(seq));
        }
        EventBody::Delivered { cursors } => {
            for (member, up_to) in cursors {
                moves.delivered(member.as_str(), (*up_to).min(seq));
            }
        }
        EventBody::MemberJoined { member } => {
            // As the room aggregate folds it: joining again while a member changes nothing.
            tx.prepare_cached("INSERT INTO members (room, user, joined_seq, active) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (room, user) DO UPDATE SET active = 1,
                     joined_seq = CASE WHEN active = 1 THEN joined_seq ELSE excluded.joined_seq END")?.execute(
                params![room, member.as_str(), s],
            )?;
            moves.read(member.as_str(), seq);
        }
        EventBody::MemberLeft { member } => {
            tx.prepare_cached("UPDATE members SET active = 0 WHERE room = ?1 AND user = ?2")?
                .execute(params![room, member.as_str()])?;
        }
        EventBody::RoomCreated {
            name,
            room_kind,
            members,
        } => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO rooms (room, kind, name, creator, created_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![room, room_kind.as_str(), name, user, s])?;
            for member in members.iter().map(UserId::as_str).chain([user]) {
                tx.prepare_cached("INSERT INTO members (room, user, joined_seq, active) VALUES (?1, ?2, ?3, 1)
                     ON CONFLICT (room, user) DO UPDATE SET joined_seq = excluded.joined_seq, active = 1")?.execute(
                    params![room, member, s],
                )?;
                moves.read(member, seq);
            }
        }
        EventBody::RoomUpdated { read_only } => {
            // The admin's (the creator, while a member) only, as the room aggregate folds it.
            tx.prepare_cached(
                "INSERT INTO room_settings (room, read_only, updated_seq)
                 SELECT ?1, ?2, ?3 FROM rooms r
                 WHERE r.room = ?1 AND r.creator = ?4
                   AND EXISTS (SELECT 1 FROM members m
                               WHERE m.room = ?1 AND m.user = ?4 AND m.active = 1)
                 ON CONFLICT (room) DO UPDATE
                 SET read_only = excluded.read_only, updated_seq = excluded.updated_seq",
            )?
            .execute(params![room, read_only, s, user])?;
        }
    }
    let target = match &event.body {
        EventBody::Edit { target, .. }
        | EventBody::Delete { target }
        | EventBody::Reaction { target, .. } => Some(seq_sql(*target)),
        _ => None,
    };
    let mut fields = fields_of(&event.body);
    if let EventBody::Edit { target, .. } = &event.body {
        // An edit of a deleted message keeps no text either.
        let deleted: Option<bool> = tx
            .query_row(
                "SELECT deleted FROM events WHERE room = ?1 AND seq = ?2",
                params![room, seq_sql(*target)],
                |r| r.get(0),
            )
            .optional()?;
        if deleted == Some(true) {
            if let Some(map) = fields.as_object_mut() {
                map.remove("text");
            }
        }
    }
    tx.prepare_cached(
        "INSERT OR IGNORE INTO events (room, seq, id, user, ts, kind, target, fields, mnum)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        room,
        s,
        id,
        user,
        event.ts,
        kind,
        target,
        fields.to_string(),
        inserts.messages
    ])?;
    Ok(())
}

/// The message numbers a room's unread count is worked out from, read with the room list: the
/// newest row's `mnum`, the `mnum` of the newest row at or before the cursor, and how many
/// messages after the cursor are deleted. -1 marks a row written by a version before `mnum`
/// (numbered when its room is next written); `None`, no such row.
macro_rules! unread_columns {
    ($room:literal, $cursor:literal) => {
        concat!(
            "(SELECT coalesce(e.mnum, -1) FROM events e WHERE e.room = ",
            $room,
            " ORDER BY e.seq DESC LIMIT 1),
             (SELECT coalesce(e.mnum, -1) FROM events e WHERE e.room = ",
            $room,
            " AND e.seq <= ",
            $cursor,
            " ORDER BY e.seq DESC LIMIT 1),
             (SELECT count(*) FROM events e INDEXED BY events_deleted WHERE e.room = ",
            $room,
            " AND e.seq > ",
            $cursor,
            " AND e.deleted = 1)"
        )
    };
}

/// The messages of `room` after `last_read` that count as unread for `user` (contract: by other
/// users, not deleted, not by an author in `blocked`, a JSON array), given the room's
/// [`unread_columns`].
///
/// Worked out from message numbers (`events.mnum`): the messages after the cursor, less the
/// deleted ones among them, which takes a few index lookups instead of a walk over every unread
/// row. A user's own messages need no subtracting: each moves its author's read cursor to it in
/// the transaction that stores it, so none is ever after the cursor. Messages by blocked authors
/// are counted by walking the rows after the cursor, so only users who block someone pay that.
fn unread_in(
    conn: &Connection,
    (room, last_read, user, blocked): (&str, i64, &str, &str),
    (newest, before, deleted): (Option<i64>, Option<i64>, i64),
) -> rusqlite::Result<i64> {
    let Some(newest) = newest else {
        return Ok(0);
    };
    if newest < 0 || before.is_some_and(|n| n < 0) {
        return conn
            .prepare_cached(
                "SELECT count(*) FROM events
                 WHERE room = ?1 AND seq > ?2 AND kind = 'message' AND deleted = 0 AND user <> ?3
                   AND user NOT IN (SELECT value FROM json_each(?4))",
            )?
            .query_row(params![room, last_read, user, blocked], |r| r.get(0));
    }
    let mut count = newest - before.unwrap_or(0) - deleted;
    if blocked != "[]" {
        let by_blocked: i64 = conn
            .prepare_cached(
                "SELECT count(*) FROM events
                 WHERE room = ?1 AND seq > ?2 AND kind = 'message' AND deleted = 0
                   AND user IN (SELECT value FROM json_each(?3))",
            )?
            .query_row(params![room, last_read, blocked], |r| r.get(0))?;
        count -= by_blocked;
    }
    Ok(count.max(0))
}

/// The columns [`stored_event`] reads, as a macro so the queries below are constants.
macro_rules! event_columns {
    () => {
        "seq, ts, user, id, kind, text, edit_seq IS NOT NULL, deleted, thread, reply_to, fields"
    };
}

const HISTORY_PAGE: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE room = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
);

const THREAD_ROOT: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE room = ?1 AND seq = ?2 AND kind = 'message' AND thread IS NULL LIMIT ?3"
);

const THREAD_PAGE: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events INDEXED BY events_by_thread
     WHERE room = ?1 AND thread = ?2 AND thread IS NOT NULL AND kind = 'message' AND seq < ?3
     ORDER BY seq DESC LIMIT ?4"
);

fn stored_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        seq: row.get::<_, i64>(0)? as u64,
        ts: row.get(1)?,
        user: row.get(2)?,
        id: row.get(3)?,
        kind: row.get(4)?,
        text: row.get(5)?,
        edited: row.get(6)?,
        deleted: row.get(7)?,
        thread: row.get::<_, Option<i64>>(8)?.map(|v| v as u64),
        reply_to: row.get::<_, Option<i64>>(9)?.map(|v| v as u64),
        fields: row.get(10)?,
        reactions: Vec::new(),
        replies: None,
    })
}

/// Adds reactions and reply counts to the messages of a page: two range queries per page,
/// not two per message.
fn decorate(conn: &Connection, room: &str, events: &mut [StoredEvent]) -> rusqlite::Result<()> {
    let (Some(low), Some(high)) = (
        events.iter().map(|e| e.seq).min(),
        events.iter().map(|e| e.seq).max(),
    ) else {
        return Ok(());
    };
    let mut by_seq: std::collections::HashMap<u64, usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == "message")
        .map(|(i, e)| (e.seq, i))
        .collect();
    let mut reactions = conn.prepare_cached(
        "SELECT target, emoji, user FROM reactions
         WHERE room = ?1 AND target BETWEEN ?2 AND ?3 ORDER BY target, emoji, seq, user",
    )?;
    let mut rows = reactions.query(params![room, seq_sql(low), seq_sql(high)])?;
    while let Some(row) = rows.next()? {
        let target = row.get::<_, i64>(0)? as u64;
        let Some(event) = by_seq.get(&target).map(|&i| &mut events[i]) else {
            continue;
        };
        if event.deleted {
            continue;
        }
        let emoji: String = row.get(1)?;
        let user: String = row.get(2)?;
        match event.reactions.last_mut() {
            Some((e, users)) if *e == emoji => users.push(user),
            _ => event.reactions.push((emoji, vec![user])),
        }
    }
    let mut replies = conn.prepare_cached(
        "SELECT thread, count(*), max(seq) FROM events INDEXED BY events_by_thread
         WHERE room = ?1 AND thread BETWEEN ?2 AND ?3 AND thread IS NOT NULL
           AND kind = 'message' AND deleted = 0
         GROUP BY thread",
    )?;
    let mut rows = replies.query(params![room, seq_sql(low), seq_sql(high)])?;
    while let Some(row) = rows.next()? {
        let root = row.get::<_, i64>(0)? as u64;
        let count = row.get::<_, i64>(1)? as u64;
        let last = row.get::<_, i64>(2)? as u64;
        if let Some(event) = by_seq.get_mut(&root).map(|i| &mut events[*i]) {
            if event.thread.is_none() && count > 0 {
                event.replies = Some((count, last));
            }
        }
    }
    Ok(())
}

fn page_of(
    conn: &Connection,
    room: &str,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
    limit: usize,
) -> rusqlite::Result<Page> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut events = stmt
        .query_map(args, stored_event)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let more = events.len() > limit;
    events.truncate(limit);
    decorate(conn, room, &mut events)?;
    Ok(Page {
        events: events.iter().map(StoredEvent::to_json).collect(),
        more,
    })
}

fn hash_table(
    conn: &Connection,
    hasher: &mut Sha256,
    table: &str,
    order: &str,
    room: Option<&str>,
) -> rusqlite::Result<()> {
    let filter = if room.is_some() {
        "WHERE room = ?1"
    } else {
        ""
    };
    let mut stmt = conn.prepare(&format!("SELECT * FROM {table} {filter} ORDER BY {order}"))?;
    let columns = stmt.column_count();
    let mut rows = match room {
        Some(room) => stmt.query([room])?,
        None => stmt.query([])?,
    };
    hasher.update(table.as_bytes());
    while let Some(row) = rows.next()? {
        for i in 0..columns {
            match row.get_ref(i)? {
                ValueRef::Null => hasher.update(b"n"),
                ValueRef::Integer(v) => {
                    hasher.update(b"i");
                    hasher.update(v.to_le_bytes());
                }
                ValueRef::Real(v) => {
                    hasher.update(b"r");
                    hasher.update(v.to_le_bytes());
                }
                ValueRef::Text(v) | ValueRef::Blob(v) => {
                    hasher.update(b"t");
                    hasher.update((v.len() as u64).to_le_bytes());
                    hasher.update(v);
                }
            }
        }
        hasher.update(b"\n");
    }
    Ok(())
}

/// Applies `batches` in one transaction (see [`Store::apply`]).
fn apply_batches(
    conn: &mut Connection,
    batches: &[RoomBatch],
    ids: &RwLock<Option<IdFilter>>,
) -> Result<()> {
    let tx = conn.transaction().map_err(backend_err("apply"))?;
    {
        let mut inserts = Inserts::prepare(&tx).map_err(backend_err("apply"))?;
        let mut cursors = CursorMoves::default();
        for batch in batches {
            let room = batch.room.as_str();
            let room_err = |e: rusqlite::Error| StoreError::Room {
                op: "apply",
                room: batch.room.clone(),
                message: e.to_string(),
            };
            let mut checkpoint = checkpoint_in(&tx, room).map_err(room_err)?;
            inserts.messages = message_count_in(&tx, room).map_err(room_err)?;
            for entry in &batch.entries {
                if entry.seq <= checkpoint {
                    continue;
                }
                match &entry.event {
                    Ok(event) => {
                        apply_event(&tx, &mut inserts, &mut cursors, room, entry.seq, event)
                    }
                    Err(error) => tx
                        .prepare_cached(
                            "INSERT OR IGNORE INTO dead_letters (room, seq, error)
                             VALUES (?1, ?2, ?3)",
                        )
                        .and_then(|mut stmt| stmt.execute(params![room, seq_sql(entry.seq), error]))
                        .map(|_| ()),
                }
                .map_err(room_err)?;
                checkpoint = entry.seq;
            }
            inserts.flush_ids(&tx, room, ids).map_err(room_err)?;
            cursors.flush(&tx, room).map_err(room_err)?;
            tx.prepare_cached(
                "INSERT INTO checkpoints (room, seq) VALUES (?1, ?2)
                 ON CONFLICT (room) DO UPDATE SET seq = max(seq, excluded.seq)",
            )
            .and_then(|mut stmt| stmt.execute(params![room, seq_sql(checkpoint)]))
            .map_err(room_err)?;
        }
    }
    tx.commit().map_err(backend_err("apply"))?;
    let outgrown = ids
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .filter(|filter| filter.outgrown())
        .map(IdFilter::added);
    if let Some(added) = outgrown {
        // Twice the size, from the file (the writer is held: nothing is written meanwhile).
        let filter =
            scan_ids(conn, added.saturating_mul(2)).map_err(backend_err("read the id index"))?;
        tracing::info!(ids = filter.added(), "id filter grown");
        *ids.write().unwrap_or_else(|p| p.into_inner()) = Some(filter);
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn apply(&self, batches: &[RoomBatch]) -> Result<()> {
        // A batch holds up to thousands of events and the caller waits for the write anyway: on
        // a multi-threaded runtime it is written in place instead of copied for the blocking
        // pool (the copy and its drop cost about 3% of a catch-up).
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            return tokio::task::block_in_place(|| {
                let mut conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                apply_batches(&mut conn, batches, &self.ids)
            });
        }
        let batches = batches.to_vec();
        let ids = self.ids.clone();
        self.write(move |conn| apply_batches(conn, &batches, &ids))
            .await
    }

    async fn checkpoint(&self, room: &RoomId) -> Result<u64> {
        self.read_point(|conn| {
            checkpoint_in(conn, room.as_str()).map_err(backend_err("checkpoint"))
        })
    }

    async fn checkpoints(&self) -> Result<Vec<(RoomId, u64)>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare("SELECT room, seq FROM checkpoints ORDER BY room")
                .map_err(backend_err("checkpoints"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(backend_err("checkpoints"))?;
            let mut out = Vec::new();
            for row in rows {
                let (room, seq) = row.map_err(backend_err("checkpoints"))?;
                // Only valid ids are ever written; skip anything else rather than fail the list.
                if let Ok(room) = RoomId::parse(room) {
                    out.push((room, seq as u64));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>> {
        let room = room.clone();
        self.read(move |conn| {
            let err = backend_err("room state");
            let meta: Option<(String, String, String, bool)> = conn
                .query_row(
                    "SELECT r.kind, r.name, r.creator, coalesce(s.read_only, 0)
                     FROM rooms r LEFT JOIN room_settings s ON s.room = r.room
                     WHERE r.room = ?1",
                    [room.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()
                .map_err(&err)?;
            let Some((kind, name, creator, read_only)) = meta else {
                return Ok(None);
            };
            let head = checkpoint_in(conn, room.as_str()).map_err(&err)?;
            let mut stmt = conn
                .prepare_cached("SELECT user, joined_seq, active FROM members WHERE room = ?1")
                .map_err(&err)?;
            // Everyone who was ever a member (a direct room's pair is known from them).
            let ever: Vec<(UserId, u64, bool)> = stmt
                .query_map([room.as_str()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, bool>(2)?,
                    ))
                })
                .map_err(&err)?
                .filter_map(|row| {
                    let (user, seq, active) = row.ok()?;
                    Some((UserId::parse(user).ok()?, seq as u64, active))
                })
                .collect();
            let kind = if kind == "direct" {
                RoomKind::Direct
            } else {
                RoomKind::Group
            };
            let creator = UserId::parse(creator).map_err(|e| StoreError::Room {
                op: "room state",
                room: room.clone(),
                message: e.to_string(),
            })?;
            Ok(Some(RoomState::stored(
                kind, name, creator, ever, head, read_only,
            )))
        })
        .await
    }

    async fn rooms_of(&self, user: &UserId, blocked: &HashSet<UserId>) -> Result<Vec<RoomSummary>> {
        let user = user.clone();
        // One JSON array parameter instead of a statement per list length: the statement stays
        // cached, and `json_each` makes it a set SQLite can probe.
        let blocked = serde_json::Value::from(
            blocked
                .iter()
                .map(|u| u.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .to_string();
        self.read(move |conn| {
            let err = backend_err("rooms of user");
            let mut stmt = conn
                .prepare_cached(concat!(
                    "WITH mine AS (
                         SELECT m.room, r.kind, r.name, coalesce(c.seq, 0) AS head,
                                max(coalesce(cu.last_read, 0), m.joined_seq) AS last_read,
                                coalesce(s.read_only, 0) AS read_only
                         FROM members m
                         JOIN rooms r ON r.room = m.room
                         LEFT JOIN room_settings s ON s.room = m.room
                         LEFT JOIN checkpoints c ON c.room = m.room
                         LEFT JOIN cursors cu ON cu.room = m.room AND cu.user = m.user
                         WHERE m.user = ?1 AND m.active = 1)
                     SELECT room, kind, name, head, last_read, read_only, ",
                    unread_columns!("mine.room", "mine.last_read"),
                    " FROM mine ORDER BY room"
                ))
                .map_err(&err)?;
            let rows = stmt
                .query_map([user.as_str()], |r| {
                    Ok((
                        (
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, bool>(5)?,
                        ),
                        (r.get(6)?, r.get(7)?, r.get(8)?),
                    ))
                })
                .map_err(&err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(&err)?;
            let mut out = Vec::with_capacity(rows.len());
            for ((room, kind, name, head, last_read, read_only), numbers) in rows {
                let count = unread_in(conn, (&room, last_read, user.as_str(), &blocked), numbers)
                    .map_err(&err)?;
                let Ok(room) = RoomId::parse(room) else {
                    continue;
                };
                out.push(RoomSummary {
                    room,
                    kind: if kind == "direct" {
                        RoomKind::Direct
                    } else {
                        RoomKind::Group
                    },
                    name,
                    head: head as u64,
                    last_read: last_read as u64,
                    unread: count as u64,
                    read_only,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn is_deleted(&self, room: &RoomId, seq: u64) -> Result<bool> {
        self.read_point(|conn| {
            let deleted: Option<bool> = conn
                .prepare_cached(
                    "SELECT deleted FROM events WHERE room = ?1 AND seq = ?2 AND kind = 'message'",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![room.as_str(), seq_sql(seq)], |r| r.get(0))
                        .optional()
                })
                .map_err(backend_err("message deleted"))?;
            Ok(deleted.unwrap_or(false))
        })
    }

    async fn read_cursor(&self, room: &RoomId, user: &UserId) -> Result<u64> {
        self.read_point(|conn| {
            let seq: Option<i64> = conn
                .prepare_cached("SELECT last_read FROM cursors WHERE room = ?1 AND user = ?2")
                .and_then(|mut stmt| {
                    stmt.query_row([room.as_str(), user.as_str()], |r| r.get(0))
                        .optional()
                })
                .map_err(backend_err("read cursor"))?;
            Ok(seq.unwrap_or(0).max(0) as u64)
        })
    }

    async fn member_cursors(&self, room: &RoomId) -> Result<Vec<MemberCursors>> {
        let room = room.clone();
        self.read(move |conn| {
            let err = backend_err("member cursors");
            let mut stmt = conn
                .prepare_cached(
                    "SELECT m.user, max(coalesce(c.last_read, 0), m.joined_seq),
                            coalesce(d.delivered, 0)
                     FROM members m
                     LEFT JOIN cursors c ON c.room = m.room AND c.user = m.user
                     LEFT JOIN delivered_cursors d ON d.room = m.room AND d.user = m.user
                     WHERE m.room = ?1 AND m.active = 1
                     ORDER BY m.user",
                )
                .map_err(&err)?;
            let rows = stmt
                .query_map([room.as_str()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(&err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(&err)?;
            Ok(rows
                .into_iter()
                .filter_map(|(user, read, delivered)| {
                    let read = read.max(0) as u64;
                    Some(MemberCursors {
                        // Only valid ids are ever written.
                        user: UserId::parse(user).ok()?,
                        read,
                        delivered: (delivered.max(0) as u64).max(read),
                    })
                })
                .collect())
        })
        .await
    }

    async fn last_message_in(&self, room: &RoomId, after: u64, up_to: u64) -> Result<Option<u64>> {
        let room = room.clone();
        self.read(move |conn| {
            // Walks the room's range backwards from `up_to` and stops at the first message.
            conn.prepare_cached(
                "SELECT seq FROM events WHERE room = ?1 AND seq > ?2 AND seq <= ?3
                   AND kind = 'message'
                 ORDER BY seq DESC LIMIT 1",
            )
            .and_then(|mut stmt| {
                stmt.query_row(
                    params![room.as_str(), seq_sql(after), seq_sql(up_to)],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
            })
            .map(|seq| seq.map(|s| s.max(0) as u64))
            .map_err(backend_err("last message"))
        })
        .await
    }

    async fn history(&self, room: &RoomId, query: PageQuery) -> Result<Page> {
        let room = room.clone();
        self.read(move |conn| {
            let limit = query.clamped_limit();
            let before = seq_sql(query.before.unwrap_or(u64::MAX));
            page_of(
                conn,
                room.as_str(),
                HISTORY_PAGE,
                &[&room.as_str(), &before, &((limit + 1) as i64)],
                limit,
            )
            .map_err(backend_err("history"))
        })
        .await
    }

    async fn thread(&self, room: &RoomId, root: u64, query: PageQuery) -> Result<ThreadPage> {
        let room = room.clone();
        self.read(move |conn| {
            let err = backend_err("thread");
            let limit = query.clamped_limit();
            let before = seq_sql(query.before.unwrap_or(u64::MAX));
            let root_page = page_of(
                conn,
                room.as_str(),
                THREAD_ROOT,
                &[&room.as_str(), &seq_sql(root), &1i64],
                1,
            )
            .map_err(&err)?;
            let replies = page_of(
                conn,
                room.as_str(),
                THREAD_PAGE,
                &[
                    &room.as_str(),
                    &seq_sql(root),
                    &before,
                    &((limit + 1) as i64),
                ],
                limit,
            )
            .map_err(&err)?;
            Ok(ThreadPage {
                root: root_page.events.into_iter().next(),
                replies,
            })
        })
        .await
    }

    async fn find_id(&self, room: &RoomId, id: Uuid) -> Result<Option<IdHit>> {
        let head = id_head(&id);
        if self.id_may_exist(room.as_str(), head) == Some(false) {
            return Ok(None);
        }
        self.read_point(move |conn| {
            // Every append asks this: a cached statement, not a parse per call.
            let err = backend_err("find id");
            // `event_ids` holds a prefix of each id: the whole id is compared on the event itself.
            // CROSS JOIN fixes the order: the room's key, its entries with this prefix (by seq),
            // then each candidate's event by primary key.
            conn.prepare_cached(
                "SELECT e.seq, e.ts
                 FROM room_keys k CROSS JOIN event_ids i CROSS JOIN events e
                 WHERE k.room = ?1 AND i.room_key = k.key AND i.id_head = ?2
                   AND e.room = ?1 AND e.seq = i.seq AND e.id = ?3
                 ORDER BY i.seq LIMIT 1",
            )
            .map_err(&err)?
            .query_row(
                params![room.as_str(), &head[..], id.hyphenated().to_string()],
                |r| {
                    Ok(IdHit {
                        seq: r.get::<_, i64>(0)? as u64,
                        ts: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(&err)
        })
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.read(|conn| {
            let err = backend_err("dead letters");
            let mut stmt = conn
                .prepare("SELECT room, seq, error FROM dead_letters ORDER BY room, seq")
                .map_err(&err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(&err)?;
            let mut out = Vec::new();
            for row in rows {
                let (room, seq, error) = row.map_err(&err)?;
                if let Ok(room) = RoomId::parse(room) {
                    out.push(DeadLetter {
                        room,
                        seq: seq as u64,
                        error,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn clear_room(&self, room: &RoomId) -> Result<()> {
        let room = room.clone();
        self.write(move |conn| {
            let tx = conn.transaction().map_err(backend_err("clear room"))?;
            // The id index first: it finds the room's entries through the room's key.
            for sql in [
                "DELETE FROM event_ids WHERE room_key = (SELECT key FROM room_keys WHERE room = ?1)",
                "DELETE FROM room_keys WHERE room = ?1",
            ] {
                tx.execute(sql, [room.as_str()])
                    .map_err(backend_err("clear room"))?;
            }
            for (table, _) in DIGEST_TABLES {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE room = ?1"),
                    [room.as_str()],
                )
                .map_err(backend_err("clear room"))?;
            }
            tx.commit().map_err(backend_err("clear room"))
        })
        .await
    }

    async fn digest(&self, room: Option<&RoomId>) -> Result<String> {
        let room = room.cloned();
        self.read(move |conn| {
            let mut hasher = Sha256::new();
            for (table, order) in DIGEST_TABLES {
                hash_table(
                    conn,
                    &mut hasher,
                    table,
                    order,
                    room.as_ref().map(RoomId::as_str),
                )
                .map_err(backend_err("digest"))?;
            }
            Ok(hex::encode(hasher.finalize()))
        })
        .await
    }

    async fn report_projector(&self, status: &ProjectorStatus) -> Result<()> {
        let status = status.clone();
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO projectors (partition, lag_ms, reported_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (partition) DO UPDATE
                 SET lag_ms = excluded.lag_ms, reported_at_ms = excluded.reported_at_ms",
                params![
                    status.partition,
                    i64::try_from(status.lag_ms).unwrap_or(i64::MAX),
                    status.reported_at_ms
                ],
            )
            .map(|_| ())
            .map_err(backend_err("report projector"))
        })
        .await
    }

    async fn projectors(&self) -> Result<Vec<ProjectorStatus>> {
        self.read(|conn| {
            let err = backend_err("projectors");
            let mut stmt = conn
                .prepare_cached(
                    "SELECT partition, lag_ms, reported_at_ms FROM projectors ORDER BY partition",
                )
                .map_err(&err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(ProjectorStatus {
                        partition: r.get(0)?,
                        lag_ms: r.get::<_, i64>(1)?.max(0) as u64,
                        reported_at_ms: r.get(2)?,
                    })
                })
                .map_err(&err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(&err)?;
            Ok(rows)
        })
        .await
    }
}

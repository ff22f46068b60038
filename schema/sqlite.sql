-- The embedded projection store (SQLite, WAL). Everything here is derived from the room logs
-- and can be rebuilt from them (`chatd rebuild`). Rows are keyed by room first, so one room's
-- rows are contiguous and a room can be cleared and rebuilt on its own.

-- One row per room, from its `room_created` event.
CREATE TABLE IF NOT EXISTS rooms (
    room        TEXT    NOT NULL PRIMARY KEY,
    kind        TEXT    NOT NULL,          -- group | direct
    name        TEXT    NOT NULL,
    creator     TEXT    NOT NULL,          -- the room's admin
    created_seq INTEGER NOT NULL
) WITHOUT ROWID;

-- A room's settings, from the admin's `room_updated` events (the latest wins). A table of its
-- own rather than columns of `rooms`, so a store made before settings existed gains it with
-- CREATE TABLE IF NOT EXISTS (no migration); a room without a row has the defaults.
CREATE TABLE IF NOT EXISTS room_settings (
    room        TEXT    NOT NULL PRIMARY KEY,
    read_only   INTEGER NOT NULL,          -- only the admin posts while 1
    updated_seq INTEGER NOT NULL           -- the room_updated that set it
) WITHOUT ROWID;

-- Membership as the log defines it: a left member keeps a row with active = 0.
CREATE TABLE IF NOT EXISTS members (
    room       TEXT    NOT NULL,
    user       TEXT    NOT NULL,
    joined_seq INTEGER NOT NULL,           -- where the member's read cursor starts
    active     INTEGER NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;
-- "My rooms": by user.
CREATE INDEX IF NOT EXISTS members_by_user ON members (user, room) WHERE active = 1;

-- Read cursors; they only move forward (max of read events, own messages, joining).
CREATE TABLE IF NOT EXISTS cursors (
    room      TEXT    NOT NULL,
    user      TEXT    NOT NULL,
    last_read INTEGER NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;

-- Delivered cursors: how far each user's devices have received the room. They only move
-- forward (max of `delivered` events, read events and own messages). A table of its own rather
-- than a column of `cursors`, so a store made before receipts existed gains it with CREATE
-- TABLE IF NOT EXISTS (no migration); a user without a row has received up to their read cursor.
CREATE TABLE IF NOT EXISTS delivered_cursors (
    room      TEXT    NOT NULL,
    user      TEXT    NOT NULL,
    delivered INTEGER NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;

-- Every event of every room, in the room's order. Messages hold their current text
-- (original_text keeps the first text once edited, for audit; a delete clears both);
-- other kinds hold their fields as JSON.
CREATE TABLE IF NOT EXISTS events (
    room          TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    id            TEXT    NOT NULL,        -- the client's idempotency key
    user          TEXT    NOT NULL,
    ts            INTEGER NOT NULL,
    kind          TEXT    NOT NULL,
    text          TEXT,
    original_text TEXT,
    edit_seq      INTEGER,                 -- seq of the edit that set `text`
    deleted       INTEGER NOT NULL DEFAULT 0,
    thread        INTEGER,                 -- seq of the thread root
    reply_to      INTEGER,
    target        INTEGER,                 -- edit / delete / reaction: the message it concerns
    fields        TEXT,
    -- How many `message` events the room holds up to and including this seq, deleted ones
    -- included. Unread counts are differences of two of these (plus the deletes between),
    -- not counts of rows: a room list costs a few lookups per room however much is unread.
    -- Added to stores made before it when they are opened (filled in from the rows).
    mnum          INTEGER,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
-- Thread views and reply counts.
CREATE INDEX IF NOT EXISTS events_by_thread ON events (room, thread, seq) WHERE thread IS NOT NULL;
-- Edits of a message (cleared with it on delete).
CREATE INDEX IF NOT EXISTS events_by_target ON events (room, target) WHERE target IS NOT NULL;
-- Deleted messages, for unread counts (the messages after a cursor, less those deleted).
CREATE INDEX IF NOT EXISTS events_deleted ON events (room, seq) WHERE deleted = 1;

-- The idempotency index past the stream's duplicate window: (room, client id) -> seq.
-- Keys are random, so every batch of new events lands on nearly every page of this index and
-- each commit writes all of those pages again; an index on `events (room, id)` (the room's
-- name and the id as 36 characters per entry) made a batch of rows cost three times as much as
-- the rows themselves. Entries here are a few bytes: the room as a small integer (`room_keys`)
-- and 8 bytes of the SHA-256 of the id (not the id's own bytes: clients choose ids, and ids
-- sharing a prefix, as time-ordered ones do, would pile up under one key and make every lookup
-- read them all). Two ids may share a key, so a lookup reads each candidate's event and
-- compares the whole id (`events.id`), and never answers with another event's seq.
-- A store made before this table existed had the index `events_by_id ON events (room, id)`:
-- opening it fills this table from `events` and drops that index, in one transaction.
CREATE TABLE IF NOT EXISTS event_ids (
    room_key INTEGER NOT NULL,             -- room_keys.key of the event's room
    id_head  BLOB    NOT NULL,             -- the first 8 bytes of SHA-256(the id's 16 bytes)
    seq      INTEGER NOT NULL,
    PRIMARY KEY (room_key, id_head, seq)
) WITHOUT ROWID;

-- A small integer per room, so the entries of `event_ids` do not repeat the room's name.
-- Derived like everything else: a room cleared for a rebuild loses its key and its entries.
CREATE TABLE IF NOT EXISTS room_keys (
    key  INTEGER PRIMARY KEY,
    room TEXT    NOT NULL UNIQUE
);

-- Reactions that are on: one row per (message, emoji, user).
CREATE TABLE IF NOT EXISTS reactions (
    room   TEXT    NOT NULL,
    target INTEGER NOT NULL,
    emoji  TEXT    NOT NULL,
    user   TEXT    NOT NULL,
    seq    INTEGER NOT NULL,               -- the reaction event that set it
    PRIMARY KEY (room, target, emoji, user)
) WITHOUT ROWID;

-- The last sequence of each room this store holds, written in the same transaction as the rows.
CREATE TABLE IF NOT EXISTS checkpoints (
    room TEXT    NOT NULL PRIMARY KEY,
    seq  INTEGER NOT NULL
) WITHOUT ROWID;

-- Entries the projector could not decode: recorded and passed over, never silently skipped.
CREATE TABLE IF NOT EXISTS dead_letters (
    room  TEXT    NOT NULL,
    seq   INTEGER NOT NULL,
    error TEXT    NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;

-- Each projector's last report of its lag; edges refuse appends while it exceeds the
-- duplicate window (see docs/architecture.md, idempotency).
CREATE TABLE IF NOT EXISTS projectors (
    partition      TEXT    NOT NULL PRIMARY KEY,
    lag_ms         INTEGER NOT NULL,
    reported_at_ms INTEGER NOT NULL
) WITHOUT ROWID;

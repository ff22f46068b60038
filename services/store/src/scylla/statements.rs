//! Every statement the store runs, prepared once at connect.
//!
//! Prepared statements are parsed once by the server and routed token-aware (to a replica of
//! the partition, on the right shard) by the driver. All run at LOCAL_QUORUM, and all are
//! idempotent: every write names its own timestamp (see `clock.rs`), so a retried write
//! lands the same cells with the same timestamps, and the driver may retry any of them.
//! Bind order: `USING TIMESTAMP ?` comes where the statement puts it (first in UPDATE and
//! DELETE, last in INSERT).

use ::scylla::client::session::Session;
use ::scylla::statement::prepared::PreparedStatement;
use ::scylla::statement::Consistency;

use crate::Result;

use super::fail;

/// The columns of `events` that [`super::rows::EventRow`] reads.
const EVENT_COLUMNS: &str =
    "seq, id, author, ts, kind, body, original_body, edit_seq, deleted, thread, reply_to, target, fields";

async fn prepare(session: &Session, cql: String) -> Result<PreparedStatement> {
    let mut statement = session
        .prepare(cql.as_str())
        .await
        .map_err(|e| fail("prepare")(format!("{cql}: {e}")))?;
    statement.set_consistency(Consistency::LocalQuorum);
    statement.set_is_idempotent(true);
    Ok(statement)
}

macro_rules! statements {
    ($($(#[doc = $doc:literal])* $name:ident = $cql:expr;)*) => {
        /// The prepared statements, by what they do.
        pub(crate) struct Statements {
            $($(#[doc = $doc])* pub $name: PreparedStatement,)*
        }

        impl Statements {
            pub async fn prepare(session: &Session) -> Result<Statements> {
                Ok(Statements {
                    $($name: prepare(session, String::from($cql)).await?,)*
                })
            }
        }
    };
}

statements! {
    // events: a room's history, by (room, bucket), newest first.
    /// A message's row: `deleted` is always set, so unread counts can filter on it.
    event_message = "INSERT INTO events (room, bucket, seq, id, author, ts, kind, body, deleted, \
        thread, reply_to) VALUES (?, ?, ?, ?, ?, ?, 'message', ?, false, ?, ?) USING TIMESTAMP ?";
    /// Any other kind's row, its fields as JSON.
    event_other = "INSERT INTO events (room, bucket, seq, id, author, ts, kind, target, fields) \
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?";
    event_get = format!("SELECT {EVENT_COLUMNS} FROM events WHERE room = ? AND bucket = ? AND seq = ?");
    /// One bucket's part of a history page: at or below a sequence, newest first.
    event_page = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE room = ? AND bucket = ? AND seq <= ? LIMIT ?"
    );
    /// Given sequences of one bucket (a page of thread replies).
    event_in = format!("SELECT {EVENT_COLUMNS} FROM events WHERE room = ? AND bucket = ? AND seq IN ?");
    /// A whole bucket (clear, digest), paged.
    event_bucket = format!("SELECT {EVENT_COLUMNS} FROM events WHERE room = ? AND bucket = ?");
    /// Unread messages of one bucket: filtering inside one partition, bounded by the seq range
    /// (ScyllaDB reads the range and drops the rest; the author is compared by the caller, as
    /// CQL has no `!=`).
    event_unread = "SELECT author FROM events WHERE room = ? AND bucket = ? AND seq > ? AND seq <= ? \
        AND kind = 'message' AND deleted = false ALLOW FILTERING";
    /// The newest message of one bucket in a seq range: filtering inside one partition, newest
    /// first (the clustering order), stopping at the first.
    event_last_message = "SELECT seq FROM events WHERE room = ? AND bucket = ? AND seq > ? \
        AND seq <= ? AND kind = 'message' LIMIT 1 ALLOW FILTERING";
    event_edit = "UPDATE events USING TIMESTAMP ? SET body = ?, original_body = ?, edit_seq = ? \
        WHERE room = ? AND bucket = ? AND seq = ?";
    event_delete = "UPDATE events USING TIMESTAMP ? SET deleted = true, body = null, \
        original_body = null WHERE room = ? AND bucket = ? AND seq = ?";
    event_fields = "UPDATE events USING TIMESTAMP ? SET fields = ? \
        WHERE room = ? AND bucket = ? AND seq = ?";
    event_drop = "DELETE FROM events USING TIMESTAMP ? WHERE room = ? AND bucket = ?";

    // events_by_id: the idempotency index.
    id_put = "INSERT INTO events_by_id (room, id, seq, ts) VALUES (?, ?, ?, ?) USING TIMESTAMP ?";
    id_get = "SELECT seq, ts FROM events_by_id WHERE room = ? AND id = ? LIMIT 1";
    id_drop = "DELETE FROM events_by_id USING TIMESTAMP ? WHERE room = ? AND id = ?";

    // edits: the edit events of a message.
    edit_put = "INSERT INTO edits (room, target, seq) VALUES (?, ?, ?) USING TIMESTAMP ?";
    edit_list = "SELECT seq FROM edits WHERE room = ? AND target = ?";
    edit_drop = "DELETE FROM edits USING TIMESTAMP ? WHERE room = ? AND target = ?";

    // reactions: per message, emoji and user.
    reaction_get = "SELECT seq FROM reactions WHERE room = ? AND target = ? AND emoji = ? AND member = ?";
    reaction_put = "INSERT INTO reactions (room, target, emoji, member, seq) VALUES (?, ?, ?, ?, ?) \
        USING TIMESTAMP ?";
    reaction_off = "DELETE FROM reactions USING TIMESTAMP ? \
        WHERE room = ? AND target = ? AND emoji = ? AND member = ?";
    reaction_list = "SELECT emoji, member, seq FROM reactions WHERE room = ? AND target = ?";
    reaction_drop = "DELETE FROM reactions USING TIMESTAMP ? WHERE room = ? AND target = ?";

    // thread_replies: per thread root, newest first.
    reply_put = "INSERT INTO thread_replies (room, root, seq, deleted) VALUES (?, ?, ?, false) \
        USING TIMESTAMP ?";
    reply_delete = "UPDATE thread_replies USING TIMESTAMP ? SET deleted = true \
        WHERE room = ? AND root = ? AND seq = ?";
    reply_page = "SELECT seq FROM thread_replies WHERE room = ? AND root = ? AND seq <= ? LIMIT ?";
    reply_all = "SELECT seq, deleted FROM thread_replies WHERE room = ? AND root = ?";
    reply_drop = "DELETE FROM thread_replies USING TIMESTAMP ? WHERE room = ? AND root = ?";

    // annotated: which messages of a bucket have reactions or replies.
    mark_reacted = "UPDATE annotated USING TIMESTAMP ? SET reacted = true \
        WHERE room = ? AND bucket = ? AND seq = ?";
    mark_threaded = "UPDATE annotated USING TIMESTAMP ? SET threaded = true \
        WHERE room = ? AND bucket = ? AND seq = ?";
    mark_range = "SELECT seq, reacted, threaded FROM annotated \
        WHERE room = ? AND bucket = ? AND seq >= ? AND seq <= ?";
    mark_drop = "DELETE FROM annotated USING TIMESTAMP ? WHERE room = ? AND bucket = ?";

    // rooms
    room_get = "SELECT kind, name, creator, created_seq FROM rooms WHERE room = ?";
    room_put = "INSERT INTO rooms (room, kind, name, creator, created_seq) VALUES (?, ?, ?, ?, ?) \
        USING TIMESTAMP ?";
    room_drop = "DELETE FROM rooms USING TIMESTAMP ? WHERE room = ?";

    // room_settings
    settings_put = "INSERT INTO room_settings (room, read_only, updated_seq) VALUES (?, ?, ?) \
        USING TIMESTAMP ?";
    settings_get = "SELECT read_only, updated_seq FROM room_settings WHERE room = ?";
    settings_drop = "DELETE FROM room_settings USING TIMESTAMP ? WHERE room = ?";

    // members and rooms_by_user
    member_join = "INSERT INTO members (room, member, joined_seq, active) VALUES (?, ?, ?, true) \
        USING TIMESTAMP ?";
    /// A leave clears the join too, so a join re-applied below it leaves nothing behind.
    member_leave = "UPDATE members USING TIMESTAMP ? SET active = false, joined_seq = null \
        WHERE room = ? AND member = ?";
    member_get = "SELECT joined_seq, active FROM members WHERE room = ? AND member = ?";
    member_list = "SELECT member, joined_seq, active FROM members WHERE room = ?";
    member_drop = "DELETE FROM members USING TIMESTAMP ? WHERE room = ?";
    user_room_put = "INSERT INTO rooms_by_user (member, room) VALUES (?, ?) USING TIMESTAMP ?";
    user_room_delete = "DELETE FROM rooms_by_user USING TIMESTAMP ? WHERE member = ? AND room = ?";
    user_room_list = "SELECT room FROM rooms_by_user WHERE member = ?";

    // cursors
    cursor_put = "UPDATE cursors USING TIMESTAMP ? SET last_read = ? WHERE room = ? AND member = ?";
    cursor_get = "SELECT last_read FROM cursors WHERE room = ? AND member = ?";
    cursor_list = "SELECT member, last_read FROM cursors WHERE room = ?";
    cursor_drop = "DELETE FROM cursors USING TIMESTAMP ? WHERE room = ?";

    // delivered_cursors
    delivered_put = "UPDATE delivered_cursors USING TIMESTAMP ? SET delivered = ? \
        WHERE room = ? AND member = ?";
    delivered_list = "SELECT member, delivered FROM delivered_cursors WHERE room = ?";
    delivered_drop = "DELETE FROM delivered_cursors USING TIMESTAMP ? WHERE room = ?";

    // message_numbers, deleted_messages, numbered_rooms: unread counts.
    number_put = "INSERT INTO message_numbers (room, bucket, seq, n) VALUES (?, ?, ?, ?) \
        USING TIMESTAMP ?";
    /// The number of the newest message of one bucket at or below a sequence.
    number_at = "SELECT n FROM message_numbers WHERE room = ? AND bucket = ? AND seq <= ? LIMIT 1";
    /// The number of the newest message of one bucket in a seq range.
    number_newest = "SELECT n FROM message_numbers WHERE room = ? AND bucket = ? AND seq > ? \
        AND seq <= ? LIMIT 1";
    /// The number of the oldest message of one bucket in a seq range.
    number_oldest = "SELECT n FROM message_numbers WHERE room = ? AND bucket = ? AND seq > ? \
        AND seq <= ? ORDER BY seq ASC LIMIT 1";
    number_bucket = "SELECT seq, n FROM message_numbers WHERE room = ? AND bucket = ?";
    number_drop = "DELETE FROM message_numbers USING TIMESTAMP ? WHERE room = ? AND bucket = ?";
    deleted_put = "INSERT INTO deleted_messages (room, seq) VALUES (?, ?) USING TIMESTAMP ?";
    deleted_between = "SELECT COUNT(*) FROM deleted_messages WHERE room = ? AND seq > ? AND seq <= ?";
    deleted_list = "SELECT seq FROM deleted_messages WHERE room = ?";
    deleted_drop = "DELETE FROM deleted_messages USING TIMESTAMP ? WHERE room = ?";
    numbered_put = "INSERT INTO numbered_rooms (room, generation, seq, n) VALUES (?, ?, ?, ?) \
        USING TIMESTAMP ?";
    numbered_get = "SELECT generation, seq, n FROM numbered_rooms WHERE room = ?";
    numbered_drop = "DELETE FROM numbered_rooms USING TIMESTAMP ? WHERE room = ?";

    // checkpoints
    checkpoint_get = "SELECT seq, written, generation FROM checkpoints WHERE room = ?";
    checkpoint_put = "UPDATE checkpoints USING TIMESTAMP ? SET seq = ? WHERE room = ?";
    written_put = "UPDATE checkpoints USING TIMESTAMP ? SET written = ? WHERE room = ?";
    generation_put = "UPDATE checkpoints USING TIMESTAMP ? SET generation = ? WHERE room = ?";
    /// A clear keeps the generation.
    checkpoint_clear = "DELETE seq, written FROM checkpoints USING TIMESTAMP ? WHERE room = ?";
    checkpoint_all = "SELECT room, seq, written FROM checkpoints";

    // dead_letters
    dead_put = "INSERT INTO dead_letters (room, seq, reason) VALUES (?, ?, ?) USING TIMESTAMP ?";
    dead_room = "SELECT seq, reason FROM dead_letters WHERE room = ?";
    dead_all = "SELECT room, seq, reason FROM dead_letters";
    dead_drop = "DELETE FROM dead_letters USING TIMESTAMP ? WHERE room = ?";

    // projectors
    projector_put = "INSERT INTO projectors (projector, lag_ms, reported_at_ms) VALUES (?, ?, ?) \
        USING TIMESTAMP ?";
    projector_all = "SELECT projector, lag_ms, reported_at_ms FROM projectors";
}

//! Whole-room and whole-store operations: checkpoints, dead letters, clearing a room for a
//! rebuild, digests, projector reports.

use std::collections::BTreeSet;

use chat_model::RoomId;
use futures::stream::{self, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::clock::{self, bucket};
use super::rows::EventRow;
use super::ScyllaStore;
use crate::{DeadLetter, ProjectorStatus, Result, StoreError};

/// Deletes of one clear in flight at once.
const DELETES_IN_FLIGHT: usize = 64;

/// Feeds rows to SHA-256 with their types and lengths, so that different rows never hash alike.
struct RowHasher(Sha256);

impl RowHasher {
    fn table(&mut self, name: &str) {
        self.0.update(b"#");
        self.text(Some(name));
    }

    fn text(&mut self, value: Option<&str>) {
        match value {
            None => self.0.update(b"n"),
            Some(s) => {
                self.0.update(b"t");
                self.0.update((s.len() as u64).to_le_bytes());
                self.0.update(s.as_bytes());
            }
        }
    }

    fn int(&mut self, value: Option<i64>) {
        match value {
            None => self.0.update(b"n"),
            Some(v) => {
                self.0.update(b"i");
                self.0.update(v.to_le_bytes());
            }
        }
    }

    fn flag(&mut self, value: Option<bool>) {
        self.0.update(match value {
            None => b"n",
            Some(false) => b"0",
            Some(true) => b"1",
        });
    }

    fn end_row(&mut self) {
        self.0.update(b"\n");
    }
}

/// What a room's events point at, found by reading them all.
#[derive(Default)]
struct Pointers {
    ids: BTreeSet<uuid::Uuid>,
    edited: BTreeSet<i64>,
    reacted: BTreeSet<i64>,
    roots: BTreeSet<i64>,
    /// Buckets of `events`, `annotated` and `message_numbers` that may hold rows.
    buckets: BTreeSet<i64>,
}

/// One partition (or row) a clear deletes.
enum Doomed {
    Id(uuid::Uuid),
    Edits(i64),
    Reactions(i64),
    Replies(i64),
    Marks(i64),
    UserRoom(String),
    Numbers(i64),
    Events(i64),
}

fn hash_event(h: &mut RowHasher, r: &EventRow) {
    let id = r.id.map(|id| id.hyphenated().to_string());
    h.int(Some(r.seq));
    h.text(id.as_deref());
    h.text(r.author.as_deref());
    h.int(r.ts);
    h.text(r.kind.as_deref());
    h.text(r.body.as_deref());
    h.text(r.original_body.as_deref());
    h.int(r.edit_seq);
    h.flag(r.deleted);
    h.int(r.thread);
    h.int(r.reply_to);
    h.int(r.target);
    h.text(r.fields.as_deref());
    h.end_row();
}

impl ScyllaStore {
    pub(super) async fn all_checkpoints(&self) -> Result<Vec<(RoomId, u64)>> {
        let rows: Vec<(String, Option<i64>, Option<i64>)> = self
            .all("checkpoints", &self.st().checkpoint_all, ())
            .await?;
        let mut out: Vec<(RoomId, u64)> = rows
            .into_iter()
            .filter_map(|(room, seq, _)| Some((RoomId::parse(room).ok()?, seq?.max(0) as u64)))
            .collect();
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(out)
    }

    pub(super) async fn all_dead_letters(&self) -> Result<Vec<DeadLetter>> {
        let rows: Vec<(String, i64, Option<String>)> =
            self.all("dead letters", &self.st().dead_all, ()).await?;
        let mut out: Vec<DeadLetter> = rows
            .into_iter()
            .filter_map(|(room, seq, error)| {
                Some(DeadLetter {
                    room: RoomId::parse(room).ok()?,
                    seq: seq.max(0) as u64,
                    error: error.unwrap_or_default(),
                })
            })
            .collect();
        out.sort_by(|a, b| (a.room.as_str(), a.seq).cmp(&(b.room.as_str(), b.seq)));
        Ok(out)
    }

    /// Reads every event row of the room, bucket by bucket, ascending (hashing each into `h`
    /// if given), and collects what they point at.
    async fn walk_events(
        &self,
        room: &str,
        high: u64,
        mut h: Option<&mut RowHasher>,
    ) -> Result<Pointers> {
        let mut p = Pointers::default();
        for b in 0..=bucket(high) {
            p.buckets.insert(b);
            let mut rows: Vec<EventRow> = self
                .all("read room", &self.st().event_bucket, (room, b))
                .await?;
            rows.sort_by_key(|r| r.seq);
            for row in &rows {
                if let Some(h) = h.as_deref_mut() {
                    hash_event(h, row);
                }
                p.ids.extend(row.id);
                match (row.kind.as_deref(), row.target, row.thread) {
                    (Some("edit"), Some(target), _) => {
                        p.edited.insert(target);
                    }
                    (Some("reaction"), Some(target), _) => {
                        p.reacted.insert(target);
                        p.buckets.insert(bucket(target.max(0) as u64));
                    }
                    (Some("message"), _, Some(root)) => {
                        p.roots.insert(root);
                        p.buckets.insert(bucket(root.max(0) as u64));
                    }
                    _ => {}
                }
            }
        }
        Ok(p)
    }

    /// Deletes one partition (or row) of a clear, at the clear's timestamp.
    async fn drop_one(&self, room: &str, at: i64, doomed: Doomed) -> Result<()> {
        let st = self.st();
        let op = "clear room";
        match doomed {
            Doomed::Id(id) => self.exec(op, &st.id_drop, (at, room, id)).await,
            Doomed::Edits(target) => self.exec(op, &st.edit_drop, (at, room, target)).await,
            Doomed::Reactions(target) => self.exec(op, &st.reaction_drop, (at, room, target)).await,
            Doomed::Replies(root) => self.exec(op, &st.reply_drop, (at, room, root)).await,
            Doomed::Marks(b) => self.exec(op, &st.mark_drop, (at, room, b)).await,
            Doomed::UserRoom(member) => {
                self.exec(op, &st.user_room_delete, (at, member.as_str(), room))
                    .await
            }
            Doomed::Numbers(b) => self.exec(op, &st.number_drop, (at, room, b)).await,
            Doomed::Events(b) => self.exec(op, &st.event_drop, (at, room, b)).await,
        }
    }

    /// Deletes them all, [`DELETES_IN_FLIGHT`] at a time; the first error stops the rest.
    async fn drop_all(
        &self,
        room: &str,
        at: i64,
        doomed: impl Iterator<Item = Doomed>,
    ) -> Result<()> {
        stream::iter(doomed)
            .map(|d| self.drop_one(room, at, d))
            .buffer_unordered(DELETES_IN_FLIGHT)
            .try_collect::<()>()
            .await
    }

    /// Removes everything the store holds for `room`, keeping (and advancing) its generation.
    ///
    /// The new generation is written first: from then on the room's writes land above the
    /// tombstones written here, even if the clear is interrupted (run it again then). The
    /// partitions the events point at are deleted before the events, which are how they are
    /// found.
    pub(super) async fn clear(&self, room: &str) -> Result<()> {
        let st = self.st();
        let checkpoint = self.checkpoint_row(room).await?;
        let generation = checkpoint.generation() + 1;
        if generation > clock::MAX_GENERATION {
            return Err(StoreError::Backend {
                op: "clear room",
                message: format!(
                    "room {room} was cleared {} times, the most write timestamps can tell apart",
                    clock::MAX_GENERATION
                ),
            });
        }
        // The generation cell is written at its own value: the highest generation wins.
        self.exec(
            "clear room",
            &st.generation_put,
            (generation, generation, room),
        )
        .await?;
        let at = clock::clear_ts(generation);
        // First: from now on readers count the room by reading its events, which are still
        // there, rather than from numbers partly deleted.
        self.exec("clear room", &st.numbered_drop, (at, room))
            .await?;
        let p = self
            .walk_events(room, checkpoint.seq().max(checkpoint.written()), None)
            .await?;
        let members: Vec<(String, Option<i64>, Option<bool>)> =
            self.all("clear room", &st.member_list, (room,)).await?;
        // What the events point at, while the events are there to say so.
        let derived = (p.ids.into_iter().map(Doomed::Id))
            .chain(p.edited.into_iter().map(Doomed::Edits))
            .chain(p.reacted.into_iter().map(Doomed::Reactions))
            .chain(p.roots.into_iter().map(Doomed::Replies))
            .chain(p.buckets.iter().copied().map(Doomed::Marks))
            .chain(p.buckets.iter().copied().map(Doomed::Numbers))
            .chain(members.into_iter().map(|(m, _, _)| Doomed::UserRoom(m)));
        self.drop_all(room, at, derived).await?;
        self.drop_all(room, at, p.buckets.into_iter().map(Doomed::Events))
            .await?;
        for statement in [
            &st.member_drop,
            &st.cursor_drop,
            &st.delivered_drop,
            &st.room_drop,
            &st.settings_drop,
            &st.dead_drop,
            &st.deleted_drop,
        ] {
            self.exec("clear room", statement, (at, room)).await?;
        }
        // Last: while it stands, a clear interrupted before this point can be found and redone.
        self.exec("clear room", &st.checkpoint_clear, (at, room))
            .await
    }

    /// A digest of the rooms' contents, each table's rows sorted by key; over every room with
    /// a checkpoint when `room` is `None`.
    pub(super) async fn digest_of(&self, room: Option<&RoomId>) -> Result<String> {
        let rooms: Vec<String> = match room {
            Some(room) => vec![room.as_str().to_owned()],
            None => {
                let rows: Vec<(String, Option<i64>, Option<i64>)> =
                    self.all("digest", &self.st().checkpoint_all, ()).await?;
                let mut rooms: Vec<String> = rows
                    .into_iter()
                    .filter(|(_, seq, written)| seq.is_some() || written.is_some())
                    .map(|(room, _, _)| room)
                    .collect();
                rooms.sort();
                rooms
            }
        };
        let mut h = RowHasher(Sha256::new());
        for room in &rooms {
            self.hash_room(&mut h, room).await?;
        }
        Ok(hex::encode(h.0.finalize()))
    }

    async fn hash_room(&self, h: &mut RowHasher, room: &str) -> Result<()> {
        let st = self.st();
        let checkpoint = self.checkpoint_row(room).await?;
        h.table("room");
        h.text(Some(room));
        h.end_row();

        h.table("rooms");
        if let Some(r) = self.room_row(room).await? {
            h.text(r.kind.as_deref());
            h.text(r.name.as_deref());
            h.text(r.creator.as_deref());
            h.int(r.created_seq);
            h.end_row();
        }

        h.table("room_settings");
        let settings: Option<(Option<bool>, Option<i64>)> =
            self.first("digest", &st.settings_get, (room,)).await?;
        if let Some((read_only, updated_seq)) = settings {
            h.flag(read_only);
            h.int(updated_seq);
            h.end_row();
        }

        h.table("members");
        let mut members: Vec<(String, Option<i64>, Option<bool>)> =
            self.all("digest", &st.member_list, (room,)).await?;
        members.sort_by(|a, b| a.0.cmp(&b.0));
        for (member, joined_seq, active) in &members {
            h.text(Some(member));
            h.int(*joined_seq);
            h.flag(*active);
            h.end_row();
        }

        h.table("cursors");
        let mut cursors: Vec<(String, Option<i64>)> =
            self.all("digest", &st.cursor_list, (room,)).await?;
        cursors.sort();
        for (member, last_read) in &cursors {
            h.text(Some(member));
            h.int(*last_read);
            h.end_row();
        }

        h.table("delivered_cursors");
        let mut delivered: Vec<(String, Option<i64>)> =
            self.all("digest", &st.delivered_list, (room,)).await?;
        delivered.sort();
        for (member, up_to) in &delivered {
            h.text(Some(member));
            h.int(*up_to);
            h.end_row();
        }

        h.table("events");
        let p = self
            .walk_events(
                room,
                checkpoint.seq().max(checkpoint.written()),
                Some(&mut *h),
            )
            .await?;

        h.table("reactions");
        for target in &p.reacted {
            let mut reactions: Vec<(String, String, Option<i64>)> = self
                .all("digest", &st.reaction_list, (room, *target))
                .await?;
            reactions.sort();
            for (emoji, member, seq) in &reactions {
                h.int(Some(*target));
                h.text(Some(emoji));
                h.text(Some(member));
                h.int(*seq);
                h.end_row();
            }
        }

        h.table("thread_replies");
        for root in &p.roots {
            let mut replies: Vec<(i64, Option<bool>)> =
                self.all("digest", &st.reply_all, (room, *root)).await?;
            replies.sort();
            for (seq, deleted) in &replies {
                h.int(Some(*root));
                h.int(Some(*seq));
                h.flag(*deleted);
                h.end_row();
            }
        }

        h.table("edits");
        for target in &p.edited {
            let mut edits: Vec<(i64,)> = self.all("digest", &st.edit_list, (room, *target)).await?;
            edits.sort();
            for (seq,) in &edits {
                h.int(Some(*target));
                h.int(Some(*seq));
                h.end_row();
            }
        }

        // Unread counts' numbers. Not the generation: a rebuilt room is in a later one.
        h.table("message_numbers");
        for b in &p.buckets {
            let mut numbers: Vec<(i64, Option<i64>)> =
                self.all("digest", &st.number_bucket, (room, *b)).await?;
            numbers.sort();
            for (seq, n) in &numbers {
                h.int(Some(*seq));
                h.int(*n);
                h.end_row();
            }
        }
        h.table("deleted_messages");
        let mut deleted: Vec<(i64,)> = self.all("digest", &st.deleted_list, (room,)).await?;
        deleted.sort();
        for (seq,) in &deleted {
            h.int(Some(*seq));
            h.end_row();
        }
        h.table("numbered_rooms");
        if let Some((seq, n)) = self.numbered_mark(room, &checkpoint).await? {
            h.int(Some(seq as i64));
            h.int(Some(n));
            h.end_row();
        }

        h.table("checkpoints");
        h.int(checkpoint.seq);
        h.end_row();

        h.table("dead_letters");
        let mut dead: Vec<(i64, Option<String>)> =
            self.all("digest", &st.dead_room, (room,)).await?;
        dead.sort();
        for (seq, reason) in &dead {
            h.int(Some(*seq));
            h.text(reason.as_deref());
            h.end_row();
        }
        Ok(())
    }

    pub(super) async fn put_projector(&self, status: &ProjectorStatus) -> Result<()> {
        // Written at the report's own clock: the newest report wins, whatever the arrival.
        let write_ts = status.reported_at_ms.saturating_mul(1000).max(i64::MIN + 1);
        self.exec(
            "report projector",
            &self.st().projector_put,
            (
                status.partition.as_str(),
                i64::try_from(status.lag_ms).unwrap_or(i64::MAX),
                status.reported_at_ms,
                write_ts,
            ),
        )
        .await
    }

    pub(super) async fn all_projectors(&self) -> Result<Vec<ProjectorStatus>> {
        let mut rows: Vec<(String, Option<i64>, Option<i64>)> =
            self.all("projectors", &self.st().projector_all, ()).await?;
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(rows
            .into_iter()
            .map(|(partition, lag_ms, reported_at_ms)| ProjectorStatus {
                partition,
                lag_ms: lag_ms.unwrap_or(0).max(0) as u64,
                reported_at_ms: reported_at_ms.unwrap_or(0),
            })
            .collect())
    }
}

//! Applying a room's events: rows first, checkpoint last, every write at its log timestamp.
//!
//! Most events only write (messages, reads, leaving): they are applied concurrently, up to
//! [`WRITES_IN_FLIGHT`] at a time, each event's own row before its effects. Events whose effect
//! depends on what the store holds (edits and deletes check the message's author, a reaction
//! keeps the sequence of the first "on", a join that of the first join, a room's first
//! `room_created` wins) wait until every earlier event is written, then read and write alone.
//! So whenever an event reads, every event before it is in the store, as in the SQLite backend;
//! the only thing a re-application (after a crash between rows and checkpoint) can add is the
//! effect of events after it, and each rule below gives the same cells then too.

use std::collections::HashMap;

use ::scylla::value::MaybeUnset;
use chat_model::{Event, EventBody, RoomId, UserId};
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;

use super::clock::{self, bucket, cql_seq, ts, OFF_CHECKPOINT, OFF_CURSOR, OFF_EFFECT, OFF_EVENT};
use super::rows::{CheckpointRow, EventRow};
use super::ScyllaStore;
use crate::render::fields_of;
use crate::{Entry, Result, RoomBatch, StoreError};

/// Events of one room being written at once.
const WRITES_IN_FLIGHT: usize = 64;
/// Rooms of one `apply` being applied at once.
const ROOMS_IN_FLIGHT: usize = 8;

/// The room being applied and its generation (see `clock.rs`).
struct RoomCtx<'a> {
    room: &'a str,
    generation: i64,
}

impl RoomCtx<'_> {
    fn ts(&self, seq: u64, offset: i64) -> i64 {
        ts(self.generation, seq, offset)
    }
}

/// Whether applying the event reads what the store holds (and so waits for every earlier one).
fn reads_state(entry: &Entry) -> bool {
    matches!(
        &entry.event,
        Ok(Event {
            body: EventBody::Edit { .. }
                | EventBody::Delete { .. }
                | EventBody::Reaction { on: true, .. }
                | EventBody::MemberJoined { .. }
                | EventBody::RoomCreated { .. }
                | EventBody::RoomUpdated { .. },
            ..
        })
    )
}

/// An edit event's fields without its text (its message is deleted).
fn without_text(fields: &str) -> Option<String> {
    let mut value: Value = serde_json::from_str(fields).ok()?;
    value.as_object_mut()?.remove("text")?;
    Some(value.to_string())
}

fn in_room(room: &RoomId, e: StoreError) -> StoreError {
    let message = match e {
        StoreError::Backend { op, message } => format!("{op}: {message}"),
        other => other.to_string(),
    };
    StoreError::Room {
        op: "apply",
        room: room.clone(),
        message,
    }
}

impl ScyllaStore {
    pub(super) async fn checkpoint_row(&self, room: &str) -> Result<CheckpointRow> {
        Ok(self
            .first("checkpoint", &self.st().checkpoint_get, (room,))
            .await?
            .unwrap_or_default())
    }

    /// Applies each room's batches in order; rooms concurrently.
    pub(super) async fn apply_batches(&self, batches: &[RoomBatch]) -> Result<()> {
        let mut by_room: Vec<Vec<&RoomBatch>> = Vec::new();
        let mut index: HashMap<&RoomId, usize> = HashMap::new();
        for batch in batches {
            let i = *index.entry(&batch.room).or_insert_with(|| {
                by_room.push(Vec::new());
                by_room.len() - 1
            });
            by_room[i].push(batch);
        }
        let mut rooms = by_room.into_iter();
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < ROOMS_IN_FLIGHT {
                let Some(room_batches) = rooms.next() else {
                    break;
                };
                in_flight.push(self.apply_in_order(room_batches));
            }
            match in_flight.next().await {
                Some(done) => done?,
                None => return Ok(()),
            }
        }
    }

    /// One room's batches, one after the other.
    async fn apply_in_order(&self, batches: Vec<&RoomBatch>) -> Result<()> {
        for batch in batches {
            self.apply_room(batch)
                .await
                .map_err(|e| in_room(&batch.room, e))?;
        }
        Ok(())
    }

    async fn apply_room(&self, batch: &RoomBatch) -> Result<()> {
        let room = batch.room.as_str();
        let checkpoint = self.checkpoint_row(room).await?;
        let generation = checkpoint.generation();
        // As SQLite: what is at or below the checkpoint (or an entry already taken) is skipped.
        let mut last = checkpoint.seq();
        let entries: Vec<&Entry> = batch
            .entries
            .iter()
            .filter(|e| {
                let fresh = e.seq > last;
                last = last.max(e.seq);
                fresh
            })
            .collect();
        let ctx = RoomCtx { room, generation };
        if entries.is_empty() {
            if checkpoint.seq.is_none() && clock::in_range(generation, 0) {
                // As SQLite does: a room the projector has seen has a checkpoint, 0 at first.
                self.exec(
                    "write checkpoint",
                    &self.st().checkpoint_put,
                    (ctx.ts(0, OFF_CHECKPOINT), 0i64, room),
                )
                .await?;
            }
            return Ok(());
        }
        if !clock::in_range(generation, last) {
            return Err(StoreError::Backend {
                op: "apply",
                message: format!(
                    "sequence {last} or generation {generation} is beyond what write timestamps \
                     encode (sequences up to {}, generations up to {})",
                    clock::MAX_SEQ,
                    clock::MAX_GENERATION
                ),
            });
        }
        // Before any row: a clear deletes every bucket up to this mark.
        if last > checkpoint.written() {
            self.exec(
                "write mark",
                &self.st().written_put,
                (ctx.ts(last, OFF_CHECKPOINT), cql_seq(last), room),
            )
            .await?;
        }
        // Messages are numbered in order here, before the writes go out concurrently.
        let mut numbered = self.numbering(&ctx, &checkpoint).await?;
        let mut in_flight = FuturesUnordered::new();
        for entry in entries {
            let number = match (&mut numbered, &entry.event) {
                (
                    Some(n),
                    Ok(Event {
                        body: EventBody::Message { .. },
                        ..
                    }),
                ) => {
                    *n += 1;
                    Some(*n)
                }
                _ => None,
            };
            if reads_state(entry) {
                while let Some(done) = in_flight.next().await {
                    done?;
                }
                self.apply_entry(&ctx, entry, number).await?;
            } else {
                if in_flight.len() >= WRITES_IN_FLIGHT {
                    if let Some(done) = in_flight.next().await {
                        done?;
                    }
                }
                in_flight.push(self.apply_entry(&ctx, entry, number));
            }
        }
        while let Some(done) = in_flight.next().await {
            done?;
        }
        // The room's message count at `last`, for the next batch to number from: after the
        // rows, before the checkpoint (so while numbered it is never behind the checkpoint).
        if let Some(n) = numbered {
            self.exec(
                "write message count",
                &self.st().numbered_put,
                (
                    room,
                    generation,
                    cql_seq(last),
                    n,
                    ctx.ts(last, OFF_CHECKPOINT),
                ),
            )
            .await?;
        }
        // Last: the checkpoint covers only rows that are all written.
        self.exec(
            "write checkpoint",
            &self.st().checkpoint_put,
            (ctx.ts(last, OFF_CHECKPOINT), cql_seq(last), room),
        )
        .await
    }

    /// How many messages the room holds up to its checkpoint, if its messages are numbered
    /// (see `numbered_rooms` in the schema); `None`: they are not, and are not numbered now.
    async fn numbering(
        &self,
        ctx: &RoomCtx<'_>,
        checkpoint: &CheckpointRow,
    ) -> Result<Option<i64>> {
        let at = checkpoint.seq();
        if at == 0 {
            // Nothing stored (a new room, or one cleared): numbered from its first message.
            return Ok(Some(0));
        }
        match self.numbered_mark(ctx.room, checkpoint).await? {
            None => Ok(None),
            Some((seq, n)) if seq == at => Ok(Some(n)),
            // A batch wrote its count, then stopped before its checkpoint: the numbers up to
            // the checkpoint are all written.
            Some(_) => self.number_at(ctx.room, at).await.map(Some),
        }
    }

    /// The room's message count row `(seq, n)` if the room is numbered: of the checkpoint's
    /// generation, and not behind the checkpoint.
    pub(super) async fn numbered_mark(
        &self,
        room: &str,
        checkpoint: &CheckpointRow,
    ) -> Result<Option<(u64, i64)>> {
        let row: Option<(Option<i64>, Option<i64>, Option<i64>)> = self
            .first("read message count", &self.st().numbered_get, (room,))
            .await?;
        Ok(match row {
            Some((Some(generation), Some(seq), Some(n)))
                if generation == checkpoint.generation()
                    && seq.max(0) as u64 >= checkpoint.seq() =>
            {
                Some((seq.max(0) as u64, n))
            }
            _ => None,
        })
    }

    /// The number of the room's newest message at or below `seq` (0: none): walks the buckets
    /// downward from `seq`'s and stops at the first that holds one.
    pub(super) async fn number_at(&self, room: &str, seq: u64) -> Result<i64> {
        if seq == 0 {
            return Ok(0);
        }
        let mut b = bucket(seq);
        loop {
            let found: Option<(Option<i64>,)> = self
                .first(
                    "read message number",
                    &self.st().number_at,
                    (room, b, cql_seq(seq)),
                )
                .await?;
            if let Some((n,)) = found {
                return Ok(n.unwrap_or(0));
            }
            if b == 0 {
                return Ok(0);
            }
            b -= 1;
        }
    }

    async fn apply_entry(
        &self,
        ctx: &RoomCtx<'_>,
        entry: &Entry,
        number: Option<i64>,
    ) -> Result<()> {
        match &entry.event {
            Ok(event) => self.apply_event(ctx, entry.seq, event, number).await,
            Err(reason) => {
                self.exec(
                    "write dead letter",
                    &self.st().dead_put,
                    (
                        ctx.room,
                        cql_seq(entry.seq),
                        reason.as_str(),
                        ctx.ts(entry.seq, OFF_EVENT),
                    ),
                )
                .await
            }
        }
    }

    /// Writes the event's own row (all kinds but messages) and its id.
    async fn put_event_row(
        &self,
        ctx: &RoomCtx<'_>,
        seq: u64,
        event: &Event,
        fields: &str,
    ) -> Result<()> {
        let target = match &event.body {
            EventBody::Edit { target, .. }
            | EventBody::Delete { target }
            | EventBody::Reaction { target, .. } => MaybeUnset::Set(cql_seq(*target)),
            _ => MaybeUnset::Unset,
        };
        self.exec(
            "write event",
            &self.st().event_other,
            (
                ctx.room,
                bucket(seq),
                cql_seq(seq),
                event.id,
                event.user.as_str(),
                event.ts,
                event.body.kind(),
                target,
                fields,
                ctx.ts(seq, OFF_EVENT),
            ),
        )
        .await?;
        self.put_id(ctx, seq, event).await
    }

    async fn put_id(&self, ctx: &RoomCtx<'_>, seq: u64, event: &Event) -> Result<()> {
        self.exec(
            "write id",
            &self.st().id_put,
            (
                ctx.room,
                event.id,
                cql_seq(seq),
                event.ts,
                ctx.ts(seq, OFF_EVENT),
            ),
        )
        .await
    }

    /// `number`: for a message in a numbered room, its number.
    async fn apply_event(
        &self,
        ctx: &RoomCtx<'_>,
        seq: u64,
        event: &Event,
        number: Option<i64>,
    ) -> Result<()> {
        let st = self.st();
        let room = ctx.room;
        let user = event.user.as_str();
        let effect_ts = ctx.ts(seq, OFF_EFFECT);
        match &event.body {
            EventBody::Message {
                text,
                thread,
                reply_to,
            } => {
                self.exec(
                    "write message",
                    &st.event_message,
                    (
                        room,
                        bucket(seq),
                        cql_seq(seq),
                        event.id,
                        user,
                        event.ts,
                        text.as_str(),
                        MaybeUnset::from_option(thread.map(cql_seq)),
                        MaybeUnset::from_option(reply_to.map(cql_seq)),
                        ctx.ts(seq, OFF_EVENT),
                    ),
                )
                .await?;
                self.put_id(ctx, seq, event).await?;
                if let Some(n) = number {
                    self.exec(
                        "write message number",
                        &st.number_put,
                        (room, bucket(seq), cql_seq(seq), n, ctx.ts(seq, OFF_EVENT)),
                    )
                    .await?;
                }
                if let Some(root) = *thread {
                    // The mark before the reply it points to.
                    self.exec(
                        "mark thread",
                        &st.mark_threaded,
                        (effect_ts, room, bucket(root), cql_seq(root)),
                    )
                    .await?;
                    self.exec(
                        "write reply",
                        &st.reply_put,
                        (room, cql_seq(root), cql_seq(seq), effect_ts),
                    )
                    .await?;
                }
                // Writing a message reads the room up to it (contract: cursors), and so has it.
                self.advance_cursor(ctx, user, seq).await?;
                self.advance_delivered(ctx, user, seq).await
            }
            EventBody::Edit { target, text } => {
                let message = self.message_at(room, *target).await?;
                // An edit of a deleted message keeps no text, whenever the delete came.
                let fields = fields_of(&event.body).to_string();
                let fields = match &message {
                    Some(m) if m.is_deleted() => without_text(&fields).unwrap_or(fields),
                    _ => fields,
                };
                self.put_event_row(ctx, seq, event, &fields).await?;
                self.exec(
                    "write edit index",
                    &st.edit_put,
                    (room, cql_seq(*target), cql_seq(seq), effect_ts),
                )
                .await?;
                // Author only; a deleted message stays deleted. A later edit (already written
                // if this is a re-application) has a higher timestamp and keeps its text.
                if let Some(m) = message {
                    if m.author.as_deref() == Some(user) && !m.is_deleted() {
                        let original = m.original_body.or(m.body);
                        self.exec(
                            "edit message",
                            &st.event_edit,
                            (
                                effect_ts,
                                text.as_str(),
                                original,
                                cql_seq(seq),
                                room,
                                bucket(*target),
                                cql_seq(*target),
                            ),
                        )
                        .await?;
                    }
                }
                Ok(())
            }
            EventBody::Delete { target } => {
                let fields = fields_of(&event.body).to_string();
                self.put_event_row(ctx, seq, event, &fields).await?;
                let Some(message) = self.message_at(room, *target).await? else {
                    return Ok(());
                };
                // Author, or the admin of a group room (the creator, while a member), as the
                // room aggregate decides it. Unlike SQLite this does not skip a message that is
                // already deleted: redoing a delete writes the same cells, and a delete
                // interrupted half-way (tombstone written, edits not yet stripped) finishes.
                let allowed = message.author.as_deref() == Some(user)
                    || self.group_admin_in(room, user, seq).await?;
                if !allowed {
                    return Ok(());
                }
                self.exec(
                    "delete message",
                    &st.event_delete,
                    (effect_ts, room, bucket(*target), cql_seq(*target)),
                )
                .await?;
                self.exec(
                    "write deleted message",
                    &st.deleted_put,
                    (room, cql_seq(*target), effect_ts),
                )
                .await?;
                if let Some(root) = message.thread {
                    self.exec(
                        "delete reply",
                        &st.reply_delete,
                        (effect_ts, room, root, cql_seq(*target)),
                    )
                    .await?;
                }
                // The tombstone keeps no text, nor do edits of it.
                let edits: Vec<(i64,)> = self
                    .all("read edits", &st.edit_list, (room, cql_seq(*target)))
                    .await?;
                for (edit_seq,) in edits {
                    let edit_seq = edit_seq.max(0) as u64;
                    let Some(edit) = self.event_at(room, edit_seq).await? else {
                        continue;
                    };
                    if let Some(fields) = edit.fields.as_deref().and_then(without_text) {
                        self.exec(
                            "strip edit",
                            &st.event_fields,
                            (effect_ts, fields, room, bucket(edit_seq), cql_seq(edit_seq)),
                        )
                        .await?;
                    }
                }
                Ok(())
            }
            EventBody::Reaction { target, emoji, on } => {
                let fields = fields_of(&event.body).to_string();
                self.put_event_row(ctx, seq, event, &fields).await?;
                let key = (room, cql_seq(*target), emoji.as_str(), user);
                if !*on {
                    return self
                        .exec(
                            "clear reaction",
                            &st.reaction_off,
                            (effect_ts, key.0, key.1, key.2, key.3),
                        )
                        .await;
                }
                // The first "on" since the last "off" keeps its sequence (users are listed in
                // that order). A row already there is that first one, or (re-applying) a later
                // one whose timestamp beats this write anyway.
                let existing: Option<(Option<i64>,)> =
                    self.first("read reaction", &st.reaction_get, key).await?;
                if existing.is_some() {
                    return Ok(());
                }
                self.exec(
                    "mark reaction",
                    &st.mark_reacted,
                    (effect_ts, room, bucket(*target), cql_seq(*target)),
                )
                .await?;
                self.exec(
                    "write reaction",
                    &st.reaction_put,
                    (key.0, key.1, key.2, key.3, cql_seq(seq), effect_ts),
                )
                .await
            }
            EventBody::Read { up_to } => {
                let fields = fields_of(&event.body).to_string();
                self.put_event_row(ctx, seq, event, &fields).await?;
                // Reading implies having received.
                self.advance_cursor(ctx, user, (*up_to).min(seq)).await?;
                self.advance_delivered(ctx, user, (*up_to).min(seq)).await
            }
            EventBody::Delivered { cursors } => {
                let fields = fields_of(&event.body).to_string();
                self.put_event_row(ctx, seq, event, &fields).await?;
                for (member, up_to) in cursors {
                    self.advance_delivered(ctx, member.as_str(), (*up_to).min(seq))
                        .await?;
                }
                Ok(())
            }
            EventBody::MemberJoined { member } => {
                let fields = fields_of(&event.body).to_string();
                self.put_event_row(ctx, seq, event, &fields).await?;
                // As the room aggregate folds it: joining again while a member changes nothing.
                self.join(ctx, member, seq, true).await
            }
            EventBody::MemberLeft { member } => {
                let fields = fields_of(&event.body).to_string();
                self.put_event_row(ctx, seq, event, &fields).await?;
                let member_ts = ctx.ts(seq, clock::OFF_MEMBER);
                self.exec(
                    "write member",
                    &st.member_leave,
                    (member_ts, room, member.as_str()),
                )
                .await?;
                self.exec(
                    "write user's rooms",
                    &st.user_room_delete,
                    (member_ts, member.as_str(), room),
                )
                .await
            }
            EventBody::RoomCreated {
                name,
                room_kind,
                members,
            } => {
                let fields = fields_of(&event.body).to_string();
                self.put_event_row(ctx, seq, event, &fields).await?;
                // The room's first `room_created` wins (as SQLite's INSERT OR IGNORE).
                if self.room_row(room).await?.is_none() {
                    self.exec(
                        "write room",
                        &st.room_put,
                        (
                            room,
                            room_kind.as_str(),
                            name.as_str(),
                            user,
                            cql_seq(seq),
                            ctx.ts(seq, clock::OFF_MEMBER),
                        ),
                    )
                    .await?;
                }
                // As SQLite: here the latest join sets where the member's cursor starts.
                for member in members.iter().chain([&event.user]) {
                    self.join(ctx, member, seq, false).await?;
                }
                Ok(())
            }
            EventBody::RoomUpdated { read_only } => {
                let fields = fields_of(&event.body).to_string();
                self.put_event_row(ctx, seq, event, &fields).await?;
                // The admin's (the creator, while a member) only, as the room aggregate folds
                // it. Every earlier event is written (this kind reads state), so the check sees
                // the membership the log had at `seq`; a later one re-applied has a higher
                // timestamp and wins anyway.
                if self.creator_of(room).await?.as_deref() != Some(user)
                    || !self.member_at(room, user, seq).await?
                {
                    return Ok(());
                }
                self.exec(
                    "write room settings",
                    &st.settings_put,
                    (room, *read_only, cql_seq(seq), effect_ts),
                )
                .await
            }
        }
    }

    /// `member` joins at `seq`: membership, "my rooms", and the cursor. With `keep_if_active`,
    /// a member who is already in the room keeps the sequence they joined at: the first join
    /// since the last leave wins. Re-applied, an earlier join either finds the member active
    /// (and writes nothing) or writes below the later leave, which clears both cells.
    async fn join(
        &self,
        ctx: &RoomCtx<'_>,
        member: &UserId,
        seq: u64,
        keep_if_active: bool,
    ) -> Result<()> {
        let st = self.st();
        let member_ts = ctx.ts(seq, clock::OFF_MEMBER);
        let active = if keep_if_active {
            let row: Option<(Option<i64>, Option<bool>)> = self
                .first("read member", &st.member_get, (ctx.room, member.as_str()))
                .await?;
            matches!(row, Some((_, Some(true))))
        } else {
            false
        };
        // The member row before the user's-rooms row: a clear finds the latter from the former.
        if !active {
            self.exec(
                "write member",
                &st.member_join,
                (ctx.room, member.as_str(), cql_seq(seq), member_ts),
            )
            .await?;
        }
        self.exec(
            "write user's rooms",
            &st.user_room_put,
            (member.as_str(), ctx.room, member_ts),
        )
        .await?;
        self.advance_cursor(ctx, member.as_str(), seq).await
    }

    /// Moves `user`'s cursor forward to `seq`: written at the timestamp of its value, so the
    /// highest value wins whatever the order of arrival, and it never moves back.
    async fn advance_cursor(&self, ctx: &RoomCtx<'_>, user: &str, seq: u64) -> Result<()> {
        self.exec(
            "write cursor",
            &self.st().cursor_put,
            (ctx.ts(seq, OFF_CURSOR), cql_seq(seq), ctx.room, user),
        )
        .await
    }

    /// Moves `user`'s delivered cursor forward to `seq`, written at the timestamp of its value
    /// like the read cursor: the highest value wins whatever the order of arrival.
    async fn advance_delivered(&self, ctx: &RoomCtx<'_>, user: &str, seq: u64) -> Result<()> {
        self.exec(
            "write delivered cursor",
            &self.st().delivered_put,
            (ctx.ts(seq, OFF_CURSOR), cql_seq(seq), ctx.room, user),
        )
        .await
    }

    /// The row of the event at `seq`, if the store holds it.
    pub(super) async fn event_at(&self, room: &str, seq: u64) -> Result<Option<EventRow>> {
        self.first(
            "read event",
            &self.st().event_get,
            (room, bucket(seq), cql_seq(seq)),
        )
        .await
    }

    /// The message at `seq`, if the store holds a message there.
    pub(super) async fn message_at(&self, room: &str, seq: u64) -> Result<Option<EventRow>> {
        Ok(self.event_at(room, seq).await?.filter(EventRow::is_message))
    }

    async fn creator_of(&self, room: &str) -> Result<Option<String>> {
        Ok(self.room_row(room).await?.and_then(|r| r.creator))
    }

    /// Whether `user` administers `room` at `seq`: a group room's creator, while a member.
    async fn group_admin_in(&self, room: &str, user: &str, seq: u64) -> Result<bool> {
        let Some(row) = self.room_row(room).await? else {
            return Ok(false);
        };
        if row.kind.as_deref() != Some("group") || row.creator.as_deref() != Some(user) {
            return Ok(false);
        }
        self.member_at(room, user, seq).await
    }

    /// Whether `user` is a member of `room` at `seq`, from the member row. Every earlier event
    /// is written when this is asked (the kinds that ask read state), but a batch applied again
    /// after a failed write also finds the rows of later events: a member who left before `seq`
    /// and joined again after it is active now, since a join later than `seq`, and was not a
    /// member at `seq`. (A leave later than `seq` re-applied refuses what the first application
    /// allowed; its writes stay, so the cells are the same.)
    async fn member_at(&self, room: &str, user: &str, seq: u64) -> Result<bool> {
        let member: Option<(Option<i64>, Option<bool>)> = self
            .first("read member", &self.st().member_get, (room, user))
            .await?;
        Ok(matches!(member, Some((Some(joined), Some(true))) if joined < cql_seq(seq)))
    }
}

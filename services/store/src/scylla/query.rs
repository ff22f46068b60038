//! Reads: history and thread pages, room lists with unread counts, room state.

use std::collections::{BTreeMap, HashMap, HashSet};

use chat_model::{RoomId, RoomKind, RoomState, UserId};
use futures::stream::{self, StreamExt, TryStreamExt};

use super::clock::{bucket, cql_seq};
use super::rows::{CheckpointRow, EventRow, RoomRow};
use super::ScyllaStore;
use crate::render::StoredEvent;
use crate::{MemberCursors, Page, PageQuery, Result, RoomSummary, StoreError, ThreadPage};

/// Reads one page decoration or one room summary runs at once.
const READS_IN_FLIGHT: usize = 16;

/// Values of one `IN` list: ScyllaDB refuses more than 100 clustering keys per query
/// (`max_clustering_key_restrictions_per_query`).
const MAX_IN: usize = 100;

/// `members`: when the user joined, whether they are still in the room.
type MemberRow = (Option<i64>, Option<bool>);

/// What decorating one message needs.
enum Decoration {
    Reactions(usize, Vec<(String, Vec<String>)>),
    Replies(usize, Option<(u64, u64)>),
}

fn kind_of(kind: &str) -> RoomKind {
    if kind == "direct" {
        RoomKind::Direct
    } else {
        RoomKind::Group
    }
}

/// The highest sequence a page may show: below `before`, at or below the checkpoint.
fn page_top(query: &PageQuery, checkpoint: u64) -> u64 {
    match query.before {
        Some(before) => before.saturating_sub(1).min(checkpoint),
        None => checkpoint,
    }
}

impl ScyllaStore {
    pub(super) async fn room_row(&self, room: &str) -> Result<Option<RoomRow>> {
        self.first("read room", &self.st().room_get, (room,)).await
    }

    /// Whether the room is read-only (no settings row: the default, not).
    pub(super) async fn read_only(&self, room: &str) -> Result<bool> {
        let row: Option<(Option<bool>, Option<i64>)> = self
            .first("read room settings", &self.st().settings_get, (room,))
            .await?;
        Ok(matches!(row, Some((Some(true), _))))
    }

    /// A page of history: walks the buckets downward from the page's top until it has
    /// `limit + 1` events (the extra one says whether there are more) or bucket 0 is read.
    pub(super) async fn history_page(&self, room: &str, query: PageQuery) -> Result<Page> {
        let limit = query.clamped_limit();
        let checkpoint = self.checkpoint_row(room).await?.seq();
        let top = page_top(&query, checkpoint);
        let mut rows: Vec<EventRow> = Vec::with_capacity(limit + 1);
        if top > 0 {
            let mut b = bucket(top);
            loop {
                let want = (limit + 1 - rows.len()) as i32;
                let page: Vec<EventRow> = self
                    .rows(
                        "history",
                        &self.st().event_page,
                        (room, b, cql_seq(top), want),
                    )
                    .await?;
                rows.extend(page.into_iter().filter(|r| r.kind.is_some()));
                if rows.len() > limit || b == 0 {
                    break;
                }
                b -= 1;
            }
        }
        self.page_of(room, rows, limit).await
    }

    /// A thread: its root (a message at or below the checkpoint) and a page of its replies.
    pub(super) async fn thread_page(
        &self,
        room: &str,
        root: u64,
        query: PageQuery,
    ) -> Result<ThreadPage> {
        let limit = query.clamped_limit();
        let checkpoint = self.checkpoint_row(room).await?.seq();
        let root_row = if root <= checkpoint {
            // A reply is no thread's root: threads are one level deep.
            (self.message_at(room, root).await?).filter(|row| row.thread.is_none())
        } else {
            None
        };
        let root_page = self
            .page_of(room, root_row.into_iter().collect(), 1)
            .await?;
        let top = page_top(&query, checkpoint);
        let mut rows = Vec::new();
        if top > 0 {
            let seqs: Vec<(i64,)> = self
                .rows(
                    "thread",
                    &self.st().reply_page,
                    (room, cql_seq(root), cql_seq(top), (limit + 1) as i32),
                )
                .await?;
            // The replies' rows, one read per bucket they fall in.
            let mut by_bucket: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
            for (seq,) in seqs {
                by_bucket
                    .entry(bucket(seq.max(0) as u64))
                    .or_default()
                    .push(seq);
            }
            for (b, seqs) in by_bucket {
                for chunk in seqs.chunks(MAX_IN) {
                    let found: Vec<EventRow> = self
                        .rows("thread", &self.st().event_in, (room, b, chunk.to_vec()))
                        .await?;
                    rows.extend(found.into_iter().filter(EventRow::is_message));
                }
            }
            rows.sort_by_key(|r| std::cmp::Reverse(r.seq));
        }
        Ok(ThreadPage {
            root: root_page.events.into_iter().next(),
            replies: self.page_of(room, rows, limit).await?,
        })
    }

    /// Renders rows (newest first, up to `limit + 1`) as a page.
    async fn page_of(&self, room: &str, rows: Vec<EventRow>, limit: usize) -> Result<Page> {
        let more = rows.len() > limit;
        let mut events: Vec<StoredEvent> = rows.iter().filter_map(EventRow::stored).collect();
        events.truncate(limit);
        self.decorate(room, &mut events).await?;
        Ok(Page {
            events: events.iter().map(StoredEvent::to_json).collect(),
            more,
        })
    }

    /// Adds reactions and reply counts to the messages of a page: one read of `annotated` per
    /// bucket the page covers, then one read per message that has reactions or replies.
    async fn decorate(&self, room: &str, events: &mut [StoredEvent]) -> Result<()> {
        let mut ranges: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
        for e in events.iter().filter(|e| e.kind == "message") {
            let range = ranges.entry(bucket(e.seq)).or_insert((e.seq, e.seq));
            range.0 = range.0.min(e.seq);
            range.1 = range.1.max(e.seq);
        }
        let mut marks: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
        for (b, (low, high)) in ranges {
            let rows: Vec<(i64, Option<bool>, Option<bool>)> = self
                .rows(
                    "read marks",
                    &self.st().mark_range,
                    (room, b, cql_seq(low), cql_seq(high)),
                )
                .await?;
            for (seq, reacted, threaded) in rows {
                marks.insert(
                    seq.max(0) as u64,
                    (reacted.unwrap_or(false), threaded.unwrap_or(false)),
                );
            }
        }
        let mut wanted = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let (reacted, threaded) = marks.get(&e.seq).copied().unwrap_or_default();
            if e.kind != "message" {
                continue;
            }
            if reacted && !e.deleted {
                wanted.push((i, true));
            }
            if threaded && e.thread.is_none() {
                wanted.push((i, false));
            }
        }
        let decorations: Vec<Decoration> = stream::iter(wanted)
            .map(|(i, reactions)| {
                let seq = events[i].seq;
                async move {
                    Ok::<_, StoreError>(if reactions {
                        Decoration::Reactions(i, self.reactions_of(room, seq).await?)
                    } else {
                        Decoration::Replies(i, self.replies_of(room, seq).await?)
                    })
                }
            })
            .buffered(READS_IN_FLIGHT)
            .try_collect()
            .await?;
        for decoration in decorations {
            match decoration {
                Decoration::Reactions(i, reactions) => events[i].reactions = reactions,
                Decoration::Replies(i, replies) => events[i].replies = replies,
            }
        }
        Ok(())
    }

    /// Per emoji (sorted), who reacted, in the order they did.
    async fn reactions_of(&self, room: &str, target: u64) -> Result<Vec<(String, Vec<String>)>> {
        let mut rows: Vec<(String, String, Option<i64>)> = self
            .all(
                "read reactions",
                &self.st().reaction_list,
                (room, cql_seq(target)),
            )
            .await?;
        rows.sort_by(|a, b| (&a.0, a.2, &a.1).cmp(&(&b.0, b.2, &b.1)));
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (emoji, user, _) in rows {
            match out.last_mut() {
                Some((e, users)) if *e == emoji => users.push(user),
                _ => out.push((emoji, vec![user])),
            }
        }
        Ok(out)
    }

    /// The thread `root` starts: how many replies are not deleted, and the last one.
    async fn replies_of(&self, room: &str, root: u64) -> Result<Option<(u64, u64)>> {
        let rows: Vec<(i64, Option<bool>)> = self
            .all("read replies", &self.st().reply_all, (room, cql_seq(root)))
            .await?;
        let live = rows.iter().filter(|(_, deleted)| !deleted.unwrap_or(false));
        let (count, last) = live.fold((0u64, 0i64), |(n, last), (seq, _)| (n + 1, last.max(*seq)));
        Ok((count > 0).then_some((count, last.max(0) as u64)))
    }

    /// The rooms `user` belongs to, by room id; unread counts leave out `blocked` authors.
    pub(super) async fn summaries(
        &self,
        user: &UserId,
        blocked: &HashSet<UserId>,
    ) -> Result<Vec<RoomSummary>> {
        let rooms: Vec<(String,)> = self
            .all("rooms of user", &self.st().user_room_list, (user.as_str(),))
            .await?;
        let summaries: Vec<Option<RoomSummary>> = stream::iter(rooms)
            .map(|(room,)| async move { self.summary(&room, user, blocked).await })
            .buffered(READS_IN_FLIGHT)
            .try_collect()
            .await?;
        let mut out: Vec<RoomSummary> = summaries.into_iter().flatten().collect();
        out.sort_by(|a, b| a.room.as_str().cmp(b.room.as_str()));
        Ok(out)
    }

    /// One room of a user's list; `None` if the user is not an active member or the room is
    /// not created (the user's-rooms row is only a pointer; `members` is the truth).
    async fn summary(
        &self,
        room: &str,
        user: &UserId,
        blocked: &HashSet<UserId>,
    ) -> Result<Option<RoomSummary>> {
        let st = self.st();
        let member =
            self.first::<MemberRow, _>("rooms of user", &st.member_get, (room, user.as_str()));
        let cursor =
            self.first::<(Option<i64>,), _>("rooms of user", &st.cursor_get, (room, user.as_str()));
        let (member, meta, checkpoint, cursor, read_only) = futures::try_join!(
            member,
            self.room_row(room),
            self.checkpoint_row(room),
            cursor,
            self.read_only(room),
        )?;
        let Some((joined_seq, Some(true))) = member else {
            return Ok(None);
        };
        let Some(meta) = meta else {
            return Ok(None);
        };
        let Ok(room_id) = RoomId::parse(room) else {
            return Ok(None);
        };
        let head = checkpoint.seq();
        let cursor = cursor.and_then(|(c,)| c).unwrap_or(0);
        // The writer stores a batch's cursors before its checkpoint: while one is under way, a
        // cursor may be past the checkpoint read here. Never show it past `head`.
        let last_read = (cursor.max(joined_seq.unwrap_or(0)).max(0) as u64).min(head);
        let unread = self
            .unread(room, user.as_str(), blocked, last_read, &checkpoint)
            .await?;
        Ok(Some(RoomSummary {
            room: room_id,
            kind: kind_of(meta.kind.as_deref().unwrap_or("group")),
            name: meta.name.unwrap_or_default(),
            head,
            last_read,
            unread,
            read_only,
        }))
    }

    /// Messages by others, not deleted, not by `blocked` authors, in `(last_read, head]`, `head`
    /// being the checkpoint's.
    ///
    /// In a room whose messages are numbered: the number of the newest message in the range
    /// less that of the oldest, plus one, less the deletes in it, so a few rows are read however
    /// much is unread (each lookup walks at most the range's buckets). A user's own messages
    /// need no subtracting: each moves its author's read cursor to it, so none is after the
    /// cursor. Messages by `blocked` authors, and every unread message of a room that is not
    /// numbered (projected before numbers existed, until rebuilt), are counted by reading the
    /// range ([`ScyllaStore::count_unread`]).
    async fn unread(
        &self,
        room: &str,
        user: &str,
        blocked: &HashSet<UserId>,
        last_read: u64,
        checkpoint: &CheckpointRow,
    ) -> Result<u64> {
        let head = checkpoint.seq();
        if head <= last_read {
            return Ok(0);
        }
        let blocked: HashSet<&str> = blocked.iter().map(UserId::as_str).collect();
        if self.numbered_mark(room, checkpoint).await?.is_none() {
            return self
                .count_unread(room, last_read, head, |author| match author {
                    Some(author) => author != user && !blocked.contains(author),
                    None => true,
                })
                .await;
        }
        let st = self.st();
        let range = (cql_seq(last_read), cql_seq(head));
        let (low, high) = (bucket(last_read + 1), bucket(head));
        // The first number `statement` finds, bucket by bucket in `buckets`' order.
        let first_number = |statement, buckets: Vec<i64>| async move {
            for b in buckets {
                let found: Option<(Option<i64>,)> = self
                    .first("unread", statement, (room, b, range.0, range.1))
                    .await?;
                if let Some((n,)) = found {
                    return Ok::<_, StoreError>(n);
                }
            }
            Ok(None)
        };
        let newest = first_number(&st.number_newest, (low..=high).rev().collect());
        let oldest = first_number(&st.number_oldest, (low..=high).collect());
        let deleted = async {
            let row: Option<(i64,)> = self
                .first("unread", &st.deleted_between, (room, range.0, range.1))
                .await?;
            Ok::<_, StoreError>(row.map_or(0, |(n,)| n))
        };
        let by_blocked = async {
            if blocked.is_empty() {
                return Ok(0);
            }
            self.count_unread(room, last_read, head, |author| {
                author.is_some_and(|a| blocked.contains(a))
            })
            .await
        };
        let (newest, oldest, deleted, by_blocked) =
            futures::try_join!(newest, oldest, deleted, by_blocked)?;
        let (Some(newest), Some(oldest)) = (newest, oldest) else {
            return Ok(0);
        };
        let count = (newest - oldest + 1) - deleted - by_blocked as i64;
        Ok(count.max(0) as u64)
    }

    /// Messages not deleted in `(last_read, head]` whose author `counts`: walks the buckets of
    /// that range, filtering inside each partition (see `statements::event_unread`; authors are
    /// compared here, as CQL has no `!=` or `NOT IN`).
    async fn count_unread(
        &self,
        room: &str,
        last_read: u64,
        head: u64,
        counts: impl Fn(Option<&str>) -> bool,
    ) -> Result<u64> {
        let mut count = 0;
        for b in bucket(last_read + 1)..=bucket(head) {
            let authors: Vec<(Option<String>,)> = self
                .all(
                    "unread",
                    &self.st().event_unread,
                    (room, b, cql_seq(last_read), cql_seq(head)),
                )
                .await?;
            count += authors
                .iter()
                .filter(|(author,)| counts(author.as_deref()))
                .count() as u64;
        }
        Ok(count)
    }

    /// The highest message sequence in `(after, up_to]`, at or below the checkpoint: walks the
    /// buckets of the range downward and stops at the first that holds one.
    pub(super) async fn last_message(
        &self,
        room: &str,
        after: u64,
        up_to: u64,
    ) -> Result<Option<u64>> {
        let up_to = up_to.min(self.checkpoint_row(room).await?.seq());
        if up_to <= after {
            return Ok(None);
        }
        let mut b = bucket(up_to);
        loop {
            let found: Option<(i64,)> = self
                .first(
                    "last message",
                    &self.st().event_last_message,
                    (room, b, cql_seq(after), cql_seq(up_to)),
                )
                .await?;
            if let Some((seq,)) = found {
                return Ok(Some(seq.max(0) as u64));
            }
            if b <= bucket(after + 1) {
                return Ok(None);
            }
            b -= 1;
        }
    }

    /// Every active member's read and delivered cursors: three single-partition reads of the
    /// room (members, read cursors, delivered cursors), joined here.
    pub(super) async fn cursors_of(&self, room: &str) -> Result<Vec<MemberCursors>> {
        let st = self.st();
        let (members, read, delivered) = futures::try_join!(
            self.all::<(String, Option<i64>, Option<bool>), _>(
                "member cursors",
                &st.member_list,
                (room,)
            ),
            self.all::<(String, Option<i64>), _>("member cursors", &st.cursor_list, (room,)),
            self.all::<(String, Option<i64>), _>("member cursors", &st.delivered_list, (room,)),
        )?;
        let read: HashMap<String, i64> = read
            .into_iter()
            .filter_map(|(m, c)| Some((m, c?)))
            .collect();
        let delivered: HashMap<String, i64> = delivered
            .into_iter()
            .filter_map(|(m, c)| Some((m, c?)))
            .collect();
        let mut out: Vec<MemberCursors> = members
            .into_iter()
            .filter(|(_, _, active)| *active == Some(true))
            .filter_map(|(member, joined_seq, _)| {
                let read_cursor = read
                    .get(&member)
                    .copied()
                    .unwrap_or(0)
                    .max(joined_seq.unwrap_or(0))
                    .max(0) as u64;
                let delivered_cursor = delivered.get(&member).copied().unwrap_or(0).max(0) as u64;
                Some(MemberCursors {
                    user: UserId::parse(member).ok()?,
                    read: read_cursor,
                    delivered: delivered_cursor.max(read_cursor),
                })
            })
            .collect();
        out.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(out)
    }

    /// The room's kind, creator and active members as of its checkpoint.
    pub(super) async fn state_of(&self, room: &RoomId) -> Result<Option<RoomState>> {
        let r = room.as_str();
        let Some(meta) = self.room_row(r).await? else {
            return Ok(None);
        };
        let head = self.checkpoint_row(r).await?.seq();
        let read_only = self.read_only(r).await?;
        let rows: Vec<(String, Option<i64>, Option<bool>)> =
            self.all("room state", &self.st().member_list, (r,)).await?;
        // Everyone who was ever a member (a direct room's pair is known from them).
        let ever: Vec<(UserId, u64, bool)> = rows
            .into_iter()
            .filter_map(|(user, seq, active)| {
                Some((
                    UserId::parse(user).ok()?,
                    seq.unwrap_or(0).max(0) as u64,
                    active == Some(true),
                ))
            })
            .collect();
        let kind = kind_of(meta.kind.as_deref().unwrap_or("group"));
        let creator =
            UserId::parse(meta.creator.unwrap_or_default()).map_err(|e| StoreError::Room {
                op: "room state",
                room: room.clone(),
                message: e.to_string(),
            })?;
        Ok(Some(RoomState::stored(
            kind,
            meta.name.unwrap_or_default(),
            creator,
            ever,
            head,
            read_only,
        )))
    }
}

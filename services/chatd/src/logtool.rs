//! `chatd log`: an operator's and an auditor's view of room logs, read from the streams
//! themselves (never from the store).
//!
//! - `export`: a room's events as JSON lines in sequence order, in the history form (the
//!   event as appended: edits are their own lines, nothing is applied). An entry that does not
//!   decode is a line `{"seq","undecodable","payload_hex"}`, never skipped. `--follow` goes on
//!   with each new event as it is stored, until interrupted: a replay of the room that does not
//!   stop at the head.
//! - `verify`: checks one room's log or every room's, and prints one JSON line per room; the
//!   exit status is 3 when any room has a problem (1 when the check itself failed). See [`verify_room`] for what is checked.

use std::collections::HashMap;
use std::io::Write;

use anyhow::Context;
use chat_log::{LogError, RawEntry, RoomLog};
use chat_model::{Event, EventBody, RoomId, RoomState, UserId};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One line of an export: the event in the history form, or what could not be decoded.
pub fn export_line(entry: &RawEntry) -> Value {
    match entry.decode() {
        Ok(event) => chat_store::render_entry(entry.seq, &event),
        Err(e) => json!({
            "seq": entry.seq,
            "undecodable": e.to_string(),
            "payload_hex": hex::encode(&entry.payload),
        }),
    }
}

/// Writes `room`'s events `from..=to` (`to` 0: up to the head) to `out`, one JSON line each;
/// with `follow`, then every event stored after them, until the process is stopped (or an
/// error). Returns the number of lines written.
pub async fn export(
    log: &RoomLog,
    room: &RoomId,
    from: u64,
    to: u64,
    follow: bool,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    if !log.room_exists(room).await? {
        anyhow::bail!("no room {room} in this deployment's log");
    }
    let bounds = log.bounds(room).await?;
    let to = if to == 0 { bounds.last } else { to };
    let mut written = 0;
    let mut last = from.saturating_sub(1);
    let mut reader = log.read_range(room, from.max(1), to).bulk();
    while let Some(entry) = reader.next().await {
        let entry = entry?;
        writeln!(out, "{}", export_line(&entry))?;
        last = entry.seq;
        written += 1;
    }
    out.flush()?;
    if follow {
        let mut live = log.subscribe_live(room, last.max(to)).await?;
        loop {
            let entry = live.next().await?;
            writeln!(out, "{}", export_line(&entry))?;
            out.flush()?;
        }
    }
    Ok(written)
}

/// What `verify` found in one room's log.
#[derive(Debug, Default)]
pub struct Verdict {
    pub first: u64,
    pub last: u64,
    pub events: u64,
    /// SHA-256 over every entry's seq (8 bytes, big endian) and payload length and bytes, in
    /// order: two copies of a log are the same log when their digests are equal.
    pub digest: String,
    /// Problems that make the log unfit as a record: each a short sentence with the seq.
    pub problems: Vec<String>,
    /// Events this build's rules would have refused: the log itself is intact, but no chatd
    /// of this version appended them (a foreign or faulty writer, or an older version's
    /// rules). They fail the verdict too: projections show some of them (a non-member's
    /// message, say) as any other event.
    pub refused_by_rules: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.refused_by_rules.is_empty()
    }

    pub fn to_json(&self, room: &RoomId) -> Value {
        json!({
            "room": room.as_str(),
            "ok": self.ok(),
            "first": self.first,
            "last": self.last,
            "events": self.events,
            "sha256": self.digest,
            "problems": self.problems,
            "refused_by_rules": self.refused_by_rules,
        })
    }
}

/// Checks `room`'s log:
/// - its stream is configured as this build configures room streams where it matters for
///   the record: its subject, deletes and purges denied, no limit that would drop events;
/// - its sequences are contiguous from 1 to the head (the log is gap-free); a first sequence
///   above 1 is reported (the stream was truncated);
/// - every entry decodes, the first is `room_created`, and no event id appears twice;
/// - every event is one the room's rules allow at its place (authors are members, edits by
///   their author, deletes by the author or the admin, targets are messages, posts in a
///   read-only room by the admin): refusals are listed apart (the record is intact, its
///   writer is suspect), and fail the verdict as problems do.
pub async fn verify_room(log: &RoomLog, room: &RoomId) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict::default();
    check_stream_config(log, room, &mut verdict).await?;
    let bounds = log.bounds(room).await?;
    (verdict.first, verdict.last) = (bounds.first, bounds.last);
    if bounds.last > 0 && bounds.first > 1 {
        verdict.problems.push(format!(
            "truncated: the log starts at {} (events 1..{} are gone)",
            bounds.first,
            bounds.first - 1
        ));
    }
    let mut hash = Sha256::new();
    let mut rules = Rules::default();
    let mut ids: HashMap<uuid::Uuid, u64> = HashMap::new();
    let mut expected = bounds.first.max(1);
    let mut reader = log.read_range(room, 1, bounds.last).bulk();
    while let Some(entry) = reader.next().await {
        let entry = entry.map_err(|e: LogError| anyhow::anyhow!(e))?;
        if entry.seq != expected {
            verdict.problems.push(format!(
                "gap: {}..{} missing",
                expected,
                entry.seq.saturating_sub(1)
            ));
        }
        expected = entry.seq + 1;
        verdict.events += 1;
        hash.update(entry.seq.to_be_bytes());
        hash.update((entry.payload.len() as u64).to_be_bytes());
        hash.update(&entry.payload);
        let event = match entry.decode() {
            Ok(event) => event,
            Err(e) => {
                verdict
                    .problems
                    .push(format!("{}: does not decode ({e})", entry.seq));
                continue;
            }
        };
        if let Some(earlier) = ids.insert(event.id, entry.seq) {
            verdict.problems.push(format!(
                "{}: event id {} was already used at {earlier}",
                entry.seq, event.id
            ));
        }
        match rules.apply(entry.seq, &event) {
            Check::Fine => {}
            Check::Problem(p) => verdict.problems.push(format!("{}: {p}", entry.seq)),
            Check::Refused(r) => verdict.refused_by_rules.push(format!("{}: {r}", entry.seq)),
        }
    }
    if bounds.last > 0 && expected != bounds.last + 1 {
        verdict.problems.push(format!(
            "the stream reports {} as its last event, the read ended at {}",
            bounds.last,
            expected - 1
        ));
    }
    verdict.digest = hex::encode(hash.finalize());
    Ok(verdict)
}

async fn check_stream_config(
    log: &RoomLog,
    room: &RoomId,
    verdict: &mut Verdict,
) -> anyhow::Result<()> {
    let wanted = log.stream_config(room);
    let js = async_nats::jetstream::new(log.client().clone());
    let mut stream = js
        .get_stream(&wanted.name)
        .await
        .with_context(|| format!("the stream of {room} ({})", wanted.name))?;
    let have = stream.info().await?.config.clone();
    let mut differs = |what: &str, ok: bool| {
        if !ok {
            verdict
                .problems
                .push(format!("stream {}: {what}", wanted.name));
        }
    };
    // A stream made before changes had their own subject has the first alone until its room's
    // next change adds the second (`RoomLog::last_change`).
    differs(
        &format!(
            "subjects {:?}, expected {:?}",
            have.subjects, wanted.subjects
        ),
        have.subjects == wanted.subjects || have.subjects[..] == wanted.subjects[..1],
    );
    differs("deletes are allowed", have.deny_delete);
    differs("purges are allowed", have.deny_purge);
    differs(
        &format!("max_age {:?} drops old events", have.max_age),
        have.max_age.is_zero(),
    );
    differs(
        &format!("max_messages {} drops events", have.max_messages),
        have.max_messages <= 0,
    );
    differs(
        &format!("max_bytes {} drops events", have.max_bytes),
        have.max_bytes <= 0,
    );
    differs(
        &format!(
            "max_messages_per_subject {} drops events",
            have.max_messages_per_subject
        ),
        have.max_messages_per_subject <= 0,
    );
    Ok(())
}

enum Check {
    Fine,
    Problem(String),
    Refused(String),
}

/// The room's state and its messages' authors, folded event by event.
#[derive(Default)]
struct Rules {
    state: Option<RoomState>,
    /// Message seq → author.
    authors: HashMap<u64, UserId>,
}

impl Rules {
    fn apply(&mut self, seq: u64, event: &Event) -> Check {
        let Some(state) = &mut self.state else {
            return match RoomState::created(seq, event) {
                Some(state) => {
                    self.state = Some(state);
                    Check::Fine
                }
                None => Check::Problem(format!(
                    "the first event is {}, not room_created",
                    event.body.kind()
                )),
            };
        };
        let actor = &event.user;
        let target_author = |target: &u64| self.authors.get(target);
        let refused = match &event.body {
            EventBody::RoomCreated { .. } => Some("a second room_created".to_owned()),
            EventBody::Message {
                thread, reply_to, ..
            } => state
                .decide_post(actor)
                .err()
                .map(|r| r.to_string())
                .or_else(|| {
                    thread
                        .iter()
                        .chain(reply_to.iter())
                        .find(|t| target_author(t).is_none())
                        .map(|t| format!("refers to {t}, which is not a message"))
                }),
            EventBody::Edit { target, .. } => match target_author(target) {
                None => Some(format!("edits {target}, which is not a message")),
                Some(author) => state
                    .decide_edit(actor, author)
                    .err()
                    .map(|r| r.to_string()),
            },
            EventBody::Delete { target } => match target_author(target) {
                None => Some(format!("deletes {target}, which is not a message")),
                Some(author) => state
                    .decide_delete(actor, author)
                    .err()
                    .map(|r| r.to_string()),
            },
            EventBody::Reaction { target, .. } => match target_author(target) {
                None => Some(format!("reacts to {target}, which is not a message")),
                Some(_) => state.decide_post(actor).err().map(|r| r.to_string()),
            },
            EventBody::Read { up_to } if *up_to >= seq => {
                Some(format!("reads up to {up_to}, past its own place"))
            }
            EventBody::Read { .. } => (!state.is_member(actor)).then(|| "not a member".to_owned()),
            EventBody::Delivered { cursors } => cursors
                .iter()
                .find(|(_, up_to)| *up_to >= seq)
                .map(|(user, up_to)| format!("{user}'s cursor {up_to} is past its own place")),
            EventBody::MemberJoined { member } => state
                .decide_invite(actor, member)
                .err()
                .map(|r| r.to_string()),
            EventBody::MemberLeft { member } => state
                .decide_remove(actor, member)
                .err()
                .map(|r| r.to_string()),
            EventBody::RoomUpdated { read_only } => state
                .decide_update(actor, *read_only)
                .err()
                .map(|r| r.to_string()),
        };
        if let EventBody::Message { .. } = &event.body {
            self.authors.insert(seq, actor.clone());
        }
        state.apply(seq, event);
        match refused {
            Some(r) => Check::Refused(format!("{} by {actor}: {r}", event.body.kind())),
            None => Check::Fine,
        }
    }
}

//! The user log: per-user state that is not a room's, today the block lists.
//!
//! | what | name (prefix `chat`) |
//! |---|---|
//! | stream | `CHAT_USERS` (metadata `chat.log = users`) |
//! | subject of one user | `chat.user.<32 hex of sha256(user id)>` |
//! | republished, headers only (a change notice) | `chat.blocks.<same 32 hex>` |
//!
//! One stream for every user rather than one per user: a user is not an ordering domain that
//! needs its own sequence, and tens of thousands of streams are what a server holds at most
//! (docs/architecture.md, limits). Per-subject operations give each user what a stream would:
//! the last entry of a subject by direct get (O(1), whatever the stream's size), and appends
//! conditional on the subject's last sequence (`Nats-Expected-Last-Subject-Sequence`), which
//! turns "read the list, change it, write it" into a compare-and-set.
//!
//! The stream is set up like a room's: file storage, configured replicas, no limits (the changes
//! are the audit trail), deletes and purges denied, direct gets allowed, the duplicate window.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::{HeaderMap, Subscriber};
use chat_model::{BlockEvent, UserId};

use crate::config::LOG_METADATA_KEY;
use crate::RoomLog;

/// The metadata value that marks the user stream as this project's.
const USERS_METADATA_VALUE: &str = "users";

/// A user-log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UserLogError {
    /// NATS or JetStream cannot serve the request now. For an append the outcome is unknown:
    /// read the list again before deciding anew.
    #[error("user log: {op}: nats unavailable: {reason}")]
    Unavailable { op: &'static str, reason: String },
    /// No answer in time; for an append the outcome is unknown, as for `Unavailable`.
    #[error("user log: {op} timed out")]
    Timeout { op: &'static str },
    /// The user's subject holds a later entry than the change was decided on.
    #[error("user log: the block list of {user} changed since it was read (expected last entry {expected})")]
    WrongLastSequence { user: UserId, expected: u64 },
    /// The event could not be encoded (or is larger than the stream accepts).
    #[error("user log: {0}")]
    Encode(#[from] chat_model::EncodeError),
    /// The last entry of a user's subject is not a block event of that user: written by
    /// something else, or by a newer build. Never silently read as an empty list.
    #[error("user log: entry {seq} for {user}: {reason}")]
    Corrupt {
        user: UserId,
        seq: u64,
        reason: String,
    },
    /// A stream of the user stream's name exists but is not this project's.
    #[error("user log: stream {stream} is not this deployment's user stream")]
    StreamConflict { stream: String },
    /// Any other refusal from JetStream.
    #[error("user log: {op}: {reason}")]
    JetStream { op: &'static str, reason: String },
}

impl UserLogError {
    /// Whether retrying later may succeed (NATS trouble, not a refusal).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            UserLogError::Unavailable { .. } | UserLogError::Timeout { .. }
        )
    }
}

/// The last entry of a user's subject: their current block list and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlocksEntry {
    /// The entry's sequence in the user stream: the compare-and-set token of the next change.
    pub seq: u64,
    pub event: BlockEvent,
}

/// Handle to the user log; shares the room log's NATS connection. Cheap to clone.
#[derive(Clone)]
pub struct UserLog {
    log: RoomLog,
    /// Set once the stream is known to exist, so it is checked once per handle, not per call.
    ensured: std::sync::Arc<AtomicBool>,
}

impl UserLog {
    pub fn new(log: &RoomLog) -> UserLog {
        UserLog {
            log: log.clone(),
            ensured: std::sync::Arc::new(AtomicBool::new(false)),
        }
    }

    /// The user stream's settings (see the module docs).
    pub fn stream_config(&self) -> stream::Config {
        let cfg = self.log.config();
        stream::Config {
            name: cfg.users_stream_name(),
            description: Some("chat users: block lists".to_owned()),
            subjects: vec![cfg.user_wildcard()],
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            duplicate_window: cfg.duplicate_window,
            max_message_size: i32::try_from(cfg.max_event_bytes).unwrap_or(i32::MAX),
            deny_delete: true,
            deny_purge: true,
            allow_direct: true,
            republish: Some(stream::Republish {
                source: cfg.user_wildcard(),
                destination: format!("{}.blocks.{{{{wildcard(1)}}}}", cfg.prefix),
                headers_only: true,
            }),
            metadata: HashMap::from([(
                LOG_METADATA_KEY.to_owned(),
                USERS_METADATA_VALUE.to_owned(),
            )]),
            ..Default::default()
        }
    }

    /// Makes sure the user stream exists and is this project's. An existing stream's settings
    /// (an operator's) are left alone.
    pub async fn ensure(&self) -> Result<(), UserLogError> {
        if self.ensured.load(Ordering::Relaxed) {
            return Ok(());
        }
        let config = self.stream_config();
        let name = config.name.clone();
        let deadline = tokio::time::Instant::now() + self.log.config().request_timeout;
        let mut pause = std::time::Duration::from_millis(5);
        let mut info = loop {
            match self.log.jetstream().create_stream(config.clone()).await {
                Ok(stream) => break stream.cached_info().clone(),
                Err(e) if e.kind() == jetstream::context::CreateStreamErrorKind::TimedOut => {
                    return Err(UserLogError::Timeout {
                        op: "create stream",
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "create user stream refused; reading its info");
                    match self.stream_info(&name).await {
                        Ok(info) => break info,
                        // Created concurrently by another process, and not visible yet on
                        // every server of a cluster: try again until the deadline.
                        Err(_) if tokio::time::Instant::now() < deadline => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(std::time::Duration::from_millis(100));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        let owner = info.config.metadata.get(LOG_METADATA_KEY);
        if owner.map(String::as_str) != Some(USERS_METADATA_VALUE) {
            return Err(UserLogError::StreamConflict { stream: name });
        }
        // A replicated stream serves reads and appends once its Raft group has a leader.
        let mut pause = std::time::Duration::from_millis(5);
        let has_leader = |info: &stream::Info| {
            let leader = info.cluster.as_ref().and_then(|c| c.leader.as_ref());
            leader.is_some_and(|l| !l.is_empty())
        };
        while info.config.num_replicas > 1 && !has_leader(&info) {
            if tokio::time::Instant::now() >= deadline {
                return Err(UserLogError::Unavailable {
                    op: "create stream",
                    reason: "the user stream has no leader yet".to_owned(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
            info = self.stream_info(&name).await?;
        }
        self.ensured.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn stream_info(&self, name: &str) -> Result<stream::Info, UserLogError> {
        let unavailable = |e: &dyn std::fmt::Display| UserLogError::Unavailable {
            op: "stream info",
            reason: e.to_string(),
        };
        let mut stream = self
            .log
            .jetstream()
            .get_stream(name)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(stream.info().await.map_err(|e| unavailable(&e))?.clone())
    }

    /// Whether the user stream exists (any settings).
    async fn exists(&self) -> Result<bool, UserLogError> {
        let name = self.log.config().users_stream_name();
        match self.log.jetstream().get_stream(&name).await {
            Ok(_) => Ok(true),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(false)
                }
                _ => Err(UserLogError::Unavailable {
                    op: "stream info",
                    reason: e.to_string(),
                }),
            },
        }
    }

    /// After a failure, the stream is checked again on the next call (an operator may have
    /// removed it, or it may be moving).
    fn recheck<T>(&self, result: Result<T, UserLogError>) -> Result<T, UserLogError> {
        if let Err(e) = &result {
            if !matches!(e, UserLogError::WrongLastSequence { .. }) {
                self.ensured.store(false, Ordering::Relaxed);
            }
        }
        result
    }

    async fn stream(&self, op: &'static str) -> Result<stream::Stream<()>, UserLogError> {
        self.ensure().await?;
        self.log
            .jetstream()
            .get_stream_no_info(self.log.config().users_stream_name())
            .await
            .map_err(|e| UserLogError::JetStream {
                op,
                reason: e.to_string(),
            })
    }

    /// The user's current block list entry (`None`: never changed, an empty list).
    ///
    /// `fresh: false` reads with a direct get, which any replica answers (cheap, but on a
    /// clustered stream possibly a moment behind); `fresh: true` asks the stream leader, as a
    /// change about to be decided on it must.
    pub async fn last_blocks(
        &self,
        user: &UserId,
        fresh: bool,
    ) -> Result<Option<BlocksEntry>, UserLogError> {
        let result = self.read_last(user, fresh).await;
        self.recheck(result)
    }

    async fn read_last(
        &self,
        user: &UserId,
        fresh: bool,
    ) -> Result<Option<BlocksEntry>, UserLogError> {
        // Reading never creates the stream: it exists once anyone has changed a list, so its
        // absence means every list is empty. (Creating it here made every read wait, then fail,
        // while a cluster could not place a new replicated stream, e.g. with a server down.)
        if !self.ensured.load(Ordering::Relaxed) && !self.exists().await? {
            return Ok(None);
        }
        let stream = self.stream("read block list").await?;
        let subject = self.log.config().user_subject(user);
        let message = if fresh {
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => message,
                Err(e) => {
                    return match e.kind() {
                        stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
                        _ => Err(UserLogError::Unavailable {
                            op: "read block list",
                            reason: e.to_string(),
                        }),
                    }
                }
            }
        } else {
            match stream.direct_get_last_for_subject(subject).await {
                Ok(message) => message,
                Err(e) => {
                    return match e.kind() {
                        stream::DirectGetErrorKind::NotFound => Ok(None),
                        stream::DirectGetErrorKind::TimedOut => Err(UserLogError::Timeout {
                            op: "read block list",
                        }),
                        _ => Err(UserLogError::Unavailable {
                            op: "read block list",
                            reason: e.to_string(),
                        }),
                    }
                }
            }
        };
        let corrupt = |reason: String| UserLogError::Corrupt {
            user: user.clone(),
            seq: message.sequence,
            reason,
        };
        let event = BlockEvent::decode(&message.payload).map_err(|e| corrupt(e.to_string()))?;
        // The subject is a digest; the payload says whose list it is. A mismatch would be a
        // digest collision or a foreign writer: refuse it rather than apply someone else's.
        if &event.user != user {
            return Err(corrupt(format!("the entry is {}'s list", event.user)));
        }
        Ok(Some(BlocksEntry {
            seq: message.sequence,
            event,
        }))
    }

    /// Appends a change of `event.user`'s list if the subject's last entry is still
    /// `expected_last` (0: the user has none yet). Returns the new entry's sequence.
    pub async fn append_blocks(
        &self,
        event: &BlockEvent,
        expected_last: u64,
    ) -> Result<u64, UserLogError> {
        let result = self.append(event, expected_last).await;
        self.recheck(result)
    }

    async fn append(&self, event: &BlockEvent, expected_last: u64) -> Result<u64, UserLogError> {
        self.ensure().await?;
        let payload = event.encode()?;
        let max = self.log.config().max_event_bytes;
        if payload.len() > max {
            return Err(UserLogError::Encode(chat_model::EncodeError::TooLarge {
                kind: event.change.kind(),
                size: payload.len(),
                max,
            }));
        }
        let mut headers = HeaderMap::new();
        let mut id = uuid::Uuid::encode_buffer();
        headers.insert(
            NATS_MESSAGE_ID,
            &*event.id.hyphenated().encode_lower(&mut id),
        );
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected_last.to_string().as_str(),
        );
        let subject = self.log.config().user_subject(&event.user);
        let published = self
            .log
            .jetstream()
            .publish_with_headers(subject, headers, payload.into())
            .await;
        let ack = match published {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match ack {
            // A duplicate (a retried id) is the original's outcome: its sequence.
            Ok(ack) if ack.sequence != 0 => Ok(ack.sequence),
            Ok(_) => Err(UserLogError::Unavailable {
                op: "append block change",
                reason: "duplicate acknowledged without its original sequence".to_owned(),
            }),
            Err(e) => Err(match e.kind() {
                PublishErrorKind::WrongLastSequence => UserLogError::WrongLastSequence {
                    user: event.user.clone(),
                    expected: expected_last,
                },
                PublishErrorKind::TimedOut => UserLogError::Timeout {
                    op: "append block change",
                },
                _ => UserLogError::Unavailable {
                    op: "append block change",
                    reason: e.to_string(),
                },
            }),
        }
    }

    /// A core subscription to every change notice (`<prefix>.blocks.*`); each message's last
    /// subject token is the changed user's key ([`UserLog::key_of_notice`]).
    pub async fn subscribe_notices(&self) -> Result<Subscriber, UserLogError> {
        self.log
            .client()
            .subscribe(self.log.config().blocks_notice_wildcard())
            .await
            .map_err(|e| UserLogError::Unavailable {
                op: "subscribe to block notices",
                reason: e.to_string(),
            })
    }

    /// The user key a notice's subject names.
    pub fn key_of_notice(subject: &str) -> Option<&str> {
        subject.rsplit_once('.').map(|(_, key)| key)
    }

    /// Events of the shared NATS connection: notices may have been lost across a reconnect or
    /// a slow-consumer notice.
    pub fn connection_events(&self) -> crate::ConnectionEvents {
        self.log.connection_events()
    }

    /// The key under which `user` appears in subjects and notices.
    pub fn key(&self, user: &UserId) -> String {
        self.log.config().user_key(user)
    }
}

//! Reading a range of a room's log in order.

use async_nats::jetstream;
use chat_model::RoomId;
use futures::{FutureExt, StreamExt};

use crate::error::LogError;
use crate::log::{RawEntry, RoomLog};
use crate::wire::{WireError, WireReader, WireTarget};

/// A range this short is read with one direct get per event; longer ones with a consumer
/// (creating a consumer costs more than a few single reads). See decision 0001.
const DIRECT_GET_MAX: u64 = 8;

/// The fewest messages a consumer is asked for at a time. It starts at the log's `read_batch`
/// (500, as the client library's ordered consumer), or 8 times that for a bulk read: a long read
/// otherwise waits on its own pull requests, and 4,000 reads a long range 20–30% faster on a
/// 2-core machine; fewer when the range is shorter. A delivery lost on the way (the
/// connection's subscription buffer was full) halves it for the next consumer, down to this.
const PULL_BATCH_MIN: u64 = 64;

/// Bytes a consumer is asked for at a time, at most: with the next request sent at half, what
/// one reader holds unread stays under about 1.5 times this.
const PULL_MAX_BYTES: usize = 2 << 20;

/// The shortest bulk read done on a connection of its own (see [`crate::wire`]); a shorter one is
/// not worth a connection.
const WIRE_MIN: u64 = 1_000;

enum RangeSource {
    /// Not started yet.
    Idle,
    /// One direct get per sequence.
    Direct,
    /// An ephemeral, unacknowledged pull consumer starting at `next`, read in order the way the
    /// client library's ordered consumer is: a delivery that does not follow the previous one
    /// (a message lost between the server and this reader) starts a fresh consumer at `next`.
    Pull {
        messages: Box<jetstream::consumer::pull::Stream>,
        /// The consumer sequence of the last delivery.
        delivered: u64,
        consumer: Ephemeral,
    },
    /// The same consumer's deliveries read on a connection of its own (bulk reads).
    Wire {
        reader: Box<WireReader>,
        /// The consumer sequence of the last delivery.
        delivered: u64,
        _consumer: Ephemeral,
    },
}

/// An ephemeral consumer of a range read, deleted when the read is done with it. The server
/// would drop it 30 s after its last pull anyway, but a reconnect storm (thousands of sessions
/// each catching up) would leave thousands of them behind for that long.
struct Ephemeral {
    js: jetstream::Context,
    stream: String,
    name: String,
}

impl Ephemeral {
    fn of(log: &RoomLog, room: &RoomId, consumer: &jetstream::consumer::PullConsumer) -> Ephemeral {
        Ephemeral {
            js: log.jetstream().clone(),
            stream: log.config().stream_name(room),
            name: consumer.cached_info().name.clone(),
        }
    }

    /// Whether the consumer has nothing left to deliver: it holds no message it has not
    /// delivered, and delivered no more than the `received` (a consumer sequence) that reached
    /// the reader. (Deliveries that never arrived are not that: the reader starts over for
    /// them.) False when the server cannot say.
    async fn exhausted(&self, received: u64) -> bool {
        let info = match self.js.get_stream_no_info(&self.stream).await {
            Ok(stream) => stream.consumer_info(&self.name).await,
            Err(e) => {
                tracing::debug!(stream = self.stream, error = %e, "range read: stream not found");
                return false;
            }
        };
        match info {
            Ok(info) => info.num_pending == 0 && info.delivered.consumer_sequence <= received,
            Err(e) => {
                tracing::debug!(stream = self.stream, consumer = self.name, error = %e, "range read: consumer info failed");
                false
            }
        }
    }
}

impl Drop for Ephemeral {
    fn drop(&mut self) {
        // Without a runtime (the process is ending) the server's inactivity timer removes it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (js, stream, name) = (
            self.js.clone(),
            std::mem::take(&mut self.stream),
            std::mem::take(&mut self.name),
        );
        runtime.spawn(async move {
            if let Err(e) = js.delete_consumer_from_stream(&name, &stream).await {
                tracing::debug!(stream, consumer = name, error = %e, "range read's consumer not deleted; it expires by itself");
            }
        });
    }
}

/// Reads a range of a room's log in order. Cancel-safe: dropping a pending `next` loses nothing.
pub struct RangeReader {
    log: RoomLog,
    room: RoomId,
    /// Next sequence to hand out.
    next: u64,
    /// Last sequence of the range (inclusive).
    to: u64,
    /// Whether `to` still has to be clamped to the head.
    clamp: bool,
    /// Messages per pull request.
    batch: u64,
    /// Whether this is a bulk read that may use a connection of its own (until that fails).
    wire: bool,
    /// Whether a short range may be read by direct gets (until one finds nothing).
    direct: bool,
    source: RangeSource,
}

impl RangeReader {
    pub(crate) fn new(log: RoomLog, room: RoomId, from: u64, to: u64, clamp: bool) -> RangeReader {
        RangeReader {
            batch: log.config().read_batch,
            log,
            room,
            next: from.max(1),
            to,
            clamp,
            wire: false,
            direct: true,
            source: RangeSource::Idle,
        }
    }

    /// Asks for [`crate::config::BULK_READ_FACTOR`] times the log's `read_batch` at a time: for
    /// readers that go through a long range as fast as they can (a projector catching up, a
    /// rebuild, an export) and can afford the memory.
    pub fn bulk(mut self) -> RangeReader {
        self.batch = (self.log.config().read_batch).saturating_mul(crate::config::BULK_READ_FACTOR);
        self.wire = true;
        self
    }

    /// The last sequence this reader will return (after clamping, once started).
    pub fn end(&self) -> u64 {
        self.to
    }

    /// The next entry, or `None` when the range is exhausted.
    pub async fn next(&mut self) -> Option<Result<RawEntry, LogError>> {
        loop {
            if self.next > self.to {
                return None;
            }
            match &mut self.source {
                RangeSource::Idle => {
                    if self.clamp {
                        match self.log.bounds(&self.room).await {
                            Ok(b) => {
                                self.to = self.to.min(b.last);
                                self.next = self.next.max(b.first);
                            }
                            Err(e) => return Some(Err(e)),
                        }
                        self.clamp = false;
                        continue;
                    }
                    let remaining = self.to - self.next;
                    let wire = self
                        .log
                        .wire_target()
                        .filter(|_| self.wire && remaining >= WIRE_MIN);
                    if self.direct && remaining < DIRECT_GET_MAX {
                        self.source = RangeSource::Direct;
                    } else if let Some(target) = wire {
                        match self.open_wire(&target, remaining + 1).await {
                            Ok((reader, consumer)) => {
                                self.log.count_wire_read();
                                self.source = RangeSource::Wire {
                                    reader: Box::new(reader),
                                    delivered: 0,
                                    _consumer: consumer,
                                };
                            }
                            Err(Some(e)) => return Some(Err(e)),
                            // Read through the client library instead.
                            Err(None) => self.wire = false,
                        }
                    } else {
                        let batch = remaining.saturating_add(1).min(self.batch) as usize;
                        match pull_consumer(&self.log, &self.room, self.next, batch).await {
                            Ok((messages, consumer)) => {
                                self.source = RangeSource::Pull {
                                    messages: Box::new(messages),
                                    delivered: 0,
                                    consumer,
                                }
                            }
                            Err(e) => return Some(Err(e)),
                        }
                    }
                }
                RangeSource::Direct => {
                    let seq = self.next;
                    match self.log.get(&self.room, seq).await {
                        Ok(Some(entry)) => {
                            self.next = seq + 1;
                            return Some(Ok(entry));
                        }
                        // Not there: removed by retention, or not on the replica that answered
                        // yet (any replica answers a direct get, and one may lag the leader by
                        // a moment). Skipping it would lose an event: the rest is read through
                        // a consumer, which delivers in order what the stream holds.
                        Ok(None) => {
                            self.direct = false;
                            self.source = RangeSource::Idle;
                        }
                        Err(e) => return Some(Err(e)),
                    }
                }
                RangeSource::Wire {
                    reader, delivered, ..
                } => match reader.next().await {
                    Ok(delivery) => {
                        if delivery.consumer_seq != *delivered + 1 {
                            // Cannot happen on a connection of its own; if it does, read the
                            // rest through the client library.
                            tracing::debug!(room = %self.room, expected = *delivered + 1, got = delivery.consumer_seq, "bulk read out of order; reading on");
                            self.wire = false;
                            self.source = RangeSource::Idle;
                            continue;
                        }
                        *delivered = delivery.consumer_seq;
                        match self.hand_out(delivery.stream_seq, delivery.payload) {
                            Some(out) => return out,
                            None => continue,
                        }
                    }
                    Err(e) => {
                        tracing::debug!(room = %self.room, next = self.next, error = %e, "bulk read failed; reading on through the client library");
                        self.wire = false;
                        self.source = RangeSource::Idle;
                    }
                },
                RangeSource::Pull {
                    messages,
                    delivered,
                    consumer,
                } => match match messages.next().now_or_never() {
                    // Delivered already (the usual case in a batch): no deadline to compute.
                    Some(next) => Ok(next),
                    None => {
                        tokio::time::timeout(self.log.config().request_timeout, messages.next())
                            .await
                    }
                } {
                    Err(_) => {
                        // A silence this long: the last messages were lost on the way (no
                        // later delivery reveals that), or the range's end is not there (the
                        // stream's last messages were deleted: `to`, clamped to the last
                        // sequence the stream reports, no longer exists). The consumer tells.
                        if consumer.exhausted(*delivered).await {
                            self.next = self.to.saturating_add(1);
                            self.source = RangeSource::Idle;
                            return None;
                        }
                        tracing::debug!(room = %self.room, next = self.next, "range read stalled; new consumer");
                        self.batch = (self.batch / 2).max(PULL_BATCH_MIN);
                        self.source = RangeSource::Idle;
                    }
                    Ok(next) => match next {
                        Some(Ok(msg)) => {
                            let (seq, consumer_seq) = match msg.info() {
                                Ok(info) => (info.stream_sequence, info.consumer_sequence),
                                Err(e) => {
                                    return Some(Err(LogError::JetStream {
                                        room: self.room.clone(),
                                        op: "read range",
                                        reason: format!("message without stream info: {e}"),
                                    }))
                                }
                            };
                            if consumer_seq != *delivered + 1 {
                                // A delivery went missing: start over from `next`, asking for less.
                                tracing::debug!(room = %self.room, expected = *delivered + 1, got = consumer_seq, "range read lost a delivery; new consumer");
                                self.batch = (self.batch / 2).max(PULL_BATCH_MIN);
                                self.source = RangeSource::Idle;
                                continue;
                            }
                            *delivered = consumer_seq;
                            match self.hand_out(seq, msg.message.payload) {
                                Some(out) => return out,
                                None => continue,
                            }
                        }
                        Some(Err(e)) => {
                            // Start over from where we are with a fresh consumer next time.
                            self.source = RangeSource::Idle;
                            return Some(Err(LogError::Unavailable {
                                room: self.room.clone(),
                                op: "read range",
                                reason: e.to_string(),
                            }));
                        }
                        None => {
                            self.source = RangeSource::Idle;
                            return Some(Err(LogError::Unavailable {
                                room: self.room.clone(),
                                op: "read range",
                                reason: "consumer ended".to_owned(),
                            }));
                        }
                    },
                },
            }
        }
    }

    /// What the delivery at `seq`, in consumer order, gives the caller: `None` to read on (it
    /// was handed out already), `Some(None)` at the range's end, else the entry.
    #[allow(clippy::option_option)]
    fn hand_out(
        &mut self,
        seq: u64,
        payload: bytes::Bytes,
    ) -> Option<Option<Result<RawEntry, LogError>>> {
        if seq < self.next {
            return None;
        }
        if seq > self.to {
            self.next = seq;
            self.source = RangeSource::Idle;
            return Some(None);
        }
        self.next = seq + 1;
        Some(Some(Ok(RawEntry { seq, payload })))
    }

    /// A consumer from `next`, read on a connection of its own. `Err(None)`: that is not
    /// possible (read through the client library instead); `Err(Some(_))`: the consumer could
    /// not be created.
    async fn open_wire(
        &self,
        target: &WireTarget,
        wanted: u64,
    ) -> Result<(WireReader, Ephemeral), Option<LogError>> {
        let consumer = create_consumer(&self.log, &self.room, self.next)
            .await
            .map_err(Some)?;
        let ephemeral = Ephemeral::of(&self.log, &self.room, &consumer);
        let name = consumer.cached_info().name.clone();
        let stream = self.log.config().stream_name(&self.room);
        match WireReader::open(
            target,
            &stream,
            &name,
            wanted,
            self.batch,
            PULL_MAX_BYTES,
            self.log.config().request_timeout,
        )
        .await
        {
            Ok(reader) => Ok((reader, ephemeral)),
            Err(WireError::Unsupported(reason)) => {
                self.log.disable_wire_reads(&reason);
                Err(None)
            }
            Err(e) => {
                tracing::debug!(room = %self.room, error = %e, "bulk read connection failed; reading through the client library");
                Err(None)
            }
        }
    }

    /// Reads the whole range into memory (tests and small ranges).
    pub async fn collect(mut self) -> Result<Vec<RawEntry>, LogError> {
        let mut out = Vec::new();
        while let Some(entry) = self.next().await {
            out.push(entry?);
        }
        Ok(out)
    }
}

fn unavailable(room: &RoomId, e: &dyn std::fmt::Display) -> LogError {
    LogError::Unavailable {
        room: room.clone(),
        op: "read range",
        reason: e.to_string(),
    }
}

/// An ephemeral pull consumer of the room's stream starting at `start`, asking for `batch`
/// messages at a time.
async fn pull_consumer(
    log: &RoomLog,
    room: &RoomId,
    start: u64,
    batch: usize,
) -> Result<(jetstream::consumer::pull::Stream, Ephemeral), LogError> {
    let consumer = create_consumer(log, room, start).await?;
    let ephemeral = Ephemeral::of(log, room, &consumer);
    let messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .max_bytes_per_batch(PULL_MAX_BYTES)
        .messages()
        .await
        .map_err(|e| unavailable(room, &e))?;
    Ok((messages, ephemeral))
}

/// An ephemeral pull consumer of the room's stream starting at `start`.
async fn create_consumer(
    log: &RoomLog,
    room: &RoomId,
    start: u64,
) -> Result<jetstream::consumer::PullConsumer, LogError> {
    let unavailable = |e: &dyn std::fmt::Display| unavailable(room, e);
    let stream = log
        .jetstream()
        .get_stream_no_info(log.config().stream_name(room))
        .await
        .map_err(|e| unavailable(&e))?;
    // What the client library's ordered consumer asks for: one replica in memory, no acks, gone
    // 30 s after its reader.
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ack_policy: jetstream::consumer::AckPolicy::None,
            max_deliver: 1,
            inactive_threshold: std::time::Duration::from_secs(30),
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(consumer)
}

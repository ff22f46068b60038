//! Reading a range of a room's log in order.

use async_nats::jetstream;
use chat_model::RoomId;
use futures::StreamExt;

use crate::error::LogError;
use crate::log::{RawEntry, RoomLog};

/// A range this short is read with one direct get per event; longer ones with an ordered
/// consumer (creating a consumer costs more than a few single reads). See decision 0001.
const DIRECT_GET_MAX: u64 = 8;

enum RangeSource {
    /// Not started yet.
    Idle,
    /// One direct get per sequence.
    Direct,
    /// An ordered consumer starting at the range's first sequence.
    Ordered(Box<jetstream::consumer::pull::Ordered>),
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
    source: RangeSource,
}

impl RangeReader {
    pub(crate) fn new(log: RoomLog, room: RoomId, from: u64, to: u64, clamp: bool) -> RangeReader {
        RangeReader {
            log,
            room,
            next: from.max(1),
            to,
            clamp,
            source: RangeSource::Idle,
        }
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
                    if self.to - self.next < DIRECT_GET_MAX {
                        self.source = RangeSource::Direct;
                    } else {
                        match ordered_consumer(&self.log, &self.room, self.next).await {
                            Ok(messages) => self.source = RangeSource::Ordered(Box::new(messages)),
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
                        Ok(None) => self.next = seq + 1,
                        Err(e) => return Some(Err(e)),
                    }
                }
                RangeSource::Ordered(messages) => match messages.next().await {
                    Some(Ok(msg)) => {
                        let seq = match msg.info() {
                            Ok(info) => info.stream_sequence,
                            Err(e) => {
                                return Some(Err(LogError::JetStream {
                                    room: self.room.clone(),
                                    op: "read range",
                                    reason: format!("message without stream info: {e}"),
                                }))
                            }
                        };
                        if seq < self.next {
                            continue;
                        }
                        if seq > self.to {
                            self.next = seq;
                            self.source = RangeSource::Idle;
                            return None;
                        }
                        self.next = seq + 1;
                        return Some(Ok(RawEntry {
                            seq,
                            payload: msg.message.payload,
                        }));
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
                            reason: "ordered consumer ended".to_owned(),
                        }));
                    }
                },
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

/// An ordered consumer of the room's stream starting at `start`.
async fn ordered_consumer(
    log: &RoomLog,
    room: &RoomId,
    start: u64,
) -> Result<jetstream::consumer::pull::Ordered, LogError> {
    let unavailable = |e: &dyn std::fmt::Display| LogError::Unavailable {
        room: room.clone(),
        op: "read range",
        reason: e.to_string(),
    };
    let stream = log
        .jetstream()
        .get_stream_no_info(log.config().stream_name(room))
        .await
        .map_err(|e| unavailable(&e))?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?;
    consumer.messages().await.map_err(|e| unavailable(&e))
}

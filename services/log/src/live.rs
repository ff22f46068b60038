//! A live feed of one room: persisted events in sequence order, with no gap and no duplicate.
//!
//! Live delivery rides the stream's republish (core NATS, at-most-once). Gaps are detected by
//! sequence and filled from the stream. A lost *last* event has no successor to reveal it, so the
//! head is re-checked after every (re)connect and slow-consumer notice, and whenever the client's
//! connect counter shows a reconnect whose event was dropped.

use async_nats::header::NATS_SEQUENCE;
use async_nats::Subscriber;
use chat_model::RoomId;
use futures::StreamExt;
use tokio::sync::broadcast::error::RecvError;

use crate::error::LogError;
use crate::log::{ConnectionEvent, ConnectionEvents, RawEntry, RoomLog};
use crate::range::RangeReader;

/// Events of one room with seq > the starting point, each exactly once, in order.
///
/// `next` is cancel-safe. After it returns an error the subscription stays usable: call `next`
/// again (after a pause: the error is usually NATS being unreachable) and it resumes where it was.
pub struct LiveSubscription {
    log: RoomLog,
    room: RoomId,
    /// Core subscription to the room's republish subject.
    live: Subscriber,
    /// Reconnects and slow-consumer notices.
    events: ConnectionEvents,
    /// Highest sequence handed out.
    delivered: u64,
    /// Highest sequence known to exist; `delivered..=fill_to` is read from the stream.
    fill_to: u64,
    /// The range read in progress, if any.
    fill: Option<RangeReader>,
    /// The head must be re-read before waiting on live messages.
    recheck: bool,
    /// The client's connect count at the last head check.
    connects_seen: u64,
}

impl LiveSubscription {
    pub(crate) fn new(
        log: RoomLog,
        room: RoomId,
        live: Subscriber,
        events: ConnectionEvents,
        after: u64,
        connects_seen: u64,
    ) -> LiveSubscription {
        LiveSubscription {
            log,
            room,
            live,
            events,
            delivered: after,
            fill_to: after,
            fill: None,
            // Catch up on what the log holds past `after` before going live.
            recheck: true,
            connects_seen,
        }
    }

    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// The sequence of the last entry returned (or the starting point).
    pub fn position(&self) -> u64 {
        self.delivered
    }

    /// The next event of the room.
    pub async fn next(&mut self) -> Result<RawEntry, LogError> {
        loop {
            let connects = self.log.connects();
            if connects != self.connects_seen {
                self.recheck = true;
            }
            if self.recheck {
                let head = self.log.head(&self.room).await?;
                self.connects_seen = connects;
                self.recheck = false;
                self.fill_to = self.fill_to.max(head);
            }
            if self.fill_to > self.delivered {
                if let Some(entry) = self.next_from_stream().await? {
                    return Ok(entry);
                }
                continue;
            }
            tokio::select! {
                biased;
                event = self.events.recv() => match event {
                    Ok(ConnectionEvent::Connected | ConnectionEvent::SlowConsumer)
                    | Err(RecvError::Lagged(_)) => self.recheck = true,
                    Ok(ConnectionEvent::Disconnected | ConnectionEvent::Refused)
                    | Err(RecvError::Closed) => {}
                },
                message = self.live.next() => {
                    let Some(message) = message else {
                        return Err(LogError::Unavailable {
                            room: self.room.clone(),
                            op: "live subscription",
                            reason: "subscription closed".to_owned(),
                        });
                    };
                    let seq = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(NATS_SEQUENCE))
                        .and_then(|v| v.as_str().parse::<u64>().ok());
                    let Some(seq) = seq else {
                        tracing::warn!(room = %self.room, "live message without Nats-Sequence ignored");
                        continue;
                    };
                    if seq <= self.delivered {
                        continue; // already handed out (caught up from the stream)
                    }
                    if seq == self.delivered + 1 && self.fill_to <= self.delivered {
                        self.delivered = seq;
                        self.fill_to = seq;
                        return Ok(RawEntry { seq, payload: message.payload });
                    }
                    // A gap: read everything up to and including this one from the stream.
                    tracing::debug!(room = %self.room, expected = self.delivered + 1, got = seq, "filling gap");
                    self.fill_to = self.fill_to.max(seq);
                }
            }
        }
    }

    /// The next entry of `delivered+1..=fill_to` from the stream; `None` when that range turned
    /// out to be exhausted (entries the log no longer holds are skipped).
    async fn next_from_stream(&mut self) -> Result<Option<RawEntry>, LogError> {
        let reader = self.fill.get_or_insert_with(|| {
            RangeReader::new(
                self.log.clone(),
                self.room.clone(),
                self.delivered + 1,
                self.fill_to,
                false,
            )
        });
        match reader.next().await {
            Some(Ok(entry)) => {
                if entry.seq <= self.delivered {
                    return Ok(None);
                }
                self.delivered = entry.seq;
                Ok(Some(entry))
            }
            Some(Err(e)) => {
                self.fill = None;
                Err(e)
            }
            None => {
                let end = reader.end();
                self.fill = None;
                // Whatever of the range the log did not hold is gone for good.
                self.delivered = self.delivered.max(end);
                Ok(None)
            }
        }
    }
}

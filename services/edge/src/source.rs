//! A followed room's events as one session's writer pulls them.
//!
//! The writer polls a source whenever the socket takes more, once per event per session: on
//! that path a source makes no future, takes no lock of its own and allocates nothing. Only
//! the rare steps (a block list to look up, a pause while NATS is away) wait in a boxed future.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::{Delivery, Follower, Framed};
use chat_model::{RoomId, UserId};
use chat_rooms::{HeldBlocks, Rooms};
use futures::task::AtomicWaker;
use futures::Stream;
use tokio::sync::Notify;

/// Rooms whose event source ended because the user was removed from them: the sources tell
/// the session's read loop, which drops the subscription and says so.
/// Each with the subscription it ended ([`EndOnDrop::id`]): a removal that reaches the read
/// loop after the room was subscribed again ends nothing.
#[derive(Default)]
pub(crate) struct Removals {
    rooms: Mutex<Vec<(RoomId, u64)>>,
    pub(crate) notify: Notify,
}

impl Removals {
    fn removed(&self, room: RoomId, subscription: u64) {
        if let Ok(mut rooms) = self.rooms.lock() {
            rooms.push((room, subscription));
        }
        self.notify.notify_one();
    }

    pub(crate) fn take(&self) -> Vec<(RoomId, u64)> {
        self.rooms
            .lock()
            .map(|mut rooms| std::mem::take(&mut *rooms))
            .unwrap_or_default()
    }
}

/// What a subscription and its source share: the subscription going ends the source.
struct End {
    /// Which subscription (unique in the process).
    id: u64,
    ended: AtomicBool,
    waker: AtomicWaker,
}

/// Held by the subscription: dropping it ends the source (at the writer's next poll, which it
/// wakes).
pub(crate) struct EndOnDrop(Arc<End>);

impl EndOnDrop {
    /// The subscription's id, as its removal names it.
    pub(crate) fn id(&self) -> u64 {
        self.0.id
    }
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

/// The events of a followed room as one session gets them: a message or edit by someone the
/// user blocks arrives as a placeholder. Ends when the subscription is dropped (unsubscribed,
/// or subscribed again from elsewhere) or after the event that removes the user from the room
/// (the session is told, and says so to the client); a replayed removal that the user's joining
/// again followed does not end it.
///
/// The writer pulls only while the socket takes frames: a session that falls behind the room's
/// feed reads the rest from the log, and one whose socket takes nothing for the grace is closed
/// with 4008 (the client resumes by sequence).
pub(crate) struct RoomSource {
    follower: Follower,
    rooms: Arc<Rooms>,
    user: UserId,
    /// Where the user's membership began when they subscribed: only a removal after it ends
    /// the source (an earlier one was followed by their joining again).
    joined: u64,
    removals: Arc<Removals>,
    end: Arc<End>,
    blocks: HeldBlocks,
    waiting: Option<Waiting>,
    /// How long to wait before reading again after the feed failed (doubling, up to 2 s).
    pause: Duration,
    removed: bool,
}

/// A block list lookup, and the event it decided on.
type Lookup = Pin<Box<dyn Future<Output = (HeldBlocks, Pick)> + Send>>;

/// An event as one session gets it: the delivery, and which of its two frames (its author
/// blocked or not). Handed to the writer as it is, with no copy of the frame's handle.
pub(crate) struct Pick {
    delivery: Arc<Delivery>,
    hidden: bool,
}

impl Pick {
    pub(crate) fn frame(&self) -> &Framed {
        match (&self.delivery.hidden, self.hidden) {
            (Some(hidden), true) => hidden,
            _ => &self.delivery.frame,
        }
    }
}

/// A rare step the source waits on before its next event.
enum Waiting {
    /// The user's block list, looked up to decide how an event reaches them.
    Blocks(Lookup),
    /// NATS away: the follower resumes where it was after the pause.
    Pause(Pin<Box<tokio::time::Sleep>>),
}

const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LAST_PAUSE: Duration = Duration::from_secs(2);

impl RoomSource {
    /// A source over `follower`, and what ends it when dropped.
    pub(crate) fn new(
        follower: Follower,
        rooms: Arc<Rooms>,
        user: UserId,
        joined: u64,
        removals: Arc<Removals>,
    ) -> (RoomSource, EndOnDrop) {
        static SUBSCRIPTIONS: AtomicU64 = AtomicU64::new(0);
        let end = Arc::new(End {
            id: SUBSCRIPTIONS.fetch_add(1, Ordering::Relaxed),
            ended: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let source = RoomSource {
            follower,
            rooms,
            user,
            joined,
            removals,
            end: end.clone(),
            blocks: HeldBlocks::default(),
            waiting: None,
            pause: FIRST_PAUSE,
            removed: false,
        };
        (source, EndOnDrop(end))
    }

    /// How `delivery` reaches this user; `None` while their block list must be looked up
    /// first (then `waiting` holds the lookup).
    fn pick(&mut self, delivery: Arc<Delivery>) -> Option<Pick> {
        if delivery.hidden.is_none() {
            return Some(self.handed(Pick {
                delivery,
                hidden: false,
            }));
        }
        if let Some(blocked) = self.rooms.blocked_fresh(&self.blocks, delivery.rendered) {
            let hidden = delivery.hides_for(blocked);
            return Some(self.handed(Pick { delivery, hidden }));
        }
        let (rooms, user) = (self.rooms.clone(), self.user.clone());
        let mut held = std::mem::take(&mut self.blocks);
        let lookup = Box::pin(async move {
            let hidden = match rooms.blocked_held(&user, &mut held).await {
                Ok(blocked) => delivery.hides_for(blocked),
                // The list held before, if any. Without one, fail closed for others' messages:
                // a placeholder keeps the sequence, and history shows the text later if its
                // author is not blocked after all. Never the reader's own.
                Err(e) => match held.last_known() {
                    Some(blocked) => delivery.hides_for(blocked),
                    None => {
                        let own = delivery.author.as_ref() == Some(&user);
                        if !own && delivery.hidden.is_some() {
                            tracing::warn!(user = %user, error = %e, "block list unavailable; sending a placeholder");
                        }
                        !own && delivery.hidden.is_some()
                    }
                },
            };
            (held, Pick { delivery, hidden })
        });
        self.waiting = Some(Waiting::Blocks(lookup));
        None
    }

    /// `pick` is going out: notes a removal of the user.
    fn handed(&mut self, pick: Pick) -> Pick {
        self.pause = FIRST_PAUSE;
        if pick.delivery.left.as_ref() == Some(&self.user) && pick.delivery.seq > self.joined {
            self.removed = true;
            // Typing and presence are for members: none of the room's after this.
            self.follower.stop_listening();
            self.removals
                .removed(self.follower.room().clone(), self.end.id);
        }
        pick
    }
}

impl Stream for RoomSource {
    type Item = Pick;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Pick>> {
        let this = self.get_mut();
        if this.removed || this.end.ended.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        loop {
            match this.waiting.as_mut() {
                Some(Waiting::Blocks(lookup)) => match lookup.as_mut().poll(cx) {
                    Poll::Ready((held, pick)) => {
                        this.waiting = None;
                        this.blocks = held;
                        return Poll::Ready(Some(this.handed(pick)));
                    }
                    Poll::Pending => break,
                },
                Some(Waiting::Pause(sleep)) => match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => this.waiting = None,
                    Poll::Pending => break,
                },
                None => {}
            }
            match this.follower.poll_next(cx) {
                Poll::Ready(Ok(delivery)) => {
                    if let Some(pick) = this.pick(delivery) {
                        return Poll::Ready(Some(pick));
                    }
                }
                Poll::Ready(Err(e)) => {
                    // NATS away: the follower resumes where it was when polled again.
                    tracing::debug!(room = %this.follower.room(), error = %e, "follow interrupted; retrying");
                    this.waiting = Some(Waiting::Pause(Box::pin(tokio::time::sleep(this.pause))));
                    this.pause = (this.pause * 2).min(LAST_PAUSE);
                }
                Poll::Pending => break,
            }
        }
        // Nothing yet: the subscription's end wakes the writer too.
        this.end.waker.register(cx.waker());
        if this.end.ended.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

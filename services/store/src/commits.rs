//! How code sharing a process with the projector sees its commits and asks it not to wait.

use tokio::sync::{watch, Notify};

/// Shared by a projector and the readers of its store in the same process. The projector may
/// hold live events back for a fuller commit; a reader that must see a sequence it knows exists
/// (read-your-writes) asks for the commit now and waits for it, rather than polling the
/// checkpoint or showing rows from before the event.
#[derive(Debug)]
pub struct Commits {
    flush: Notify,
    committed: watch::Sender<u64>,
}

impl Default for Commits {
    fn default() -> Self {
        Commits {
            flush: Notify::new(),
            committed: watch::Sender::new(0),
        }
    }
}

impl Commits {
    /// Asks the projector to write what it holds without waiting for more (remembered until it
    /// next looks, if it is busy).
    pub fn request_flush(&self) {
        self.flush.notify_one();
    }

    /// Resolves when a flush is requested (for the projector).
    pub async fn flush_requested(&self) {
        self.flush.notified().await;
    }

    /// Says that a write reached the store (for the projector).
    pub fn committed(&self) {
        self.committed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Commits from now on: `changed()` resolves after the next one.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }
}

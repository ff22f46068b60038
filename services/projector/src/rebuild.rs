//! Rebuilding the store (or one room of it) from the logs.

use std::sync::Arc;

use chat_log::RoomLog;
use chat_model::RoomId;
use chat_store::{Entry, RoomBatch, Store};

use crate::Partition;

/// Entries per store write while rebuilding.
const REBUILD_BATCH: usize = 2_000;

/// What a rebuild did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub rooms: usize,
    pub events: u64,
    pub dead_letters: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    List(#[from] chat_log::ListRoomsError),
    #[error(transparent)]
    Log(#[from] chat_log::LogError),
    #[error(transparent)]
    Store(#[from] chat_store::StoreError),
    /// The rebuild would clear rooms whose logs it cannot find; nothing was cleared.
    #[error("{0}")]
    Refused(String),
}

/// Clears and re-projects `room`, or every room `partition` owns, from the logs. With `force`,
/// a whole rebuild also clears the rooms the store holds (by checkpoint) that no log has any
/// more, so the store ends as the logs say, and a room rebuilt alone whose log is gone is
/// cleared. Without it, either refuses before clearing anything: a log missing rooms the store
/// holds is more often the wrong NATS or prefix than rooms deleted on purpose.
///
/// Run it while no projector writes the same rooms to this store (stop the projector role, or
/// rebuild into a fresh store and switch to it).
pub async fn rebuild(
    log: &RoomLog,
    store: &Arc<dyn Store>,
    room: Option<&RoomId>,
    partition: Partition,
    force: bool,
) -> Result<RebuildReport, RebuildError> {
    let rooms: Vec<RoomId> = match room {
        Some(room) if log.room_exists(room).await? => vec![room.clone()],
        Some(room) if force => {
            store.clear_room(room).await?;
            tracing::info!(room = %room, "room cleared: no log has it");
            return Ok(RebuildReport::default());
        }
        Some(room) => {
            return Err(RebuildError::Refused(format!(
                "no log has room {room}; nothing cleared (--force clears it from the store)"
            )))
        }
        None => log
            .rooms()
            .await?
            .into_iter()
            .map(|(room, _)| room)
            .filter(|room| partition.owns(room))
            .collect(),
    };
    let mut report = RebuildReport::default();
    if room.is_none() {
        let logged: std::collections::HashSet<&RoomId> = rooms.iter().collect();
        let unlogged: Vec<RoomId> = store
            .checkpoints()
            .await?
            .into_iter()
            .map(|(held, _)| held)
            .filter(|held| partition.owns(held) && !logged.contains(held))
            .collect();
        if !unlogged.is_empty() && !force {
            let some: Vec<&str> = unlogged.iter().take(5).map(RoomId::as_str).collect();
            return Err(RebuildError::Refused(format!(
                "{} of the store's rooms have no log ({}{}), and the logs hold {} rooms: \
                 nothing cleared. Check NATS_URL and CHAT_PREFIX, or pass --force to clear them",
                unlogged.len(),
                some.join(", "),
                if unlogged.len() > some.len() {
                    ", …"
                } else {
                    ""
                },
                rooms.len()
            )));
        }
        for held in unlogged {
            store.clear_room(&held).await?;
            tracing::info!(room = %held, "room cleared: no log has it");
        }
    }
    for room in rooms {
        store.clear_room(&room).await?;
        let mut reader = log.read_range(&room, 1, u64::MAX).bulk();
        let mut entries = Vec::with_capacity(REBUILD_BATCH);
        while let Some(raw) = reader.next().await {
            let raw = raw?;
            let event = raw.decode().map_err(|e| e.to_string());
            report.dead_letters += u64::from(event.is_err());
            entries.push(Entry {
                seq: raw.seq,
                event,
            });
            if entries.len() == REBUILD_BATCH {
                report.events += entries.len() as u64;
                let batch = RoomBatch {
                    room: room.clone(),
                    entries: std::mem::take(&mut entries),
                };
                store.apply(&[batch]).await?;
            }
        }
        if !entries.is_empty() {
            report.events += entries.len() as u64;
            store
                .apply(&[RoomBatch {
                    room: room.clone(),
                    entries,
                }])
                .await?;
        }
        report.rooms += 1;
        tracing::info!(room = %room, "room rebuilt");
    }
    Ok(report)
}

//! Write timestamps and buckets: where the log's order becomes ScyllaDB's.
//!
//! ScyllaDB resolves conflicting writes by their timestamps (last writer wins, a deletion
//! shadowing everything at or below its own). Every room-scoped write therefore says
//! `USING TIMESTAMP` with a value derived from the log, never from a clock, so the outcome is
//! decided by sequences and re-applying any events, in any order, converges:
//!
//! ```text
//! ts(generation, seq, offset) = -2^63 + 2^50 * (generation + 1) + seq * 1000 + offset
//! ```
//!
//! - `seq`: the event whose effect is written (for a read cursor, the cursor's value: the
//!   highest cursor wins, so cursors only move forward).
//! - `offset` (< 1000): orders the writes of one sequence, see the `OFF_*` constants. No two
//!   writes of one event put different values in one cell today, so the offsets document the
//!   order (readable in `WRITETIME(...)`) rather than decide it; they leave room for a kind
//!   whose writes would.
//! - `generation`: how many times the room has been cleared for a rebuild. A clear deletes at
//!   `ts(generation + 1, 0, 0) - 1`, shadowing every write of the old generations and none of
//!   the rebuild's (which would otherwise land below the clear's tombstones and vanish).
//!
//! All timestamps stay at or before the Unix epoch: ScyllaDB rejects `USING TIMESTAMP` values
//! more than three days in the future (`restrict_future_timestamp`), and negative values are
//! legal (only `i64::MIN` is reserved). Limits: sequences below [`MAX_SEQ`] (about 1.1e12 per
//! room) and [`MAX_GENERATION`] clears per room.
//!
//! One caveat of any synthetic timestamp: a write must not land below a tombstone that may
//! already have been garbage-collected (`gc_grace_seconds`, 10 days by default). Re-applying
//! happens only between a batch's rows and its checkpoint (seconds), or after a clear (a new
//! generation, above every old tombstone); a room whose checkpoint stays behind its rows for
//! longer than that must be cleared and rebuilt rather than replayed.

/// Sequences per history bucket: a busy room's partitions stay far below ScyllaDB's
/// large-partition warning (100k rows) and a page of 200 spans at most two buckets.
pub(crate) const BUCKET_SIZE: u64 = 4096;

/// The span of one generation's timestamps.
const GENERATION_SPAN: i64 = 1 << 50;
/// Timestamps of one sequence.
const PER_SEQ: i64 = 1000;
/// The first timestamp of generation 0.
const ORIGIN: i64 = i64::MIN + GENERATION_SPAN;

/// The highest sequence a timestamp can encode.
pub(crate) const MAX_SEQ: u64 = (GENERATION_SPAN / PER_SEQ - 1) as u64;
/// The highest generation whose timestamps all stay at or before the epoch.
pub(crate) const MAX_GENERATION: i64 = (1 << 13) - 2;

/// The event's own row (`events`, `events_by_id`, `dead_letters`).
pub(crate) const OFF_EVENT: i64 = 0;
/// Its effects on other rows: messages it edits or deletes, reactions, threads, edits index.
pub(crate) const OFF_EFFECT: i64 = 1;
/// Membership rows (`members`, `rooms_by_user`) and the room's own row.
pub(crate) const OFF_MEMBER: i64 = 2;
/// Read cursors, at the cursor's value.
pub(crate) const OFF_CURSOR: i64 = 3;
/// The checkpoint (and the written mark) of a batch ending at the sequence: after its rows.
pub(crate) const OFF_CHECKPOINT: i64 = 999;

/// The write timestamp of `seq`'s effects in `generation` (callers check [`in_range`]).
pub(crate) fn ts(generation: i64, seq: u64, offset: i64) -> i64 {
    debug_assert!(in_range(generation, seq) && (0..PER_SEQ).contains(&offset));
    ORIGIN + generation * GENERATION_SPAN + seq as i64 * PER_SEQ + offset
}

/// The timestamp of a clear that starts `new_generation`: just below its first write.
pub(crate) fn clear_ts(new_generation: i64) -> i64 {
    ORIGIN + new_generation * GENERATION_SPAN - 1
}

/// Whether `seq` and `generation` can be encoded.
pub(crate) fn in_range(generation: i64, seq: u64) -> bool {
    (0..=MAX_GENERATION).contains(&generation) && seq <= MAX_SEQ
}

/// The history bucket of `seq`.
pub(crate) fn bucket(seq: u64) -> i64 {
    (seq / BUCKET_SIZE) as i64
}

/// A sequence as CQL's `bigint` (sequences are checked against [`MAX_SEQ`] when written).
pub(crate) fn cql_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_order_by_generation_then_sequence_and_stay_in_the_past() {
        assert!(ts(0, 0, 0) > i64::MIN);
        assert!(ts(0, 5, OFF_EVENT) < ts(0, 5, OFF_CHECKPOINT));
        assert!(ts(0, 5, OFF_CHECKPOINT) < ts(0, 6, OFF_EVENT));
        assert!(ts(0, MAX_SEQ, OFF_CHECKPOINT) < clear_ts(1));
        assert!(clear_ts(1) < ts(1, 0, 0));
        assert!(ts(MAX_GENERATION, MAX_SEQ, OFF_CHECKPOINT) <= 0);
        assert!(!in_range(MAX_GENERATION + 1, 1));
        assert!(!in_range(0, MAX_SEQ + 1));
    }

    #[test]
    fn buckets_cut_every_4096_sequences() {
        assert_eq!((bucket(0), bucket(4095), bucket(4096)), (0, 0, 1));
    }
}

//! Wire limits of the sensor-to-collector stream: the one source for both sides.
//! A sensor batch is at most [`MAX_BATCH_FRAMES`] frames and about
//! [`MAX_BATCH_BYTES`] of record bytes; messages are refused above
//! [`MAX_MESSAGE_BYTES`] before they are decoded.

/// Frames in one `Batch` (the uplink sends at most this many).
pub const MAX_BATCH_FRAMES: usize = 1000;
/// Record bytes the uplink puts in one batch before it stops adding frames.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Largest record the uplink sends in a batch of its own (larger ones are refused).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Largest encoded stream message, either direction: a full batch, one oversized
/// last record and the per-frame overhead (seq, two hashes, tags).
pub const MAX_MESSAGE_BYTES: usize = MAX_BATCH_BYTES + MAX_RECORD_BYTES + MAX_BATCH_FRAMES * 96;
/// Longest sensor id (bytes), as in the spool segment header's limit for the store.
pub const MAX_SENSOR_ID_BYTES: usize = 128;
/// Bound on the map content a `policy_change` record lists (zones, endpoints,
/// conduits): well below [`MAX_RECORD_BYTES`], so a huge map never makes a record
/// that cannot travel.
pub const MAX_POLICY_CONTENT_BYTES: usize = 256 * 1024;

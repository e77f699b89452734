//! The collector's stream decoding (`conduit_proto::codec`): the wire scan that runs
//! before prost never panics, and whenever it lets a message through, prost's view
//! agrees with it (so the frame cap cannot be smuggled past the scan).
#![no_main]

use conduit_proto::codec::{WireCheck as _, count_batch_frames};
use conduit_proto::limits::MAX_BATCH_FRAMES;
use conduit_proto::v1::{SensorMessage, sensor_message::Msg};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let scanned = count_batch_frames(data);
    let allowed = SensorMessage::check_wire(data).is_ok();
    if let Ok(m) = SensorMessage::decode(data) {
        if allowed {
            // prost keeps the last Batch field; the scan counts frames of them all.
            if let Some(Msg::Batch(b)) = &m.msg {
                assert!(b.frames.len() <= MAX_BATCH_FRAMES);
                assert!(scanned.is_some_and(|n| n >= b.frames.len()));
            }
        }
    }
});

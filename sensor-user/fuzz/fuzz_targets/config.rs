//! Config decoder: conduits.yaml and sensor.yaml. Never panics, stays within the
//! YAML caps (alias bombs and deep nesting are refused with a position), and every
//! error names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensor_user::config::{ConduitMap, SensorConfig};

fuzz_target!(|data: &[u8]| {
    // No catalogue directory: the embedded catalogue, no file-system reads.
    if let Err(e) = ConduitMap::from_bytes("fuzz.yaml", data, None, None) {
        assert!(e.to_string().starts_with("fuzz.yaml"), "{e}");
    }
    if let Err(e) = SensorConfig::from_bytes("fuzz.yaml", data) {
        assert!(e.to_string().starts_with("fuzz.yaml"), "{e}");
    }
});

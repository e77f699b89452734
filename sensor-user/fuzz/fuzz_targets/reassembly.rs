//! TCP ClientHello reassembly: the input is a script of segments
//! `[flow: u8][seq offset: u16 be][len: u8][payload...]` fed to one table.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sensor_user::tls::{Limits, ReassemblyTable};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_flows: 4,
        max_bytes_per_flow: 2048,
        max_fragments: 16,
        timeout: Duration::from_secs(5),
    };
    let mut table = ReassemblyTable::new(limits);
    let start = Instant::now();
    let base_seq = 0xffff_ff00_u32; // exercise sequence wrap-around
    let mut rest = data;
    let mut step = 0u64;
    while let [flow, hi, lo, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(n);
        let seq = base_seq.wrapping_add(u32::from(u16::from_be_bytes([*hi, *lo])));
        let now = start + Duration::from_millis(step * 100);
        let _ = table.push(*flow % 8, seq, payload, now);
        assert!(table.len() <= limits.max_flows);
        if step % 16 == 15 {
            let _ = table.expire(now);
        }
        step += 1;
        rest = next;
    }
});

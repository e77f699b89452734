//! The sweep's read of the flow table (`Kernel::for_each_flow`, batch lookups where
//! the kernel has them) sees every flow exactly once (needs root).
#![expect(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeMap;

use etherparse::PacketBuilder;
use sensor_user::kernel::{Kernel, KernelOptions, Program};

/// More than one batch (4,096 entries per call) and than the table's buckets hold
/// at once in any one chunk.
const FLOWS: u16 = 10_000;

fn syn(sport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 10, 1, 5], [192, 0, 2, 10], 64)
        .tcp(sport, 443, 1, 1000)
        .syn()
        .write(&mut out, &[])
        .unwrap();
    out
}

#[test]
fn every_flow_is_read_once() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP every_flow_is_read_once: needs root");
        return;
    }
    let mut k = Kernel::load(&KernelOptions::default()).unwrap();
    for i in 0..FLOWS {
        k.test_run(Program::Xdp, &syn(10_000 + i)).unwrap();
        if i % 1000 == 999 {
            k.drain_events();
        }
    }
    let mut seen: BTreeMap<u16, u32> = BTreeMap::new();
    k.for_each_flow(|key, stats| {
        assert_eq!(stats.packets.iter().sum::<u64>(), 1, "{key:?}");
        let client = if key.port_lo == 443 {
            key.port_hi
        } else {
            key.port_lo
        };
        *seen.entry(client).or_default() += 1;
    })
    .unwrap();
    assert_eq!(seen.len(), usize::from(FLOWS), "distinct flows read");
    assert!(seen.values().all(|&n| n == 1), "a flow read twice");
    assert_eq!(k.flow_entries().unwrap().len(), usize::from(FLOWS));
}

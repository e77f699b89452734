//! DNS answers: the response parser on arbitrary bytes (never panics, output
//! within its bounds and normalized), what it gives learned into a cache that
//! must then answer for it, and the input read as a stream of cache operations
//! on a tiny cache (eviction and expiry all the time) whose answers are checked
//! against what was just learned.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use sensor_user::dns::message::{MAX_ANSWERS, MAX_ECH_NAMES};
use sensor_user::dns::{Answer, DnsCache, DnsLimits, Resolves, Response, parse_response};

const S: u64 = 1_000_000_000;

fuzz_target!(|data: &[u8]| {
    // 1. The input as a DNS message.
    if let Ok(resp) = parse_response(data) {
        assert!(resp.answers.len() <= MAX_ANSWERS);
        assert!(resp.ech_names.len() <= MAX_ECH_NAMES);
        for name in resp.answers.iter().map(|a| &a.name).chain(&resp.ech_names) {
            assert!(!name.is_empty() && !name.ends_with('.'), "{name:?}");
            assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "{name:?}");
        }
        // Room for every answer: each must be found right after learning.
        let mut cache = DnsCache::new(DnsLimits {
            max_entries: 2 * MAX_ANSWERS,
            ..DnsLimits::default()
        });
        let client = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let now = 1_000 * S;
        cache.learn(client, &resp, now);
        for a in &resp.answers {
            assert_eq!(cache.resolves(&a.name, a.addr, now), Resolves::Yes);
            assert!(cache.name_for(client, a.addr, now).is_some());
        }
        assert_eq!(cache.evicted(), 0);
        // Long after: everything expired, nothing claimed.
        let later = now + 2 * 86_400 * S;
        for a in &resp.answers {
            assert_eq!(cache.resolves(&a.name, a.addr, later), Resolves::Unseen);
            assert!(cache.name_for(client, a.addr, later).is_none());
        }
    }
    // 2. The input as cache operations, 4 bytes each: time step and client,
    //    name, address, TTL. A tiny cache, few names, clients and addresses.
    let mut cache = DnsCache::new(DnsLimits {
        max_entries: 5,
        ttl_floor_s: 2,
        ttl_cap_s: 30,
    });
    let names = ["a.example", "B.Example.", "c.example", "d.example"];
    let mut now = 0u64;
    for op in data.chunks_exact(4) {
        now += u64::from(op[0] >> 4) * S;
        let client = IpAddr::V4(Ipv4Addr::new(10, 0, 0, op[0] & 3));
        let name = names[usize::from(op[1] & 3)];
        let addr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, op[1] >> 6));
        let ttl = u32::from(op[2]);
        let resp = Response {
            answers: vec![Answer {
                name: name.to_owned(),
                addr,
                ttl,
            }],
            ech_names: if op[3] & 1 == 1 {
                vec![name.to_owned()]
            } else {
                vec![]
            },
            ech_ttl: u32::from(op[3] >> 1),
        };
        cache.learn(client, &resp, now);
        assert!(cache.len() <= 5);
        // Just learned, so alive (TTL >= floor > 0) and the latest for its pair.
        assert_eq!(cache.resolves(name, addr, now), Resolves::Yes);
        let got = cache.name_for(client, addr, now).map(|r| r.name);
        assert_eq!(
            got,
            Some(name.trim_end_matches('.').to_ascii_lowercase().as_str())
        );
        if op[3] & 1 == 1 {
            assert!(
                cache
                    .name_for(client, addr, now)
                    .is_some_and(|r| r.ech_announced)
            );
        }
        let _ = cache.resolves(names[usize::from(op[3] & 3)], addr, now + 10 * S);
    }
});

//! Community ID v1 (<https://github.com/corelight/community-id-spec>): a flow hash
//! that Zeek, Suricata and most SIEMs compute identically, so a record can be joined
//! with other tools' views of the same flow.

use std::net::IpAddr;

use base64::Engine as _;
use sha1::{Digest as _, Sha1};

/// `1:<base64(sha1(seed, ordered tuple))>` for a TCP/UDP flow with seed 0.
pub fn community_id_v1(
    src: IpAddr,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
    protocol: u8,
) -> String {
    community_id_v1_seeded(0, src, src_port, dst, dst_port, protocol)
}

/// Community ID v1 with an explicit seed.
pub fn community_id_v1_seeded(
    seed: u16,
    src: IpAddr,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
    protocol: u8,
) -> String {
    let octets = |ip: IpAddr| -> Vec<u8> {
        match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }
    };
    let (a, b) = (octets(src), octets(dst));
    // The spec orders the endpoints so both directions hash the same.
    let ((a, a_port), (b, b_port)) = if (&a, src_port) <= (&b, dst_port) {
        ((a, src_port), (b, dst_port))
    } else {
        ((b, dst_port), (a, src_port))
    };
    let mut hasher = Sha1::new();
    hasher.update(seed.to_be_bytes());
    hasher.update(&a);
    hasher.update(&b);
    hasher.update([protocol, 0]);
    hasher.update(a_port.to_be_bytes());
    hasher.update(b_port.to_be_bytes());
    format!(
        "1:{}",
        base64::engine::general_purpose::STANDARD.encode(hasher.finalize())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from Zeek's community-id test suite.
    #[test]
    fn matches_reference_vectors() {
        let a: IpAddr = "1.2.3.4".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let b: IpAddr = "5.6.7.8".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(
            community_id_v1(a, 1122, b, 3344, 6),
            "1:wCb3OG7yAFWelaUydu0D+125CLM="
        );
        assert_eq!(
            community_id_v1(a, 1122, b, 3344, 17),
            "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg="
        );
    }

    #[test]
    fn both_directions_hash_the_same() {
        let a: IpAddr = "fd00::1".parse().unwrap_or(IpAddr::from([0u8; 16]));
        let b: IpAddr = "2001:db8::2".parse().unwrap_or(IpAddr::from([0u8; 16]));
        assert_eq!(
            community_id_v1(a, 40000, b, 443, 6),
            community_id_v1(b, 443, a, 40000, 6)
        );
    }
}

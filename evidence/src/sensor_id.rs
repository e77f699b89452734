//! The sensor-id grammar, one rule for the sensor's config and the collector: ids
//! name spool and store directories, NATS subjects and SIEM fields, so they are
//! short, plain, and never one of the collector's own names.

/// The grammar, as error messages and the README state it.
pub const GRAMMAR: &str = "1 to 128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit, not a reserved name (collector, exports, in any case)";

/// Longest sensor id in bytes.
pub const MAX_LEN: usize = 128;

/// Names the collector uses for itself (its alarm chain, its export cursors).
pub const RESERVED: &[&str] = &["collector", "exports"];

/// Whether `id` matches [`GRAMMAR`].
pub fn is_valid(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !RESERVED.iter().any(|r| r.eq_ignore_ascii_case(id))
}

#[cfg(test)]
mod tests {
    use super::is_valid;

    #[test]
    fn grammar() {
        for ok in ["gw-01", "a", "plant.1_gw", &"x".repeat(128)] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "_collector",
            "-x",
            "a/b",
            "a\0b",
            "..",
            "collector",
            "EXPORTS",
            "Collector",
            &"x".repeat(129),
            "gw 1",
            "gw\u{e9}",
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }
}

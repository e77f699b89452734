//! Peer-controlled text is cut to a bound before it is logged, recorded or sent back.

use std::borrow::Cow;

/// `s` if it is at most `max` bytes, else its first bytes up to a char boundary
/// and a note of the full length.
pub fn bounded(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}... ({} bytes)", &s[..end], s.len()))
}

#[cfg(test)]
mod tests {
    use super::bounded;

    #[test]
    fn cuts_at_a_char_boundary() {
        assert_eq!(bounded("abc", 3), "abc");
        assert_eq!(bounded("abcd", 3), "abc... (4 bytes)");
        assert_eq!(bounded("aé", 2), "a... (3 bytes)");
    }
}

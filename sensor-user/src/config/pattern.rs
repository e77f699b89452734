//! SNI patterns: `api.openai.com`, `*.openai.com` (one or more labels), and
//! `bedrock-runtime.*.amazonaws.com` (`*` = exactly one label inside a name).
//! Matching is case-insensitive and ignores a trailing dot.

use std::fmt;

use sensor_common::sni_hash;

/// How the kernel can look a pattern up in its SNI hash map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelSniKey {
    /// `sni_hash(name)` of an exact name.
    Exact(u64),
    /// `sni_hash(".suffix")` of a `*.suffix` pattern.
    Suffix(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SniPattern {
    /// Normalized text: lower-case, no trailing dot.
    text: String,
    /// True for a leading `*.` (one or more labels before the rest).
    suffix: bool,
    /// Labels after the leading `*.` (or all labels); `*` is one label.
    labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("the pattern is empty")]
    Empty,
    #[error("the name has an empty label (`..`, or a leading dot)")]
    EmptyLabel,
    #[error("character `{0}` is not allowed in a host name")]
    BadChar(char),
    #[error("`*` must be a whole label (`*.example.com`), not part of `{0}`")]
    PartialWildcard(String),
    #[error("`*` cannot be the last label (top-level domain)")]
    WildcardAtEnd,
    #[error("the label `{0}` is longer than 63 characters")]
    LabelTooLong(String),
    #[error("the name is longer than 253 characters")]
    TooLong,
}

impl PatternError {
    /// How to fix it, for diagnostics.
    pub fn fix(&self) -> &'static str {
        match self {
            PatternError::Empty | PatternError::EmptyLabel => {
                "write a host name such as `api.example.com`"
            }
            PatternError::BadChar(_) => {
                "host names use letters, digits, `-` and `_`; write only the host, no scheme, port or path"
            }
            PatternError::PartialWildcard(_) | PatternError::WildcardAtEnd => {
                "use `*.example.com` for any subdomain or `a.*.example.com` for exactly one label"
            }
            PatternError::LabelTooLong(_) | PatternError::TooLong => "check the name for typos",
        }
    }
}

impl SniPattern {
    pub fn parse(input: &str) -> Result<SniPattern, PatternError> {
        let lower = input.trim().to_ascii_lowercase();
        let text = lower.strip_suffix('.').unwrap_or(&lower).to_owned();
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > 253 {
            return Err(PatternError::TooLong);
        }
        let mut labels: Vec<String> = Vec::new();
        for label in text.split('.') {
            if label.is_empty() {
                return Err(PatternError::EmptyLabel);
            }
            if label.len() > 63 {
                return Err(PatternError::LabelTooLong(label.to_owned()));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*')))
            {
                return Err(PatternError::BadChar(c));
            }
            if label.contains('*') && label != "*" {
                return Err(PatternError::PartialWildcard(label.to_owned()));
            }
            labels.push(label.to_owned());
        }
        if labels.last().is_some_and(|l| l == "*") {
            return Err(PatternError::WildcardAtEnd);
        }
        let suffix = labels.first().is_some_and(|l| l == "*");
        if suffix {
            labels.remove(0);
        }
        Ok(SniPattern {
            text,
            suffix,
            labels,
        })
    }

    /// The normalized pattern text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_exact(&self) -> bool {
        !self.suffix && !self.labels.iter().any(|l| l == "*")
    }

    /// Whether `name` (a TLS/QUIC server name) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return false;
        }
        let got: Vec<&str> = name.split('.').collect();
        let n = self.labels.len();
        if self.suffix {
            if got.len() <= n {
                return false;
            }
        } else if got.len() != n {
            return false;
        }
        let tail = &got[got.len() - n..];
        tail.iter()
            .zip(&self.labels)
            .all(|(g, p)| !g.is_empty() && (p == "*" || g.eq_ignore_ascii_case(p)))
            && got.iter().all(|g| !g.is_empty())
    }

    /// The kernel's hash-map key, or `None` for inner-`*` patterns, which the
    /// agent matches in userspace.
    pub fn kernel_key(&self) -> Option<KernelSniKey> {
        if self.labels.iter().any(|l| l == "*") {
            return None;
        }
        let rest = self.labels.join(".");
        Some(if self.suffix {
            KernelSniKey::Suffix(sni_hash(format!(".{rest}").as_bytes()))
        } else {
            KernelSniKey::Exact(sni_hash(rest.as_bytes()))
        })
    }

    /// Ordering key for overlapping patterns: exact names beat wildcards,
    /// then more literal characters win (as the kernel's longest-suffix walk).
    pub fn specificity(&self) -> (u8, usize) {
        let literal: usize = self
            .labels
            .iter()
            .filter(|l| *l != "*")
            .map(|l| l.len() + 1)
            .sum();
        (u8::from(self.is_exact()), literal)
    }
}

impl fmt::Display for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for SniPattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SniPattern::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SniPattern {
        SniPattern::parse(s).expect("valid pattern")
    }

    #[test]
    fn exact() {
        let pat = p("API.OpenAI.com.");
        assert_eq!(pat.as_str(), "api.openai.com");
        assert!(pat.matches("api.openai.com"));
        assert!(pat.matches("API.OPENAI.COM."));
        assert!(!pat.matches("x.api.openai.com"));
        assert!(!pat.matches("openai.com"));
        assert_eq!(
            pat.kernel_key(),
            Some(KernelSniKey::Exact(sni_hash(b"api.openai.com")))
        );
    }

    #[test]
    fn suffix() {
        let pat = p("*.openai.com");
        assert!(pat.matches("api.openai.com"));
        assert!(pat.matches("a.b.c.openai.com"));
        assert!(pat.matches("Chat.OpenAI.com."));
        assert!(!pat.matches("openai.com"));
        assert!(!pat.matches("evilopenai.com"));
        assert!(!pat.matches(".openai.com"));
        assert_eq!(
            pat.kernel_key(),
            Some(KernelSniKey::Suffix(sni_hash(b".openai.com")))
        );
    }

    #[test]
    fn inner_wildcard() {
        let pat = p("bedrock-runtime.*.amazonaws.com");
        assert!(pat.matches("bedrock-runtime.eu-central-1.amazonaws.com"));
        assert!(pat.matches("BEDROCK-RUNTIME.us-east-1.amazonaws.com."));
        assert!(!pat.matches("bedrock-runtime.amazonaws.com"));
        assert!(!pat.matches("bedrock-runtime.a.b.amazonaws.com"));
        assert!(!pat.matches("bedrock.us-east-1.amazonaws.com"));
        assert_eq!(pat.kernel_key(), None);
        let both = p("*.notebooks.*.example.com");
        assert!(both.matches("x.y.notebooks.z.example.com"));
        assert!(!both.matches("notebooks.z.example.com"));
    }

    #[test]
    fn invalid() {
        for (s, e) in [
            ("", PatternError::Empty),
            ("a..b", PatternError::EmptyLabel),
            (".a.b", PatternError::EmptyLabel),
            ("https://a.b", PatternError::BadChar(':')),
            ("a b.com", PatternError::BadChar(' ')),
            (
                "api*.openai.com",
                PatternError::PartialWildcard("api*".into()),
            ),
            ("api.openai.*", PatternError::WildcardAtEnd),
            ("*", PatternError::WildcardAtEnd),
        ] {
            assert_eq!(SniPattern::parse(s), Err(e), "{s}");
        }
    }

    #[test]
    fn specificity_orders_exact_first() {
        assert!(p("api.openai.com").specificity() > p("*.openai.com").specificity());
        assert!(p("*.api.openai.com").specificity() > p("*.openai.com").specificity());
    }
}

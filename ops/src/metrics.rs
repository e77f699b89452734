//! What both daemons' metrics share: the library (prometheus-client, re-exported so
//! both binaries use one version), the text encoding, and `build_info`.

pub use prometheus_client;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// A registry whose families are all named `<prefix>_...`, with `<prefix>_build_info`.
pub fn registry(prefix: &str, version: &'static str) -> Registry {
    let mut registry = Registry::with_prefix(prefix);
    registry.register(
        "build",
        "The running build (value 1; the version is a label)",
        Info::new(vec![("version", version)]),
    );
    registry
}

/// The Prometheus text exposition (format 0.0.4) of a registry.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; a collector's error would cut the page short.
    if let Err(err) = prometheus_text::encode(&mut text, registry) {
        tracing::warn!("metrics encoding: {err}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_carries_the_version() {
        let text = encode(&registry("conduit_test", "1.2.3"));
        assert!(
            text.lines()
                .any(|l| l == "conduit_test_build_info{version=\"1.2.3\"} 1"),
            "{text}"
        );
    }
}

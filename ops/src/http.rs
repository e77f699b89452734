//! The small HTTP/1.1 endpoint both daemons serve on their opt-in metrics address:
//! `GET /metrics` (Prometheus text format 0.0.4, encoded by prometheus-client from
//! the daemon's registry), `/livez` (the process answers),
//! `/readyz` (200 once the daemon is ready: the sensor attached, the collector
//! listening; 503 before and while draining), 404 for anything else. One request
//! per connection; nothing else is parsed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// What a daemon exposes.
pub trait Endpoint: Send + Sync + 'static {
    /// Every metric family of the daemon.
    fn registry(&self) -> &Registry;
    /// Whether `/readyz` answers 200.
    fn ready(&self) -> bool;
}

/// The response to one request line's path: status, content type, body.
pub fn respond(endpoint: &dyn Endpoint, path: &str) -> (&'static str, &'static str, String) {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => (
            "200 OK",
            prometheus_text::CONTENT_TYPE,
            crate::metrics::encode(endpoint.registry()),
        ),
        "/livez" => ("200 OK", PLAIN, "ok\n".to_string()),
        "/readyz" if endpoint.ready() => ("200 OK", PLAIN, "ready\n".to_string()),
        "/readyz" => ("503 Service Unavailable", PLAIN, "not ready\n".to_string()),
        _ => ("404 Not Found", PLAIN, "not found\n".to_string()),
    }
}

/// Binds `addr`; the returned future serves until it is dropped.
pub async fn bind(
    addr: SocketAddr,
    endpoint: Arc<dyn Endpoint>,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    Ok(async move {
        loop {
            // Out of descriptors (EMFILE) is not the end of the endpoint: wait it out.
            let (mut stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!("metrics accept: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, content_type, body) = respond(endpoint.as_ref(), path);
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool, Registry);
    impl Endpoint for Fixed {
        fn registry(&self) -> &Registry {
            &self.1
        }
        fn ready(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn metrics_come_from_the_registry() {
        let mut registry = Registry::with_prefix("conduit_test");
        let counter: prometheus_client::metrics::counter::Counter = Default::default();
        registry.register("things", "Things seen", counter.clone());
        counter.inc_by(3);
        let (status, content_type, body) = respond(&Fixed(true, registry), "/metrics");
        assert_eq!(status, "200 OK");
        assert!(content_type.starts_with("text/plain; version=0.0.4"));
        assert!(
            body.contains(
                "# TYPE conduit_test_things_total counter\nconduit_test_things_total 3\n"
            ),
            "{body}"
        );
    }

    #[test]
    fn paths() {
        assert_eq!(
            respond(&Fixed(true, Registry::default()), "/metrics").0,
            "200 OK"
        );
        assert_eq!(
            respond(&Fixed(true, Registry::default()), "/livez").0,
            "200 OK"
        );
        assert_eq!(
            respond(&Fixed(true, Registry::default()), "/readyz").0,
            "200 OK"
        );
        assert_eq!(
            respond(&Fixed(false, Registry::default()), "/readyz").0,
            "503 Service Unavailable"
        );
        assert_eq!(
            respond(&Fixed(true, Registry::default()), "/").0,
            "404 Not Found"
        );
    }
}

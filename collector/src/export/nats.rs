//! `--nats URL`: NATS JetStream. One stream per site (`CONDUIT_<SITE>`, subjects
//! `conduit.<site>.>`, created if missing; the site canonicalized once, lower case); subject `conduit.<site>.<sensor>.<action>`;
//! header `Nats-Msg-Id: <sensor>-<seq>` so a re-publish after a crash is dropped by the
//! stream's duplicate window. The cursor moves only after every publish ack.

use std::collections::{HashMap, HashSet};

use async_nats::jetstream;

use super::{ExportError, Format, Item, Sink};

/// Publishes in flight before their acks are awaited (below async-nats's limit).
const ACK_WINDOW: usize = 1000;

pub struct NatsSink {
    url: String,
    format: Format,
    /// TLS of the connection (the same as the JetStream chains').
    tls: crate::nats_client::NatsTls,
    js: Option<jetstream::Context>,
    streams: HashSet<String>,
    /// Last site seen per chain: checkpoints and restarts carry no site, they go to
    /// the site of the chain's flows.
    chain_site: HashMap<String, String>,
    /// Where records without a site go, when set ([`NatsSink::site_less_to`]).
    fixed_site: Option<String>,
    /// Whether the server's version was judged (once per process).
    version_checked: bool,
}

/// A subject token: no dots, wildcards or whitespace.
pub fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() { "_".to_owned() } else { t }
}

/// The one canonical form of a site for NATS: a lower-case subject token, so that
/// `plant` and `PLANT` are one stream and one subject space (stream names are
/// upper-cased, subjects are case-sensitive: without this they would collide).
pub fn canonical_site(s: &str) -> String {
    token(s).to_ascii_lowercase()
}

/// Site of a record (`default` when neither it nor its chain named one yet).
pub fn site(item: &Item, chain_site: Option<&String>) -> String {
    if !item.record.site.is_empty() {
        canonical_site(&item.record.site)
    } else if let Some(s) = chain_site {
        s.clone()
    } else {
        "default".to_owned()
    }
}

pub fn stream_name(site: &str) -> String {
    format!("CONDUIT_{}", site.to_ascii_uppercase())
}

pub fn subject(item: &Item, site: &str) -> String {
    format!(
        "conduit.{}.{}.{}",
        site,
        token(item.sensor()),
        item.action()
    )
}

pub fn msg_id(item: &Item) -> String {
    format!("{}-{}", item.chain, item.pos.seq)
}

impl NatsSink {
    pub fn new(url: String, format: Format, tls: crate::nats_client::NatsTls) -> NatsSink {
        NatsSink {
            url,
            format,
            tls,
            js: None,
            streams: HashSet::new(),
            chain_site: HashMap::new(),
            fixed_site: None,
            version_checked: false,
        }
    }

    /// Records that name no site go to `site`, not to their chain's last one: with
    /// JetStream the collectors of a site share the export, and what one collector
    /// saw of a chain must not decide where another sends a record (a record given
    /// to both would land in two streams, past their message-id de-duplication).
    pub fn site_less_to(mut self, site: &str) -> NatsSink {
        self.fixed_site = Some(canonical_site(site));
        self
    }

    async fn context(&mut self) -> Result<jetstream::Context, ExportError> {
        if let Some(js) = &self.js {
            return Ok(js.clone());
        }
        let client = self
            .tls
            .options("conduit-collector-export", &self.url)
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(self.url.as_str())
            .await
            .map_err(|e| {
                let url = crate::nats_client::redact(&self.url);
                ExportError::Target(format!("nats {url}: {e}"))
            })?;
        let version = client.server_info().version;
        let since = crate::jetstream::DEDUPE_ACROSS_LEADERS_SINCE;
        if !self.version_checked
            && crate::jetstream::nats_version(&version).is_none_or(|v| v < since)
        {
            tracing::warn!(
                %version,
                "nats-server before 2.11: after a stream leader change the NATS export can store a record twice (docs/jetstream.md)"
            );
        }
        self.version_checked = true;
        let js = jetstream::new(client);
        self.js = Some(js.clone());
        Ok(js)
    }

    async fn ensure_stream(
        &mut self,
        js: &jetstream::Context,
        site: &str,
    ) -> Result<(), ExportError> {
        if self.streams.contains(site) {
            return Ok(());
        }
        // Replicated on a cluster: the SIEM's copy survives a node as the chains do.
        crate::jetstream::create_replicated(
            js,
            jetstream::stream::Config {
                name: stream_name(site),
                subjects: vec![format!("conduit.{site}.>")],
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ExportError::Target(e.to_string()))?;
        self.streams.insert(site.to_owned());
        Ok(())
    }

    async fn publish(&mut self, items: &[Item]) -> Result<(), ExportError> {
        // async-nats holds at most 5,000 unacknowledged publishes per context and
        // makes the next one wait: acks are awaited per window, never all at the end.
        for window in items.chunks(ACK_WINDOW) {
            self.publish_window(window).await?;
        }
        Ok(())
    }

    async fn publish_window(&mut self, items: &[Item]) -> Result<(), ExportError> {
        let js = self.context().await?;
        let mut acks = Vec::with_capacity(items.len());
        for item in items {
            if !item.record.site.is_empty() {
                self.chain_site
                    .insert(item.chain.clone(), canonical_site(&item.record.site));
            }
            let site = site(
                item,
                self.fixed_site
                    .as_ref()
                    .or_else(|| self.chain_site.get(&item.chain)),
            );
            self.ensure_stream(&js, &site).await?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id(item).as_str());
            let payload = item.render(self.format).to_string();
            let ack = js
                .publish_with_headers(subject(item, &site), headers, payload.into())
                .await
                .map_err(|e| ExportError::Target(format!("nats publish: {e}")))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await
                .map_err(|e| ExportError::Target(format!("nats publish ack: {e}")))?;
        }
        Ok(())
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &str {
        "nats"
    }

    async fn send(&mut self, items: &[Item]) -> Result<(), ExportError> {
        let r = self.publish(items).await;
        if r.is_err() {
            // Reconnect next time; the stream check is cheap to redo.
            self.js = None;
            self.streams.clear();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::{canonical_site, stream_name};

    #[test]
    fn sites_differing_in_case_are_one_stream_and_subject() {
        assert_eq!(canonical_site("plant"), canonical_site("PLANT"));
        assert_eq!(canonical_site("Plant.01"), "plant_01");
        assert_eq!(stream_name(&canonical_site("PLANT")), "CONDUIT_PLANT");
    }
}

//! The collector's own alarms: logged, counted, and appended as signed ALARM records
//! to its own chain in `<store>/_collector/` (same format as a sensor spool, with its
//! own key, so `conduit-sensor verify-chain` checks it and the exports ship it).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use conduit_evidence::chain::{Recorder, RecorderOptions, keys};
use conduit_evidence::spool::SyncPolicy;
use conduit_proto::v1::{self, RecordKind, record::Body};
use ed25519_dalek::SigningKey;

use crate::metrics::Metrics;
use crate::store::ALARM_DIR;
use crate::text::bounded;

/// Longest alarm detail kept (peer-controlled text is cut, never stored whole).
const MAX_DETAIL_BYTES: usize = 2048;

/// Sensor id of the alarm chain.
pub const ALARM_SENSOR_ID: &str = "collector";

pub struct Alarms {
    recorder: Mutex<Recorder>,
    dir: std::path::PathBuf,
    /// Sensors whose silence is alarmed and not yet over.
    silent: Mutex<std::collections::HashSet<String>>,
    /// The alarm chain's key, which also cosigns the sensors' checkpoints (its
    /// public half is `<store>/_collector/signing.pub`; docs/witness.md).
    witness: SigningKey,
    pub metrics: Arc<Metrics>,
    /// Woken after each record appended, for whoever ships the chain on (JetStream).
    pub appended: tokio::sync::Notify,
}

impl Alarms {
    pub fn open(store: &Path) -> Result<Alarms, conduit_evidence::chain::Error> {
        let mut opts = RecorderOptions::new(store.join(ALARM_DIR), ALARM_SENSOR_ID);
        opts.sync = SyncPolicy::EveryRecord;
        let (recorder, _) = Recorder::open(opts)?;
        let witness = keys::load_signing_key(&store.join(ALARM_DIR).join(keys::KEY_FILE))?;
        Ok(Alarms {
            recorder: Mutex::new(recorder),
            dir: store.join(ALARM_DIR),
            silent: Mutex::default(),
            witness,
            metrics: Arc::default(),
            appended: tokio::sync::Notify::new(),
        })
    }

    /// The collector's witness key (cosignatures).
    pub fn witness_key(&self) -> &SigningKey {
        &self.witness
    }

    /// Logs, counts and records an alarm about `sensor_id` at `seq`.
    pub fn raise(&self, kind: &str, sensor_id: &str, seq: u64, detail: &str) {
        let sensor_id = bounded(sensor_id, conduit_proto::limits::MAX_SENSOR_ID_BYTES);
        let detail = bounded(detail, MAX_DETAIL_BYTES);
        let (sensor_id, detail) = (sensor_id.as_ref(), detail.as_ref());
        tracing::error!(alarm = kind, sensor = sensor_id, seq, detail, "ALARM");
        self.metrics.alarm(kind);
        self.append(kind, sensor_id, seq, detail);
    }

    /// Records an event of the collector's own (e.g. `retention`) in its signed
    /// chain, without raising an alarm.
    pub fn note(&self, kind: &str, sensor_id: &str, seq: u64, detail: &str) {
        let sensor_id = bounded(sensor_id, conduit_proto::limits::MAX_SENSOR_ID_BYTES);
        let detail = bounded(detail, MAX_DETAIL_BYTES);
        self.append(kind, &sensor_id, seq, &detail);
    }

    fn append(&self, kind: &str, sensor_id: &str, seq: u64, detail: &str) {
        let record = v1::Record {
            software_version: String::new(),
            kind: RecordKind::Alarm as i32,
            time_unix_nano: 0,
            sensor_id: String::new(),
            site: String::new(),
            body: Some(Body::Alarm(v1::Alarm {
                kind: kind.to_owned(),
                sensor_id: sensor_id.to_owned(),
                seq,
                detail: detail.to_owned(),
            })),
        };
        let mut rec = match self.recorder.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = rec.append(record).and_then(|_| rec.sync()) {
            tracing::error!(error = %e, "could not write the alarm record");
        }
        drop(rec);
        self.appended.notify_one();
    }

    /// The alarm chain's directory (`<store>/_collector`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Timer: a sensor that streamed and then sent nothing for `after` raises
    /// `sensor_silent` once; when it speaks again, `sensor_resumed` is noted. Only
    /// sensors seen since this collector started are watched.
    pub fn check_silence(&self, after: std::time::Duration) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        for (sensor, head, last_seen) in self.metrics.last_seen() {
            let quiet = now - last_seen;
            let was = match self.silent.lock() {
                Ok(s) => s.contains(&sensor),
                Err(p) => p.into_inner().contains(&sensor),
            };
            let is = quiet >= after.as_secs_f64();
            if is == was {
                continue;
            }
            let mut set = match self.silent.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if is {
                set.insert(sensor.clone());
                drop(set);
                self.raise(
                    "sensor_silent",
                    &sensor,
                    head,
                    &format!(
                        "no message for {quiet:.0} s (threshold {} s); its stored chain ends at seq {head}",
                        after.as_secs()
                    ),
                );
            } else {
                set.remove(&sensor);
                drop(set);
                self.note("sensor_resumed", &sensor, head, "the sensor sends again");
            }
        }
    }

    /// Timer: checkpoints the alarm chain so that its silence is signed too.
    pub fn tick(&self) {
        let mut rec = match self.recorder.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        match rec
            .tick(SystemTime::now())
            .and_then(|t| rec.sync().map(|()| t))
        {
            Ok(t) if !t.is_empty() => {
                drop(rec);
                self.appended.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "alarm chain tick failed"),
        }
    }
}

//! The systemd readiness protocol (`Type=notify`). Every call is a no-op when
//! `NOTIFY_SOCKET` is not set, so the daemons behave the same outside systemd.
//!
//! A reload sends `RELOADING=1` with `MONOTONIC_USEC` and then `READY=1` with a
//! `STATUS=` that says whether it was applied; systemd 252 (bookworm) has no
//! `Type=notify-reload`, so the units check the new configuration in
//! `ExecReload=` before they send SIGHUP, and `systemctl reload` fails on a bad
//! file (see deploy/systemd/).

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!("sd_notify: {err}");
    }
}

/// Start-up is complete (the sensor: programs attached; the collector: listening).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A reload ended (applied or rejected, as `status` says).
pub fn reloaded(status: &str) {
    ready(status);
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// A status line for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

//! Log output for three readers:
//!
//! - a terminal: human-readable lines, coloured only when stderr is a terminal;
//! - journald (`JOURNAL_STREAM` names our stderr): each line starts with its
//!   sd-daemon priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and
//!   trace), no colour and no time stamp (the journal keeps its own), so that
//!   `journalctl -p warning` finds the warnings;
//! - a log shipper: `--log-format json`, one JSON object per line.
//!
//! The filter is `RUST_LOG` (tracing-subscriber's EnvFilter syntax, e.g.
//! `RUST_LOG=info,sensor_user::flows=debug`); without it, `info`.

use std::io::IsTerminal as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text; with sd-daemon priority prefixes when stderr is the journal.
    #[default]
    Text,
    /// One JSON object per line (time, level, target, fields).
    Json,
}

/// The logging flag both binaries take (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr: text (priority prefixes under journald, colour only on a terminal) or json.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "CONDUIT_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

/// The sd-daemon priority (syslog level) of a tracing level.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Whether stderr is the journal: `JOURNAL_STREAM` is `DEV:INODE` of the stream
/// systemd connected, and stderr is still that stream (not redirected since).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let value = value.to_string_lossy();
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on fd 2 writes only into the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev == dev && st.st_ino == ino
}

/// Prints a fatal error the CLI reports outside tracing (a configuration error
/// with its file:line:column lines, the final runtime error): as is on a
/// terminal, each line with `<3>` when stderr is the journal.
pub fn print_error(message: &str) {
    let journal = stderr_is_journal();
    for line in message.lines() {
        if journal {
            eprintln!("<3>{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Prefixes every line of every event with its `<N>` priority: journald makes each
/// line of a stream its own entry, so a multi-line message (a rejected map's
/// file:line:column list) keeps its priority on every line.
struct Prioritized<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut text = String::new();
        self.0.format_event(ctx, Writer::new(&mut text), event)?;
        write!(
            writer,
            "{}",
            prefix_lines(priority(*event.metadata().level()), &text)
        )
    }
}

/// `text` with `<priority>` at the start of every line.
fn prefix_lines(priority: u8, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.split_inclusive('\n') {
        out.push_str(&format!("<{priority}>{line}"));
    }
    out
}

/// Installs the global subscriber, writing to stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_ansi(false).init(),
        LogFormat::Text if stderr_is_journal() => {
            let inner = tracing_subscriber::fmt::format()
                .without_time()
                .with_ansi(false);
            builder
                .with_ansi(false)
                .event_format(Prioritized(inner))
                .init();
        }
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_a_message_has_its_priority() {
        assert_eq!(
            prefix_lines(3, "reload rejected:\nconduits.yaml:4:7: bad\n"),
            "<3>reload rejected:\n<3>conduits.yaml:4:7: bad\n"
        );
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
        assert_eq!(priority(Level::TRACE), 7);
    }
}

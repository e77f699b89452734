//! `conduit-sensor`: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // One malloc arena: the event loop moves between tokio's worker threads, and
    // per-thread arenas would each keep the memory of a burst (RSS bound, README).
    // SAFETY: mallopt before any thread exists; it only tunes glibc's allocator.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cli = sensor_user::cli::Cli::parse();
    conduit_ops::logging::init(cli.log.log_format);
    sensor_user::commands::dispatch(cli)
}

//! `conduit-sensor`: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser as _;

/// mimalloc: every record allocates its fields, and glibc's malloc and free took a
/// fifth of the record path (`bench_chain`: about 1.4x the records per second with
/// it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay` in the bundled
/// `mimalloc.h` (v3), which libmimalloc-sys 0.1.49 does not name.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    let cli = sensor_user::cli::Cli::parse();
    // Commit arena memory as it is used and return freed pages at once: a burst of
    // 120k flows then peaks at about 51 MiB instead of 56 MiB (flow_burst.rs; the
    // README's RSS bound). Not in `replay`, a batch job bound by time: there each
    // purge was a refault of a transparent huge page, zeroed whole (a tenth of
    // its time).
    let purge_at_once = !matches!(cli.command, sensor_user::cli::Command::Replay(_));
    // SAFETY: plain option setters of the allocator, before any other thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        if purge_at_once {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
    conduit_ops::logging::init(cli.log.log_format);
    sensor_user::commands::dispatch(cli)
}

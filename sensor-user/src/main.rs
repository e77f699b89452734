//! `conduit-sensor`: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = sensor_user::cli::Cli::parse();
    conduit_ops::logging::init(cli.log.log_format);
    sensor_user::commands::dispatch(cli)
}

//! The `clusterwatch` binary: parse the command line, set up logging, run the command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    clusterwatch::memory::drop_thread_caches();
    clusterwatch::memory::tune_allocator();
    let cli = clusterwatch::cli::Cli::parse();
    clusterwatch::logging::init(cli.log_level, cli.log_format);
    clusterwatch::commands::run(cli)
}

//! The `clusterwatch` binary: parse the command line, set up logging, run the command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = clusterwatch::cli::Cli::parse();
    clusterwatch::logging::init(cli.log_level, cli.log_format);
    clusterwatch::commands::run(cli)
}

/// glibc gives a thread that meets contention its own malloc arena, up to eight per core, and
/// each arena keeps the pages of its own high-water mark. With tokio's blocking threads coming
/// and going, more arenas warm up over hours and resident memory creeps up although the live
/// heap does not grow; two arenas are plenty here. `MALLOC_ARENA_MAX` set by the operator wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: runs before any other thread exists; mallopt only sets a tunable.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

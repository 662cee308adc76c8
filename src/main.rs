//! The `smtp-after-popd` command: parses arguments and hands over to the
//! library; see `lib.rs` for the layout.

use clap::Parser;
use smtp_after_popd::service::config::Cli;

fn main() {
    // glibc gives each thread that allocates its own malloc arena; with a
    // large grant table made by several runtime threads, the arenas'
    // fragmentation costs more memory than the table. Two are plenty for
    // a daemon whose work is one receive loop per socket.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = Cli::parse();
    std::process::exit(smtp_after_popd::service::daemon::main(cli));
}

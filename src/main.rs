//! The `smtp-after-popd` command: parses arguments and hands over to the
//! library; see `lib.rs` for the layout.

use clap::Parser;
use smtp_after_popd::config::Cli;

fn main() {
    let cli = Cli::parse();
    std::process::exit(smtp_after_popd::daemon::main(cli));
}

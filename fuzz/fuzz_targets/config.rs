//! The configuration loader on arbitrary file contents: TOML parsing,
//! every key's validation and [[pattern]] compilation must fail with a
//! message, never panic.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smtp_after_popd::service::config::{Cli, Config};

fn dir() -> &'static tempfile::TempDir {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().expect("tempdir"))
}

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("fuzz.toml");
    let mut f = std::fs::File::create(&path).expect("create");
    f.write_all(data).expect("write");
    drop(f);
    let map = dir().path().join("map");
    let args = <Cli as clap::Parser>::try_parse_from([
        "smtp-after-popd",
        "--config",
        path.to_str().expect("path"),
        "--map",
        map.to_str().expect("path"),
    ])
    .expect("args");
    if let Err(e) = Config::from_args(&args.daemon) {
        assert!(!e.0.is_empty());
    }
});

//! Test guests for hopvm and a kvm-unit-tests style runner.
//!
//! The guests (small freestanding C + assembly programs in `guests/`) are
//! built by `build.rs` into Multiboot v1 ELF32 images; [`image_path`] and
//! [`images_dir`] locate them.  The [`manifest`] module parses the test list
//! (`unittests.cfg`) and the [`runner`] module runs each test by spawning the
//! hopvm binary and judging its exit status and output ([`migrate`] runs the
//! live-migration tests).

pub mod manifest;
pub mod migrate;
pub mod pattern;
pub mod process;
pub mod runner;

use std::path::PathBuf;

include!(concat!(env!("OUT_DIR"), "/image_names.rs"));

/// Environment variable that overrides [`images_dir`] at run time.
pub const IMAGES_DIR_ENV: &str = "HOPVM_GUEST_IMAGES_DIR";

/// Directory holding the built guest images (`<name>.elf`).
///
/// This is the build script's output directory, unless the environment
/// variable [`IMAGES_DIR_ENV`] is set at run time.
pub fn images_dir() -> PathBuf {
    match std::env::var_os(IMAGES_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("HOPVM_GUEST_IMAGES_DIR")),
    }
}

/// Path of the guest image `name`, e.g. `image_path("hello")` or
/// `image_path("hello.elf")`: `<images_dir>/hello.elf`.
pub fn image_path(name: &str) -> PathBuf {
    if name.ends_with(".elf") {
        images_dir().join(name)
    } else {
        images_dir().join(format!("{name}.elf"))
    }
}

/// Path of the default manifest, `unittests.cfg` in this crate's directory.
pub fn default_manifest_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("unittests.cfg")
}

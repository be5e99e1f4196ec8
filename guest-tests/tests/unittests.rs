//! Runs the guest test manifest (`unittests.cfg`) against the hopvm binary.
//!
//! hopvm is found via `$HOPVM`, else as `hopvm` in the cargo target profile
//! directory of this test (build it first, e.g. `cargo build`).

use guest_tests::manifest;
use guest_tests::runner::{self, RunnerConfig, Verdict};

/// Checks the built images: ELF32 i386 with a valid Multiboot v1 header
/// (no a.out kludge) in the first 8 KiB.  Does not need hopvm.
#[test]
fn images_are_multiboot_elf32() {
    assert!(!guest_tests::IMAGE_NAMES.is_empty());
    for name in guest_tests::IMAGE_NAMES {
        let path = guest_tests::image_path(name);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&data[..4], b"\x7fELF", "{name}: not ELF");
        assert_eq!(data[4], 1, "{name}: not ELF32");
        assert_eq!(
            u16::from_le_bytes([data[18], data[19]]),
            3,
            "{name}: not i386"
        );
        let header = data[..data.len().min(8192)]
            .chunks_exact(4)
            .enumerate()
            .find(|(_, w)| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) == 0x1BAD_B002)
            .map(|(i, _)| i * 4)
            .unwrap_or_else(|| panic!("{name}: no multiboot header in the first 8 KiB"));
        let word =
            |o: usize| u32::from_le_bytes(data[header + o..header + o + 4].try_into().unwrap());
        let (magic, flags, checksum) = (word(0), word(4), word(8));
        assert_eq!(
            magic.wrapping_add(flags).wrapping_add(checksum),
            0,
            "{name}: bad checksum"
        );
        assert_eq!(flags & (1 << 16), 0, "{name}: uses the a.out kludge");
        let entry = u32::from_le_bytes(data[24..28].try_into().unwrap());
        assert!(
            (0x40_0000..0x50_0000).contains(&entry),
            "{name}: entry {entry:#x}"
        );
    }
}

/// Runs every test of the manifest through hopvm and asserts none fails.
#[test]
fn unittests_cfg() {
    let manifest =
        manifest::load(&guest_tests::default_manifest_path()).unwrap_or_else(|e| panic!("{e}"));
    let hopvm = runner::find_hopvm().unwrap_or_else(|e| panic!("{e}"));
    println!("hopvm: {}", hopvm.display());
    let config = RunnerConfig::new(hopvm);
    let summary = runner::run_manifest(&manifest, &config, |r| {
        println!("{}  [{:.1}s]", r.line(), r.duration.as_secs_f64());
        if matches!(r.verdict, Verdict::Fail(_)) {
            println!("{}", r.output_text());
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    println!("{}", summary.line());
    let failed: Vec<String> = summary
        .results
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Fail(_)))
        .map(|r| r.line())
        .collect();
    assert!(
        failed.is_empty(),
        "failed guest tests:\n{}",
        failed.join("\n")
    );
}

/// Runs the manifest under QEMU (TCG) through `scripts/qemu-as-hopvm`, which
/// checks the guests independently of hopvm.  Does nothing when
/// `qemu-system-x86_64` is not installed.
#[test]
fn guests_under_qemu() {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    if !found {
        println!("qemu-system-x86_64 not installed; not checking the guests under QEMU");
        return;
    }
    let manifest =
        manifest::load(&guest_tests::default_manifest_path()).unwrap_or_else(|e| panic!("{e}"));
    let wrapper = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/qemu-as-hopvm");
    let config = RunnerConfig::new(wrapper);
    let summary = runner::run_manifest(&manifest, &config, |r| {
        println!("{}  [{:.1}s]", r.line(), r.duration.as_secs_f64());
        if matches!(r.verdict, Verdict::Fail(_)) {
            println!("{}", r.output_text());
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    println!("under QEMU: {}", summary.line());
    assert!(summary.success(), "guest tests failed under QEMU");
}

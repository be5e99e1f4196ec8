//! Builds the test guests in `guests/` into Multiboot v1 ELF32 images.
//!
//! Every `guests/<name>.c` is one image; it is linked with the shared runtime
//! in `guests/lib/` (`*.c` and `*.S`) using `guests/lib/linker.ld` (64-bit
//! code at 4 MiB), then converted with `objcopy -O elf32-i386` so that
//! Multiboot loaders (hopvm, `qemu-system-x86_64 -kernel`) accept it.
//!
//! Every `guests/<name>.S` is a standalone real-mode image in the style of
//! kvm-unit-tests' `x86/realmode`: assembled with `gcc -m32`, linked without
//! the runtime by `guests/lib/standalone16.ld` at 0x8000 as an ELF32 Multiboot
//! image whose 32-bit entry code (`.text`) drops to real mode itself and runs
//! 16-bit code (`.text16`).
//!
//! Outputs in `$OUT_DIR`:
//! - `images/<name>.elf`: the bootable images (directory exported to the
//!   crate as `HOPVM_GUEST_IMAGES_DIR`),
//! - `obj/<name>.elf64`: the 64-bit ELF with symbols, for debugging
//!   (`obj/<name>.elf32` for standalone images),
//! - `image_names.rs`: the lists of image names (`IMAGE_NAMES` for the C
//!   guests, `STANDALONE_IMAGE_NAMES` for the real-mode ones).
//!
//! Tools: `gcc`, `ld`, `objcopy` and `objdump` from PATH, overridable with
//! `HOPVM_GUEST_CC`, `HOPVM_GUEST_LD`, `HOPVM_GUEST_OBJCOPY` and
//! `HOPVM_GUEST_OBJDUMP`.
//!
//! After linking, the code is disassembled (`.text16` as 8086 code) and the
//! build fails if it contains an instruction that the test machine's
//! instruction emulator cannot execute
//! (SSE/AVX registers, XSAVE family, CMPXCHG16B, CLAC/STAC, INT3, FWAIT,
//! POPCNT, MOVBE), except under a symbol whose name ends in `_probe` (used by
//! guests that deliberately execute such an instruction).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiler flags for freestanding, integer-only 64-bit guest code.
const CFLAGS: &[&str] = &[
    "-m64",
    "-std=gnu11",
    "-O2",
    "-g",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-fcf-protection=none",
    "-fno-common",
    "-mgeneral-regs-only",
    "-mno-sse",
    "-mno-mmx",
    "-mno-red-zone",
    "-mno-popcnt",
    "-nostdlib",
];

/// Instruction mnemonics (objdump spelling, prefix match) the emulator lacks.
const FORBIDDEN_MNEMONICS: &[&str] = &[
    "xsave",
    "xrstor",
    "xgetbv",
    "xsetbv",
    "cmpxchg16b",
    "clac",
    "stac",
    "int3",
    "fwait",
    "wait",
    "popcnt",
    "movbe",
    "lzcnt",
    "tzcnt",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guests_dir = manifest_dir.join("guests");
    let lib_dir = guests_dir.join("lib");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", guests_dir.display());
    for var in [
        "HOPVM_GUEST_CC",
        "HOPVM_GUEST_LD",
        "HOPVM_GUEST_OBJCOPY",
        "HOPVM_GUEST_OBJDUMP",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let tools = Tools {
        cc: tool("HOPVM_GUEST_CC", "gcc"),
        ld: tool("HOPVM_GUEST_LD", "ld"),
        objcopy: tool("HOPVM_GUEST_OBJCOPY", "objcopy"),
        objdump: tool("HOPVM_GUEST_OBJDUMP", "objdump"),
    };

    let obj_dir = out_dir.join("obj");
    let images_dir = out_dir.join("images");
    for dir in [&obj_dir, &obj_dir.join("lib"), &images_dir] {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    }

    let lib_sources = list_sources(&lib_dir, &["c", "S"]);
    let guest_sources = list_sources(&guests_dir, &["c"]);
    let standalone_sources = list_sources(&guests_dir, &["S"]);
    // The directories catch added or removed files; every file is listed
    // too, since a directory's own timestamp does not change when a file in
    // it is edited.
    println!("cargo:rerun-if-changed={}", lib_dir.display());
    for f in list_sources(&lib_dir, &["c", "S", "h", "ld"])
        .iter()
        .chain(&guest_sources)
        .chain(&standalone_sources)
    {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    assert!(
        !guest_sources.is_empty(),
        "no guest sources found in {}",
        guests_dir.display()
    );

    // Compile everything (in parallel: gcc start-up dominates).
    let mut jobs: Vec<(PathBuf, PathBuf, Kind)> = Vec::new();
    for src in &lib_sources {
        jobs.push((
            src.clone(),
            obj_dir.join("lib").join(object_name(src)),
            Kind::Runtime,
        ));
    }
    for src in &guest_sources {
        jobs.push((src.clone(), obj_dir.join(object_name(src)), Kind::Runtime));
    }
    for src in &standalone_sources {
        jobs.push((
            src.clone(),
            obj_dir.join(object_name(src)),
            Kind::Standalone,
        ));
    }
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(src, obj, kind)| s.spawn(|| tools.compile(src, obj, &lib_dir, *kind)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("compiler thread panicked".into()))
            })
            .collect()
    });
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if !errors.is_empty() {
        panic!("building test guests failed:\n{}", errors.join("\n"));
    }

    let lib_objs: Vec<PathBuf> = lib_sources
        .iter()
        .map(|s| obj_dir.join("lib").join(object_name(s)))
        .collect();
    let linker_script = lib_dir.join("linker.ld");
    let mut names = Vec::new();
    for src in &guest_sources {
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_else(|| panic!("bad guest file name {}", src.display()))
            .to_string();
        let elf64 = obj_dir.join(format!("{name}.elf64"));
        let image = images_dir.join(format!("{name}.elf"));
        let mut objs = vec![obj_dir.join(object_name(src))];
        objs.extend(lib_objs.iter().cloned());
        if let Err(e) = tools
            .link(&linker_script, &objs, &elf64)
            .and_then(|()| tools.check_instructions(&elf64, &[]))
            .and_then(|()| tools.to_elf32(&elf64, &image))
        {
            panic!("building test guest {name} failed:\n{e}");
        }
        names.push(name);
    }

    let standalone_script = lib_dir.join("standalone16.ld");
    let mut standalone_names = Vec::new();
    for src in &standalone_sources {
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_else(|| panic!("bad guest file name {}", src.display()))
            .to_string();
        let elf = obj_dir.join(format!("{name}.elf32"));
        let image = images_dir.join(format!("{name}.elf"));
        if let Err(e) = tools
            .link_standalone(&standalone_script, &obj_dir.join(object_name(src)), &elf)
            .and_then(|()| tools.check_instructions(&elf, &["-j", ".text"]))
            .and_then(|()| tools.check_instructions(&elf, &["-j", ".text16", "-M", "i8086"]))
            .and_then(|()| tools.strip(&elf, &image))
        {
            panic!("building standalone test guest {name} failed:\n{e}");
        }
        standalone_names.push(name);
    }

    let list: String = names.iter().map(|n| format!("    {n:?},\n")).collect();
    let standalone_list: String = standalone_names
        .iter()
        .map(|n| format!("    {n:?},\n"))
        .collect();
    let rs = format!(
        "/// Names of the test guest images built from `guests/*.c`.\npub const IMAGE_NAMES: &[&str] = &[\n{list}];\n\n/// Names of the standalone real-mode images built from `guests/*.S`\n/// (Multiboot ELF32 linked at 0x8000, see `guests/lib/standalone16.ld`).\npub const STANDALONE_IMAGE_NAMES: &[&str] = &[\n{standalone_list}];\n"
    );
    let rs_path = out_dir.join("image_names.rs");
    fs::write(&rs_path, rs).unwrap_or_else(|e| panic!("writing {}: {e}", rs_path.display()));
    println!(
        "cargo:rustc-env=HOPVM_GUEST_IMAGES_DIR={}",
        images_dir.display()
    );
}

fn tool(var: &str, default: &str) -> String {
    env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn list_sources(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    v.sort();
    v
}

fn object_name(src: &Path) -> String {
    let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("x");
    let ext = src.extension().and_then(|s| s.to_str()).unwrap_or("");
    format!("{stem}.{ext}.o")
}

/// How a source file is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// 64-bit code linked with the runtime (`guests/*.c`, `guests/lib/`).
    Runtime,
    /// A standalone 32/16-bit image (`guests/*.S`).
    Standalone,
}

/// Flags for standalone 32/16-bit assembly guests.
const STANDALONE_FLAGS: &[&str] = &["-m32", "-ffreestanding", "-fno-pic", "-nostdlib"];

struct Tools {
    cc: String,
    ld: String,
    objcopy: String,
    objdump: String,
}

impl Tools {
    fn compile(&self, src: &Path, obj: &Path, lib_dir: &Path, kind: Kind) -> Result<(), String> {
        let mut cmd = Command::new(&self.cc);
        cmd.args(match kind {
            Kind::Runtime => CFLAGS,
            Kind::Standalone => STANDALONE_FLAGS,
        })
        .arg("-I")
        .arg(lib_dir)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj);
        run(&mut cmd)
    }

    fn link(&self, script: &Path, objs: &[PathBuf], out: &Path) -> Result<(), String> {
        let mut cmd = Command::new(&self.ld);
        cmd.args([
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "-static",
            "--build-id=none",
        ])
        .args(["-z", "max-page-size=0x1000", "-z", "noexecstack"])
        .arg("-T")
        .arg(script)
        .arg("-o")
        .arg(out)
        .args(objs);
        run(&mut cmd)
    }

    fn link_standalone(&self, script: &Path, obj: &Path, out: &Path) -> Result<(), String> {
        let mut cmd = Command::new(&self.ld);
        cmd.args(["-m", "elf_i386", "-nostdlib", "-static", "--build-id=none"])
            .args(["-z", "max-page-size=0x1000", "-z", "noexecstack"]);
        // One RWX segment by design (it must fit in [0x8000, 0x9000)); binutils
        // 2.39 and later warn about that unless told not to.
        let help = Command::new(&self.ld).arg("--help").output();
        if help.is_ok_and(|h| String::from_utf8_lossy(&h.stdout).contains("--no-warn-rwx-segments"))
        {
            cmd.arg("--no-warn-rwx-segments");
        }
        cmd.arg("-T").arg(script).arg("-o").arg(out).arg(obj);
        run(&mut cmd)
    }

    fn strip(&self, elf: &Path, image: &Path) -> Result<(), String> {
        let mut cmd = Command::new(&self.objcopy);
        cmd.arg("--strip-debug").arg(elf).arg(image);
        run(&mut cmd)
    }

    fn to_elf32(&self, elf64: &Path, image: &Path) -> Result<(), String> {
        let mut cmd = Command::new(&self.objcopy);
        cmd.args(["-O", "elf32-i386", "--strip-debug"])
            .arg(elf64)
            .arg(image);
        run(&mut cmd)
    }

    /// Fails if the disassembly contains an instruction the emulator lacks;
    /// `extra` adds objdump options (sections, `-M i8086`).
    fn check_instructions(&self, elf: &Path, extra: &[&str]) -> Result<(), String> {
        let output = Command::new(&self.objdump)
            .args(["-d", "--no-show-raw-insn", "-M", "att"])
            .args(extra)
            .arg(elf)
            .output();
        let output = match output {
            Ok(o) if o.status.success() => o,
            Ok(o) => {
                println!(
                    "cargo:warning=objdump failed on {}: {}; skipping the instruction check",
                    elf.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return Ok(());
            }
            Err(e) => {
                println!(
                    "cargo:warning=cannot run {} ({e}); skipping the guest instruction check",
                    self.objdump
                );
                return Ok(());
            }
        };
        let text = String::from_utf8_lossy(&output.stdout);
        let mut symbol = String::new();
        let mut bad = Vec::new();
        for line in text.lines() {
            // Symbol headers look like "0000000000401000 <name>:".
            if let Some(rest) = line.strip_suffix(">:") {
                if let Some(i) = rest.find(" <") {
                    symbol = rest[i + 2..].to_string();
                }
                continue;
            }
            // Instruction lines look like "  401234:\tmnemonic operands".
            let Some((addr, insn)) = line.split_once(":\t") else {
                continue;
            };
            let insn = insn.trim();
            let mut words = insn.split_whitespace();
            let mut mnemonic = words.next().unwrap_or("");
            if matches!(
                mnemonic,
                "lock" | "rep" | "repz" | "repe" | "repnz" | "repne" | "data16"
            ) {
                mnemonic = words.next().unwrap_or("");
            }
            let forbidden = FORBIDDEN_MNEMONICS
                .iter()
                .any(|f| mnemonic == *f || (mnemonic.starts_with(f) && f.len() > 4))
                || insn.contains("%xmm")
                || insn.contains("%ymm")
                || insn.contains("%zmm")
                || insn.contains("%mm")
                || insn.contains("%st");
            if forbidden && !symbol.ends_with("_probe") {
                bad.push(format!("  {}: {insn}   (in <{symbol}>)", addr.trim()));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} contains instructions the test machine's emulator cannot execute:\n{}",
                elf.display(),
                bad.join("\n")
            ))
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    match cmd.output() {
        Ok(o) if o.status.success() => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
                println!("cargo:warning={line}");
            }
            Ok(())
        }
        Ok(o) => Err(format!(
            "{shown} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!(
            "cannot run {shown}: {e} (the test guests need gcc and GNU binutils)"
        )),
    }
}

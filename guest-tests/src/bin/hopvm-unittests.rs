//! `hopvm-unittests`: runs the guest tests of a manifest against hopvm,
//! kvm-unit-tests style.  Prints `PASS name`, `FAIL name (reason)` or
//! `SKIP name (reason)` per test and a final `N passed, N failed[, N skipped]`
//! line; exits 0 when nothing failed, 1 when a test failed, 2 on errors
//! (bad manifest, hopvm not found, unknown test name).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use guest_tests::manifest;
use guest_tests::runner::{self, RunnerConfig};

/// Run hopvm guest tests from a kvm-unit-tests style manifest.
#[derive(Parser, Debug)]
#[command(name = "hopvm-unittests", version)]
struct Args {
    /// The hopvm binary (default: $HOPVM, else `hopvm` in this executable's
    /// cargo target directory).
    #[arg(long, value_name = "PATH")]
    hopvm: Option<PathBuf>,
    /// The manifest (default: guest-tests/unittests.cfg).
    #[arg(long, value_name = "PATH")]
    manifest: Option<PathBuf>,
    /// Only run tests in GROUP (repeatable); others are reported as SKIP.
    #[arg(short = 'g', long = "group", value_name = "GROUP")]
    groups: Vec<String>,
    /// Show the command line and the guest output of every test.
    #[arg(short, long)]
    verbose: bool,
    /// List the tests instead of running them.
    #[arg(long)]
    list: bool,
    /// Only run these tests.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let manifest_path = args
        .manifest
        .clone()
        .unwrap_or_else(guest_tests::default_manifest_path);
    let manifest = match manifest::load(&manifest_path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("hopvm-unittests: {e}");
            return ExitCode::from(2);
        }
    };
    if args.list {
        for t in &manifest.tests {
            println!(
                "{:<20} file={} smp={} memory={} append={:?} groups={}",
                t.name,
                t.file,
                t.smp,
                t.memory,
                t.append,
                t.groups.join(",")
            );
        }
        return ExitCode::SUCCESS;
    }
    let hopvm = match args.hopvm.clone() {
        Some(p) => p,
        None => match runner::find_hopvm() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("hopvm-unittests: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let mut config = RunnerConfig::new(hopvm);
    config.groups = args.groups.clone();
    config.names = args.names.clone();
    let verbose = args.verbose;
    let summary = runner::run_manifest(&manifest, &config, |r| {
        println!("{}", r.line());
        let failed = matches!(r.verdict, runner::Verdict::Fail(_));
        if verbose && !r.command.is_empty() {
            print!("{}", indent(&r.output_text()));
        } else if failed {
            // Without -v, still show the tail of a failing test's output.
            let text = r.output_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            print!("{}", indent(&(tail.join("\n") + "\n")));
        }
    });
    match summary {
        Ok(s) => {
            println!("{}", s.line());
            if s.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("hopvm-unittests: {e}");
            ExitCode::from(2)
        }
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

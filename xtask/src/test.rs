//! `cargo xtask test`: the project's test command.
//!
//! Tests that need root are named `root_*`. As root, everything runs. Not
//! root outside CI, they are skipped and listed. Not root in CI (`CI=true`)
//! is an error: CI must run them.
use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{apt::Apt, ebpf, sh, sys, tools};

/// Substring that marks a test as needing root (libtest's `--skip` matches substrings).
const ROOT_MARK: &str = "root_";

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Args {
    /// Test only this package (repeatable); default: the whole workspace.
    #[arg(short, long = "package", value_name = "PACKAGE")]
    packages: Vec<String>,
    /// Arguments for the test binaries (filters, `--nocapture`, ...), after `--`.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Runs the tests.
pub fn run(apt: &mut Apt, args: &Args) -> Result<()> {
    let root = sys::is_root();
    // Checked first: no point building for minutes to fail afterwards.
    if sys::is_ci() && !root {
        bail!(
            "CI=true but not running as root: the {ROOT_MARK}* tests (network namespaces, XDP) \
             must run in CI; run .ci/run as root"
        );
    }
    ebpf::build(apt)?;
    tools::ensure(apt)?;

    let mut test_args = args.args.clone();
    if root {
        sh::step("running all tests (root)");
    } else {
        let skipped = root_tests(args)?;
        sh::step(format!(
            "not root: skipping {} test(s) that need root (names with `{ROOT_MARK}`):",
            skipped.len()
        ));
        for name in &skipped {
            eprintln!("    skipped: {name}");
        }
        for name in skipped.iter().filter(|n| !named_root(n)) {
            eprintln!(
                "warning: {name} is skipped because its name contains `{ROOT_MARK}`; \
                 only tests that need root should (rename it if it does not)"
            );
        }
        if args.args.iter().any(|a| a == "--exact") {
            // With --exact, `--skip root_` would only skip a test named exactly that.
            for name in &skipped {
                test_args.extend(["--skip".to_string(), name.clone()]);
            }
        } else {
            test_args.extend(["--skip".to_string(), ROOT_MARK.to_string()]);
        }
    }
    let mut cmd = cargo_test(args);
    cmd.arg("--").args(&test_args);
    sh::step(sh::display(&cmd));
    run_counting(&mut cmd)
}

/// Runs the test command, passing its output through, and ends with one
/// line totalling every binary's `test result:` (cargo's own last line is
/// the doc tests', often "0 passed", which says nothing of the run).
fn run_counting(cmd: &mut Command) -> Result<()> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", sh::display(cmd)))?;
    let mut total = Totals::default();
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout().lock();
        for line in BufReader::new(out).lines() {
            let line = line.context("reading the test output")?;
            total.add(&line);
            writeln!(stdout, "{line}").context("writing the test output")?;
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!(
        "summary: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

/// Sums of libtest's `test result:` lines.
#[derive(Debug, Default, PartialEq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds a `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// `cargo test --release` on the chosen packages.
fn cargo_test(args: &Args) -> Command {
    let mut cmd = sys::cargo();
    // --no-fail-fast: one failing binary must not hide the others' results.
    cmd.args(["test", "--release", "--no-fail-fast"]);
    if args.packages.is_empty() {
        cmd.arg("--workspace");
    }
    for p in &args.packages {
        cmd.args(["-p", p]);
    }
    cmd
}

/// Names of the tests `--skip root_` skips, from `cargo test -- --list`.
fn root_tests(args: &Args) -> Result<Vec<String>> {
    sh::step("listing tests");
    let mut cmd = cargo_test(args);
    cmd.arg("--").args(&args.args).arg("--list");
    let listing = sh::output(&mut cmd).context("listing the tests (does the workspace build?)")?;
    Ok(parse_list(&listing))
}

/// Picks the `root_` tests out of libtest's `--list` output (`name: test`).
fn parse_list(listing: &str) -> Vec<String> {
    let mut names: Vec<String> = listing
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|name| name.contains(ROOT_MARK))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// True if the test's own name (last path segment) starts with `root_`:
/// the convention, as opposed to merely containing it.
fn named_root(full_name: &str) -> bool {
    full_name
        .rsplit("::")
        .next()
        .is_some_and(|n| n.starts_with(ROOT_MARK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_list_picks_privileged_tests() {
        let listing = "\
netns::tests::root_veth_ping: test
netns::tests::name_is_short: test
root_mod::not_named_root_x: test
redis::tests::starts: test
root_top_level: test
src/lib.rs - require_root (line 5): test
bench_root_x: benchmark

3 tests, 1 benchmark
";
        assert_eq!(
            parse_list(listing),
            // Everything `--skip root_` skips (a substring match), not only
            // the tests named root_*.
            vec![
                "netns::tests::root_veth_ping",
                "root_mod::not_named_root_x",
                "root_top_level"
            ]
        );
    }

    #[test]
    fn totals_sum_result_lines() {
        let mut t = Totals::default();
        for l in [
            "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.04s",
            "running 3 tests",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
        ] {
            t.add(l);
        }
        assert_eq!(
            t,
            Totals {
                passed: 14,
                failed: 1,
                ignored: 1
            }
        );
    }

    #[test]
    fn named_root_looks_at_the_last_segment() {
        assert!(named_root("netns::tests::root_veth_ping"));
        assert!(named_root("root_top_level"));
        assert!(!named_root("tests::require_root_matches"));
        assert!(!named_root("root_mod::plain"));
    }
}

//! Running helper commands (`ip`, `ping`, ...) with errors that say what failed.
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Runs `argv` (program and arguments) in the caller's network namespace;
/// returns stdout. The error names the command and carries its stderr.
pub fn run_cmd(argv: &[&str]) -> Result<String> {
    let (program, args) = argv.split_first().context("run_cmd: empty command")?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    output(&mut cmd)
}

/// Runs `cmd` to completion; returns stdout, or an error with the command
/// line, exit status and stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line, space separated (for messages).
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

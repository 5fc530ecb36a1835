//! Running commands: print them, run them, turn failures into errors that
//! name the command.
use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Prints a step of the task.
pub fn step(msg: impl AsRef<str>) {
    eprintln!("==> {}", msg.as_ref());
}

/// The command line as a shell user would type it (for messages).
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), env_value(k, v))))
        .collect();
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

/// An environment value for display; a `PATH` that extends ours is shown
/// as `prefix:"$PATH"`, which is shorter and still right to paste.
fn env_value(key: &OsStr, value: &OsStr) -> String {
    let current = env::var("PATH").unwrap_or_default();
    if key == "PATH" && !current.is_empty() {
        if let Some(prefix) = value
            .to_str()
            .and_then(|v| v.strip_suffix(current.as_str()))
        {
            return format!("{}\"$PATH\"", quote(OsStr::new(prefix)));
        }
    }
    quote(value)
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%^".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed: {status}");
    }
    Ok(())
}

/// Runs `cmd`, returning its stdout; stderr is passed through. Fails unless
/// it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed: {}", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

/// Runs `cmd` quietly; `Some(stdout)` if it could start and exited 0.
/// For probes, where failure just means "not there".
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Finds an executable on `PATH`, then in `extra` directories.
pub fn which(name: &str, extra: &[&Path]) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(extra.iter().map(|p| p.to_path_buf()))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_and_shortens_path() {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", "a b", "it's"]);
        assert_eq!(display(&cmd), r#"cargo install 'a b' 'it'\''s'"#);
        if let Ok(path) = env::var("PATH") {
            if !path.is_empty() {
                cmd.env("PATH", format!("/usr/lib/llvm-22/bin:{path}"));
                assert!(display(&cmd).starts_with(r#"PATH=/usr/lib/llvm-22/bin:"$PATH" cargo"#));
            }
        }
    }
}

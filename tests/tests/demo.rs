//! `cargo xtask demo` is a smoke check of its own (it judges every phase and
//! exits non-zero if connections did not follow the daemon's tables): run
//! it, shortest, so CI sees the daemon, Redis, reporters and clients work
//! together as a user first sees them.
use std::process::Command;

use headroom_tests::require_root;

#[test]
fn root_demo_runs_and_passes_its_verdict() {
    if !require_root("root_demo_runs_and_passes_its_verdict") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--seconds", "30"])
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    let verdicts = stdout.lines().filter(|l| l.contains("PASS:")).count();
    assert_eq!(verdicts, 4, "expected 4 phase verdicts:\n{stdout}");
}

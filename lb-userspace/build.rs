//! Embeds the XDP object built by `cargo xtask build-ebpf`, and refuses to
//! build userspace against a missing or stale one.
use std::{
    env, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

const HINT: &str = "run `cargo xtask build-ebpf` (it installs what is missing and builds lb-ebpf)";

fn newest(dir: &Path, acc: &mut Option<(SystemTime, PathBuf)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            newest(&p, acc);
        } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
            println!("cargo:rerun-if-changed={}", p.display());
            if acc.as_ref().is_none_or(|(t, _)| m > *t) {
                *acc = Some((m, p));
            }
        }
    }
}

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("lb-userspace sits in the workspace root")
        .to_path_buf();
    println!("cargo:rerun-if-env-changed=HEADROOM_EBPF_OBJECT");
    let object = env::var_os("HEADROOM_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bpfel-unknown-none/release/lb-ebpf"));
    println!("cargo:rerun-if-changed={}", object.display());

    let built = match fs::metadata(&object).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(_) => panic!(
            "\n\nthe XDP object {} is missing: {HINT}\n",
            object.display()
        ),
    };
    let mut src = None;
    newest(&root.join("lb-ebpf/src"), &mut src);
    newest(&root.join("lb-common/src"), &mut src);
    for f in ["lb-ebpf/Cargo.toml", "lb-common/Cargo.toml"] {
        newest_file(&root.join(f), &mut src);
    }
    if let Some((t, p)) = src {
        if t > built {
            panic!(
                "\n\nthe XDP object {} is stale: {} changed after it was built: {HINT}\n",
                object.display(),
                p.display()
            );
        }
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("lb-ebpf.o");
    fs::copy(&object, &out).expect("copy the XDP object into OUT_DIR");
}

fn newest_file(p: &Path, acc: &mut Option<(SystemTime, PathBuf)>) {
    if let Ok(m) = fs::metadata(p).and_then(|m| m.modified()) {
        println!("cargo:rerun-if-changed={}", p.display());
        if acc.as_ref().is_none_or(|(t, _)| m > *t) {
            *acc = Some((m, p.to_path_buf()));
        }
    }
}

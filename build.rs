//! Names the commit the binaries are built from, for `--version`:
//! `$CIAO_COMMIT` if set (builds from a tarball), else `git rev-parse`, else
//! "unknown".
//!
//! Release binaries are also linked with packed relative relocations
//! (`DT_RELR`): a position-independent Rust binary carries one 24-byte
//! `R_X86_64_RELATIVE` entry per pointer in its vtables and tables, which
//! `-z pack-relative-relocs` packs into bitmaps (about 120 KB less for
//! `ciao-launcher`). The binary then needs glibc 2.36 or later; a linker
//! older than binutils 2.38 warns and ignores the option, and a newer one
//! leaves it off when the C library lacks `GLIBC_ABI_DT_RELR`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn rerun_if_exists(path: &str) {
    if Path::new(path).exists() {
        println!("cargo:rerun-if-changed={path}");
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CIAO_COMMIT");
    let commit = std::env::var("CIAO_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            // Rebuilt when HEAD moves (a commit, a checkout).
            if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
                rerun_if_exists(&head);
            }
            if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"])
                && let Some(p) = git(&["rev-parse", "--git-path", &r])
            {
                rerun_if_exists(&p);
            }
            if let Some(p) = git(&["rev-parse", "--git-path", "packed-refs"]) {
                rerun_if_exists(&p);
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CIAO_BUILD_COMMIT={commit}");

    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let gnu_linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|o| o == "linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|e| e == "gnu");
    if release && gnu_linux {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

//! Names the commit the binaries are built from, for `--version`:
//! `$CIAO_COMMIT` if set (builds from a tarball), else `git rev-parse`, else
//! "unknown".

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
}

//! `scripts/package-deb.sh` builds a .deb (of the test build's binaries)
//! that installs into a throw-away root with `dpkg --root`, holds what it
//! should, and whose binaries run.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A private directory removed on drop.
struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn deb_installs_into_a_throwaway_root_and_runs() {
    require(&[(&["dpkg-deb"], "dpkg"), (&["objdump"], "binutils")]);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = Tmp(std::env::temp_dir().join(format!("ciao-deb-{}", &id[..12])));
    let bin_dir = Path::new(LAUNCHER).parent().expect("binary directory");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/package-deb.sh");
    let out = run(Command::new(script)
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--out")
        .arg(&tmp.0)
        .arg("--fast"));
    let deb = PathBuf::from(out.lines().last().unwrap_or("").trim());
    assert!(deb.is_file(), "no .deb at {}", deb.display());

    let field = |f: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
    assert_eq!(field("Package").trim(), "ciao-launcher");
    assert_eq!(field("Version").trim(), env!("CARGO_PKG_VERSION"));
    let depends = field("Depends");
    for d in [
        "qemu-system-x86",
        "qemu-utils",
        "xorriso | genisoimage",
        "ovmf",
        "libc6",
    ] {
        assert!(depends.contains(d), "Depends lacks {d}: {depends}");
    }
    assert_eq!(field("Recommends").trim(), "docker.io");

    // A throw-away root with an empty dpkg database.
    let root = tmp.0.join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("dpkg database");
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").expect("status");
    let dpkg = || {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", root.display()))
            .arg("--log=/dev/null")
            // The runtime dependencies are not in the throw-away root.
            .arg("--force-depends");
        c
    };
    run(dpkg().arg("-i").arg(&deb));

    for f in [
        "usr/bin/ciao-launcher",
        "usr/bin/ciao-lc",
        "usr/share/man/man8/ciao-launcher.8.gz",
        "usr/share/man/man1/ciao-lc.1.gz",
        "lib/systemd/system/ciao-launcher.service",
        "etc/default/ciao-launcher",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    for (d, mode) in [("var/lib/ciao", 0o755), ("etc/pki/ciao", 0o700)] {
        let m = std::fs::metadata(root.join(d)).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert!(m.is_dir(), "{d} is not a directory");
        assert_eq!(m.permissions().mode() & 0o7777, mode, "mode of {d}");
    }
    let listed = run(dpkg().arg("-L").arg("ciao-launcher"));
    assert!(
        listed.lines().any(|l| l == "/usr/bin/ciao-launcher"),
        "{listed}"
    );
    let conffiles = run(dpkg().args(["-s", "ciao-launcher"]));
    assert!(
        conffiles.contains("/etc/default/ciao-launcher"),
        "{conffiles}"
    );
    // The installed unit is the committed one.
    assert_eq!(
        std::fs::read(root.join("lib/systemd/system/ciao-launcher.service")).ok(),
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/ciao-launcher.service"
        ))
        .ok()
    );

    for bin in ["ciao-launcher", "ciao-lc"] {
        let v = run(Command::new(root.join("usr/bin").join(bin)).arg("--version"));
        assert!(
            v.starts_with(&format!("{bin} {}", env!("CARGO_PKG_VERSION"))),
            "{bin} --version: {v}"
        );
    }

    // Purging leaves nothing of the package behind but the directories others share.
    run(dpkg().args(["--purge", "ciao-launcher"]));
    assert!(!root.join("usr/bin/ciao-launcher").exists());
    assert!(!root.join("etc/default/ciao-launcher").exists());
}

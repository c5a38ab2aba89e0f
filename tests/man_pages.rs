//! The committed man pages are what `cargo run --example gen-man` renders
//! now, and they document every flag and subcommand.

#[path = "../examples/support/man_render.rs"]
mod man_render;

use std::path::Path;

use ciao_launcher::cli::LauncherCli;
use ciao_launcher::lc::LcCli;
use clap::CommandFactory;

fn committed(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo run --example gen-man`", full.display()))
}

#[test]
fn committed_pages_are_current() {
    for (path, page) in man_render::render_man_pages() {
        let page = String::from_utf8(page).expect("UTF-8 page");
        let old = committed(path);
        if old != page {
            let line = old
                .lines()
                .zip(page.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| old.lines().count().min(page.lines().count()));
            panic!(
                "{path} is out of date (first difference at line {}); \
                 run `cargo run --example gen-man` and commit the result",
                line + 1
            );
        }
    }
}

/// `-` is `\-` in roff.
fn roff(s: &str) -> String {
    s.replace('-', "\\-")
}

/// Every long name, short name and alias of `cmd`'s visible arguments
/// appears in `page`, and so does every subcommand with its own arguments.
fn assert_documents(page: &str, path: &str, cmd: &clap::Command) {
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        if let Some(long) = arg.get_long() {
            let want = roff(&format!("--{long}"));
            assert!(page.contains(&want), "{path} does not mention --{long}");
        }
        if let Some(short) = arg.get_short() {
            let want = roff(&format!("-{short}"));
            assert!(page.contains(&want), "{path} does not mention -{short}");
        }
        for alias in arg.get_all_aliases().unwrap_or_default() {
            let want = roff(&format!("--{alias}"));
            assert!(page.contains(&want), "{path} does not mention --{alias}");
        }
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let heading = format!(".SS {}\n", sub.get_name());
        assert!(
            page.contains(&heading),
            "{path} has no section for {}",
            sub.get_name()
        );
        assert_documents(page, path, sub);
    }
}

#[test]
fn pages_document_every_flag_and_subcommand() {
    let mut launcher = LauncherCli::command();
    let mut lc = LcCli::command();
    // Building adds --help, --version and the help subcommand.
    launcher.build();
    lc.build();
    assert_documents(
        &committed("man/ciao-launcher.8"),
        "man/ciao-launcher.8",
        &launcher,
    );
    assert_documents(&committed("man/ciao-lc.1"), "man/ciao-lc.1", &lc);
}

#[test]
fn pages_have_the_hand_written_sections() {
    let launcher = committed("man/ciao-launcher.8");
    for section in [
        ".SH FILES",
        ".SH \"EXIT STATUS\"",
        ".SH SIGNALS",
        ".SH \"PROTOCOL PROFILES\"",
        ".SH EXAMPLE",
    ] {
        assert!(
            launcher.contains(section),
            "ciao-launcher.8 lacks {section}"
        );
    }
    assert!(launcher.starts_with(".ie") && launcher.contains("\n.TH CIAO-LAUNCHER 8 "));
    let lc = committed("man/ciao-lc.1");
    for section in [".SH FILES", ".SH \"EXIT STATUS\"", ".SH SUBCOMMANDS"] {
        assert!(lc.contains(section), "ciao-lc.1 lacks {section}");
    }
    assert!(lc.contains("\n.TH CIAO-LC 1 "));
}

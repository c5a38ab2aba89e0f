//! Renders the man pages. Shared, via `#[path]`, by `examples/gen-man.rs`
//! (which writes them) and `tests/man_pages.rs` (which checks the committed
//! files are current): clap_mangen is a dev-dependency, so this cannot live
//! in the library.

use ciao_launcher::cli::LauncherCli;
use ciao_launcher::lc::LcCli;
use clap::CommandFactory;
use clap_mangen::Man;

/// The hand-written prose, in files beside the pages: the sections that
/// follow what clap renders (roff source), and ciao-lc's own description
/// (plain text; clap's bare `about` would take the crate's, which describes
/// the daemon).
const LAUNCHER_MAN_EXTRA: &str = include_str!("../../man/ciao-launcher.8.roff");
const LC_MAN_EXTRA: &str = include_str!("../../man/ciao-lc.1.roff");
const LC_ABOUT: &str = include_str!("../../man/ciao-lc.about");
const LC_DESCRIPTION: &str = include_str!("../../man/ciao-lc.description");

/// `(path relative to the crate root, page)` for every man page.
pub fn render_man_pages() -> Vec<(&'static str, Vec<u8>)> {
    let lc = LcCli::command()
        .about(LC_ABOUT.trim_end())
        .long_about(LC_DESCRIPTION.trim_end());
    vec![
        (
            "man/ciao-launcher.8",
            render(
                LauncherCli::command(),
                "8",
                "System Manager's Manual",
                LAUNCHER_MAN_EXTRA,
            ),
        ),
        (
            "man/ciao-lc.1",
            render(lc, "1", "User Commands", LC_MAN_EXTRA),
        ),
    ]
}

const OK: &str = "writing a man page to memory cannot fail";

/// Every clap_mangen part starts with this (it defines `\*(Aq`); the page
/// needs it once.
const PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// One part rendered by clap_mangen, without its preamble.
fn part(render: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> String {
    let mut buf = Vec::new();
    render(&mut buf).expect(OK);
    let text = String::from_utf8(buf).expect("clap_mangen writes UTF-8");
    text.strip_prefix(PREAMBLE).unwrap_or(&text).to_string()
}

/// NAME, SYNOPSIS, DESCRIPTION and OPTIONS from clap_mangen, each subcommand
/// in full, then the hand-written `extra`. No VERSION section: the version
/// is in the page footer already.
fn render(cmd: clap::Command, section: &str, manual: &str, extra: &str) -> Vec<u8> {
    let mut cmd = cmd;
    // Gives subcommands their full name (`ciao-lc certs`) for their synopses.
    cmd.build();
    let name = cmd.get_name().to_string();
    // The crate's version only: `--version` also names the commit, which
    // would change the committed page with every commit.
    let version = cmd
        .get_version()
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let man = Man::new(cmd.clone());
    let mut page = String::from(PREAMBLE);
    // Written by hand: clap_mangen drops an empty date argument, which
    // shifts the source and manual into the wrong fields of .TH.
    page += &format!(
        ".TH {} {section} \"\" \"{name} {version}\" \"{manual}\"\n",
        name.to_uppercase()
    );
    // No hyphenation, ragged right: option names must not be split at the
    // end of a line, and long ones would otherwise stretch the line before.
    page += ".nh\n.ad l\n";
    page += &part(|w| man.render_name_section(w));
    page += &part(|w| man.render_synopsis_section(w));
    page += &part(|w| man.render_description_section(w));
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        page += &part(|w| man.render_options_section(w));
    }
    let subs: Vec<&clap::Command> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    if !subs.is_empty() {
        // clap_mangen's own SUBCOMMANDS section only points to one page per
        // subcommand (ciao-lc-certs(1), ...); here they share one page.
        page += ".SH SUBCOMMANDS\n";
        for sub in subs {
            page += &subcommand(sub);
        }
    }
    page += extra;
    page.into_bytes()
}

/// `.SS name`, then its description, synopsis and options as paragraphs.
fn subcommand(sub: &clap::Command) -> String {
    let man = Man::new(sub.clone());
    let mut parts = vec![
        part(|w| man.render_description_section(w)),
        part(|w| man.render_synopsis_section(w)),
    ];
    if sub.get_arguments().any(|a| !a.is_hide_set()) {
        parts.push(part(|w| man.render_options_section(w)));
    }
    let mut out = format!(".SS {}\n", sub.get_name());
    for (i, p) in parts.iter().enumerate() {
        for line in p.lines() {
            // The subcommand page's headings become paragraph breaks.
            if line.starts_with(".SH ") {
                if i > 0 {
                    out += ".PP\n";
                }
            } else {
                out += line;
                out += "\n";
            }
        }
    }
    out
}

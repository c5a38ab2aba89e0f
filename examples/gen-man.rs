//! Writes the man pages: `cargo run --example gen-man`.
//!
//! `man/ciao-launcher.8` and `man/ciao-lc.1` are rendered from the clap
//! commands plus the hand-written prose beside them (`man/*.roff`,
//! `man/ciao-lc.about`, `man/ciao-lc.description`);
//! `tests/man_pages.rs` fails when the committed files are out of date.

#[path = "support/man_render.rs"]
mod man_render;

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (path, page) in man_render::render_man_pages() {
        let path = root.join(path);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, page));
        match written {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => {
                eprintln!("gen-man: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

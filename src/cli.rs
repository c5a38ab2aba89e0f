//! Command-line helpers shared by the binaries.
//!
//! ciao's Go tools take single-dash long flags (`-cacert=x`, `-v 2`,
//! `-network=false`); clap only knows `--long`. [`normalize_args`] rewrites
//! `-name` and `-name=value` to `--name…` for the long names (and aliases) a
//! clap command declares, and leaves everything else alone: short flags,
//! unknown words (clap then reports them), and all arguments after `--`.

use std::ffi::OsString;

/// Rewrites Go-style single-dash long flags known to `cmd`.
pub fn normalize_args(
    cmd: &clap::Command,
    args: impl IntoIterator<Item = OsString>,
) -> Vec<OsString> {
    let mut longs: Vec<String> = Vec::new();
    collect_longs(cmd, &mut longs);
    let mut out = Vec::new();
    let mut rest = false;
    for a in args {
        if rest {
            out.push(a);
            continue;
        }
        let Some(s) = a.to_str() else {
            out.push(a);
            continue;
        };
        if s == "--" {
            rest = true;
            out.push(a);
            continue;
        }
        let rewritten = s
            .strip_prefix('-')
            .filter(|r| !r.starts_with('-'))
            .and_then(|r| {
                let name = r.split_once('=').map_or(r, |(n, _)| n);
                longs.iter().any(|l| l == name).then(|| format!("--{r}"))
            });
        out.push(rewritten.map_or(a, OsString::from));
    }
    out
}

fn collect_longs(cmd: &clap::Command, out: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        if let Some(l) = arg.get_long() {
            // A one-letter long name would shadow a short flag.
            if l.len() > 1 {
                out.push(l.to_string());
            }
        }
        if let Some(aliases) = arg.get_all_aliases() {
            out.extend(
                aliases
                    .into_iter()
                    .filter(|a| a.len() > 1)
                    .map(str::to_string),
            );
        }
    }
    for sub in cmd.get_subcommands() {
        collect_longs(sub, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cmd() -> Command {
        Command::new("t")
            .arg(Arg::new("cacert").long("cacert"))
            .arg(Arg::new("log-dir").long("log-dir").alias("log_dir"))
            .arg(Arg::new("v").short('v').long("v"))
            .arg(
                Arg::new("hard-reset")
                    .long("hard-reset")
                    .action(ArgAction::SetTrue),
            )
    }

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(&cmd(), args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().expect("utf8"))
            .collect()
    }

    #[test]
    fn go_style_flags_become_gnu_style() {
        assert_eq!(
            norm(&[
                "prog",
                "-cacert=/a.pem",
                "-log_dir",
                "/l",
                "-hard-reset",
                "-v",
                "2",
                "--cacert",
                "x"
            ]),
            [
                "prog",
                "--cacert=/a.pem",
                "--log_dir",
                "/l",
                "--hard-reset",
                "-v",
                "2",
                "--cacert",
                "x"
            ]
        );
    }

    #[test]
    fn unknown_words_and_after_double_dash_are_kept() {
        assert_eq!(
            norm(&["prog", "-bogus", "--", "-cacert"]),
            ["prog", "-bogus", "--", "-cacert"]
        );
    }
}

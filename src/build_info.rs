//! What `--version` says: the crate's version, the commit it was built from
//! (by `build.rs`) and the TLS crypto provider compiled in.

/// The git commit of the build (`$CIAO_COMMIT`, else `git rev-parse`), or
/// "unknown".
pub const COMMIT: &str = env!("CIAO_BUILD_COMMIT");

/// The rustls crypto provider of every TLS configuration.
#[cfg(feature = "aws-lc-rs")]
pub const CRYPTO_PROVIDER: &str = "aws-lc-rs";
/// The rustls crypto provider of every TLS configuration.
#[cfg(not(feature = "aws-lc-rs"))]
pub const CRYPTO_PROVIDER: &str = "ring";

macro_rules! version_line {
    ($provider:literal) => {
        concat!(
            env!("CARGO_PKG_VERSION"),
            " (commit ",
            env!("CIAO_BUILD_COMMIT"),
            ", rustls with ",
            $provider,
            ")"
        )
    };
}

/// `--version` of both binaries, after the program's name:
/// `0.1.0 (commit 1e4cef5a1b2c, rustls with ring)`.
#[cfg(feature = "aws-lc-rs")]
pub const VERSION: &str = version_line!("aws-lc-rs");
/// `--version` of both binaries, after the program's name:
/// `0.1.0 (commit 1e4cef5a1b2c, rustls with ring)`.
#[cfg(not(feature = "aws-lc-rs"))]
pub const VERSION: &str = version_line!("ring");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_commit_and_provider() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")), "{VERSION}");
        assert!(VERSION.contains(&format!("commit {COMMIT}")), "{VERSION}");
        assert!(
            VERSION.ends_with(&format!("rustls with {CRYPTO_PROVIDER})")),
            "{VERSION}"
        );
        assert!(!COMMIT.is_empty());
    }
}

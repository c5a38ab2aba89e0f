//! ciao-launcher: the compute-node agent of the CIAO cloud orchestrator.
//!
//! Library first: the binaries `ciao-launcher` and `ciao-lc` are thin shells
//! over this crate. See ARCHITECTURE.md (shared) for the thread map.

pub mod cli;
pub mod daemon;
pub mod lc;
pub mod logging;
pub mod nodestats;
pub mod payloads;
pub mod signals;
pub mod ssntp;
pub mod state;
pub mod virt;

//! ciao-launcher: the compute-node agent of the CIAO cloud orchestrator.
//!
//! Library first: the binaries `ciao-launcher` and `ciao-lc` are thin shells
//! over this crate. See ARCHITECTURE.md (shared) for the thread map.

pub mod cli;
pub mod daemon;
pub mod instance;
pub mod launcher;
pub mod lc;
pub mod logging;
pub mod node;
pub mod nodestats;
pub mod overseer;
pub mod payloads;
pub mod server;
pub mod signals;
pub mod ssntp;
pub mod state;
pub mod virt;

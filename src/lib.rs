//! ciao-launcher: the compute-node agent of the CIAO cloud orchestrator.
//!
//! Library first: the binaries `ciao-launcher` and `ciao-lc` are thin shells
//! over this crate. Synchronous: named OS threads coordinated with
//! crossbeam channels, no async runtime.
//!
//! ```text
//! main ──> signals
//!   └────> server ──> ssntp-io          (the TLS connection to the scheduler)
//!            └─────> overseer ──> instance-<uuid8>   (one per instance)
//!                                   └──> monitor-<uuid8> (while it runs: QMP with
//!                                        its reader qmp-<uuid8>, or Docker /wait)
//! ```
//! * [`daemon`]: main — command line, lock, logging, the 1-second shutdown rule;
//! * [`server`]: parses and routes what the scheduler sends, never blocking;
//! * [`overseer`]: the instance map, admission, STATUS and STATS;
//! * [`instance`]: one instance's state machine and virtualizer;
//! * [`virt`]: the virtualizers (simulation, Docker, QEMU) and their monitors;
//! * [`ssntp`]: the protocol, usable on its own;
//! * [`network`]: tenant networking (bridges, tunnels, VNICs) under one node-wide lock,
//!   called by the instance threads (a tap per VM, a veth per container);
//! * [`notify`]: readiness for systemd (`Type=notify`);
//! * [`capabilities`]: start-up checks of QEMU, its tools and the Docker engine.
//!
//! Shutdown is a broadcast by dropping senders; instances keep running. It
//! waits only for threads in the middle of something: an idle instance
//! thread owns nothing that is not on disk, and the process exit ends it.

pub mod build_info;
pub mod capabilities;
pub mod cli;
pub mod daemon;
pub mod health;
pub mod instance;
pub mod launcher;
pub mod lc;
pub mod logging;
pub mod network;
pub mod node;
pub mod nodestats;
pub mod notify;
pub mod overseer;
pub mod payloads;
pub mod server;
pub mod signals;
pub mod ssntp;
pub mod state;
pub mod virt;

//! SSNTP, the Simple and Secure Node Transfer Protocol of ciao, usable on its own.
//!
//! Frames are Go `encoding/gob` values over mutually authenticated TLS.
//! Layers, bottom up:
//! - [`gob`]: the subset of Go's gob stream format SSNTP needs;
//! - [`frame`]: the three frame structs and their typed operations;
//! - [`profile`]: operand numbering per protocol generation;
//! - [`role`] and [`tls`]: roles, rustls configurations and the ciao certificate verifier;
//! - [`conn`]: one connection owned by one io thread, and the [`conn::Link`]
//!   other threads send through;
//! - [`client`] and [`server`]: dialling, handshakes, reconnection, sessions.

pub mod certgen;
pub mod client;
pub mod conn;
pub mod frame;
pub mod gob;
pub mod profile;
pub mod role;
pub mod server;
pub mod tls;

pub use frame::{
    Command, ConnectFrame, ConnectedFrame, ErrorCode, Event, Frame, FrameType, Operation, Status,
};
pub use profile::Profile;
pub use role::Role;

/// Why a client or server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The certificates or keys cannot be used.
    Tls(tls::TlsError),
    /// Binding the listener or spawning a thread failed.
    Io(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Tls(e) => write!(f, "{e}"),
            StartError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Tls(e) => Some(e),
            StartError::Io(e) => Some(e),
        }
    }
}

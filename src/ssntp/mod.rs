//! SSNTP, the Simple and Secure Node Transfer Protocol of ciao, usable on its own.
//!
//! Frames are Go `encoding/gob` values over mutually authenticated TLS
//! (spec/ssntp.md). Layers, bottom up:
//! - [`gob`]: the subset of Go's gob stream format SSNTP needs;
//! - [`frame`]: the three frame structs and their typed operations;
//! - [`profile`]: operand numbering per protocol generation;
//! - [`role`] and [`tls`]: roles, rustls configurations and the ciao certificate verifier;
//! - [`client`] and [`server`]: connection handling, one io thread per connection.

pub mod certgen;
pub mod frame;
pub mod gob;
pub mod profile;
pub mod role;
pub mod tls;

pub use frame::{
    Command, ConnectFrame, ConnectedFrame, ErrorCode, Event, Frame, FrameType, Operation, Status,
};
pub use profile::Profile;
pub use role::Role;

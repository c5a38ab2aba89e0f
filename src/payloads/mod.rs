//! YAML payloads of SSNTP frames (spec/payloads.md, spec/wire-2016.md).

pub mod config;

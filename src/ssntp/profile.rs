//! Protocol profiles: the operand numbering (and a few policies) of one ciao
//! generation. This is the only place that knows operand numbers.
//!
//! * `2016` — ciao e7061307 (2016-04), the launcher the user's documents
//!   describe (its operand table, as seen on the wire of that launcher).
//! * `2018` — ciao master 194264ad.
//!
//! The frame *type* byte and the STATUS operands are the same in both.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::frame::{Command, ErrorCode, Event, Frame, FrameType, Operation, Status};

/// A ciao protocol generation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum Profile {
    #[default]
    P2016,
    P2018,
}

const COMMANDS_2016: &[(Command, u8)] = &[
    (Command::Connect, 0),
    (Command::Start, 1),
    (Command::Stop, 2),
    (Command::Stats, 3),
    (Command::Evacuate, 4),
    (Command::Delete, 5),
    (Command::Restart, 6),
    (Command::AssignPublicIp, 7),
    (Command::ReleasePublicIp, 8),
    (Command::Configure, 9),
];

const COMMANDS_2018: &[(Command, u8)] = &[
    (Command::Connect, 0),
    (Command::Start, 1),
    (Command::Stats, 2),
    (Command::Evacuate, 3),
    (Command::Delete, 4),
    (Command::AssignPublicIp, 5),
    (Command::ReleasePublicIp, 6),
    (Command::Configure, 7),
    (Command::AttachVolume, 8),
    (Command::Restore, 9),
    (Command::RefreshCnci, 10),
];

const STATUSES: &[(Status, u8)] = &[
    (Status::Connected, 0),
    (Status::Ready, 1),
    (Status::Full, 2),
    (Status::Offline, 3),
    (Status::Maintenance, 4),
];

const EVENTS_2016: &[(Event, u8)] = &[
    (Event::TenantAdded, 0),
    (Event::TenantRemoved, 1),
    (Event::InstanceDeleted, 2),
    (Event::ConcentratorInstanceAdded, 3),
    (Event::PublicIpAssigned, 4),
    (Event::TraceReport, 5),
];

const EVENTS_2018: &[(Event, u8)] = &[
    (Event::TenantAdded, 0),
    (Event::TenantRemoved, 1),
    (Event::InstanceDeleted, 2),
    (Event::ConcentratorInstanceAdded, 3),
    (Event::PublicIpAssigned, 4),
    (Event::PublicIpUnassigned, 5),
    (Event::TraceReport, 6),
    (Event::NodeConnected, 7),
    (Event::NodeDisconnected, 8),
    (Event::InstanceStopped, 9),
];

const ERRORS_2016: &[(ErrorCode, u8)] = &[
    (ErrorCode::InvalidFrameType, 0),
    (ErrorCode::StartFailure, 1),
    (ErrorCode::StopFailure, 2),
    (ErrorCode::ConnectionFailure, 3),
    (ErrorCode::RestartFailure, 4),
    (ErrorCode::DeleteFailure, 5),
    (ErrorCode::ConnectionAborted, 6),
];

const ERRORS_2018: &[(ErrorCode, u8)] = &[
    (ErrorCode::InvalidFrameType, 0),
    (ErrorCode::StartFailure, 1),
    (ErrorCode::ConnectionFailure, 2),
    (ErrorCode::DeleteFailure, 3),
    (ErrorCode::ConnectionAborted, 4),
    (ErrorCode::InvalidConfiguration, 5),
    (ErrorCode::AttachVolumeFailure, 6),
    (ErrorCode::AssignPublicIpFailure, 7),
    (ErrorCode::UnassignPublicIpFailure, 8),
];

fn to_operand<T: PartialEq + Copy>(table: &[(T, u8)], v: T) -> Option<u8> {
    table.iter().find(|(t, _)| *t == v).map(|(_, n)| *n)
}

fn from_operand<T: Copy>(table: &[(T, u8)], n: u8) -> Option<T> {
    table.iter().find(|(_, o)| *o == n).map(|(t, _)| *t)
}

/// A (type, operand) pair the profile has no name for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UnknownOperation {
    /// The Type byte is not COMMAND/STATUS/ERROR/EVENT (peer answers InvalidFrameType).
    FrameType(u8),
    /// A valid type with an operand this profile does not define.
    Operand(FrameType, u8),
}

impl fmt::Display for UnknownOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnknownOperation::FrameType(t) => write!(f, "invalid SSNTP frame type {t}"),
            UnknownOperation::Operand(t, o) => write!(f, "unknown {t:?} operand {o}"),
        }
    }
}

impl std::error::Error for UnknownOperation {}

/// The operation exists in ciao but not in this profile.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NotInProfile(pub Operation, pub Profile);

impl fmt::Display for NotInProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} does not exist in the {} protocol profile",
            self.0, self.1
        )
    }
}

impl std::error::Error for NotInProfile {}

impl Profile {
    pub const ALL: [Profile; 2] = [Profile::P2016, Profile::P2018];

    fn commands(self) -> &'static [(Command, u8)] {
        match self {
            Profile::P2016 => COMMANDS_2016,
            Profile::P2018 => COMMANDS_2018,
        }
    }

    fn events(self) -> &'static [(Event, u8)] {
        match self {
            Profile::P2016 => EVENTS_2016,
            Profile::P2018 => EVENTS_2018,
        }
    }

    fn errors(self) -> &'static [(ErrorCode, u8)] {
        match self {
            Profile::P2016 => ERRORS_2016,
            Profile::P2018 => ERRORS_2018,
        }
    }

    /// The operand byte of `op` in this profile.
    pub fn operand(self, op: Operation) -> Result<u8, NotInProfile> {
        match op {
            Operation::Command(c) => to_operand(self.commands(), c),
            Operation::Status(s) => to_operand(STATUSES, s),
            Operation::Error(e) => to_operand(self.errors(), e),
            Operation::Event(e) => to_operand(self.events(), e),
        }
        .ok_or(NotInProfile(op, self))
    }

    /// The typed operation of a raw (type, operand) pair.
    pub fn operation(self, ftype: u8, operand: u8) -> Result<Operation, UnknownOperation> {
        let t = FrameType::from_u8(ftype).ok_or(UnknownOperation::FrameType(ftype))?;
        let op = match t {
            FrameType::Command => from_operand(self.commands(), operand).map(Operation::Command),
            FrameType::Status => from_operand(STATUSES, operand).map(Operation::Status),
            FrameType::Error => from_operand(self.errors(), operand).map(Operation::Error),
            FrameType::Event => from_operand(self.events(), operand).map(Operation::Event),
        };
        op.ok_or(UnknownOperation::Operand(t, operand))
    }

    /// The typed operation of a frame.
    pub fn frame_operation(self, f: &Frame) -> Result<Operation, UnknownOperation> {
        self.operation(f.ftype, f.operand)
    }

    /// Every operation this profile defines, for tests and documentation.
    pub fn operations(self) -> Vec<(Operation, u8)> {
        let mut v: Vec<(Operation, u8)> = Vec::new();
        v.extend(
            self.commands()
                .iter()
                .map(|(c, n)| (Operation::Command(*c), *n)),
        );
        v.extend(STATUSES.iter().map(|(s, n)| (Operation::Status(*s), *n)));
        v.extend(
            self.errors()
                .iter()
                .map(|(e, n)| (Operation::Error(*e), *n)),
        );
        v.extend(
            self.events()
                .iter()
                .map(|(e, n)| (Operation::Event(*e), *n)),
        );
        v
    }

    /// How often the node reports STATUS and STATS.
    pub fn stats_interval(self) -> Duration {
        match self {
            Profile::P2016 => Duration::from_secs(30),
            Profile::P2018 => Duration::from_secs(6),
        }
    }

    /// The STATS state string of a running instance.
    pub fn running_state(self) -> &'static str {
        match self {
            Profile::P2016 => "running",
            Profile::P2018 => "active",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Profile::P2016 => "2016",
            Profile::P2018 => "2018",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Profile, String> {
        match s {
            "2016" => Ok(Profile::P2016),
            "2018" => Ok(Profile::P2018),
            _ => Err(format!(
                "unknown protocol profile {s:?} (expected 2016 or 2018)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_bijective() {
        for p in Profile::ALL {
            let ops = p.operations();
            for (op, n) in &ops {
                assert_eq!(p.operand(*op), Ok(*n), "{p} {op}");
                assert_eq!(
                    p.operation(op.frame_type().to_u8(), *n),
                    Ok(*op),
                    "{p} {op}"
                );
            }
            // No two operations of one type share a number.
            for (i, (a, na)) in ops.iter().enumerate() {
                for (b, nb) in &ops[i + 1..] {
                    assert!(
                        !(a.frame_type() == b.frame_type() && na == nb),
                        "{p}: {a} and {b} share {na}"
                    );
                }
            }
        }
    }

    #[test]
    fn spec_values() {
        let p = Profile::P2018;
        assert_eq!(p.operand(Operation::Command(Command::Stats)), Ok(2));
        assert_eq!(p.operand(Operation::Command(Command::Delete)), Ok(4));
        assert_eq!(p.operand(Operation::Event(Event::InstanceStopped)), Ok(9));
        assert_eq!(
            p.operand(Operation::Error(ErrorCode::ConnectionAborted)),
            Ok(4)
        );
        assert!(p.operand(Operation::Command(Command::Stop)).is_err());
        let p = Profile::P2016;
        assert_eq!(p.operand(Operation::Command(Command::Stats)), Ok(3));
        assert_eq!(p.operand(Operation::Command(Command::Restart)), Ok(6));
        assert_eq!(p.operand(Operation::Error(ErrorCode::StopFailure)), Ok(2));
        assert_eq!(
            p.operand(Operation::Error(ErrorCode::ConnectionFailure)),
            Ok(3)
        );
        assert_eq!(p.operand(Operation::Event(Event::TraceReport)), Ok(5));
        assert!(p.operand(Operation::Event(Event::InstanceStopped)).is_err());
        assert_eq!(p.operation(4, 0), Err(UnknownOperation::FrameType(4)));
        assert_eq!(
            p.operation(0, 42),
            Err(UnknownOperation::Operand(FrameType::Command, 42))
        );
    }
}

//! The structs that travel on an SSNTP stream (Go's ssntp.Frame,
//! ConnectFrame and ConnectedFrame, matched by field name) and the
//! typed names of their Type/Operand bytes.
//!
//! Three shapes exist: [`ConnectFrame`] (client → server, once),
//! [`ConnectedFrame`] (server → client, once — or an ERROR [`Frame`] in its
//! place) and [`Frame`] (everything afterwards). They are decoded from gob
//! values by field name, so the handshake reply can be read as either shape.
//! Operand bytes are kept raw here; [`super::profile`] maps them to the typed
//! [`Command`], [`Status`], [`Event`] and [`ErrorCode`] for one protocol
//! generation.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::gob::{GobEncode, GobError, StructValue, StructWriter, TypeDesc, Value};
use super::role::Role;

/// Protocol version sent in every frame (never checked by Go peers).
pub const MAJOR: u8 = 0;
pub const MINOR: u8 = 1;
/// Bit 7 of `Major` flags path tracing.
pub const PATH_TRACE_BIT: u8 = 0x80;

/// A UUID as 16 raw bytes.
pub type Uuid16 = [u8; 16];

// ---------------------------------------------------------------------------
// Go type descriptions (names and field order as in ciao's ssntp/frame.go)

static UUID_ARRAY: TypeDesc = TypeDesc::Array {
    name: "UUID",
    elem: &TypeDesc::Uint,
    len: 16,
};
/// Go's `time.Time` (a GobEncoder). Public for tests that build gob types
/// of their own around the frame's parts.
pub static TIME: TypeDesc = TypeDesc::GobEncoder { name: "Time" };
/// ssntp's `Node` (one hop of a frame trace).
pub static NODE: TypeDesc = TypeDesc::Struct {
    name: "Node",
    fields: &[
        ("UUID", &TypeDesc::Bytes),
        ("Role", &TypeDesc::Uint),
        ("TxTimestamp", &TIME),
        ("RxTimestamp", &TIME),
    ],
};
static NODE_SLICE: TypeDesc = TypeDesc::Slice {
    name: "[]ssntp.Node",
    elem: &NODE,
};
static FRAME_TRACE: TypeDesc = TypeDesc::Struct {
    name: "FrameTrace",
    fields: &[
        ("Label", &TypeDesc::Bytes),
        ("StartTimestamp", &TIME),
        ("EndTimestamp", &TIME),
        ("PathLength", &TypeDesc::Uint),
        ("Path", &NODE_SLICE),
    ],
};
static FRAME: TypeDesc = TypeDesc::Struct {
    name: "Frame",
    fields: &[
        ("Major", &TypeDesc::Uint),
        ("Minor", &TypeDesc::Uint),
        ("Type", &TypeDesc::Uint),
        ("Operand", &TypeDesc::Uint),
        ("Origin", &UUID_ARRAY),
        ("PayloadLength", &TypeDesc::Uint),
        ("Trace", &FRAME_TRACE),
        ("Payload", &TypeDesc::Bytes),
    ],
};
static CONNECT_FRAME: TypeDesc = TypeDesc::Struct {
    name: "ConnectFrame",
    fields: &[
        ("Major", &TypeDesc::Uint),
        ("Minor", &TypeDesc::Uint),
        ("Type", &TypeDesc::Uint),
        ("Operand", &TypeDesc::Uint),
        ("Role", &TypeDesc::Uint),
        ("Source", &TypeDesc::Bytes),
        ("Destination", &TypeDesc::Bytes),
    ],
};
static CONNECTED_FRAME: TypeDesc = TypeDesc::Struct {
    name: "ConnectedFrame",
    fields: &[
        ("Major", &TypeDesc::Uint),
        ("Minor", &TypeDesc::Uint),
        ("Type", &TypeDesc::Uint),
        ("Operand", &TypeDesc::Uint),
        ("Role", &TypeDesc::Uint),
        ("Source", &TypeDesc::Bytes),
        ("Destination", &TypeDesc::Bytes),
        ("PayloadLength", &TypeDesc::Uint),
        ("Payload", &TypeDesc::Bytes),
    ],
};

// ---------------------------------------------------------------------------
// time.Time

/// Seconds from 0001-01-01T00:00:00Z to the Unix epoch.
const UNIX_TO_INTERNAL: i64 = 62_135_596_800;

/// A Go `time.Time` in its `MarshalBinary` form (the bytes gob carries).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct GoTime {
    /// Seconds since 0001-01-01T00:00:00Z.
    pub secs: i64,
    pub nanos: i32,
    /// Zone offset in minutes; −1 means UTC.
    pub offset_min: i16,
    /// Extra offset seconds (format version 2 only).
    pub offset_sec: i8,
}

impl GoTime {
    pub fn from_system_time(t: SystemTime) -> GoTime {
        let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
            Err(e) => {
                let d = e.duration();
                let (s, n) = (d.as_secs() as i64, d.subsec_nanos() as i32);
                if n == 0 {
                    (-s, 0)
                } else {
                    (-s - 1, 1_000_000_000 - n)
                }
            }
        };
        GoTime {
            secs: secs + UNIX_TO_INTERNAL,
            nanos,
            offset_min: -1,
            offset_sec: 0,
        }
    }

    pub fn now() -> GoTime {
        GoTime::from_system_time(SystemTime::now())
    }

    /// The instant (zone offsets do not change it).
    pub fn to_system_time(self) -> Option<SystemTime> {
        let unix = self.secs.checked_sub(UNIX_TO_INTERNAL)?;
        let nanos = u32::try_from(self.nanos).ok()?;
        if unix >= 0 {
            UNIX_EPOCH.checked_add(Duration::new(unix as u64, nanos))
        } else {
            UNIX_EPOCH
                .checked_sub(Duration::from_secs(unix.unsigned_abs()))?
                .checked_add(Duration::from_nanos(u64::from(nanos)))
        }
    }

    /// `time.Time.MarshalBinary`.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16);
        b.push(if self.offset_sec != 0 { 2 } else { 1 });
        b.extend_from_slice(&self.secs.to_be_bytes());
        b.extend_from_slice(&self.nanos.to_be_bytes());
        b.extend_from_slice(&self.offset_min.to_be_bytes());
        if self.offset_sec != 0 {
            b.push(self.offset_sec as u8);
        }
        b
    }

    /// `time.Time.UnmarshalBinary`.
    pub fn from_bytes(b: &[u8]) -> Result<GoTime, GobError> {
        let bad = || GobError::Mismatch(format!("time.Time: {} bytes of unknown form", b.len()));
        let (version, rest) = b.split_first().ok_or_else(bad)?;
        let want = match version {
            1 => 14,
            2 => 15,
            _ => return Err(bad()),
        };
        if rest.len() != want {
            return Err(bad());
        }
        let secs = i64::from_be_bytes(rest[0..8].try_into().map_err(|_| bad())?);
        let nanos = i32::from_be_bytes(rest[8..12].try_into().map_err(|_| bad())?);
        let offset_min = i16::from_be_bytes(rest[12..14].try_into().map_err(|_| bad())?);
        let offset_sec = if *version == 2 { rest[14] as i8 } else { 0 };
        Ok(GoTime {
            secs,
            nanos,
            offset_min,
            offset_sec,
        })
    }
}

fn time_field(v: &Value, field: &str) -> Result<Option<GoTime>, GobError> {
    GoTime::from_bytes(v.as_opaque(field)?).map(Some)
}

// ---------------------------------------------------------------------------
// Trace

/// One hop of a traced frame (Go `ssntp.Node`).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct TraceHop {
    /// Raw bytes (a `[]byte` in Go, unlike `Frame::origin`).
    pub uuid: Vec<u8>,
    pub role: Role,
    pub tx: Option<GoTime>,
    pub rx: Option<GoTime>,
}

/// Go `ssntp.FrameTrace`.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct FrameTrace {
    pub label: Vec<u8>,
    pub start: Option<GoTime>,
    pub end: Option<GoTime>,
    pub path_length: u8,
    pub path: Vec<TraceHop>,
}

impl GobEncode for TraceHop {
    const TYPE: &'static TypeDesc = &NODE;
    fn encode_fields(&self, w: &mut StructWriter<'_>) {
        w.bytes(0, &self.uuid);
        w.uint(1, u64::from(self.role.bits()));
        w.encoded(2, self.tx.map(GoTime::to_bytes).as_deref());
        w.encoded(3, self.rx.map(GoTime::to_bytes).as_deref());
    }
}

impl GobEncode for FrameTrace {
    const TYPE: &'static TypeDesc = &FRAME_TRACE;
    fn encode_fields(&self, w: &mut StructWriter<'_>) {
        w.bytes(0, &self.label);
        w.encoded(1, self.start.map(GoTime::to_bytes).as_deref());
        w.encoded(2, self.end.map(GoTime::to_bytes).as_deref());
        w.uint(3, u64::from(self.path_length));
        w.struct_slice(4, &self.path);
    }
}

impl TraceHop {
    fn from_struct(s: &StructValue) -> Result<TraceHop, GobError> {
        let mut n = TraceHop::default();
        for (name, v) in s.iter() {
            match name {
                "UUID" => n.uuid = v.as_bytes(name)?.to_vec(),
                "Role" => n.role = Role::from_bits(v.as_uint(name, u64::from(u32::MAX))? as u32),
                "TxTimestamp" => n.tx = time_field(v, name)?,
                "RxTimestamp" => n.rx = time_field(v, name)?,
                _ => {}
            }
        }
        Ok(n)
    }
}

impl FrameTrace {
    fn from_struct(s: &StructValue) -> Result<FrameTrace, GobError> {
        let mut t = FrameTrace::default();
        for (name, v) in s.iter() {
            match name {
                "Label" => t.label = v.as_bytes(name)?.to_vec(),
                "StartTimestamp" => t.start = time_field(v, name)?,
                "EndTimestamp" => t.end = time_field(v, name)?,
                "PathLength" => t.path_length = v.as_uint(name, 255)? as u8,
                "Path" => {
                    t.path = v
                        .as_slice(name)?
                        .iter()
                        .map(|n| TraceHop::from_struct(n.as_struct(name)?))
                        .collect::<Result<_, _>>()?
                }
                _ => {}
            }
        }
        Ok(t)
    }
}

// ---------------------------------------------------------------------------
// Frame types and operations

/// The `Type` byte (identical in every ciao generation).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FrameType {
    Command,
    Status,
    Error,
    Event,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<FrameType> {
        match b {
            0 => Some(FrameType::Command),
            1 => Some(FrameType::Status),
            2 => Some(FrameType::Error),
            3 => Some(FrameType::Event),
            _ => None,
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            FrameType::Command => 0,
            FrameType::Status => 1,
            FrameType::Error => 2,
            FrameType::Event => 3,
        }
    }
}

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($v:ident => $s:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub enum $name { $($v),* }
        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v),*];
            /// The name Go's `String()` gives (or the Go identifier where it gives none).
            pub fn name(self) -> &'static str {
                match self { $($name::$v => $s),* }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_enum!(
    /// COMMAND operands across ciao generations (numbers live in `profile`).
    Command {
        Connect => "CONNECT",
        Start => "START",
        Stop => "STOP",
        Stats => "STATISTICS",
        Evacuate => "EVACUATE",
        Delete => "DELETE",
        Restart => "RESTART",
        AssignPublicIp => "Assign public IP",
        ReleasePublicIp => "Release public IP",
        Configure => "CONFIGURE",
        AttachVolume => "Attach storage volume",
        DetachVolume => "Detach storage volume",
        Restore => "Restore",
        RefreshCnci => "Refresh CNCI List",
    }
);

named_enum!(
    /// STATUS operands (unchanged across generations).
    Status {
        Connected => "CONNECTED",
        Ready => "READY",
        Full => "FULL",
        Offline => "OFFLINE",
        Maintenance => "MAINTENANCE",
    }
);

named_enum!(
    /// EVENT operands across ciao generations.
    Event {
        TenantAdded => "Tenant Added",
        TenantRemoved => "Tenant Removed",
        InstanceDeleted => "Instance Deleted",
        ConcentratorInstanceAdded => "Network Concentrator Instance Added",
        PublicIpAssigned => "Public IP Assigned",
        PublicIpUnassigned => "Public IP Unassigned",
        TraceReport => "Trace Report",
        NodeConnected => "Node Connected",
        NodeDisconnected => "Node Disconnected",
        InstanceStopped => "Instance Stopped",
    }
);

named_enum!(
    /// ERROR operands across ciao generations.
    ErrorCode {
        InvalidFrameType => "Invalid SSNTP frame type",
        StartFailure => "Could not start instance",
        StopFailure => "Could not stop instance",
        ConnectionFailure => "SSNTP Connection failed",
        RestartFailure => "Could not restart instance",
        DeleteFailure => "Could not delete instance",
        ConnectionAborted => "SSNTP Connection aborted",
        InvalidConfiguration => "Cluster configuration is invalid",
        AttachVolumeFailure => "AttachVolumeFailure",
        DetachVolumeFailure => "DetachVolumeFailure",
        AssignPublicIpFailure => "AssignPublicIPFailure",
        UnassignPublicIpFailure => "UnassignPublicIPFailure",
    }
);

/// A typed (Type, Operand) pair.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Operation {
    Command(Command),
    Status(Status),
    Error(ErrorCode),
    Event(Event),
}

impl Operation {
    pub fn frame_type(self) -> FrameType {
        match self {
            Operation::Command(_) => FrameType::Command,
            Operation::Status(_) => FrameType::Status,
            Operation::Error(_) => FrameType::Error,
            Operation::Event(_) => FrameType::Event,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::Command(c) => write!(f, "COMMAND {c}"),
            Operation::Status(s) => write!(f, "STATUS {s}"),
            Operation::Error(e) => write!(f, "ERROR {e}"),
            Operation::Event(e) => write!(f, "EVENT {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The three wire structs

/// Go `ssntp.Frame`: every frame after the handshake.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub major: u8,
    pub minor: u8,
    /// Raw `Type` byte (see [`FrameType`]).
    pub ftype: u8,
    /// Raw operand byte (see `profile`).
    pub operand: u8,
    /// The UUID of the session that created the frame (kept when forwarded).
    pub origin: Uuid16,
    pub payload_length: u32,
    /// Boxed: rare, and it would triple the size of every frame.
    pub trace: Option<Box<FrameTrace>>,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Frame {
    // Payloads can be megabytes: show their size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("major", &self.major)
            .field("minor", &self.minor)
            .field("type", &self.ftype)
            .field("operand", &self.operand)
            .field("origin", &uuid::Uuid::from_bytes(self.origin))
            .field("payload", &format_args!("{} bytes", self.payload.len()))
            .field("trace", &self.trace)
            .finish()
    }
}

impl Frame {
    /// A frame as our sessions create it: version 0.1, PayloadLength = len(Payload).
    pub fn new(ftype: FrameType, operand: u8, origin: Uuid16, payload: Vec<u8>) -> Frame {
        Frame {
            major: MAJOR,
            minor: MINOR,
            ftype: ftype.to_u8(),
            operand,
            origin,
            payload_length: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            trace: None,
            payload,
        }
    }

    /// `Major` without the path-trace bit.
    pub fn version_major(&self) -> u8 {
        self.major & !PATH_TRACE_BIT
    }

    /// Go's `PathTrace()`: a trace is present and bit 7 of Major is set.
    pub fn path_trace(&self) -> bool {
        self.trace.is_some() && self.major & PATH_TRACE_BIT != 0
    }

    pub fn frame_type(&self) -> Option<FrameType> {
        FrameType::from_u8(self.ftype)
    }

    /// Reads a `Frame` from a decoded struct by field name.
    pub fn from_struct(s: &StructValue) -> Result<Frame, GobError> {
        s.require_common_field(&[
            "Major",
            "Minor",
            "Type",
            "Operand",
            "Origin",
            "PayloadLength",
            "Trace",
            "Payload",
        ])?;
        let mut f = Frame::default();
        for (name, v) in s.iter() {
            match name {
                "Major" => f.major = v.as_uint(name, 255)? as u8,
                "Minor" => f.minor = v.as_uint(name, 255)? as u8,
                "Type" => f.ftype = v.as_uint(name, 255)? as u8,
                "Operand" => f.operand = v.as_uint(name, 255)? as u8,
                "Origin" => f.origin = v.as_byte_array::<16>(name)?,
                "PayloadLength" => f.payload_length = v.as_uint(name, u64::from(u32::MAX))? as u32,
                "Trace" => f.trace = Some(Box::new(FrameTrace::from_struct(v.as_struct(name)?)?)),
                "Payload" => f.payload = v.as_bytes(name)?.to_vec(),
                _ => {}
            }
        }
        Ok(f)
    }

    /// Like [`Frame::from_struct`] but takes the payload without copying it.
    pub fn from_value(v: Value) -> Result<Frame, GobError> {
        let Value::Struct(mut s) = v else {
            return Err(GobError::Mismatch("a frame must be a struct".into()));
        };
        let payload = take_field(&mut s, "Payload");
        let mut f = Frame::from_struct(&s)?;
        if let Some(p) = payload {
            f.payload = p.into_bytes("Payload")?;
        }
        Ok(f)
    }
}

/// Removes a field from a decoded struct (to move a large value out).
fn take_field(s: &mut StructValue, name: &str) -> Option<Value> {
    let def = &s.def;
    let pos = s
        .fields
        .iter()
        .position(|(i, _)| def.fields.get(*i).is_some_and(|f| f.name == name))?;
    Some(s.fields.swap_remove(pos).1)
}

impl GobEncode for Frame {
    const TYPE: &'static TypeDesc = &FRAME;
    fn encode_fields(&self, w: &mut StructWriter<'_>) {
        w.uint(0, u64::from(self.major));
        w.uint(1, u64::from(self.minor));
        w.uint(2, u64::from(self.ftype));
        w.uint(3, u64::from(self.operand));
        w.byte_array(4, &self.origin);
        w.uint(5, u64::from(self.payload_length));
        w.structure(6, self.trace.as_deref());
        w.bytes(7, &self.payload);
    }
}

/// Go `ssntp.ConnectFrame`: the client's first and only handshake frame.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ConnectFrame {
    pub major: u8,
    pub minor: u8,
    pub ftype: u8,
    pub operand: u8,
    pub role: Role,
    pub source: Vec<u8>,
    pub destination: Vec<u8>,
}

impl ConnectFrame {
    /// CONNECT as the Go client builds it: COMMAND/CONNECT (both 0 in every
    /// generation), destination 16 zero bytes.
    pub fn new(role: Role, source: Uuid16) -> ConnectFrame {
        ConnectFrame {
            major: MAJOR,
            minor: MINOR,
            ftype: FrameType::Command.to_u8(),
            operand: 0,
            role,
            source: source.to_vec(),
            destination: vec![0; 16],
        }
    }

    pub fn from_struct(s: &StructValue) -> Result<ConnectFrame, GobError> {
        s.require_common_field(&[
            "Major",
            "Minor",
            "Type",
            "Operand",
            "Role",
            "Source",
            "Destination",
        ])?;
        let mut f = ConnectFrame::default();
        for (name, v) in s.iter() {
            match name {
                "Major" => f.major = v.as_uint(name, 255)? as u8,
                "Minor" => f.minor = v.as_uint(name, 255)? as u8,
                "Type" => f.ftype = v.as_uint(name, 255)? as u8,
                "Operand" => f.operand = v.as_uint(name, 255)? as u8,
                "Role" => f.role = Role::from_bits(v.as_uint(name, u64::from(u32::MAX))? as u32),
                "Source" => f.source = v.as_bytes(name)?.to_vec(),
                "Destination" => f.destination = v.as_bytes(name)?.to_vec(),
                _ => {}
            }
        }
        Ok(f)
    }
}

impl GobEncode for ConnectFrame {
    const TYPE: &'static TypeDesc = &CONNECT_FRAME;
    fn encode_fields(&self, w: &mut StructWriter<'_>) {
        w.uint(0, u64::from(self.major));
        w.uint(1, u64::from(self.minor));
        w.uint(2, u64::from(self.ftype));
        w.uint(3, u64::from(self.operand));
        w.uint(4, u64::from(self.role.bits()));
        w.bytes(5, &self.source);
        w.bytes(6, &self.destination);
    }
}

/// Go `ssntp.ConnectedFrame`: the server's handshake reply. A handshake
/// *error* arrives as a `Frame`; read by field name it fills the same
/// Type/Operand/Payload fields, so the client decodes either into this.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ConnectedFrame {
    pub major: u8,
    pub minor: u8,
    pub ftype: u8,
    pub operand: u8,
    pub role: Role,
    pub source: Vec<u8>,
    pub destination: Vec<u8>,
    pub payload_length: u32,
    pub payload: Vec<u8>,
}

impl fmt::Debug for ConnectedFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectedFrame")
            .field("type", &self.ftype)
            .field("operand", &self.operand)
            .field("role", &self.role)
            .field("source", &self.source)
            .field("destination", &self.destination)
            .field("payload", &format_args!("{} bytes", self.payload.len()))
            .finish()
    }
}

impl ConnectedFrame {
    /// CONNECTED (STATUS 0 in every generation) with the cluster configuration.
    pub fn new(
        role: Role,
        server: Uuid16,
        client: &[u8],
        configuration: Vec<u8>,
    ) -> ConnectedFrame {
        ConnectedFrame {
            major: MAJOR,
            minor: MINOR,
            ftype: FrameType::Status.to_u8(),
            operand: 0,
            role,
            source: server.to_vec(),
            destination: client.to_vec(),
            payload_length: u32::try_from(configuration.len()).unwrap_or(u32::MAX),
            payload: configuration,
        }
    }

    pub fn from_struct(s: &StructValue) -> Result<ConnectedFrame, GobError> {
        s.require_common_field(&[
            "Major",
            "Minor",
            "Type",
            "Operand",
            "Role",
            "Source",
            "Destination",
            "PayloadLength",
            "Payload",
        ])?;
        let mut f = ConnectedFrame::default();
        for (name, v) in s.iter() {
            match name {
                "Major" => f.major = v.as_uint(name, 255)? as u8,
                "Minor" => f.minor = v.as_uint(name, 255)? as u8,
                "Type" => f.ftype = v.as_uint(name, 255)? as u8,
                "Operand" => f.operand = v.as_uint(name, 255)? as u8,
                "Role" => f.role = Role::from_bits(v.as_uint(name, u64::from(u32::MAX))? as u32),
                "Source" => f.source = v.as_bytes(name)?.to_vec(),
                "Destination" => f.destination = v.as_bytes(name)?.to_vec(),
                "PayloadLength" => f.payload_length = v.as_uint(name, u64::from(u32::MAX))? as u32,
                "Payload" => f.payload = v.as_bytes(name)?.to_vec(),
                _ => {}
            }
        }
        Ok(f)
    }
}

impl GobEncode for ConnectedFrame {
    const TYPE: &'static TypeDesc = &CONNECTED_FRAME;
    fn encode_fields(&self, w: &mut StructWriter<'_>) {
        w.uint(0, u64::from(self.major));
        w.uint(1, u64::from(self.minor));
        w.uint(2, u64::from(self.ftype));
        w.uint(3, u64::from(self.operand));
        w.uint(4, u64::from(self.role.bits()));
        w.bytes(5, &self.source);
        w.bytes(6, &self.destination);
        w.uint(7, u64::from(self.payload_length));
        w.bytes(8, &self.payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_time_matches_spec_example() {
        // 2017-11-01T12:00:00.0000005Z
        let t = UNIX_EPOCH + Duration::new(1_509_537_600, 500);
        let g = GoTime::from_system_time(t);
        assert_eq!(
            g.to_bytes(),
            [
                0x01, 0, 0, 0, 0x0e, 0xd1, 0x8b, 0xae, 0x40, 0, 0, 0x01, 0xf4, 0xff, 0xff
            ]
        );
        assert_eq!(GoTime::from_bytes(&g.to_bytes()), Ok(g));
        assert_eq!(g.to_system_time(), Some(t));
    }

    #[test]
    fn go_time_rejects_garbage() {
        assert!(GoTime::from_bytes(&[]).is_err());
        assert!(GoTime::from_bytes(&[3; 15]).is_err());
        assert!(GoTime::from_bytes(&[1; 10]).is_err());
    }

    #[test]
    fn enum_names() {
        assert_eq!(Command::Stats.to_string(), "STATISTICS");
        assert_eq!(
            Operation::Error(ErrorCode::StartFailure).to_string(),
            "ERROR Could not start instance"
        );
        assert_eq!(FrameType::from_u8(4), None);
        for t in [
            FrameType::Command,
            FrameType::Status,
            FrameType::Error,
            FrameType::Event,
        ] {
            assert_eq!(FrameType::from_u8(t.to_u8()), Some(t));
        }
    }
}

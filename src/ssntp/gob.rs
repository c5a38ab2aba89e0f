//! The subset of Go's `encoding/gob` stream format that SSNTP uses.
//!
//! A gob stream is a sequence of messages `uint length | int typeId | body`.
//! A negative type id introduces a *type definition* (a `wireType` value) that
//! later values of that id are decoded with; a positive one carries a value.
//! Type ids above 64 are chosen by each sender, so a receiver must learn them
//! from the stream, and struct fields are matched to local structs **by name**.
//!
//! * [`Decoder`] is resumable: feed it bytes as they arrive from the socket and
//!   take whole values out. Definitions are consumed internally. Every length is
//!   checked against what is actually buffered before anything is allocated, and
//!   a message longer than the configured maximum is an error, so a hostile
//!   length prefix costs nothing.
//! * [`Encoder`] writes our own static types ([`TypeDesc`]): it assigns ids in
//!   the order Go does, sends each definition once per stream right before the
//!   first value that needs it, and omits zero-valued fields (arrays are always
//!   sent), so its output is byte-identical to Go's given the same ids.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// A gob type id. Negative on the wire for definitions.
pub type TypeId = i64;

/// Builtin type ids (gob's `tBool` … `tInterface`).
pub mod ids {
    use super::TypeId;
    pub const BOOL: TypeId = 1;
    pub const INT: TypeId = 2;
    pub const UINT: TypeId = 3;
    pub const FLOAT: TypeId = 4;
    pub const BYTES: TypeId = 5;
    pub const STRING: TypeId = 6;
    pub const COMPLEX: TypeId = 7;
    pub const INTERFACE: TypeId = 8;
    /// The first id a sender may assign to its own types.
    pub const FIRST_USER: TypeId = 65;
}

/// Default upper bound for one message (length prefix), 16 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 16 << 20;
/// Nesting depth beyond which a value is rejected (recursive types exist in gob).
const MAX_DEPTH: usize = 64;
/// Upper bound for the total size of the type definitions of one stream; SSNTP
/// needs about 500 bytes, so this only stops a peer that defines types forever.
const MAX_TYPE_BYTES: usize = 1 << 20;
/// Fields of one struct definition (SSNTP's largest has 9).
const MAX_FIELDS: usize = 1024;
/// Values decoded from one message. A value costs ~50 bytes of memory but can
/// take one byte on the wire, so without this a 16 MiB message of empty
/// structs would cost ~800 MB. SSNTP frames hold fewer than a hundred.
const MAX_VALUES: usize = 1 << 16;
/// Elements reserved up front for a sequence; it grows as values really arrive.
const MAX_PREALLOC: usize = 256;

/// Everything that can go wrong decoding or matching a gob stream. Any of these
/// leaves the stream unusable: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GobError {
    /// A length prefix above the configured maximum.
    MessageTooLarge { len: u64, max: usize },
    /// A message with a zero length.
    EmptyMessage,
    /// Data ended inside a message (its length prefix promised more).
    Truncated,
    /// An encoded unsigned integer with more than 8 bytes.
    BadUint,
    /// A message body left bytes over after its value.
    ExtraData,
    /// A value of a type id that was never defined on this stream.
    UnknownType(TypeId),
    /// A second definition for the same id, or a definition for a builtin id.
    BadDefinition(String),
    /// Type definitions of this stream exceed the budget.
    TooManyTypes,
    /// Nested deeper than we accept.
    TooDeep,
    /// A gob feature SSNTP never uses (interfaces).
    Unsupported(&'static str),
    /// Malformed content (bad field number, array length mismatch, …).
    Corrupt(String),
    /// The value does not fit the local type (Go's "type mismatch").
    Mismatch(String),
}

impl fmt::Display for GobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GobError::MessageTooLarge { len, max } => {
                write!(
                    f,
                    "gob: message of {len} bytes exceeds the limit of {max} bytes"
                )
            }
            GobError::EmptyMessage => f.write_str("gob: zero-length message"),
            GobError::Truncated => f.write_str("gob: message truncated"),
            GobError::BadUint => f.write_str("gob: encoded unsigned integer out of range"),
            GobError::ExtraData => f.write_str("gob: extra data after value"),
            GobError::UnknownType(id) => write!(f, "gob: value of undefined type id {id}"),
            GobError::BadDefinition(s) => write!(f, "gob: bad type definition: {s}"),
            GobError::TooManyTypes => f.write_str("gob: too many type definitions"),
            GobError::TooDeep => f.write_str("gob: value nested too deeply"),
            GobError::Unsupported(what) => write!(f, "gob: unsupported: {what}"),
            GobError::Corrupt(s) => write!(f, "gob: corrupt data: {s}"),
            GobError::Mismatch(s) => write!(f, "gob: type mismatch: {s}"),
        }
    }
}

impl std::error::Error for GobError {}

type Result<T> = std::result::Result<T, GobError>;

// ---------------------------------------------------------------------------
// Primitives

/// Appends a gob unsigned integer.
pub fn write_uint(out: &mut Vec<u8>, v: u64) {
    // Most are field deltas and small counts: one byte, no array.
    if v < 0x80 {
        out.push(v as u8);
        return;
    }
    let mut b = [0; MAX_UINT_LEN];
    let n = uint_into(&mut b, v);
    out.extend_from_slice(&b[..n]);
}

/// The longest gob unsigned integer: a count byte and eight bytes.
const MAX_UINT_LEN: usize = 9;

/// Writes `v` as a gob unsigned integer at the start of `buf`; its length.
fn uint_into(buf: &mut [u8; MAX_UINT_LEN], v: u64) -> usize {
    if v < 0x80 {
        buf[0] = v as u8;
        return 1;
    }
    let n = 8 - (v.leading_zeros() / 8) as usize;
    // The count byte is the negated length: 0xff for 1 byte … 0xf8 for 8.
    buf[0] = (256 - n) as u8;
    buf[1..=n].copy_from_slice(&v.to_be_bytes()[8 - n..]);
    n + 1
}

/// Appends a gob signed integer (sign folded into bit 0).
pub fn write_int(out: &mut Vec<u8>, v: i64) {
    let u = if v < 0 {
        ((!v as u64) << 1) | 1
    } else {
        (v as u64) << 1
    };
    write_uint(out, u);
}

fn write_bytes(out: &mut Vec<u8>, v: &[u8]) {
    write_uint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// Reads a gob unsigned integer from the front of `buf`: `Ok(None)` if `buf`
/// is too short to tell, else the value and the bytes it used.
fn peek_uint(buf: &[u8]) -> Result<Option<(u64, usize)>> {
    let Some(&b) = buf.first() else {
        return Ok(None);
    };
    if b < 0x80 {
        return Ok(Some((u64::from(b), 1)));
    }
    let n = 256 - usize::from(b);
    if n > 8 {
        return Err(GobError::BadUint);
    }
    if buf.len() < 1 + n {
        return Ok(None);
    }
    let v = buf[1..=n]
        .iter()
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    Ok(Some((v, 1 + n)))
}

/// A cursor over one complete message body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn uint(&mut self) -> Result<u64> {
        match peek_uint(&self.buf[self.pos..])? {
            Some((v, n)) => {
                self.pos += n;
                Ok(v)
            }
            None => Err(GobError::Truncated),
        }
    }

    fn int(&mut self) -> Result<i64> {
        let u = self.uint()?;
        Ok(if u & 1 == 1 {
            !((u >> 1) as i64)
        } else {
            (u >> 1) as i64
        })
    }

    /// A count of items that each take at least one byte: checked against what
    /// is left so a hostile count never drives an allocation.
    fn count(&mut self) -> Result<usize> {
        let n = self.uint()?;
        if n > self.remaining() as u64 {
            return Err(GobError::Corrupt(format!(
                "count {n} exceeds the {} bytes left",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.count()?;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| GobError::Corrupt("string is not UTF-8".into()))
    }

    /// Walks a struct's (delta, value) pairs; `field` is called with each
    /// absolute field number and must consume the value.
    fn walk_struct(&mut self, mut field: impl FnMut(&mut Self, u64) -> Result<()>) -> Result<()> {
        let mut num: i64 = -1;
        loop {
            let delta = self.uint()?;
            if delta == 0 {
                return Ok(());
            }
            num = num
                .checked_add(
                    i64::try_from(delta).map_err(|_| GobError::Corrupt("field delta".into()))?,
                )
                .ok_or_else(|| GobError::Corrupt("field number overflow".into()))?;
            field(self, num as u64)?;
        }
    }
}

// ---------------------------------------------------------------------------
// Wire types

/// One field of a struct definition received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDef {
    pub name: String,
    pub id: TypeId,
}

/// A struct definition received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructDef {
    pub name: String,
    pub fields: Vec<FieldDef>,
    /// Field names, for matching by name once per definition rather than
    /// once per value.
    index: HashMap<String, usize>,
}

impl StructDef {
    pub fn new(name: String, fields: Vec<FieldDef>) -> StructDef {
        let index = fields
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        StructDef {
            name,
            fields,
            index,
        }
    }

    /// The wire index of the field called `name`.
    pub fn field(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
}

/// A type definition received from the peer (gob's `wireType`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireType {
    Array {
        name: String,
        elem: TypeId,
        len: u64,
    },
    Slice {
        name: String,
        elem: TypeId,
    },
    Struct(Arc<StructDef>),
    Map {
        name: String,
        key: TypeId,
        elem: TypeId,
    },
    /// GobEncoder, BinaryMarshaler and TextMarshaler types: opaque bytes.
    Opaque {
        name: String,
    },
}

#[derive(Default)]
struct CommonType {
    name: String,
    id: i64,
}

fn read_common(r: &mut Reader<'_>) -> Result<CommonType> {
    let mut c = CommonType::default();
    r.walk_struct(|r, f| {
        match f {
            0 => c.name = r.string()?,
            1 => c.id = r.int()?,
            _ => {
                return Err(GobError::BadDefinition(format!(
                    "CommonType has no field {f}"
                )));
            }
        }
        Ok(())
    })?;
    Ok(c)
}

fn read_wire_type(r: &mut Reader<'_>) -> Result<WireType> {
    let mut out: Option<WireType> = None;
    r.walk_struct(|r, f| {
        if out.is_some() {
            return Err(GobError::BadDefinition(
                "more than one kind in wireType".into(),
            ));
        }
        let mut common = CommonType::default();
        let (mut elem, mut key, mut len) = (0i64, 0i64, 0i64);
        let mut fields = Vec::new();
        r.walk_struct(|r, g| {
            match (f, g) {
                (_, 0) => common = read_common(r)?,
                (0, 1) | (1, 1) => elem = r.int()?,
                (0, 2) => len = r.int()?,
                (2, 1) => {
                    let n = r.count()?;
                    if n > MAX_FIELDS {
                        return Err(GobError::BadDefinition(format!(
                            "struct of {n} fields (at most {MAX_FIELDS})"
                        )));
                    }
                    for _ in 0..n {
                        let mut fd = FieldDef {
                            name: String::new(),
                            id: 0,
                        };
                        r.walk_struct(|r, h| {
                            match h {
                                0 => fd.name = r.string()?,
                                1 => fd.id = r.int()?,
                                _ => {
                                    return Err(GobError::BadDefinition(format!(
                                        "fieldType has no field {h}"
                                    )));
                                }
                            }
                            Ok(())
                        })?;
                        fields.push(fd);
                    }
                }
                (3, 1) => key = r.int()?,
                (3, 2) => elem = r.int()?,
                _ => {
                    return Err(GobError::BadDefinition(format!(
                        "wireType kind {f} has no field {g}"
                    )));
                }
            }
            Ok(())
        })?;
        let name = common.name;
        out = Some(match f {
            0 => {
                let len = u64::try_from(len).map_err(|_| {
                    GobError::BadDefinition(format!("array {name:?} of negative length"))
                })?;
                WireType::Array { name, elem, len }
            }
            1 => WireType::Slice { name, elem },
            2 => WireType::Struct(Arc::new(StructDef::new(name, fields))),
            3 => WireType::Map { name, key, elem },
            4..=6 => WireType::Opaque { name },
            _ => {
                return Err(GobError::BadDefinition(format!(
                    "unknown wireType kind {f}"
                )));
            }
        });
        Ok(())
    })?;
    out.ok_or_else(|| GobError::BadDefinition("empty wireType".into()))
}

// ---------------------------------------------------------------------------
// Values

/// A decoded struct: the peer's definition and the fields it transmitted
/// (zero-valued fields are absent, as on the wire).
#[derive(Debug, Clone, PartialEq)]
pub struct StructValue {
    pub def: Arc<StructDef>,
    /// (index into `def.fields`, value), in wire order.
    pub fields: Vec<(usize, Value)>,
}

impl StructValue {
    /// The transmitted fields with their names.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.fields
            .iter()
            .filter_map(|(i, v)| self.def.fields.get(*i).map(|f| (f.name.as_str(), v)))
    }

    /// Go's rule that at least one wire field must exist in the local type.
    pub fn require_common_field(&self, local: &[&str]) -> Result<()> {
        if self
            .def
            .fields
            .iter()
            .any(|f| local.contains(&f.name.as_str()))
        {
            Ok(())
        } else {
            Err(GobError::Mismatch(format!(
                "no field of wire type {:?} matches",
                self.def.name
            )))
        }
    }
}

/// A decoded gob value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Complex(f64, f64),
    Bytes(Vec<u8>),
    /// Go strings may hold any bytes.
    String(Vec<u8>),
    Array(Vec<Value>),
    Slice(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Struct(StructValue),
    /// The bytes of a GobEncoder/BinaryMarshaler/TextMarshaler (e.g. time.Time).
    Opaque(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Uint(_) => "uint",
            Value::Float(_) => "float",
            Value::Complex(..) => "complex",
            Value::Bytes(_) => "bytes",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Slice(_) => "slice",
            Value::Map(_) => "map",
            Value::Struct(_) => "struct",
            Value::Opaque(_) => "encoded value",
        }
    }

    fn mismatch(&self, field: &str, want: &str) -> GobError {
        GobError::Mismatch(format!(
            "field {field}: expected {want}, got {}",
            self.kind()
        ))
    }

    /// An unsigned field that must fit `max` (Go rejects out-of-range values).
    pub fn as_uint(&self, field: &str, max: u64) -> Result<u64> {
        match self {
            Value::Uint(v) if *v <= max => Ok(*v),
            Value::Uint(v) => Err(GobError::Mismatch(format!(
                "field {field}: value {v} out of range"
            ))),
            _ => Err(self.mismatch(field, "uint")),
        }
    }

    pub fn as_bytes(&self, field: &str) -> Result<&[u8]> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err(self.mismatch(field, "bytes")),
        }
    }

    pub fn into_bytes(self, field: &str) -> Result<Vec<u8>> {
        match self {
            Value::Bytes(b) => Ok(b),
            other => Err(other.mismatch(field, "bytes")),
        }
    }

    pub fn as_opaque(&self, field: &str) -> Result<&[u8]> {
        match self {
            Value::Opaque(b) => Ok(b),
            _ => Err(self.mismatch(field, "encoded value")),
        }
    }

    pub fn as_struct(&self, field: &str) -> Result<&StructValue> {
        match self {
            Value::Struct(s) => Ok(s),
            _ => Err(self.mismatch(field, "struct")),
        }
    }

    pub fn as_slice(&self, field: &str) -> Result<&[Value]> {
        match self {
            Value::Slice(s) => Ok(s),
            _ => Err(self.mismatch(field, "slice")),
        }
    }

    /// A Go `[N]byte` array (sent as N uints, each ≤ 255).
    pub fn as_byte_array<const N: usize>(&self, field: &str) -> Result<[u8; N]> {
        let Value::Array(items) = self else {
            return Err(self.mismatch(field, "array"));
        };
        if items.len() != N {
            return Err(GobError::Mismatch(format!(
                "field {field}: array of {} elements, expected {N}",
                items.len()
            )));
        }
        let mut out = [0u8; N];
        for (o, v) in out.iter_mut().zip(items) {
            *o = v.as_uint(field, 255)? as u8;
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Decoder

/// Resumable gob stream decoder: [`feed`](Decoder::feed) bytes, then call
/// [`next_value`](Decoder::next_value) until it returns `Ok(None)`.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    types: HashMap<TypeId, WireType>,
    type_bytes: usize,
    max_message: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_MESSAGE)
    }
}

impl Decoder {
    /// A decoder for a fresh stream that refuses messages above `max_message` bytes.
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            types: HashMap::new(),
            type_bytes: 0,
            max_message,
        }
    }

    /// Appends bytes received from the peer.
    pub fn feed(&mut self, data: &[u8]) {
        // Reclaim consumed space before growing, so the buffer stays about one
        // message large however long the stream runs.
        if self.start > 0 && (self.start == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet consumed as whole messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The definition the peer gave for `id`, if any.
    pub fn wire_type(&self, id: TypeId) -> Option<&WireType> {
        self.types.get(&id)
    }

    /// The next complete value, consuming any type definitions before it.
    /// `Ok(None)` means more bytes are needed. After an error the stream is
    /// unusable.
    pub fn next_value(&mut self) -> Result<Option<(TypeId, Value)>> {
        loop {
            let avail = &self.buf[self.start..];
            let Some((len, hdr)) = peek_uint(avail)? else {
                return Ok(None);
            };
            if len > self.max_message as u64 {
                return Err(GobError::MessageTooLarge {
                    len,
                    max: self.max_message,
                });
            }
            if len == 0 {
                return Err(GobError::EmptyMessage);
            }
            let len = len as usize;
            if avail.len() < hdr + len {
                return Ok(None);
            }
            let body_start = self.start + hdr;
            self.start = body_start + len;
            let body = &self.buf[body_start..body_start + len];
            let mut r = Reader { buf: body, pos: 0 };
            let id = r.int()?;
            if id < 0 {
                let id = id
                    .checked_neg()
                    .ok_or_else(|| GobError::BadDefinition("type id".into()))?;
                if id < ids::FIRST_USER {
                    return Err(GobError::BadDefinition(format!("id {id} is reserved")));
                }
                if self.types.contains_key(&id) {
                    return Err(GobError::BadDefinition(format!(
                        "duplicate definition of id {id}"
                    )));
                }
                self.type_bytes += len;
                if self.type_bytes > MAX_TYPE_BYTES {
                    return Err(GobError::TooManyTypes);
                }
                let wt = read_wire_type(&mut r)?;
                if r.remaining() != 0 {
                    return Err(GobError::ExtraData);
                }
                self.types.insert(id, wt);
                continue;
            }
            if id == 0 {
                return Err(GobError::Corrupt("type id 0".into()));
            }
            let types = &self.types;
            let is_struct = matches!(types.get(&id), Some(WireType::Struct(_)));
            if !is_struct {
                // Non-struct top-level values carry a zero "singleton" delta.
                if r.uint()? != 0 {
                    return Err(GobError::Corrupt("non-zero delta for singleton".into()));
                }
            }
            let mut budget = MAX_VALUES;
            let v = decode_value(types, &mut r, id, 0, &mut budget)?;
            if r.remaining() != 0 {
                return Err(GobError::ExtraData);
            }
            return Ok(Some((id, v)));
        }
    }
}

fn decode_value(
    types: &HashMap<TypeId, WireType>,
    r: &mut Reader<'_>,
    id: TypeId,
    depth: usize,
    budget: &mut usize,
) -> Result<Value> {
    if depth > MAX_DEPTH {
        return Err(GobError::TooDeep);
    }
    *budget = budget.checked_sub(1).ok_or_else(|| {
        GobError::Corrupt(format!("more than {MAX_VALUES} values in one message"))
    })?;
    Ok(match id {
        ids::BOOL => Value::Bool(match r.uint()? {
            0 => false,
            1 => true,
            n => return Err(GobError::Corrupt(format!("bool value {n}"))),
        }),
        ids::INT => Value::Int(r.int()?),
        ids::UINT => Value::Uint(r.uint()?),
        ids::FLOAT => Value::Float(f64::from_bits(r.uint()?.swap_bytes())),
        ids::COMPLEX => {
            let re = f64::from_bits(r.uint()?.swap_bytes());
            Value::Complex(re, f64::from_bits(r.uint()?.swap_bytes()))
        }
        ids::BYTES => Value::Bytes(r.bytes()?.to_vec()),
        ids::STRING => Value::String(r.bytes()?.to_vec()),
        ids::INTERFACE => return Err(GobError::Unsupported("interface values")),
        _ => match types.get(&id).ok_or(GobError::UnknownType(id))? {
            WireType::Struct(def) => {
                let mut fields = Vec::new();
                r.walk_struct(|r, num| {
                    let idx = num as usize;
                    let fd = def.fields.get(idx).ok_or_else(|| {
                        GobError::Corrupt(format!("{} has no field {num}", def.name))
                    })?;
                    fields.push((idx, decode_value(types, r, fd.id, depth + 1, budget)?));
                    Ok(())
                })?;
                Value::Struct(StructValue {
                    def: Arc::clone(def),
                    fields,
                })
            }
            WireType::Array { elem, len, name } => {
                let n = r.count()?;
                if n as u64 != *len {
                    return Err(GobError::Corrupt(format!(
                        "{name}: {n} elements for an array of {len}"
                    )));
                }
                Value::Array(decode_seq(types, r, *elem, n, depth, budget)?)
            }
            WireType::Slice { elem, .. } => {
                let n = r.count()?;
                Value::Slice(decode_seq(types, r, *elem, n, depth, budget)?)
            }
            WireType::Map { key, elem, .. } => {
                let n = r.count()?;
                let mut out = Vec::with_capacity(n.min(MAX_PREALLOC));
                for _ in 0..n {
                    let k = decode_value(types, r, *key, depth + 1, budget)?;
                    out.push((k, decode_value(types, r, *elem, depth + 1, budget)?));
                }
                Value::Map(out)
            }
            WireType::Opaque { .. } => Value::Opaque(r.bytes()?.to_vec()),
        },
    })
}

fn decode_seq(
    types: &HashMap<TypeId, WireType>,
    r: &mut Reader<'_>,
    elem: TypeId,
    n: usize,
    depth: usize,
    budget: &mut usize,
) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(n.min(MAX_PREALLOC));
    for _ in 0..n {
        out.push(decode_value(types, r, elem, depth + 1, budget)?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Encoder

/// Static description of one of our own types, enough to send its gob
/// definition. Struct field order is the Go declaration order.
#[derive(Debug)]
pub enum TypeDesc {
    Bool,
    Int,
    Uint,
    Bytes,
    String,
    Array {
        name: &'static str,
        elem: &'static TypeDesc,
        len: u64,
    },
    Slice {
        name: &'static str,
        elem: &'static TypeDesc,
    },
    Struct {
        name: &'static str,
        fields: &'static [(&'static str, &'static TypeDesc)],
    },
    /// A type that implements GobEncoder in Go (e.g. `time.Time`).
    GobEncoder {
        name: &'static str,
    },
}

impl TypeDesc {
    fn builtin_id(&self) -> Option<TypeId> {
        match self {
            TypeDesc::Bool => Some(ids::BOOL),
            TypeDesc::Int => Some(ids::INT),
            TypeDesc::Uint => Some(ids::UINT),
            TypeDesc::Bytes => Some(ids::BYTES),
            TypeDesc::String => Some(ids::STRING),
            _ => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            TypeDesc::Array { name, .. }
            | TypeDesc::Slice { name, .. }
            | TypeDesc::Struct { name, .. }
            | TypeDesc::GobEncoder { name } => name,
            _ => "",
        }
    }
}

/// A struct type we can send.
pub trait GobEncode {
    /// Must be a [`TypeDesc::Struct`].
    const TYPE: &'static TypeDesc;
    /// Writes the fields in declaration order.
    fn encode_fields(&self, w: &mut StructWriter<'_>);
}

/// Writes one struct's fields as (delta, value) pairs, omitting zero values
/// as Go does. Field numbers must increase.
#[derive(Debug)]
pub struct StructWriter<'a> {
    out: &'a mut Vec<u8>,
    last: i64,
}

impl<'a> StructWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> StructWriter<'a> {
        StructWriter { out, last: -1 }
    }

    fn field(&mut self, n: u32) {
        let n = i64::from(n);
        debug_assert!(n > self.last, "gob struct fields must be written in order");
        write_uint(self.out, (n - self.last) as u64);
        self.last = n;
    }

    pub fn uint(&mut self, n: u32, v: u64) {
        if v != 0 {
            self.field(n);
            write_uint(self.out, v);
        }
    }

    pub fn int(&mut self, n: u32, v: i64) {
        if v != 0 {
            self.field(n);
            write_int(self.out, v);
        }
    }

    pub fn bool(&mut self, n: u32, v: bool) {
        if v {
            self.field(n);
            self.out.push(1);
        }
    }

    /// `[]byte` or `string`.
    pub fn bytes(&mut self, n: u32, v: &[u8]) {
        if !v.is_empty() {
            self.field(n);
            write_bytes(self.out, v);
        }
    }

    /// A Go `[N]byte`: always sent, each byte as a uint.
    pub fn byte_array(&mut self, n: u32, v: &[u8]) {
        self.field(n);
        write_uint(self.out, v.len() as u64);
        for &b in v {
            write_uint(self.out, u64::from(b));
        }
    }

    /// A GobEncoder value; `None` is the zero value and is omitted.
    pub fn encoded(&mut self, n: u32, v: Option<&[u8]>) {
        if let Some(v) = v {
            self.field(n);
            write_bytes(self.out, v);
        }
    }

    /// A nested struct (a pointer field: `None` is nil and omitted).
    pub fn structure<T: GobEncode>(&mut self, n: u32, v: Option<&T>) {
        if let Some(v) = v {
            self.field(n);
            let mut w = StructWriter::new(self.out);
            v.encode_fields(&mut w);
            w.end();
        }
    }

    /// A slice of structs; empty is omitted.
    pub fn struct_slice<T: GobEncode>(&mut self, n: u32, items: &[T]) {
        if !items.is_empty() {
            self.field(n);
            write_uint(self.out, items.len() as u64);
            for it in items {
                let mut w = StructWriter::new(self.out);
                it.encode_fields(&mut w);
                w.end();
            }
        }
    }

    /// Terminates the struct.
    pub fn end(self) {
        self.out.push(0);
    }
}

/// Appends one gob message to `out`: its length, then what `body` writes.
/// The body is written in place, after room for the longest length, and
/// moved down once its length is known. No second buffer: one would keep
/// the capacity of the largest message ever sent (a STATS of thousands of
/// instances is most of a megabyte) for the connection's life.
fn append_message(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; MAX_UINT_LEN]);
    body(out);
    let len = out.len() - start - MAX_UINT_LEN;
    let mut head = [0u8; MAX_UINT_LEN];
    let n = uint_into(&mut head, len as u64);
    out.copy_within(start + MAX_UINT_LEN.., start + n);
    out.truncate(start + n + len);
    out[start..start + n].copy_from_slice(&head[..n]);
}

/// A gob stream encoder for one connection direction.
#[derive(Debug)]
pub struct Encoder {
    next_id: TypeId,
    /// (type name, id, definition sent); a handful of entries, so a Vec.
    types: Vec<(&'static str, TypeId, bool)>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// An encoder for a fresh stream; its first type gets id 65, as in a fresh Go process.
    pub fn new() -> Encoder {
        Encoder::starting_at(ids::FIRST_USER)
    }

    /// An encoder whose first new type gets `first_id` (≥ 65). Go assigns ids
    /// per process, so reproducing a Go stream byte for byte needs its ids.
    pub fn starting_at(first_id: TypeId) -> Encoder {
        Encoder {
            next_id: first_id.max(ids::FIRST_USER),
            types: Vec::new(),
        }
    }

    fn lookup(&self, name: &str) -> Option<usize> {
        self.types.iter().position(|(n, _, _)| *n == name)
    }

    /// Assigns ids the way Go does: a struct before its fields, an array or
    /// slice after its element.
    fn assign(&mut self, t: &'static TypeDesc) -> TypeId {
        if let Some(id) = t.builtin_id() {
            return id;
        }
        if let Some(i) = self.lookup(t.name()) {
            return self.types[i].1;
        }
        let alloc = |enc: &mut Encoder| {
            let id = enc.next_id;
            enc.next_id += 1;
            enc.types.push((t.name(), id, false));
            id
        };
        match t {
            TypeDesc::Struct { fields, .. } => {
                let id = alloc(self);
                for (_, ft) in fields.iter() {
                    self.assign(ft);
                }
                id
            }
            TypeDesc::Array { elem, .. } | TypeDesc::Slice { elem, .. } => {
                self.assign(elem);
                alloc(self)
            }
            _ => alloc(self),
        }
    }

    fn id_of(&self, t: &'static TypeDesc) -> TypeId {
        t.builtin_id()
            .or_else(|| self.lookup(t.name()).map(|i| self.types[i].1))
            .unwrap_or(0)
    }

    /// Sends the definition of `t`, then of the types it refers to, each once.
    fn send_definitions(&mut self, t: &'static TypeDesc, out: &mut Vec<u8>) {
        if t.builtin_id().is_some() {
            return;
        }
        let Some(i) = self.lookup(t.name()) else {
            return;
        };
        if self.types[i].2 {
            return;
        }
        self.types[i].2 = true;
        let id = self.types[i].1;

        let this = &*self;
        append_message(out, |body| {
            write_int(body, -id);
            let common = |w: &mut StructWriter<'_>| {
                w.field(0);
                let mut c = StructWriter::new(w.out);
                c.bytes(0, t.name().as_bytes());
                c.int(1, id);
                c.end();
            };
            let mut wt = StructWriter::new(body);
            match t {
                TypeDesc::Array { elem, len, .. } => {
                    wt.field(0);
                    let mut a = StructWriter::new(wt.out);
                    common(&mut a);
                    a.int(1, this.id_of(elem));
                    a.int(2, *len as i64);
                    a.end();
                }
                TypeDesc::Slice { elem, .. } => {
                    wt.field(1);
                    let mut s = StructWriter::new(wt.out);
                    common(&mut s);
                    s.int(1, this.id_of(elem));
                    s.end();
                }
                TypeDesc::Struct { fields, .. } => {
                    wt.field(2);
                    let mut s = StructWriter::new(wt.out);
                    common(&mut s);
                    if !fields.is_empty() {
                        s.field(1);
                        write_uint(s.out, fields.len() as u64);
                        for (fname, ft) in fields.iter() {
                            let mut f = StructWriter::new(s.out);
                            f.bytes(0, fname.as_bytes());
                            f.int(1, this.id_of(ft));
                            f.end();
                        }
                    }
                    s.end();
                }
                TypeDesc::GobEncoder { .. } => {
                    wt.field(4);
                    let mut g = StructWriter::new(wt.out);
                    common(&mut g);
                    g.end();
                }
                _ => {}
            }
            wt.end();
        });

        match t {
            TypeDesc::Struct { fields, .. } => {
                for (_, ft) in fields.iter() {
                    self.send_definitions(ft, out);
                }
            }
            TypeDesc::Array { elem, .. } | TypeDesc::Slice { elem, .. } => {
                self.send_definitions(elem, out)
            }
            _ => {}
        }
    }

    /// Appends the messages for one value of `T` to `out`: its type
    /// definitions if this stream has not carried them yet, then the value.
    pub fn encode<T: GobEncode>(&mut self, v: &T, out: &mut Vec<u8>) {
        let id = self.assign(T::TYPE);
        self.send_definitions(T::TYPE, out);
        append_message(out, |body| {
            write_int(body, id);
            let mut w = StructWriter::new(body);
            v.encode_fields(&mut w);
            w.end();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uint_bytes(v: u64) -> Vec<u8> {
        let mut o = Vec::new();
        write_uint(&mut o, v);
        o
    }

    fn int_bytes(v: i64) -> Vec<u8> {
        let mut o = Vec::new();
        write_int(&mut o, v);
        o
    }

    #[test]
    fn integers_match_spec_examples() {
        assert_eq!(uint_bytes(7), [7]);
        assert_eq!(uint_bytes(200), [0xff, 0xc8]);
        assert_eq!(uint_bytes(258), [0xfe, 0x01, 0x02]);
        assert_eq!(
            uint_bytes(u64::MAX),
            [0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(int_bytes(65), [0xff, 0x82]);
        assert_eq!(int_bytes(-65), [0xff, 0x81]);
        assert_eq!(int_bytes(16), [0x20]);
        assert_eq!(int_bytes(370), [0xfe, 0x02, 0xe4]);
        for v in [0u64, 1, 127, 128, 255, 256, 65535, 1 << 40, u64::MAX] {
            let b = uint_bytes(v);
            assert_eq!(peek_uint(&b), Ok(Some((v, b.len()))));
        }
        for v in [0i64, 1, -1, 63, -64, 64, i64::MIN, i64::MAX] {
            let b = int_bytes(v);
            let mut r = Reader { buf: &b, pos: 0 };
            assert_eq!(r.int(), Ok(v));
        }
    }

    #[test]
    fn oversized_length_prefix_is_refused_without_allocation() {
        let mut d = Decoder::new(1024);
        d.feed(&[0xf8, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_value(),
            Err(GobError::MessageTooLarge { .. })
        ));
        let mut d = Decoder::new(1024);
        d.feed(&[0xf7]);
        assert_eq!(d.next_value(), Err(GobError::BadUint));
    }

    #[test]
    fn partial_input_waits() {
        let mut d = Decoder::default();
        d.feed(&[0xff]);
        assert_eq!(d.next_value(), Ok(None));
        d.feed(&[0x90]);
        assert_eq!(d.next_value(), Ok(None));
        assert_eq!(d.buffered(), 2);
    }

    fn msg(body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        write_uint(&mut m, body.len() as u64);
        m.extend_from_slice(body);
        m
    }

    fn common(name: &[u8], id: i64) -> Vec<u8> {
        let mut c = vec![1, 1];
        write_uint(&mut c, name.len() as u64);
        c.extend_from_slice(name);
        c.push(1);
        write_int(&mut c, id);
        c.push(0);
        c
    }

    /// `type S []S` with one value whose nested counts each claim every byte
    /// left: found by fuzzing to reserve ~2 GB from a 1 MiB message.
    #[test]
    fn nested_hostile_counts_reserve_nothing_big() {
        let len = 1usize << 20;
        let mut def = Vec::new();
        write_int(&mut def, -65);
        def.push(2);
        def.extend(common(b"S", 65));
        def.push(1);
        write_int(&mut def, 65);
        def.extend([0, 0]);
        let mut body = Vec::new();
        write_int(&mut body, 65);
        body.push(0);
        for _ in 0..65 {
            let left = len - body.len() - 4;
            write_uint(&mut body, left as u64);
        }
        body.resize(len, 0);
        let mut d = Decoder::new(2 << 20);
        d.feed(&msg(&def));
        d.feed(&msg(&body));
        // Fails on depth, having reserved at most MAX_PREALLOC per level.
        assert_eq!(d.next_value(), Err(GobError::TooDeep));
    }

    /// A struct definition with half a million fields made matching by name
    /// quadratic (found by fuzzing): definitions are now capped, and names
    /// are indexed once per definition.
    #[test]
    fn wide_struct_definitions_are_refused() {
        let mut def = Vec::new();
        write_int(&mut def, -65);
        def.push(3);
        def.extend(common(b"W", 65));
        def.push(1);
        write_uint(&mut def, 500_000);
        def.extend(std::iter::repeat_n(0u8, 500_000));
        def.extend([0, 0]);
        let mut d = Decoder::default();
        d.feed(&msg(&def));
        assert!(matches!(d.next_value(), Err(GobError::BadDefinition(_))));
    }

    /// A message of a million empty structs would cost ~50 MB of values.
    #[test]
    fn values_per_message_are_bounded() {
        let mut def = Vec::new();
        write_int(&mut def, -65);
        def.push(3);
        def.extend(common(b"E", 65));
        def.extend([0, 0]);
        let mut sdef = Vec::new();
        write_int(&mut sdef, -66);
        sdef.push(2);
        sdef.extend(common(b"[]E", 66));
        sdef.push(1);
        write_int(&mut sdef, 65);
        sdef.extend([0, 0]);
        let mut body = Vec::new();
        write_int(&mut body, 66);
        body.push(0);
        write_uint(&mut body, 1_000_000);
        body.extend(std::iter::repeat_n(0u8, 1_000_000));
        let mut d = Decoder::new(2 << 20);
        for m in [msg(&def), msg(&sdef), msg(&body)] {
            d.feed(&m);
        }
        assert!(
            matches!(d.next_value(), Err(GobError::Corrupt(e)) if e.contains("values in one message"))
        );
    }

    #[test]
    fn hostile_counts_are_checked() {
        // A []byte value (type 5 is builtin, non-struct → singleton 0) claiming 100 bytes.
        let mut d = Decoder::default();
        d.feed(&[4, 0x0a, 0x00, 100, 1]);
        assert!(matches!(d.next_value(), Err(GobError::Corrupt(_))));
    }
}

//! The YAML dialect of the ciao peers (gopkg.in/yaml.v2, YAML 1.1 flavoured),
//! as far as payloads need it:
//!
//! * a tolerant reader: the first document of a stream becomes a [`YamlNode`] tree,
//!   and [`Field`] pulls typed values out of it with yaml.v2's decoding rules
//!   (missing or null = zero value, unknown keys ignored, `yes`/`on` are
//!   booleans, any scalar fits a string, floats truncate into integers,
//!   merge keys, last duplicate key wins), reporting the field path on a
//!   type mismatch;
//! * a scalar emitter choosing plain, single- or double-quoted style exactly
//!   like yaml.v2 + its libyaml port, so our writers produce the bytes a Go
//!   peer would.
//!
//! serde_yaml is only the parser here: its own typed decoding follows YAML 1.2
//! and rejects things yaml.v2 accepts (duplicate keys, `yes`, `1_000`).

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};

/// One YAML value, with yaml.v2's view of plain scalars already resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum YamlNode {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<YamlNode>),
    /// Entries in document order; duplicates are kept (lookups take the last).
    Map(Vec<(YamlNode, YamlNode)>),
}

impl YamlNode {
    fn describe(&self) -> String {
        match self {
            YamlNode::Null => "null".to_string(),
            YamlNode::Bool(b) => format!("boolean {b}"),
            YamlNode::Int(i) => format!("integer {i}"),
            YamlNode::Float(f) => format!("float {f}"),
            YamlNode::Str(s) => {
                let shown: String = s.chars().take(40).collect();
                let more = if shown.len() < s.len() { "…" } else { "" };
                format!("string {shown:?}{more}")
            }
            YamlNode::Seq(_) => "a sequence".to_string(),
            YamlNode::Map(_) => "a mapping".to_string(),
        }
    }

    /// Value of `key` in a mapping: explicit keys first (last duplicate wins,
    /// as yaml.v2 decodes them in order), then `<<` merge sources (the
    /// earliest source wins, again as yaml.v2).
    fn lookup(&self, key: &str) -> Option<&YamlNode> {
        let YamlNode::Map(entries) = self else {
            return None;
        };
        let explicit = entries
            .iter()
            .rev()
            .find(|(k, _)| matches!(k, YamlNode::Str(s) if s == key));
        if let Some((_, v)) = explicit {
            return Some(v);
        }
        for (k, v) in entries.iter().rev() {
            if !matches!(k, YamlNode::Str(s) if s == "<<") {
                continue;
            }
            match v {
                YamlNode::Map(_) => {
                    if let Some(found) = v.lookup(key) {
                        return Some(found);
                    }
                }
                YamlNode::Seq(sources) => {
                    if let Some(found) = sources.iter().find_map(|m| m.lookup(key)) {
                        return Some(found);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Parses the first document of `text` (yaml.v2's `Unmarshal` never looks at
/// later documents). An empty stream is a null document.
pub(crate) fn parse_first_document(text: &str) -> Result<YamlNode, String> {
    check_flow_depth(text)?;
    // Alias expansion can make a small document huge ("billion laughs");
    // charge every node and string byte against a budget proportional to the
    // input, which an alias-free document never exceeds.
    let budget = Cell::new(text.len().saturating_mul(4).saturating_add(4096));
    let mut stream = serde_yaml::Deserializer::from_str(text);
    let Some(first) = stream.next() else {
        return Ok(YamlNode::Null);
    };
    NodeSeed { budget: &budget }
        .deserialize(first)
        .map_err(|e| e.to_string())
}

/// Deeper nesting than this cannot decode anyway (serde_yaml stops at 128).
const MAX_FLOW_DEPTH: usize = 256;

/// The YAML scanner's cost grows with the square of the flow-collection
/// depth (100 000 `[` take half a minute), so refuse absurd depths before
/// parsing. Brackets inside quoted strings or comments are counted too;
/// only hundreds of unclosed ones can trip this.
fn check_flow_depth(text: &str) -> Result<(), String> {
    let mut depth = 0usize;
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Err(format!(
                        "more than {MAX_FLOW_DEPTH} nested flow collections (at byte {i})"
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct NodeSeed<'b> {
    budget: &'b Cell<usize>,
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = YamlNode;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<YamlNode, D::Error> {
        d.deserialize_any(self)
    }
}

impl NodeSeed<'_> {
    fn charge<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        let cost = bytes.saturating_add(1);
        match self.budget.get().checked_sub(cost) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(E::custom(
                "document too large (alias expansion exceeds the size limit)",
            )),
        }
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = YamlNode;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<YamlNode, E> {
        self.charge(0)?;
        Ok(YamlNode::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<YamlNode, E> {
        self.charge(0)?;
        Ok(YamlNode::Int(i128::from(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<YamlNode, E> {
        self.charge(0)?;
        Ok(YamlNode::Int(i128::from(v)))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<YamlNode, E> {
        self.charge(0)?;
        Ok(YamlNode::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<YamlNode, E> {
        self.charge(0)?;
        Ok(i128::try_from(v).map_or(YamlNode::Float(v as f64), YamlNode::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<YamlNode, E> {
        self.charge(0)?;
        Ok(YamlNode::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<YamlNode, E> {
        self.charge(v.len())?;
        Ok(YamlNode::Str(v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<YamlNode, E> {
        self.charge(0)?;
        Ok(YamlNode::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<YamlNode, E> {
        self.charge(0)?;
        Ok(YamlNode::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<YamlNode, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<YamlNode, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<YamlNode, A::Error> {
        self.charge(0)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(YamlNode::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<YamlNode, A::Error> {
        self.charge(0)?;
        let mut entries = Vec::new();
        while let Some(k) = map.next_key_seed(self)? {
            let v = map.next_value_seed(self)?;
            entries.push((k, v));
        }
        Ok(YamlNode::Map(entries))
    }
    /// A value with a non-core tag (`!foo bar`): yaml.v2 decodes the content
    /// and ignores the tag, and so do we.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<YamlNode, A::Error> {
        let (_tag, variant): (String, _) = data.variant()?;
        variant.newtype_variant_seed(self)
    }
}

/// A position in a decoded document: the node (absent = missing key) and
/// its dotted path for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Field<'a> {
    node: Option<&'a YamlNode>,
    path: String,
}

/// A type mismatch found while decoding: yaml.v2 fails the whole Unmarshal.
pub(crate) type DecodeResult<T> = Result<T, String>;

impl<'a> Field<'a> {
    pub(crate) fn root(node: &'a YamlNode) -> Field<'a> {
        Field {
            node: Some(node),
            path: String::new(),
        }
    }

    pub(crate) fn path(&self) -> &str {
        if self.path.is_empty() {
            "(document)"
        } else {
            &self.path
        }
    }

    fn mismatch(&self, want: &str, found: &YamlNode) -> String {
        format!(
            "{}: expected {want}, found {}",
            self.path(),
            found.describe()
        )
    }

    /// Present and not null.
    pub(crate) fn is_set(&self) -> bool {
        !matches!(self.node, None | Some(YamlNode::Null))
    }

    /// The value under `key`; a null or missing parent yields a missing
    /// child, a scalar or sequence parent is a type mismatch.
    pub(crate) fn get(&self, key: &str) -> DecodeResult<Field<'a>> {
        let path = if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        };
        match self.node {
            None | Some(YamlNode::Null) => Ok(Field { node: None, path }),
            Some(n @ YamlNode::Map(_)) => Ok(Field {
                node: n.lookup(key),
                path,
            }),
            Some(other) => Err(self.mismatch("a mapping", other)),
        }
    }

    /// The elements of a sequence (missing or null = none).
    pub(crate) fn items(&self) -> DecodeResult<Vec<Field<'a>>> {
        match self.node {
            None | Some(YamlNode::Null) => Ok(Vec::new()),
            Some(YamlNode::Seq(items)) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, n)| Field {
                    node: Some(n),
                    path: format!("{}[{i}]", self.path()),
                })
                .collect()),
            Some(other) => Err(self.mismatch("a sequence", other)),
        }
    }

    /// A mapping or nothing: checks the type of a sub-document we otherwise
    /// only read keys from.
    pub(crate) fn mapping(&self) -> DecodeResult<()> {
        match self.node {
            None | Some(YamlNode::Null | YamlNode::Map(_)) => Ok(()),
            Some(other) => Err(self.mismatch("a mapping", other)),
        }
    }

    /// A string; yaml.v2 stores any non-null scalar's text in a string field.
    pub(crate) fn string(&self) -> DecodeResult<String> {
        match self.node {
            None | Some(YamlNode::Null) => Ok(String::new()),
            Some(YamlNode::Str(s)) => Ok(s.clone()),
            Some(YamlNode::Int(i)) => Ok(i.to_string()),
            Some(YamlNode::Float(f)) => Ok(f.to_string()),
            Some(YamlNode::Bool(b)) => Ok(b.to_string()),
            Some(other) => Err(self.mismatch("a string", other)),
        }
    }

    /// A list of strings; a lone scalar is taken as a one-element list
    /// (tolerance for hand-written configuration; yaml.v2 would refuse it).
    pub(crate) fn strings_lenient(&self) -> DecodeResult<Vec<String>> {
        match self.node {
            Some(YamlNode::Seq(_)) => self.items()?.iter().map(Field::string).collect(),
            _ => {
                let s = self.string()?;
                Ok(if s.is_empty() { Vec::new() } else { vec![s] })
            }
        }
    }

    /// A Go `int` (64-bit): integers, floats truncated toward zero when they
    /// fit, and plain strings that yaml.v2 would have resolved as numbers.
    /// `None` when missing or null (the field keeps its previous value).
    pub(crate) fn opt_int(&self) -> DecodeResult<Option<i64>> {
        let node = match self.node {
            None | Some(YamlNode::Null) => return Ok(None),
            Some(n) => n,
        };
        let value = match node {
            YamlNode::Int(i) => i64::try_from(*i).ok(),
            YamlNode::Float(f) => float_to_i64(*f),
            YamlNode::Str(s) => match resolve_number(s) {
                Some(Number::Int(i)) => i64::try_from(i).ok(),
                Some(Number::Float(f)) => float_to_i64(f),
                None => None,
            },
            _ => None,
        };
        match value {
            Some(v) => Ok(Some(v)),
            None => Err(self.mismatch("an integer", node)),
        }
    }

    pub(crate) fn int(&self) -> DecodeResult<i64> {
        Ok(self.opt_int()?.unwrap_or(0))
    }

    /// A boolean, with YAML 1.1's `yes`/`no`/`on`/`off`/`y`/`n` spellings.
    pub(crate) fn bool(&self) -> DecodeResult<bool> {
        match self.node {
            None | Some(YamlNode::Null) => Ok(false),
            Some(YamlNode::Bool(b)) => Ok(*b),
            Some(n @ YamlNode::Str(s)) => match yaml11_bool(s) {
                Some(b) => Ok(b),
                None => Err(self.mismatch("a boolean", n)),
            },
            Some(other) => Err(self.mismatch("a boolean", other)),
        }
    }
}

fn float_to_i64(f: f64) -> Option<i64> {
    // yaml.v2 accepts a float for an int field when it is in range and
    // truncates it.
    if f.is_finite() && f >= i64::MIN as f64 && f < i64::MAX as f64 {
        Some(f.trunc() as i64)
    } else {
        None
    }
}

fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            Some(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            Some(false)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// yaml.v2's scalar resolution (what an unquoted scalar would mean)

enum Number {
    Int(i128),
    Float(f64),
}

/// Go's `strconv.ParseInt(s, 0, 64)` / `ParseUint(s, 0, 64)` after yaml.v2
/// removed the underscores: sign, `0x`/`0o`/`0b` prefixes, leading-zero octal.
fn go_parse_int(s: &str) -> Option<i128> {
    let (neg, body) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let lower = body.get(..2).map(str::to_ascii_lowercase);
    let (radix, digits) = match lower.as_deref() {
        Some("0x") => (16, &body[2..]),
        Some("0o") => (8, &body[2..]),
        Some("0b") => (2, &body[2..]),
        _ if body.len() > 1 && body.starts_with('0') => (8, &body[1..]),
        _ => (10, body),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = u128::from_str_radix(digits, radix).ok()?;
    if neg {
        (v <= 1u128 << 63).then(|| -(v as i128))
    } else {
        (v <= u128::from(u64::MAX)).then_some(v as i128)
    }
}

/// yaml.v2's `yamlStyleFloat`: `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`.
fn is_yaml_style_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    } else {
        if digits(&mut i) == 0 {
            return false;
        }
        if i < b.len() && b[i] == b'.' {
            i += 1;
            digits(&mut i);
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// The number an unquoted digit/sign-led scalar resolves to under yaml.v2.
fn resolve_number(s: &str) -> Option<Number> {
    let plain: String = s.chars().filter(|&c| c != '_').collect();
    if let Some(i) = go_parse_int(&plain) {
        return Some(Number::Int(i));
    }
    if is_yaml_style_float(&plain) {
        // Go's ParseFloat reports overflow (±Inf) as an error: not a float.
        if let Ok(f) = plain.parse::<f64>()
            && f.is_finite()
        {
            return Some(Number::Float(f));
        }
    }
    None
}

/// yaml.v2's `isBase60Float`: `^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$`.
/// Strings like `52:54:00:12:34:56` match and are therefore quoted.
fn is_base60_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    if i >= b.len() || !b[i].is_ascii_digit() {
        return false;
    }
    i += 1;
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    let mut groups = 0;
    while i < b.len() && b[i] == b':' {
        i += 1;
        // [0-5]?[0-9]
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() && i - start < 2 {
            i += 1;
        }
        match i - start {
            1 => {}
            2 if b[start] <= b'5' => {}
            _ => return false,
        }
        groups += 1;
    }
    if groups == 0 {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
            i += 1;
        }
    }
    i == b.len()
}

/// yaml.v2's timestamp resolution: `YYYY-M-D`, optionally followed by
/// `[Tt ]H:M:S[.frac]` and, for the `T`/`t` forms, a `Z`/`±hh:mm` zone.
fn is_timestamp(s: &str) -> bool {
    fn num(b: &[u8], i: &mut usize, min: usize, max: usize) -> Option<u32> {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() && *i - start < max {
            *i += 1;
        }
        if *i - start < min {
            return None;
        }
        std::str::from_utf8(&b[start..*i]).ok()?.parse().ok()
    }
    let b = s.as_bytes();
    let mut i = 0;
    let Some(year) = num(b, &mut i, 4, 4) else {
        return false;
    };
    if b.get(i) != Some(&b'-') {
        return false;
    }
    i += 1;
    let Some(month) = num(b, &mut i, 1, 2) else {
        return false;
    };
    if b.get(i) != Some(&b'-') {
        return false;
    }
    i += 1;
    let Some(day) = num(b, &mut i, 1, 2) else {
        return false;
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days {
        return false;
    }
    if i == b.len() {
        return true;
    }
    let sep = b[i];
    if !matches!(sep, b'T' | b't' | b' ') {
        return false;
    }
    i += 1;
    let (Some(h), true, Some(m), true, Some(sec)) = (
        num(b, &mut i, 1, 2),
        b.get(i) == Some(&b':') && {
            i += 1;
            true
        },
        num(b, &mut i, 1, 2),
        b.get(i) == Some(&b':') && {
            i += 1;
            true
        },
        num(b, &mut i, 1, 2),
    ) else {
        return false;
    };
    if h > 23 || m > 59 || sec > 59 {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if num(b, &mut i, 1, 9).is_none() {
            return false;
        }
    }
    if sep == b' ' {
        return i == b.len();
    }
    match b.get(i) {
        Some(b'Z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            i += 1;
            num(b, &mut i, 2, 2).is_some()
                && b.get(i) == Some(&b':')
                && {
                    i += 1;
                    num(b, &mut i, 2, 2).is_some()
                }
                && i == b.len()
        }
        _ => false,
    }
}

/// Would yaml.v2 read this text, unquoted, as something other than a string?
fn resolves_to_non_string(s: &str) -> bool {
    const SPECIAL: &[&str] = &[
        "", "~", "null", "Null", "NULL", ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf",
        "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", "<<",
    ];
    if SPECIAL.contains(&s) || yaml11_bool(s).is_some() {
        return true;
    }
    match s.as_bytes().first() {
        // Go's ParseFloat on a '.'-led scalar: only `.5`-style numbers parse.
        Some(b'.') => is_yaml_style_float(s) && s.parse::<f64>().is_ok_and(f64::is_finite),
        Some(c) if c.is_ascii_digit() || *c == b'+' || *c == b'-' => {
            is_timestamp(s) || resolve_number(s).is_some()
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// libyaml's scalar analysis (emitterc.go) for the styles yaml.v2 may pick

fn is_printable(c: char) -> bool {
    matches!(c as u32, 0x0A | 0x20..=0x7E | 0xA0..=0xD7FF | 0xE000..=0xFFFD) && c != '\u{FEFF}'
}

fn is_break(c: char) -> bool {
    matches!(c, '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

fn is_blank_or_end(c: Option<char>) -> bool {
    matches!(c, None | Some(' ' | '\t')) || c.is_some_and(is_break)
}

struct Analysis {
    block_plain_allowed: bool,
    single_quoted_allowed: bool,
}

fn analyze(s: &str) -> Analysis {
    if s.is_empty() {
        return Analysis {
            block_plain_allowed: true,
            single_quoted_allowed: true,
        };
    }
    let chars: Vec<char> = s.chars().collect();
    let mut block_indicators = s.starts_with("---") || s.starts_with("...");
    let (mut leading_space, mut leading_break, mut trailing_space, mut trailing_break) =
        (false, false, false, false);
    let (mut break_space, mut space_break, mut special, mut line_breaks) =
        (false, false, false, false);
    let (mut previous_space, mut previous_break) = (false, false);
    let mut preceded_by_whitespace = true;
    for (i, &c) in chars.iter().enumerate() {
        let followed_by_whitespace = is_blank_or_end(chars.get(i + 1).copied());
        let first = i == 0;
        let last = i + 1 == chars.len();
        if first {
            match c {
                '#' | ',' | '[' | ']' | '{' | '}' | '&' | '*' | '!' | '|' | '>' | '\'' | '"'
                | '%' | '@' | '`' => block_indicators = true,
                '?' | ':' | '-' if followed_by_whitespace => block_indicators = true,
                _ => {}
            }
        } else {
            match c {
                ':' if followed_by_whitespace => block_indicators = true,
                '#' if preceded_by_whitespace => block_indicators = true,
                _ => {}
            }
        }
        if !is_printable(c) {
            special = true;
        }
        if c == ' ' {
            leading_space |= first;
            trailing_space |= last;
            break_space |= previous_break;
            previous_space = true;
            previous_break = false;
        } else if is_break(c) {
            line_breaks = true;
            leading_break |= first;
            trailing_break |= last;
            space_break |= previous_space;
            previous_break = true;
            previous_space = false;
        } else {
            previous_space = false;
            previous_break = false;
        }
        preceded_by_whitespace = c == ' ' || c == '\t' || is_break(c);
    }
    let mut plain = !(leading_space || leading_break || trailing_space || trailing_break);
    let mut single = true;
    if break_space {
        plain = false;
        single = false;
    }
    if space_break || special {
        plain = false;
        single = false;
    }
    if line_breaks || block_indicators {
        plain = false;
    }
    Analysis {
        block_plain_allowed: plain,
        single_quoted_allowed: single,
    }
}

fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        let escape = !is_printable(c) || c == '\u{FEFF}' || is_break(c) || c == '"' || c == '\\';
        if !escape {
            out.push(c);
            continue;
        }
        match c {
            '\0' => out.push_str("\\0"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{b}' => out.push_str("\\v"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            '\u{1b}' => out.push_str("\\e"),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{85}' => out.push_str("\\N"),
            '\u{a0}' => out.push_str("\\_"),
            '\u{2028}' => out.push_str("\\L"),
            '\u{2029}' => out.push_str("\\P"),
            c if (c as u32) <= 0xFF => out.push_str(&format!("\\x{:02X}", c as u32)),
            c if (c as u32) <= 0xFFFF => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push_str(&format!("\\U{:08X}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// A string as yaml.v2 emits it as a mapping value or sequence item: plain
/// when it reads back as the same string, double-quoted when it would
/// resolve to another type (`""`, `"true"`, `"123"`, `"52:54:00:12:34:56"`),
/// single-quoted when only YAML syntax forbids plain (`'a: b'`).
/// Multi-line strings are double-quoted (yaml.v2 versions differ there).
pub(crate) fn scalar(s: &str) -> Cow<'_, str> {
    let wants_plain = !resolves_to_non_string(s) && !is_base60_float(s);
    if wants_plain && !s.contains('\n') {
        let a = analyze(s);
        if a.block_plain_allowed {
            return Cow::Borrowed(s);
        }
        if a.single_quoted_allowed {
            return Cow::Owned(format!("'{}'", s.replace('\'', "''")));
        }
    }
    Cow::Owned(double_quoted(s))
}

/// Builds block-style YAML the way yaml.v2 lays it out: two-space indents,
/// sequences of a mapping value at the key's own indentation, `[]` for empty
/// sequences.
#[derive(Debug, Default)]
pub(crate) struct Emitter {
    out: String,
}

impl Emitter {
    pub(crate) fn new() -> Emitter {
        Emitter::default()
    }

    fn indent(&mut self, level: usize) {
        for _ in 0..level {
            self.out.push_str("  ");
        }
    }

    /// `key:` opening a nested mapping or sequence.
    pub(crate) fn open(&mut self, level: usize, key: &str) {
        self.indent(level);
        self.out.push_str(key);
        self.out.push_str(":\n");
    }

    /// `key: "string"` with yaml.v2 quoting.
    pub(crate) fn str(&mut self, level: usize, key: &str, value: &str) {
        self.raw(level, key, &scalar(value));
    }

    pub(crate) fn int(&mut self, level: usize, key: &str, value: impl fmt::Display) {
        self.raw(level, key, &value.to_string());
    }

    pub(crate) fn bool(&mut self, level: usize, key: &str, value: bool) {
        self.raw(level, key, if value { "true" } else { "false" });
    }

    fn raw(&mut self, level: usize, key: &str, value: &str) {
        self.indent(level);
        self.out.push_str(key);
        self.out.push_str(": ");
        self.out.push_str(value);
        self.out.push('\n');
    }

    /// A sequence of strings under `key`.
    pub(crate) fn str_list(&mut self, level: usize, key: &str, items: &[String]) {
        if items.is_empty() {
            self.raw(level, key, "[]");
            return;
        }
        self.open(level, key);
        for item in items {
            self.indent(level);
            self.out.push_str("- ");
            self.out.push_str(&scalar(item));
            self.out.push('\n');
        }
    }

    /// A sequence of mappings under `key`; `entry` writes each mapping's
    /// keys at `level + 1` (its first key is moved onto the `- ` line).
    /// Any iterator: a list made from thousands of records needs no
    /// collected copy first.
    pub(crate) fn map_list<I: IntoIterator>(
        &mut self,
        level: usize,
        key: &str,
        items: I,
        mut entry: impl FnMut(&mut Emitter, usize, I::Item),
    ) {
        let mut items = items.into_iter().peekable();
        if items.peek().is_none() {
            self.raw(level, key, "[]");
            return;
        }
        self.open(level, key);
        for item in items {
            let start = self.out.len();
            entry(self, level + 1, item);
            // The first key was written with level + 1 indents; turn the
            // last indent of that line into the sequence dash.
            let dash_at = start + 2 * level;
            if self.out.get(dash_at..dash_at + 2) == Some("  ") {
                self.out.replace_range(dash_at..dash_at + 2, "- ");
            }
        }
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.out.into_bytes()
    }

    pub(crate) fn into_string(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_matches_yaml_v2() {
        let cases = [
            ("", "\"\""),
            ("READY", "READY"),
            ("52:54:00:12:34:56", "\"52:54:00:12:34:56\""),
            ("02:00:e6:f5:af:f9", "02:00:e6:f5:af:f9"),
            ("192.168.1.10", "192.168.1.10"),
            ("192.168.8.0/21", "192.168.8.0/21"),
            (
                "d7d86208-b46c-4465-9018-ee14087d415f",
                "d7d86208-b46c-4465-9018-ee14087d415f",
            ),
            ("123", "\"123\""),
            ("0x1F", "\"0x1F\""),
            ("1_000", "\"1_000\""),
            ("1.5", "\"1.5\""),
            ("1e400", "1e400"),
            (".5", "\".5\""),
            ("true", "\"true\""),
            ("yes", "\"yes\""),
            ("Off", "\"Off\""),
            ("null", "\"null\""),
            ("~", "\"~\""),
            ("2017-11-01", "\"2017-11-01\""),
            ("2017-02-30", "2017-02-30"),
            ("cn1", "cn1"),
            ("a: b", "'a: b'"),
            ("it's", "it's"),
            ("- x", "'- x'"),
            ("-x", "-x"),
            (" lead", "' lead'"),
            ("#x", "'#x'"),
            ("a #b", "'a #b'"),
            ("a\tb", "\"a\\tb\""),
            ("two\nlines", "\"two\\nlines\""),
            ("ünïcode", "ünïcode"),
            ("ubuntu:latest", "ubuntu:latest"),
            ("---", "'---'"),
        ];
        for (input, want) in cases {
            assert_eq!(scalar(input), want, "{input:?}");
        }
    }

    #[test]
    fn emitted_scalars_read_back() {
        for s in [
            "",
            "a: b",
            "it's",
            "- x",
            " lead",
            "trail ",
            "a\tb",
            "x\ny",
            "\"q\"",
            "\\",
            "123",
            "yes",
            "#c",
            "%p",
            "@a",
            "`b",
            "\u{1F600}",
            "\u{85}",
            "x #y",
            "---",
            "...",
        ] {
            let doc = format!("k: {}\n", scalar(s));
            let node = parse_first_document(&doc).expect("parses");
            let got = Field::root(&node).get("k").and_then(|f| f.string());
            assert_eq!(got.as_deref(), Ok(s), "{doc:?}");
        }
    }

    #[test]
    fn yaml_v2_decoding_rules() {
        let node = parse_first_document(
            "a: 1_000\nb: 017\nc: 2.9\nd: yes\ne: off\nf: 12\nf: 13\ng: ~\nh: 0x10\n\
             base: &b {x: 5}\nm:\n  <<: *b\n  y: 6\nt: !custom 7\n",
        )
        .expect("parses");
        let r = Field::root(&node);
        let int = |k: &str| r.get(k).and_then(|f| f.int());
        assert_eq!(int("a"), Ok(1000));
        assert_eq!(int("b"), Ok(15));
        assert_eq!(int("c"), Ok(2));
        assert_eq!(int("f"), Ok(13));
        assert_eq!(int("h"), Ok(16));
        assert_eq!(r.get("g").and_then(|f| f.opt_int()), Ok(None));
        assert_eq!(r.get("d").and_then(|f| f.bool()), Ok(true));
        assert_eq!(r.get("e").and_then(|f| f.bool()), Ok(false));
        assert_eq!(r.get("f").and_then(|f| f.string()), Ok("13".to_string()));
        let m = r.get("m").expect("m");
        assert_eq!(m.get("x").and_then(|f| f.int()), Ok(5));
        assert_eq!(m.get("y").and_then(|f| f.int()), Ok(6));
        assert_eq!(int("t"), Ok(7));
        let err = r
            .get("d")
            .and_then(|f| f.int())
            .expect_err("bool is no int");
        assert!(err.contains("d: expected an integer"), "{err}");
        assert!(r.get("a").and_then(|f| f.get("x")).is_err());
    }

    #[test]
    fn only_first_document_is_read() {
        let node = parse_first_document("a: 1\n---\n: : : [\n").expect("first doc only");
        assert_eq!(Field::root(&node).get("a").and_then(|f| f.int()), Ok(1));
        assert_eq!(parse_first_document(""), Ok(YamlNode::Null));
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut doc = String::from("a: &a [");
        doc.push_str(&"x,".repeat(2000));
        doc.push_str("x]\nb: [");
        doc.push_str(&"*a,".repeat(2000));
        doc.push_str("*a]\n");
        let err = parse_first_document(&doc).expect_err("too large");
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn emitter_layout() {
        let mut e = Emitter::new();
        e.map_list(
            0,
            "networks",
            &[("1.2.3.4", "52:54:00:12:34:56")],
            |e, l, n| {
                e.str(l, "ip", n.0);
                e.str(l, "mac", n.1);
            },
        );
        e.str_list(0, "volumes", &[]);
        e.open(0, "x");
        e.str_list(1, "ids", &["a".to_string()]);
        assert_eq!(
            e.into_string(),
            "networks:\n- ip: 1.2.3.4\n  mac: \"52:54:00:12:34:56\"\nvolumes: []\nx:\n  ids:\n  - a\n"
        );
    }
}

//! `[input] format = "auto"`: the level of events written by common loggers, found among the
//! fields they use, so that pino, bunyan, zap, logrus, slog, Elastic Common Schema, Google Cloud,
//! OpenTelemetry, python-json-logger, structlog, Serilog and tracing-subscriber lines are routed
//! without a mapping. Only the level decides routing, so no other field can reject an event:
//! a numeric `ts`, a missing message or an object-valued field are all fine. The payload must
//! still be one well-formed JSON object (the same syntax, UTF-8, depth and size checks as the
//! strict format), and JSON behind Confluent Schema Registry's 5-byte prefix (a zero byte and
//! a 4-byte schema id) is read past the prefix.
//!
//! Where the level is looked for, first found in this order wins:
//!
//! | field | written by | numbers |
//! |---|---|---|
//! | `level` | logbridge, pino, bunyan, zap, logrus, slog, structlog, tracing-subscriber | pino/bunyan scale: 10 trace, 20 debug, 30 info, 40 warning, 50 error, 60 fatal |
//! | `log.level` (a flat key) | Elastic Common Schema | |
//! | `log` → `level` (nested) | Elastic Common Schema | |
//! | `severity` | Google Cloud structured logging | |
//! | `severityText` | OpenTelemetry | |
//! | `severityNumber` | OpenTelemetry | 1–4 trace, 5–8 debug, 9–12 info, 13–16 warning, 17–20 error, 21–24 fatal |
//! | `levelname` | python-json-logger | |
//! | `@l` | Serilog compact JSON (absent with `@mt` or `@m` present: info) | |
//!
//! Level names are normalised as in the strict format (lowercase; `warn` → `warning`, `err` →
//! `error`) and, for these loggers' own names, `information` and `notice` and `default` →
//! `info`, `verbose` → `trace`, `crit` → `critical`, `alert`, `emerg`, `emergency`, `panic` and
//! `dpanic` → `fatal`. A null value counts as absent; a level of another type (a boolean, an
//! object, a fraction) is `wrong_type`, naming the field; no level anywhere is
//! `missing_field` (`level`).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{
    decode_text, json_body, not_object, Decoded, Form, Level, OtlpEncoding, Outcome, Part, Routing,
    Scalar, ScalarSeed, Skip, SkipVisitor, TextFormat,
};
use crate::event::DecodeError;

/// How payloads are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputFormat {
    /// logbridge's own event format, strictly: `level` and `message` strings, typed optional
    /// fields (see [`crate::event`]).
    #[default]
    Logbridge,
    /// The level wherever common loggers put it (see the module docs).
    Auto,
    /// A line of plain text, its level found by a pattern, a logfmt key or fixed (see
    /// [`TextFormat`]).
    Text,
    /// An OTLP logs export request in protobuf, a batch of events (see [`super::otlp`]).
    #[serde(rename = "otlp_proto", alias = "otlp-proto")]
    OtlpProto,
    /// An OTLP logs export request in OTLP JSON, a batch of events (see [`super::otlp`]).
    #[serde(rename = "otlp_json", alias = "otlp-json")]
    OtlpJson,
}

impl InputFormat {
    /// Decodes `payload`'s level in this format, with no configured mapping (text: every line
    /// at level `info`).
    pub fn decode_level(
        self,
        payload: Option<&[u8]>,
        max_bytes: usize,
    ) -> Result<Level, DecodeError> {
        Decoder::from(self).decode_level(payload, max_bytes)
    }

    /// Decodes `payload`'s level and service in this format, with no configured mapping.
    pub fn decode_routing(
        self,
        payload: Option<&[u8]>,
        max_bytes: usize,
    ) -> Result<Routing, DecodeError> {
        Decoder::from(self).decode_routing(payload, max_bytes)
    }
}

/// How the pipeline reads payloads: the format and what the configuration says about it (for
/// `auto`, `input.level_field` and `input.level_map`; for `text`, how the level is found).
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    reading: Reading,
}

#[derive(Debug, Clone, Default)]
enum Reading {
    #[default]
    Strict,
    Auto(Option<Arc<Mapping>>),
    Text(Arc<TextFormat>),
    Otlp(OtlpEncoding),
}

/// What `input.level_field` and `input.level_map` say.
#[derive(Debug, Default)]
pub struct Mapping {
    /// Read the level from this path only (keys, outermost first).
    path: Option<Vec<String>>,
    /// Level names and numbers (as written, lowercased) → level, before the built-in ones.
    names: rustc_hash::FxHashMap<String, Level>,
}

impl Mapping {
    /// A mapping reading the level at `path` (if given) and naming levels by `names`.
    pub fn new<'a>(
        path: Option<Vec<String>>,
        names: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Mapping {
        Mapping {
            path,
            names: names
                .into_iter()
                .map(|(name, level)| (name.to_lowercase(), Level::new(level)))
                .collect(),
        }
    }

    /// The configured level of a name, if any (names are kept lowercased: a name that is
    /// already lowercase is looked up as it is).
    fn named(&self, name: &str) -> Option<Level> {
        if self.names.is_empty() {
            return None;
        }
        match self.names.get(name) {
            Some(level) => Some(level.clone()),
            // Only a name that lowercasing changes is lowercased (allocated) to look it up.
            None if name.chars().any(|c| c.to_lowercase().ne([c])) => {
                self.names.get(&name.to_lowercase()).cloned()
            }
            None => None,
        }
    }

    /// The configured level of a number, if any (formatted only when names are configured).
    fn numbered(&self, n: i128) -> Option<Level> {
        if self.names.is_empty() {
            return None;
        }
        self.names.get(&n.to_string()).cloned()
    }

    /// The level a level name stands for: what the configuration calls it, else the loggers'
    /// own names folded (`notice` → info), else the name itself, lowercased (a level of its
    /// own, which a route may name).
    pub(super) fn level_of(&self, name: &str) -> Level {
        self.named(name).unwrap_or_else(|| normalise(name))
    }
}

impl Decoder {
    /// Reads payloads in `format`; `mapping` applies to `auto` (and to `text`, whose lines then
    /// all have level `info`: use [`Decoder::text`] for the text format as configured).
    pub fn new(format: InputFormat, mapping: Option<Mapping>) -> Decoder {
        let reading = match format {
            InputFormat::Logbridge => Reading::Strict,
            InputFormat::Auto => Reading::Auto(mapping.map(Arc::new)),
            InputFormat::Text => Reading::Text(Arc::new(TextFormat::every_line_at(
                "info",
                mapping.unwrap_or_default(),
            ))),
            InputFormat::OtlpProto => Reading::Otlp(OtlpEncoding::Proto),
            InputFormat::OtlpJson => Reading::Otlp(OtlpEncoding::Json),
        };
        Decoder { reading }
    }

    /// Reads payloads as lines of text, as `format` says.
    pub fn text(format: TextFormat) -> Decoder {
        Decoder {
            reading: Reading::Text(Arc::new(format)),
        }
    }

    /// Decodes `payload`'s level.
    pub fn decode_level(
        &self,
        payload: Option<&[u8]>,
        max_bytes: usize,
    ) -> Result<Level, DecodeError> {
        match &self.reading {
            Reading::Strict => super::decode_level(payload, max_bytes),
            Reading::Auto(mapping) => {
                auto(mapping.as_deref(), payload, max_bytes).map(|(level, _, _)| level)
            }
            Reading::Text(format) => format
                .decode(payload, max_bytes, false)
                .map(|(level, _)| level),
            Reading::Otlp(_) => self
                .decode(payload, max_bytes, false)
                .map(|decoded| decoded.level),
        }
    }

    /// Whether payloads hold a batch of events each ([`Decoder::split`]).
    pub fn splits(&self) -> bool {
        matches!(self.reading, Reading::Otlp(_))
    }

    /// For a format whose payloads hold a batch of events (OTLP), each event of `payload`
    /// ([`super::otlp::split`]); `None` for a format of one event per payload.
    pub fn split(
        &self,
        payload: Option<&[u8]>,
        max_bytes: usize,
    ) -> Option<Result<Vec<Part>, DecodeError>> {
        match &self.reading {
            Reading::Otlp(encoding) => Some(super::otlp::split(*encoding, payload, max_bytes)),
            Reading::Strict | Reading::Auto(_) | Reading::Text(_) => None,
        }
    }

    /// Decodes `payload`'s level and service.
    pub fn decode_routing(
        &self,
        payload: Option<&[u8]>,
        max_bytes: usize,
    ) -> Result<Routing, DecodeError> {
        self.decode(payload, max_bytes, true)
            .map(|decoded| (decoded.level, decoded.service))
    }

    /// Decodes `payload`'s level, its service if `with_service` (else `None`: routes that match
    /// on the service ask for it, others do not pay for it), and how it reads as an event.
    pub fn decode(
        &self,
        payload: Option<&[u8]>,
        max_bytes: usize,
        with_service: bool,
    ) -> Result<Decoded, DecodeError> {
        match &self.reading {
            Reading::Strict => super::decode_strict(payload, max_bytes, with_service),
            Reading::Auto(mapping) => {
                let (level, service, wrapped) = auto(mapping.as_deref(), payload, max_bytes)?;
                Ok(Decoded {
                    level,
                    service: service
                        .filter(|_| with_service)
                        .map(|service| Box::from(&*service)),
                    form: if wrapped { Form::Wrapped } else { Form::Object },
                })
            }
            Reading::Text(format) => {
                let (level, service) = format.decode(payload, max_bytes, with_service)?;
                Ok(Decoded {
                    level,
                    service,
                    form: Form::Text(format.clone()),
                })
            }
            // The router splits a batch before anything reads it (see `split`); read whole,
            // a batch stands for its first log record (for tools), or its first problem.
            Reading::Otlp(encoding) => {
                let parts = super::otlp::split(*encoding, payload, max_bytes)?;
                let first = parts.into_iter().next().map(|part| part.decoded);
                let (level, service) = first.unwrap_or(Err(DecodeError::MissingField {
                    field: "logRecords",
                }))?;
                Ok(Decoded {
                    level,
                    service: service.filter(|_| with_service),
                    form: Form::Object,
                })
            }
        }
    }
}

/// The auto decoder's reading of `payload`: the level, the service, and whether the payload is
/// in the serde form.
fn auto<'p>(
    mapping: Option<&Mapping>,
    payload: Option<&'p [u8]>,
    max_bytes: usize,
) -> Result<(Level, Option<Cow<'p, str>>, bool), DecodeError> {
    decode_text(payload, max_bytes, auto_body, |de| {
        de.deserialize_any(AutoVisitor { mapping })
    })
}

impl From<InputFormat> for Decoder {
    fn from(format: InputFormat) -> Decoder {
        Decoder::new(format, None)
    }
}

/// The JSON text of a payload: past a Schema Registry prefix (magic byte 0 and a 4-byte schema
/// id; no JSON text starts with a zero byte) and a BOM.
pub(super) fn auto_body(payload: &[u8]) -> &[u8] {
    match payload {
        [0, _, _, _, _, rest @ ..] => json_body(rest),
        _ => json_body(payload),
    }
}

/// Where a level was found, in the order they are tried.
#[derive(Clone, Copy)]
enum Source {
    Level,
    FlatLogLevel,
    NestedLogLevel,
    Severity,
    SeverityText,
    SeverityNumber,
    LevelName,
    Serilog,
    /// `input.level_field`.
    Explicit,
}

/// Every source has a slot in [`Found`].
const SOURCES: usize = 9;

impl Source {
    /// Where `auto` looks, in order (without `input.level_field`).
    const SEARCHED: [Source; 8] = [
        Source::Level,
        Source::FlatLogLevel,
        Source::NestedLogLevel,
        Source::Severity,
        Source::SeverityText,
        Source::SeverityNumber,
        Source::LevelName,
        Source::Serilog,
    ];

    /// The field's name in errors.
    fn field(self) -> &'static str {
        match self {
            Source::Level => "level",
            Source::FlatLogLevel | Source::NestedLogLevel => "log.level",
            Source::Severity => "severity",
            Source::SeverityText => "severityText",
            Source::SeverityNumber => "severityNumber",
            Source::LevelName => "levelname",
            Source::Serilog => "@l",
            Source::Explicit => "level",
        }
    }

    /// The level a number stands for in this field, if the field's logger uses numbers.
    fn numeric(self, n: i128) -> Option<&'static str> {
        match self {
            // pino and bunyan: 10 trace, 20 debug, 30 info, 40 warn, 50 error, 60 fatal; the
            // custom levels they allow in between take the standard level below them.
            Source::Level => Some(match n {
                ..20 => "trace",
                20..30 => "debug",
                30..40 => "info",
                40..50 => "warning",
                50..60 => "error",
                _ => "fatal",
            }),
            Source::SeverityNumber => i32::try_from(n).ok().and_then(severity_level),
            _ => None,
        }
    }
}

/// The level of an OpenTelemetry `SeverityNumber`: ranges of four per level (1–4 trace, ...,
/// 21–24 fatal); 0 (unspecified) and anything outside 1–24 have none. The `auto` decoder and the
/// OTLP input formats read it.
pub(crate) fn severity_level(number: i32) -> Option<&'static str> {
    match number {
        1..=4 => Some("trace"),
        5..=8 => Some("debug"),
        9..=12 => Some("info"),
        13..=16 => Some("warning"),
        17..=20 => Some("error"),
        21..=24 => Some("fatal"),
        _ => None,
    }
}

/// The level-bearing fields of one object: each one's value (`None` for null), and whether it
/// appeared twice.
#[derive(Default)]
struct Found<'de> {
    values: [Option<Scalar<'de>>; SOURCES],
    duplicate: [bool; SOURCES],
    /// Serilog's message template or message: a Serilog event, info unless `@l` says otherwise.
    serilog: bool,
    /// The service, from each of its fields, in [`ServiceField`] order.
    services: [Option<Cow<'de, str>>; 3],
}

impl<'de> Found<'de> {
    fn put(&mut self, source: Source, value: Scalar<'de>) {
        let slot = &mut self.values[source as usize];
        if slot.is_some() {
            self.duplicate[source as usize] = true;
        } else if !matches!(value, Scalar::Null) {
            *slot = Some(value);
        }
    }

    fn routing(&mut self, mapping: Option<&Mapping>) -> Outcome<(Level, Option<Cow<'de, str>>)> {
        let service = self.take_service();
        self.level(mapping).map(|level| (level, service))
    }

    /// The service, from the first of its fields found.
    fn take_service(&mut self) -> Option<Cow<'de, str>> {
        self.services.iter_mut().find_map(Option::take)
    }

    fn level(&mut self, mapping: Option<&Mapping>) -> Outcome<Level> {
        let Found {
            values,
            duplicate,
            serilog,
            ..
        } = self;
        let serilog = *serilog;
        // With `input.level_field` only that field counts (named `level` in errors).
        let explicit = mapping.is_some_and(|mapping| mapping.path.is_some());
        let searched: &[Source] = if explicit {
            &[Source::Explicit]
        } else {
            &Source::SEARCHED
        };
        for &source in searched {
            let Some(value) = values[source as usize].take() else {
                continue;
            };
            if duplicate[source as usize] {
                return Err(DecodeError::DuplicateField {
                    field: source.field(),
                });
            }
            return read_level(source, value, mapping);
        }
        if serilog && !explicit {
            return Ok(Level::new("info"));
        }
        Err(DecodeError::MissingField { field: "level" })
    }
}

/// The level `value`, found in `source`, stands for: the configured names first, then the
/// loggers' own.
fn read_level(source: Source, value: Scalar<'_>, mapping: Option<&Mapping>) -> Outcome<Level> {
    let wrong = |detail: String| DecodeError::WrongType {
        field: source.field(),
        detail,
    };
    let named = |name: &str| mapping.and_then(|mapping| mapping.named(name));
    match value {
        Scalar::Str(name) if name.is_empty() => Err(wrong("empty".to_owned())),
        Scalar::Str(name) => Ok(named(&name).unwrap_or_else(|| normalise(&name))),
        Scalar::Unsigned(n) => number(source, i128::from(n), mapping),
        Scalar::Signed(n) => number(source, i128::from(n), mapping),
        other => Err(wrong(format!(
            "expected a string or a level number, found {}",
            other.kind()
        ))),
    }
}

/// The level a number in `source` stands for: what the configuration calls it, else the
/// logger's scale.
fn number(source: Source, n: i128, mapping: Option<&Mapping>) -> Outcome<Level> {
    mapping
        .and_then(|mapping| mapping.numbered(n))
        .or_else(|| source.numeric(n).map(Level::new))
        .ok_or_else(|| DecodeError::WrongType {
            field: source.field(),
            detail: format!("the number {n} is no level of this field"),
        })
}

/// The loggers' own names for the levels, folded onto the strict format's.
const ALIASES: &[(&str, &str)] = &[
    ("information", "info"),
    ("notice", "info"),
    ("default", "info"),
    ("verbose", "trace"),
    ("crit", "critical"),
    ("alert", "fatal"),
    ("emerg", "fatal"),
    ("emergency", "fatal"),
    ("panic", "fatal"),
    ("dpanic", "fatal"),
];

/// The level the auto decoder reads `name` as, when it folds `name` into another one
/// (`notice` is read as `info`): a route asking for `name` itself would never see an event.
pub fn folded_alias(name: &str) -> Option<&'static str> {
    ALIASES
        .iter()
        .find(|(alias, _)| name.eq_ignore_ascii_case(alias))
        .map(|&(_, level)| level)
}

/// The level a key of the serde form names (`{"Error":{...}}`), if it names one: a name the
/// configuration gives a level, a level of the strict format, or one of the loggers' names.
/// Any other capitalised key wrapping an object is an event's field, not its level.
fn variant_level(name: &str, mapping: Option<&Mapping>) -> Option<Level> {
    if let Some(level) = mapping.and_then(|mapping| mapping.named(name)) {
        return Some(level);
    }
    let known = super::KNOWN_LEVELS
        .iter()
        .chain(ALIASES)
        .any(|(alias, _)| name.eq_ignore_ascii_case(alias));
    known.then(|| normalise(name))
}

pub(super) fn normalise(name: &str) -> Level {
    for &(alias, level) in ALIASES {
        if name.eq_ignore_ascii_case(alias) {
            return Level::new(level);
        }
    }
    Level::new(name)
}

/// A top-level key, classified.
enum Key {
    /// The first key, capitalised: the level of the serde form (`{"Error":{...}}`) if it is the
    /// only key and names a level.
    Variant(String),
    Level(Source),
    /// ECS's `log` object, which may hold `level`.
    Log,
    /// Serilog's `@mt` or `@m`.
    SerilogMessage,
    Service(ServiceField),
    /// The first key of `input.level_field`.
    Explicit,
    Other,
}

/// Where a service name may be, in the order they are tried.
#[derive(Clone, Copy)]
enum ServiceField {
    /// `service`: a string, or an object with a `name` (ECS, nested).
    Service,
    /// `service.name`: ECS, flat.
    FlatName,
    /// `serviceContext` → `service`: Google Cloud error reporting.
    Context,
}

impl Key {
    /// `explicit`: the first key of `input.level_field`, which replaces the level fields.
    fn classify(name: &str, explicit: Option<&str>) -> Key {
        if let Some(first) = explicit {
            if name == first {
                return Key::Explicit;
            }
            return match Key::classify(name, None) {
                Key::Level(_) | Key::Log => Key::Other,
                other => other,
            };
        }
        match name {
            "level" => Key::Level(Source::Level),
            "log.level" => Key::Level(Source::FlatLogLevel),
            "log" => Key::Log,
            "severity" => Key::Level(Source::Severity),
            "severityText" => Key::Level(Source::SeverityText),
            "severityNumber" => Key::Level(Source::SeverityNumber),
            "levelname" => Key::Level(Source::LevelName),
            "@l" => Key::Level(Source::Serilog),
            "@mt" | "@m" => Key::SerilogMessage,
            "service" => Key::Service(ServiceField::Service),
            "service.name" => Key::Service(ServiceField::FlatName),
            "serviceContext" => Key::Service(ServiceField::Context),
            _ => Key::Other,
        }
    }
}

struct KeySeed<'m> {
    explicit: Option<&'m str>,
    /// Whether a capitalised key is a [`Key::Variant`] (the first key of the top-level object,
    /// without `input.level_field`).
    variant: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(KeyVisitor {
            explicit: self.explicit,
            variant: self.variant,
        })
    }
}

struct KeyVisitor<'m> {
    explicit: Option<&'m str>,
    variant: bool,
}

impl Visitor<'_> for KeyVisitor<'_> {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
        // No key the loggers put a level or service in is capitalised, so a capitalised first
        // key loses nothing by being kept aside (copied: most events' first key is not).
        if self.variant && name.as_bytes().first().is_some_and(u8::is_ascii_uppercase) {
            return Ok(Key::Variant(name.to_owned()));
        }
        Ok(Key::classify(name, self.explicit))
    }
}

/// The top-level value: an object whose level is looked for.
struct AutoVisitor<'m> {
    mapping: Option<&'m Mapping>,
}

impl<'de> Visitor<'de> for AutoVisitor<'_> {
    /// The level, the service and whether the event is in the serde form.
    type Value = Outcome<(Level, Option<Cow<'de, str>>, bool)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let path = self.mapping.and_then(|mapping| mapping.path.as_deref());
        let mut found = Found::default();
        let variant = collect(map, path, true, &mut found)?;
        // The seed article's serde form, `{"Error":{"code":503,"message":"..."}}`: one key,
        // naming a level, around the event's object, whose fields give the service.
        if let Some((name, Some(mut inner))) = variant {
            if let Some(level) = variant_level(&name, self.mapping) {
                return Ok(Ok((level, inner.take_service(), true)));
            }
        }
        Ok(found
            .routing(self.mapping)
            .map(|(level, service)| (level, service, false)))
    }

    // Anything else is walked to its end (broken or too deep JSON inside is reported as such).
    not_an_object!();
}

/// A capitalised first key, and the fields of the object under it if that value is one.
type Variant<'de> = (String, Option<Found<'de>>);

/// Puts the level and service fields of an object into `found`; returns (`top`: for the
/// top-level object, and only when it has one key) its [`Variant`].
fn collect<'de, A: MapAccess<'de>>(
    mut map: A,
    path: Option<&[String]>,
    top: bool,
    found: &mut Found<'de>,
) -> Result<Option<Variant<'de>>, A::Error> {
    let mut variant = None;
    let mut entries = 0usize;
    let explicit = path.and_then(<[String]>::first).map(String::as_str);
    loop {
        let seed = KeySeed {
            explicit,
            variant: top && entries == 0 && explicit.is_none(),
        };
        let Some(key) = map.next_key_seed(seed)? else {
            break;
        };
        entries += 1;
        match key {
            Key::Variant(name) => {
                let inner = map.next_value_seed(InnerSeed)?;
                variant = Some((name, inner));
            }
            Key::Explicit => {
                let rest = path.map_or(&[][..], |path| &path[1..]);
                if let Some(value) = map.next_value_seed(PathSeed { rest })? {
                    found.put(Source::Explicit, value);
                }
            }
            Key::Level(source) => {
                let value = map.next_value_seed(ScalarSeed)?;
                found.put(source, value);
            }
            Key::Log => {
                // ECS's `log` object: its `level`.
                if let Some(value) = map.next_value_seed(PathSeed { rest: &["level"] })? {
                    found.put(Source::NestedLogLevel, value);
                }
            }
            Key::SerilogMessage => {
                found.serilog = true;
                map.next_value_seed(Skip)?;
            }
            Key::Service(field) => {
                let inner = match field {
                    ServiceField::Service => Some("name"),
                    ServiceField::FlatName => None,
                    ServiceField::Context => Some("service"),
                };
                let value = map.next_value_seed(ServiceSeed { inner })?;
                let slot = &mut found.services[field as usize];
                if slot.is_none() {
                    *slot = value;
                }
            }
            Key::Other => map.next_value_seed(Skip)?,
        }
    }
    Ok(variant.filter(|_| entries == 1))
}

/// The value of a serde form's key: the fields of the object it is, or nothing for any other
/// value.
struct InnerSeed;

impl<'de> DeserializeSeed<'de> for InnerSeed {
    type Value = Option<Found<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(InnerVisitor)
    }
}

struct InnerVisitor;

impl<'de> Visitor<'de> for InnerVisitor {
    type Value = Option<Found<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let mut found = Found::default();
        collect(map, None, false, &mut found)?;
        Ok(Some(found))
    }

    other_values!(None);
}

/// A service field: its string value, or (with `inner`) the string under that key when it is
/// an object; anything else is no service (never an error: a route's services match or not).
struct ServiceSeed {
    inner: Option<&'static str>,
}

impl<'de> DeserializeSeed<'de> for ServiceSeed {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(ServiceVisitor { inner: self.inner })
    }
}

struct ServiceVisitor {
    inner: Option<&'static str>,
}

impl<'de> Visitor<'de> for ServiceVisitor {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_owned())))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key_seed(NameSeed)? {
            if found.is_none() && self.inner == Some(key.as_ref()) {
                found = map.next_value_seed(ServiceSeed { inner: None })?;
            } else {
                map.next_value_seed(Skip)?;
            }
        }
        Ok(found)
    }

    other_values!(None, except_str);
}

/// The value at the rest of `input.level_field`'s path: the value itself when nothing is left,
/// else the value under the next key when this is an object (else nothing).
struct PathSeed<'m, K> {
    rest: &'m [K],
}

impl<'de, K: AsRef<str>> DeserializeSeed<'de> for PathSeed<'_, K> {
    type Value = Option<Scalar<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        match self.rest {
            [] => ScalarSeed.deserialize(deserializer).map(Some),
            _ => deserializer.deserialize_any(PathVisitor { rest: self.rest }),
        }
    }
}

struct PathVisitor<'m, K> {
    rest: &'m [K],
}

impl<'de, K: AsRef<str>> Visitor<'de> for PathVisitor<'_, K> {
    type Value = Option<Scalar<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key_seed(NameSeed)? {
            match self.rest.split_first() {
                Some((next, rest)) if found.is_none() && next.as_ref() == key => {
                    found = map.next_value_seed(PathSeed { rest })?;
                }
                _ => map.next_value_seed(Skip)?,
            }
        }
        Ok(found)
    }

    other_values!(None);
}

/// A key of a nested object, borrowed where it has no escapes.
struct NameSeed;

impl<'de> DeserializeSeed<'de> for NameSeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(NameVisitor)
    }
}

struct NameVisitor;

impl<'de> Visitor<'de> for NameVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn auto(text: &str) -> Result<String, &'static str> {
        InputFormat::Auto
            .decode_level(
                Some(text.as_bytes()),
                super::super::DEFAULT_MAX_PAYLOAD_BYTES,
            )
            .map(|level| level.as_str().to_owned())
            .map_err(|err| err.reason())
    }

    /// One line per shape, written from each logger's documented output format, with the level
    /// it must be routed by.
    const CORPUS: &[(&str, &str, &str)] = &[
        (
            "logbridge",
            r#"{"level":"error","code":503,"message":"upstream timeout","service":"checkout"}"#,
            "error",
        ),
        (
            "pino",
            r#"{"level":30,"time":1714557600000,"pid":4242,"hostname":"web-1","msg":"request completed","responseTime":12}"#,
            "info",
        ),
        (
            "pino error with err",
            r#"{"level":50,"time":1714557600000,"pid":4242,"hostname":"web-1","err":{"type":"Error","message":"connect ECONNREFUSED","stack":"Error: connect ECONNREFUSED\n    at x"},"msg":"db down"}"#,
            "error",
        ),
        (
            "pino trace",
            r#"{"level":10,"time":1714557600000,"msg":"enter"}"#,
            "trace",
        ),
        (
            "pino custom level 35",
            r#"{"level":35,"time":1714557600000,"msg":"audit"}"#,
            "info",
        ),
        (
            "bunyan",
            r#"{"name":"api","hostname":"h1","pid":17,"level":40,"msg":"slow query","time":"2024-05-01T10:00:00.000Z","v":0}"#,
            "warning",
        ),
        (
            "bunyan fatal",
            r#"{"name":"api","hostname":"h1","pid":17,"level":60,"msg":"out of memory","time":"2024-05-01T10:00:00.000Z","v":0}"#,
            "fatal",
        ),
        (
            "zap",
            r#"{"level":"warn","ts":1714557600.123456,"caller":"server/main.go:42","msg":"retrying","attempt":3}"#,
            "warning",
        ),
        (
            "zap dpanic",
            r#"{"level":"dpanic","ts":1714557600.1,"caller":"a.go:1","msg":"impossible","stacktrace":"main.main\n\t/a.go:1"}"#,
            "fatal",
        ),
        (
            "logrus",
            r#"{"level":"info","msg":"server started","time":"2024-05-01T10:00:00Z","port":8080}"#,
            "info",
        ),
        (
            "slog",
            r#"{"time":"2024-05-01T10:00:00.000000000Z","level":"ERROR","msg":"request failed","err":"timeout","status":504}"#,
            "error",
        ),
        (
            "ECS flat",
            r#"{"@timestamp":"2024-05-01T10:00:00.000Z","log.level":"warn","message":"disk almost full","ecs.version":"1.6.0","service.name":"store"}"#,
            "warning",
        ),
        (
            "ECS nested",
            r#"{"@timestamp":"2024-05-01T10:00:00.000Z","log":{"level":"error","logger":"app.db"},"message":"connection lost","ecs":{"version":"8.11.0"}}"#,
            "error",
        ),
        (
            "Google Cloud",
            r#"{"severity":"ERROR","message":"payment failed","logging.googleapis.com/trace":"projects/p/traces/0123","httpRequest":{"status":500}}"#,
            "error",
        ),
        (
            "Google Cloud notice",
            r#"{"severity":"NOTICE","message":"config reloaded"}"#,
            "info",
        ),
        (
            "Google Cloud emergency",
            r#"{"severity":"EMERGENCY","message":"datacenter on fire"}"#,
            "fatal",
        ),
        (
            "Google Cloud critical",
            r#"{"severity":"CRITICAL","message":"quorum lost"}"#,
            "critical",
        ),
        (
            "OpenTelemetry",
            r#"{"timeUnixNano":"1714557600000000000","severityNumber":17,"severityText":"ERROR","body":{"stringValue":"export failed"},"attributes":[{"key":"retry","value":{"intValue":"2"}}]}"#,
            "error",
        ),
        (
            "OpenTelemetry number only",
            r#"{"timeUnixNano":"1714557600000000000","severityNumber":13,"body":"queue backing up"}"#,
            "warning",
        ),
        (
            "python-json-logger",
            r#"{"asctime":"2024-05-01 10:00:00,123","name":"billing","levelname":"WARNING","message":"invoice late","invoice_id":991}"#,
            "warning",
        ),
        (
            "structlog",
            r#"{"event":"user logged in","level":"info","timestamp":"2024-05-01T10:00:00.000000Z","user_id":42}"#,
            "info",
        ),
        (
            "Serilog compact",
            r#"{"@t":"2024-05-01T10:00:00.0000000Z","@mt":"Processed {@Position} in {Elapsed:000} ms.","@l":"Warning","Position":{"Latitude":25,"Longitude":134},"Elapsed":34}"#,
            "warning",
        ),
        (
            "Serilog compact, no @l",
            r#"{"@t":"2024-05-01T10:00:00.0000000Z","@mt":"Hello, {Name}","Name":"Ada"}"#,
            "info",
        ),
        (
            "Serilog verbose",
            r#"{"@t":"2024-05-01T10:00:00.0000000Z","@m":"tick","@l":"Verbose"}"#,
            "trace",
        ),
        (
            "Serilog information",
            r#"{"@t":"2024-05-01T10:00:00.0000000Z","@mt":"ok","@l":"Information"}"#,
            "info",
        ),
        (
            "tracing-subscriber",
            r#"{"timestamp":"2024-05-01T10:00:00.000000Z","level":"INFO","fields":{"message":"listening","addr":"0.0.0.0:8080"},"target":"server::http","threadId":"ThreadId(2)"}"#,
            "info",
        ),
        (
            "numeric ts and message, strict would refuse",
            r#"{"level":"error","message":42,"ts":1714557600}"#,
            "error",
        ),
    ];

    #[test]
    fn every_shape_of_the_corpus_is_routed_by_its_level() {
        for (shape, line, level) in CORPUS {
            assert_eq!(auto(line), Ok(level.to_string()), "{shape}: {line}");
        }
        // The strict format refuses most of them: the reason `auto` exists.
        let strict = CORPUS
            .iter()
            .filter(|(_, line, _)| {
                super::super::decode_level(Some(line.as_bytes()), usize::MAX).is_ok()
            })
            .count();
        assert!(
            strict <= 6,
            "the strict format takes {strict} of {}",
            CORPUS.len()
        );
    }

    #[test]
    fn numeric_scales_cover_every_level_and_text_fields_stand_alone() {
        for (number, level) in [
            (1, "trace"),
            (4, "trace"),
            (5, "debug"),
            (8, "debug"),
            (9, "info"),
            (12, "info"),
            (13, "warning"),
            (16, "warning"),
            (17, "error"),
            (20, "error"),
            (21, "fatal"),
            (24, "fatal"),
        ] {
            assert_eq!(
                auto(&format!(r#"{{"severityNumber":{number}}}"#)),
                Ok(level.to_owned()),
                "severityNumber {number}"
            );
        }
        assert_eq!(auto(r#"{"severityNumber":25}"#), Err("wrong_type"));
        for (number, level) in [
            (10, "trace"),
            (19, "trace"),
            (20, "debug"),
            (30, "info"),
            (40, "warning"),
            (50, "error"),
            (59, "error"),
            (60, "fatal"),
            (70, "fatal"),
        ] {
            assert_eq!(
                auto(&format!(r#"{{"level":{number}}}"#)),
                Ok(level.to_owned()),
                "level {number}"
            );
        }
        // OpenTelemetry's text alone, and ahead of a number that disagrees.
        assert_eq!(
            auto(r#"{"severityText":"WARN","body":"x"}"#),
            Ok("warning".to_owned())
        );
        assert_eq!(
            auto(r#"{"severityNumber":9,"severityText":"ERROR"}"#),
            Ok("error".to_owned())
        );
    }

    #[test]
    fn json_behind_a_schema_registry_prefix_is_read_past_it() {
        let mut payload = vec![0, 0, 0, 1, 42];
        payload.extend_from_slice(br#"{"severity":"WARNING","message":"x"}"#);
        assert_eq!(
            InputFormat::Auto
                .decode_level(Some(&payload), usize::MAX)
                .map(|level| level.to_string()),
            Ok("warning".to_owned())
        );
        // Offsets count the prefix.
        let mut broken = vec![0, 0, 0, 1, 42];
        broken.extend_from_slice(b"{\"level\":\"\xff\"}");
        assert_eq!(
            InputFormat::Auto.decode_level(Some(&broken), usize::MAX),
            Err(DecodeError::NotUtf8 { valid_up_to: 15 })
        );
        // The strict format has no prefix.
        assert_eq!(
            super::super::decode_level(Some(&payload), usize::MAX).map_err(|err| err.reason()),
            Err("not_json")
        );
    }

    #[test]
    fn what_is_not_an_event_is_refused_with_a_reason_naming_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"msg":"no level anywhere","ts":1}"#, "missing_field"),
            (r#"{"level":true,"msg":"x"}"#, "wrong_type"),
            (r#"{"level":"","msg":"x"}"#, "wrong_type"),
            (r#"{"level":2.5,"msg":"x"}"#, "wrong_type"),
            (r#"{"severityNumber":0,"body":"unspecified"}"#, "wrong_type"),
            (r#"{"severity":7,"message":"x"}"#, "wrong_type"),
            (r#"{"level":"info","level":"error"}"#, "duplicate_field"),
            (r#"{"level":"info""#, "not_json"),
            (r#"{"level":"info"} trailing"#, "not_json"),
            (r#"["level","info"]"#, "not_object"),
            ("", "empty"),
        ];
        for (line, reason) in cases {
            assert_eq!(auto(line), Err(*reason), "{line}");
        }
        let wrong = InputFormat::Auto.decode_level(Some(br#"{"log.level":{"x":1}}"#), usize::MAX);
        assert!(
            matches!(
                &wrong,
                Err(DecodeError::WrongType {
                    field: "log.level",
                    ..
                })
            ),
            "{wrong:?}"
        );
        // A null level is absent: the next field in order decides.
        assert_eq!(
            auto(r#"{"level":null,"severity":"ERROR"}"#),
            Ok("error".to_owned())
        );
        // The first field in order wins, wherever it stands in the object.
        assert_eq!(
            auto(r#"{"severity":"ERROR","level":"info"}"#),
            Ok("info".to_owned())
        );
        // Deep nesting in a field routing does not need is still refused as too deep.
        let deep = format!(
            r#"{{"level":"info","x":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(auto(&deep), Err("too_deep"));
    }

    #[test]
    fn the_service_is_found_where_the_loggers_put_it() {
        let service = |text: &str, format: InputFormat| {
            format
                .decode_routing(Some(text.as_bytes()), usize::MAX)
                .map(|(_, service)| service.map(String::from))
        };
        let auto = InputFormat::Auto;
        let cases = [
            (
                r#"{"level":"error","service":"checkout"}"#,
                Some("checkout"),
            ),
            (
                r#"{"log.level":"error","service.name":"checkout"}"#,
                Some("checkout"),
            ),
            (
                r#"{"log":{"level":"error"},"service":{"name":"checkout","version":"1"}}"#,
                Some("checkout"),
            ),
            (
                r#"{"severity":"ERROR","serviceContext":{"service":"checkout","version":"2"}}"#,
                Some("checkout"),
            ),
            (
                r#"{"level":30,"service":"a","service.name":"b"}"#,
                Some("a"),
            ),
            (
                r#"{"level":30,"service.name":"b","service":{"name":"a"}}"#,
                Some("a"),
            ),
            (r#"{"level":30,"msg":"no service"}"#, None),
            (r#"{"level":30,"service":42}"#, None),
            (r#"{"level":30,"service":{"id":"x"}}"#, None),
        ];
        for (text, expected) in cases {
            assert_eq!(
                service(text, auto),
                Ok(expected.map(String::from)),
                "{text}"
            );
        }
        // Escaped keys and values (serde_json hands them over as copies, not borrowed).
        for text in [
            r#"{"level":"info","service":"check\u006fut"}"#,
            r#"{"level":"info","serviceContext":{"serv\u0069ce":"checkout"}}"#,
            r#"{"level":"info","service":{"n\u0061me":"check\u006fut"}}"#,
        ] {
            assert_eq!(
                service(text, auto),
                Ok(Some("checkout".to_owned())),
                "{text}"
            );
        }
        // The strict format reads its own `service` field, and the level is the same either way.
        assert_eq!(
            service(
                r#"{"level":"error","message":"m","service":"checkout"}"#,
                InputFormat::Logbridge
            ),
            Ok(Some("checkout".to_owned()))
        );
        for text in [
            r#"{"level":"error","message":"m","service":"checkout"}"#,
            r#"{"level":50,"msg":"m","service":{"name":"checkout"}}"#,
        ] {
            for format in [InputFormat::Logbridge, InputFormat::Auto] {
                assert_eq!(
                    format
                        .decode_routing(Some(text.as_bytes()), usize::MAX)
                        .map(|(level, _)| level),
                    format.decode_level(Some(text.as_bytes()), usize::MAX),
                    "{format:?}: {text}"
                );
            }
        }
    }

    #[test]
    fn a_configured_level_field_and_level_names_come_first() {
        let decoder = |path: Option<&[&str]>, names: &[(&str, &str)]| {
            Decoder::new(
                InputFormat::Auto,
                Some(Mapping::new(
                    path.map(|keys| keys.iter().map(|key| key.to_string()).collect()),
                    names.iter().copied(),
                )),
            )
        };
        let level = |decoder: &Decoder, text: &str| {
            decoder
                .decode_level(Some(text.as_bytes()), usize::MAX)
                .map(|level| level.as_str().to_owned())
                .map_err(|err| err.reason())
        };
        let nested = decoder(
            Some(&["attributes", "sev"]),
            &[("W", "warning"), ("5", "error")],
        );
        assert_eq!(
            level(&nested, r#"{"attributes":{"sev":"W"},"level":"info"}"#),
            Ok("warning".into())
        );
        assert_eq!(
            level(&nested, r#"{"attributes":{"sev":"w"}}"#),
            Ok("warning".into()),
            "names ignore case"
        );
        assert_eq!(
            level(&nested, r#"{"attributes":{"sev":5}}"#),
            Ok("error".into())
        );
        assert_eq!(
            level(&nested, r#"{"attributes":{"sev":"ERR"}}"#),
            Ok("error".into()),
            "else the built-in names"
        );
        // The configured field replaces the built-in ones: without it the event has no level,
        // not even Serilog's implied one.
        assert_eq!(
            level(&nested, r#"{"@mt":"x","attributes":{}}"#),
            Err("missing_field")
        );
        assert_eq!(
            level(&nested, r#"{"level":"error","attributes":{}}"#),
            Err("missing_field")
        );
        assert_eq!(
            level(&nested, r#"{"attributes":"flat"}"#),
            Err("missing_field")
        );
        assert_eq!(
            level(&nested, r#"{"attributes":{"sev":7}}"#),
            Err("wrong_type")
        );
        assert_eq!(
            level(
                &nested,
                r#"{"attributes":{"sev":"W"},"attributes":{"sev":"W"}}"#
            ),
            Err("duplicate_field")
        );
        assert_eq!(
            level(&nested, r#"{"attributes":{"s\u0065v":"W"}}"#),
            Ok("warning".into()),
            "an escaped key on the path"
        );
        // The path's key absent from its object: nothing else there stands in for it.
        assert_eq!(
            level(&nested, r#"{"attributes":{"other":"ERROR"}}"#),
            Err("missing_field")
        );
        // A key that contains a dot, named as one key.
        let dotted = decoder(Some(&["log.level"]), &[]);
        assert_eq!(
            level(&dotted, r#"{"log":{"level":"info"},"log.level":"error"}"#),
            Ok("error".into())
        );
        // Names alone apply to the fields found by `auto`, numbers before the logger's scale.
        let names = decoder(None, &[("SEV1", "fatal"), ("10", "info")]);
        assert_eq!(level(&names, r#"{"severity":"SEV1"}"#), Ok("fatal".into()));
        assert_eq!(level(&names, r#"{"level":10}"#), Ok("info".into()));
        assert_eq!(level(&names, r#"{"level":20}"#), Ok("debug".into()));
    }

    /// The seed article's serde form (`#[derive(Serialize)] enum LogEvent { Warning {..},
    /// Error {..} }`): the level from the key, the service and the other fields from the object
    /// under it.
    #[test]
    fn the_serde_form_is_read_by_its_key() {
        let decoded = |text: &str| {
            Decoder::from(InputFormat::Auto)
                .decode(Some(text.as_bytes()), usize::MAX, true)
                .map(|decoded| {
                    (
                        decoded.level.as_str().to_owned(),
                        decoded.service.map(String::from),
                        matches!(decoded.form, Form::Wrapped),
                    )
                })
                .map_err(|err| err.reason())
        };
        let wrapped = |level: &str, service: Option<&str>| {
            Ok((level.to_owned(), service.map(String::from), true))
        };
        for (text, level, service) in [
            (
                r#"{"Error":{"code":503,"message":"upstream timeout","service":"checkout"}}"#,
                "error",
                Some("checkout"),
            ),
            (
                r#"{"Warning":{"message":"disk 91% full"}}"#,
                "warning",
                None,
            ),
            (r#"{"Info":{"message":"started"}}"#, "info", None),
            (r#"{"Debug":{}}"#, "debug", None),
            (r#"{"Trace":{"message":"x"}}"#, "trace", None),
            (r#"{"Critical":{"message":"x"}}"#, "critical", None),
            (r#"{"Fatal":{"message":"x"}}"#, "fatal", None),
            // The loggers' names fold as everywhere else; any case of the first letter's word.
            (r#"{"Warn":{"message":"x"}}"#, "warning", None),
            (r#"{"Notice":{"message":"x"}}"#, "info", None),
            (r#"{"ERROR":{"message":"x"}}"#, "error", None),
            // The service wherever the loggers put it, inside the object.
            (
                r#"{"Error":{"service":{"name":"cart"},"message":"x"}}"#,
                "error",
                Some("cart"),
            ),
            (
                r#"{"Error":{"serviceContext":{"service":"billing"}}}"#,
                "error",
                Some("billing"),
            ),
            // The key says the level: an inner `level` does not.
            (r#"{"Error":{"level":"info","message":"x"}}"#, "error", None),
        ] {
            assert_eq!(decoded(text), wrapped(level, service), "{text}");
        }
        // Level names the configuration gives count too.
        let mapped = Decoder::new(
            InputFormat::Auto,
            Some(Mapping::new(None, [("Sev1", "fatal")])),
        );
        assert_eq!(
            mapped
                .decode_level(Some(br#"{"Sev1":{"message":"x"}}"#), usize::MAX)
                .map(|level| level.as_str().to_owned()),
            Ok("fatal".to_owned())
        );
    }

    #[test]
    fn what_only_looks_like_the_serde_form_is_not_read_as_it() {
        let reason = |text: &str| auto(text).err();
        // A capitalised key that names no level is a field: no level anywhere.
        assert_eq!(
            reason(r#"{"Request":{"message":"x"}}"#),
            Some("missing_field")
        );
        // Not the only key: the object's own level decides, or there is none.
        assert_eq!(
            auto(r#"{"Error":{"message":"x"},"level":"info"}"#),
            Ok("info".to_owned())
        );
        assert_eq!(
            reason(r#"{"Error":{"message":"x"},"other":1}"#),
            Some("missing_field")
        );
        // The key's value is no object.
        assert_eq!(reason(r#"{"Error":"boom"}"#), Some("missing_field"));
        assert_eq!(reason(r#"{"Error":null}"#), Some("missing_field"));
        // Lowercase keys are fields, as before.
        assert_eq!(
            reason(r#"{"error":{"message":"x"}}"#),
            Some("missing_field")
        );
        // With `input.level_field`, only that field says the level.
        let explicit = Decoder::new(
            InputFormat::Auto,
            Some(Mapping::new(Some(vec!["sev".to_owned()]), [])),
        );
        assert_eq!(
            explicit
                .decode_level(Some(br#"{"Error":{"message":"x"}}"#), usize::MAX)
                .map_err(|err| err.reason()),
            Err("missing_field")
        );
        // Broken JSON inside is still broken JSON.
        assert_eq!(reason(r#"{"Error":{"message":}}"#), Some("not_json"));
        // Ordinary events are read as ever, not wrapped.
        let plain = Decoder::from(InputFormat::Auto)
            .decode(Some(br#"{"Level":"x","level":"warn"}"#), usize::MAX, false)
            .expect("decodes");
        assert_eq!(plain.level.as_str(), "warning");
        assert!(matches!(plain.form, Form::Object));
    }

    /// What conditions, transforms and the OTLP sink read of a serde-form event: the object
    /// under the key, with the level the key names (strict and auto alike).
    #[test]
    fn the_event_of_the_serde_form_is_its_inner_object_with_the_level() {
        let text = br#"{"Error":{"code":503,"message":"upstream timeout","level":"x","service":"checkout"}}"#;
        for format in [InputFormat::Logbridge, InputFormat::Auto] {
            let decoded = Decoder::from(format)
                .decode(Some(text), usize::MAX, false)
                .expect("decodes");
            assert!(matches!(decoded.form, Form::Wrapped), "{format:?}");
            let event = decoded.form.event(text, &decoded.level).expect("an event");
            assert_eq!(
                event,
                serde_json::json!({"level": "error", "code": 503, "message": "upstream timeout", "service": "checkout"}),
                "{format:?}"
            );
            // What the sinks that write JSON forward is still the original.
            assert_eq!(&*decoded.form.json(text, &decoded.level), &text[..]);
        }
    }

    #[test]
    fn the_format_is_chosen_by_name_in_the_configuration() {
        #[derive(serde::Deserialize)]
        struct Input {
            format: InputFormat,
        }
        let parsed: Input = toml::from_str("format = \"auto\"").expect("auto");
        assert_eq!(parsed.format, InputFormat::Auto);
        let parsed: Input = toml::from_str("format = \"text\"").expect("text");
        assert_eq!(parsed.format, InputFormat::Text);
        assert!(toml::from_str::<Input>("format = \"json\"").is_err());
        assert_eq!(InputFormat::default(), InputFormat::Logbridge);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), limit in 0usize..600) {
            let _ = InputFormat::Auto.decode_level(Some(&bytes), limit);
        }

        #[test]
        fn never_panics_on_json_like_strings(text in "[{}\\[\\]\":,0-9a-zA-Z@. eE+\\-\\\\nul]{0,64}") {
            let _ = auto(&text);
        }

        /// Whatever the strict format reads in the serde form, `auto` reads at the same level,
        /// with the same service.
        #[test]
        fn auto_reads_the_serde_form_as_the_strict_format_does(
            variant in prop::sample::select(vec![
                "Error", "Warning", "Info", "Debug", "Trace", "Critical", "Fatal", "Warn", "Err",
            ]),
            message in "[a-zA-Z0-9 ]{0,20}",
            service in proptest::option::of("[a-z]{1,8}"),
            code in proptest::option::of(0u32..1000),
        ) {
            let mut inner = serde_json::json!({"message": message});
            if let Some(service) = &service {
                inner["service"] = service.clone().into();
            }
            if let Some(code) = code {
                inner["code"] = code.into();
            }
            let text = serde_json::json!({ variant: inner }).to_string();
            let strict = super::super::decode_routing(Some(text.as_bytes()), usize::MAX)
                .expect("the strict format reads the serde form");
            let read = Decoder::from(InputFormat::Auto)
                .decode_routing(Some(text.as_bytes()), usize::MAX)
                .expect("auto reads it too");
            prop_assert_eq!(read, strict);
        }

        /// Whatever the strict format accepts, `auto` routes by the same level.
        #[test]
        fn auto_agrees_with_the_strict_format_on_strict_events(
            level in "[a-zA-Z]{1,10}",
            message in "[a-zA-Z0-9 ]{0,20}",
            extra in proptest::option::of(0u32..1000),
        ) {
            let mut event = serde_json::json!({"level": level, "message": message});
            if let Some(code) = extra {
                event["code"] = code.into();
            }
            let text = event.to_string();
            let strict = super::super::decode_level(Some(text.as_bytes()), usize::MAX);
            prop_assume!(strict.is_ok());
            let strict = strict.expect("assumed").as_str().to_owned();
            let auto_level = auto(&text).expect("auto takes what strict takes");
            // The loggers' own aliases (information, notice, ...) may fold further.
            let folded = normalise(&strict);
            prop_assert_eq!(folded.as_str(), auto_level.as_str());
        }
    }
}

//! Wire format of a log event: decoding Kafka payloads into [`LogEvent`].
//!
//! Every record the consumer reads goes through [`decode`] exactly once, so this is the single
//! place that decides what counts as a log event and, when a payload is rejected, why. The
//! [`DecodeError::reason`] of a rejection becomes a metrics label and a dead-letter header, so the
//! set of reasons is small and fixed.
//!
//! Two shapes are accepted:
//!
//! * the canonical object, tagged by a `level` field:
//!   `{"level":"error","code":503,"message":"upstream timeout","service":"checkout"}`
//! * the older serde enum form, one capitalised key wrapping the body:
//!   `{"Error":{"code":503,"message":"upstream timeout"}}`
//!
//! The other input formats are beside it, one file each: [`auto`] (the level wherever common
//! loggers put it, `input.format = "auto"`), [`text`] (lines of plain text, `"text"`) and
//! [`otlp`] (OTLP logs requests, a batch of events per record, `"otlp_proto"`, `"otlp_json"`);
//! [`Decoder`] reads payloads in the configured one, and [`Form`] says how each decoded payload
//! reads as a JSON event for the stages that read fields.
//!
//! Decoding is a single pass over the JSON text with hand-written visitors: strings are borrowed
//! from the payload until the final [`LogEvent`] is built, and unknown fields are skipped
//! without building values. Problems with the event's fields are only reported once the whole
//! payload is known to be well-formed JSON, so a payload that is both broken JSON and a bad event
//! is always reported as broken JSON, whatever the order of its fields.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The visit methods of a visitor that only looks into objects: an array is walked to its end
/// (so broken or too deep JSON inside is still reported as such) and every other value gives
/// `$value`; strings too, unless the visitor reads them itself (`except_str`).
macro_rules! other_values {
    ($value:expr) => {
        other_values!($value, except_str);

        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
    ($value:expr, except_str) => {
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            SkipVisitor.visit_seq(seq)?;
            Ok($value)
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// The visit methods of a top-level visitor for what is not an object: `not_object`, naming the
/// JSON type (an array is walked to its end first, as in [`other_values`]).
macro_rules! not_an_object {
    () => {
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            SkipVisitor.visit_seq(seq)?;
            Ok(not_object("array"))
        }

        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(not_object("string"))
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(not_object("boolean"))
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(not_object("number"))
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(not_object("number"))
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(not_object("number"))
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(not_object("null"))
        }
    };
}

mod auto;
mod otlp;
mod text;
pub use auto::{folded_alias, Decoder, InputFormat, Mapping};
pub use otlp::{split as split_otlp, OtlpEncoding, Part, MAX_LOG_RECORDS};
pub use text::{TextFormat, TextSettings};

/// Payloads larger than this are rejected unless the caller picks another limit.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// The UTF-8 byte order mark some producers put in front of their JSON.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Longest `NotJson` detail kept; serde_json's messages are far shorter, this only caps surprises.
const MAX_DETAIL_CHARS: usize = 120;

/// Normalised level: known ones are static, others owned.
///
/// Normalisation lowercases ASCII letters and folds the aliases `warn` → `warning` and
/// `err` → `error`; any other string is kept as it is apart from the lowercasing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Level(Cow<'static, str>);

/// Levels that are common enough to be worth a static string, with the aliases that fold into them.
const KNOWN_LEVELS: &[(&str, &str)] = &[
    ("trace", "trace"),
    ("debug", "debug"),
    ("info", "info"),
    ("warning", "warning"),
    ("warn", "warning"),
    ("error", "error"),
    ("err", "error"),
    ("critical", "critical"),
    ("fatal", "fatal"),
];

impl Level {
    /// Normalises a raw level string (ASCII-lowercased; `warn` → `warning`, `err` → `error`).
    pub fn new(raw: &str) -> Level {
        // Comparing case-insensitively against the table means the common levels never allocate.
        for &(alias, canonical) in KNOWN_LEVELS {
            if raw.eq_ignore_ascii_case(alias) {
                return Level(Cow::Borrowed(canonical));
            }
        }
        Level(Cow::Owned(raw.to_ascii_lowercase()))
    }

    /// The normalised level name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decoded log event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    /// Normalised severity; routes are chosen by it.
    pub level: Level,
    /// Human-readable message.
    pub message: String,
    /// Optional numeric code (for example an HTTP status).
    pub code: Option<u32>,
    /// Optional name of the service that emitted the event.
    pub service: Option<String>,
    /// Optional timestamp, kept verbatim as the producer wrote it.
    pub ts: Option<String>,
}

/// Why a payload is not a log event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No payload (a Kafka tombstone) or a zero-byte payload.
    #[error("payload is empty")]
    Empty,
    /// The payload exceeds the configured size limit; checked before any parsing.
    #[error("payload is too large ({size} bytes, limit {limit})")]
    TooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The payload is not UTF-8.
    #[error("payload is not valid UTF-8 (valid up to byte {valid_up_to})")]
    NotUtf8 {
        /// Offset in the payload (counting a leading BOM) of the first invalid byte.
        valid_up_to: usize,
    },
    /// Syntax error, truncated input or trailing garbage.
    #[error("payload is not valid JSON: {detail}")]
    NotJson {
        /// serde_json's description, at most 120 characters.
        detail: String,
    },
    /// Arrays and objects nest deeper than serde_json's recursion limit allows (128 open at once,
    /// the top-level one included).
    #[error("payload nests too deeply")]
    TooDeep,
    /// Valid JSON, but not an object.
    #[error("payload is a JSON {found}, not an object")]
    NotObject {
        /// `"array"`, `"string"`, `"number"`, `"boolean"` or `"null"`.
        found: &'static str,
    },
    /// A required field is absent.
    #[error("missing field `{field}`")]
    MissingField {
        /// The field's name.
        field: &'static str,
    },
    /// A known field holds a value it cannot take.
    #[error("field `{field}` has the wrong type: {detail}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// What was expected and what was found; never contains payload text.
        detail: String,
    },
    /// A known field appears more than once.
    #[error("duplicate field `{field}`")]
    DuplicateField {
        /// The field's name.
        field: &'static str,
    },
    /// `otlp_proto`: the payload is not a protobuf `ExportLogsServiceRequest` (truncated,
    /// garbled, or another message).
    #[error("payload is not a protobuf OTLP logs request: {detail}")]
    NotProtobuf {
        /// prost's description, at most 120 characters.
        detail: String,
    },
    /// `input.schema_registry`: the registry has no schema of the payload's id.
    #[error("schema {id} is not in the schema registry: {detail}")]
    UnknownSchema {
        /// The payload's schema id.
        id: u32,
        /// The registry's answer.
        detail: String,
    },
    /// `input.schema_registry`: the payload's schema cannot be used here (it does not
    /// compile, a reference is missing, a type that is not Avro, Protobuf or JSON).
    #[error("schema {id} cannot be read: {detail}")]
    UnreadableSchema {
        /// The payload's schema id.
        id: u32,
        /// Why.
        detail: String,
    },
    /// `input.schema_registry`: the payload does not read with its schema.
    #[error("payload does not match schema {id}: {detail}")]
    SchemaMismatch {
        /// The payload's schema id.
        id: u32,
        /// The decoder's description.
        detail: String,
    },
    /// `otlp_proto`, `otlp_json`: the request holds more log records than one Kafka record may.
    #[error("payload holds too many log records ({count}, limit {limit})")]
    TooManyRecords {
        /// Log records in the request.
        count: usize,
        /// The limit in force.
        limit: usize,
    },
}

impl DecodeError {
    /// Short, low-cardinality reason for metrics labels and dead-letter headers:
    /// "empty","too_large","not_utf8","not_json","too_deep","not_object","missing_field","wrong_type","duplicate_field",
    /// "not_protobuf","too_many_records","unknown_schema","unreadable_schema","schema_mismatch"
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::NotUtf8 { .. } => "not_utf8",
            DecodeError::NotJson { .. } => "not_json",
            DecodeError::TooDeep => "too_deep",
            DecodeError::NotObject { .. } => "not_object",
            DecodeError::MissingField { .. } => "missing_field",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::DuplicateField { .. } => "duplicate_field",
            DecodeError::NotProtobuf { .. } => "not_protobuf",
            DecodeError::TooManyRecords { .. } => "too_many_records",
            DecodeError::UnknownSchema { .. } => "unknown_schema",
            DecodeError::UnreadableSchema { .. } => "unreadable_schema",
            DecodeError::SchemaMismatch { .. } => "schema_mismatch",
        }
    }
}

/// Decodes a Kafka payload. A leading UTF-8 BOM (EF BB BF) is skipped. Leading/trailing JSON whitespace is allowed.
///
/// Checks run in this order, and the first failure is returned: tombstone, size limit, zero
/// bytes, UTF-8, JSON syntax and depth over the whole payload, and only then the shape of the
/// event. `max_bytes` is compared with the full payload length, BOM included.
pub fn decode(payload: Option<&[u8]>, max_bytes: usize) -> Result<LogEvent, DecodeError> {
    decode_as::<WholeEvent>(payload, max_bytes)
}

/// Decodes a payload exactly as [`decode`] does (same checks, same errors) but keeps only the
/// level: what the pipeline routes by. The other fields are validated in place, borrowed from
/// the payload, and never copied, which saves the hot path an allocation per string field (the
/// sinks forward the original payload, not a re-encoded event).
pub fn decode_level(payload: Option<&[u8]>, max_bytes: usize) -> Result<Level, DecodeError> {
    decode_as::<LevelOnly>(payload, max_bytes).map(|(level, _)| level)
}

/// What routing reads of an event: its level and, for routes that match on it, its service.
pub type Routing = (Level, Option<Box<str>>);

/// [`decode_level`], keeping the `service` field too (copied: routes that match on the service
/// ask for it, others do not pay for it).
pub fn decode_routing(payload: Option<&[u8]>, max_bytes: usize) -> Result<Routing, DecodeError> {
    decode_as::<LevelAndService>(payload, max_bytes).map(|(routing, _)| routing)
}

/// The strict format's [`Decoded`]: [`decode_level`] or, `with_service`, [`decode_routing`],
/// and whether the payload is in the serde form.
fn decode_strict(
    payload: Option<&[u8]>,
    max_bytes: usize,
    with_service: bool,
) -> Result<Decoded, DecodeError> {
    let ((level, service), wrapped) = if with_service {
        decode_as::<LevelAndService>(payload, max_bytes)?
    } else {
        decode_as::<LevelOnly>(payload, max_bytes)
            .map(|(level, wrapped)| ((level, None), wrapped))?
    };
    Ok(Decoded {
        level,
        service,
        form: if wrapped { Form::Wrapped } else { Form::Object },
    })
}

/// What the pipeline keeps of a payload that decoded: what routing reads, and how the payload
/// reads as an event.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The normalised level.
    pub level: Level,
    /// The service, when it was asked for and the event names one.
    pub service: Option<Box<str>>,
    /// How the payload reads as a JSON event.
    pub form: Form,
}

/// How a decoded payload reads as one JSON event: what route conditions (`when`), transforms and
/// templates see, and what the sinks that read an event's fields (OTLP, Loki's labels) read. The
/// payload itself is what the Kafka sink and the dead-letter topic forward, whatever its form.
#[derive(Debug, Clone, Default)]
pub enum Form {
    /// The payload is the event: one JSON object (past a Schema Registry prefix and a BOM).
    #[default]
    Object,
    /// The payload is the seed article's serde form, `{"Error":{"code":503,"message":"..."}}`:
    /// the event is the inner object, with the `level` its key names.
    Wrapped,
    /// The payload is a line of text (`input.format = "text"`): the event is the object
    /// [`TextFormat`] makes of it (`level`, `message`, the pattern's groups, the logfmt pairs).
    Text(std::sync::Arc<TextFormat>),
    /// The payload is in a Schema Registry's wire format (Avro or Protobuf): the event is the
    /// JSON object it stands for, kept here (see `schema_registry`).
    Registry(bytes::Bytes),
}

impl Form {
    /// The event of `payload` (which decoded in this form, at `level`) as a JSON value; `Err`
    /// says why it cannot be read as one (JSON nested past serde_json's 128 levels, which
    /// decoding allows).
    pub fn event(&self, payload: &[u8], level: &Level) -> Result<serde_json::Value, String> {
        let parse = |text: &[u8]| {
            serde_json::from_slice::<serde_json::Value>(text).map_err(|err| err.to_string())
        };
        match self {
            Form::Object => parse(json_text(payload)),
            Form::Wrapped => match parse(json_text(payload))? {
                serde_json::Value::Object(outer) => {
                    let inner = outer.into_iter().next().map(|(_, inner)| inner);
                    let mut event = serde_json::Map::new();
                    event.insert("level".into(), level.as_str().into());
                    if let Some(serde_json::Value::Object(inner)) = inner {
                        // The key names the level; an inner `level` is just another field to
                        // the decoder, and here it would contradict the key.
                        event.extend(inner.into_iter().filter(|(name, _)| name != "level"));
                    }
                    Ok(serde_json::Value::Object(event))
                }
                other => Ok(other),
            },
            Form::Text(format) => format
                .event(payload, level)
                .map(serde_json::Value::Object)
                .ok_or_else(|| "the line is no longer readable".to_string()),
            Form::Registry(json) => parse(json),
        }
    }

    /// The JSON text the file, HTTP and Elasticsearch sinks write for `payload`: its own JSON
    /// (the original bytes, past a Schema Registry prefix and a BOM; for the serde form too), or
    /// for a line of text the event [`Form::event`] makes of it.
    pub fn json<'p>(&'p self, payload: &'p [u8], level: &Level) -> Cow<'p, [u8]> {
        match self {
            Form::Object | Form::Wrapped => Cow::Borrowed(json_text(payload)),
            Form::Text(format) => {
                let event = format.event(payload, level).unwrap_or_default();
                // Serialising a map of JSON values into a Vec cannot fail.
                Cow::Owned(serde_json::to_vec(&event).unwrap_or_default())
            }
            Form::Registry(json) => Cow::Borrowed(json),
        }
    }
}

fn decode_as<B: Build>(payload: Option<&[u8]>, max_bytes: usize) -> Result<B::Out, DecodeError> {
    decode_text(payload, max_bytes, json_body, |de| {
        de.deserialize_any(TopVisitor::<B>(std::marker::PhantomData))
    })
}

/// The checks every format shares, in order (tombstone, size, zero bytes, UTF-8, then JSON
/// syntax and depth over the whole text), around `parse`, which reads the top-level value of the
/// text that `body` leaves of the payload (a suffix of it).
fn decode_text<'p, T>(
    payload: Option<&'p [u8]>,
    max_bytes: usize,
    body: fn(&'p [u8]) -> &'p [u8],
    parse: impl FnOnce(
        &mut serde_json::Deserializer<serde_json::de::StrRead<'p>>,
    ) -> Result<Outcome<T>, serde_json::Error>,
) -> Result<T, DecodeError> {
    let text = checked_text(payload, max_bytes, body)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let outcome = parse(&mut de).map_err(from_json_error)?;
    // Trailing garbage is a syntax problem, so it must outrank whatever the visitor found.
    de.end().map_err(from_json_error)?;
    outcome
}

/// The checks every format makes first, text or binary, in order: tombstone, size, zero bytes.
fn checked_payload(payload: Option<&[u8]>, max_bytes: usize) -> Result<&[u8], DecodeError> {
    let payload = payload.ok_or(DecodeError::Empty)?;
    if payload.len() > max_bytes {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            limit: max_bytes,
        });
    }
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(payload)
}

/// The checks every format shares, in order: tombstone, size, zero bytes, then UTF-8 over the
/// text that `body` leaves of the payload (a suffix of it), which is returned.
fn checked_text<'p>(
    payload: Option<&'p [u8]>,
    max_bytes: usize,
    body: fn(&'p [u8]) -> &'p [u8],
) -> Result<&'p str, DecodeError> {
    let payload = checked_payload(payload, max_bytes)?;
    let body = body(payload);
    // Offsets are reported against the payload as it sits in Kafka, so a BOM or prefix counts.
    // `body` is a suffix of `payload`, so this cannot underflow.
    let skipped = payload.len() - body.len();
    // Validating up front gives one error for bad bytes wherever they are (serde_json would call
    // bad bytes outside strings a syntax error), and lets the parser borrow `&str` slices.
    std::str::from_utf8(body).map_err(|err| DecodeError::NotUtf8 {
        valid_up_to: skipped + err.valid_up_to(),
    })
}

/// The JSON text of a payload that decoded: the payload with a leading BOM removed (for embedding the original event in JSON output).
pub fn json_body(payload: &[u8]) -> &[u8] {
    payload.strip_prefix(BOM).unwrap_or(payload)
}

/// The JSON text of a payload in either format: past a Schema Registry prefix (a zero byte and
/// a 4-byte schema id; no JSON text starts with a zero byte, so a strict-format payload, which
/// never has one, is unchanged) and a BOM.
pub fn json_text(payload: &[u8]) -> &[u8] {
    auto::auto_body(payload)
}

/// Maps serde_json's errors onto ours. Our visitors never fail on their own (field problems are
/// carried in the visitor's value), so every error here comes from the parser itself.
///
/// This relies on serde_json's default number handling: its `arbitrary_precision` feature would
/// hand numbers to visitors as maps, and the `code` tests would catch that.
fn from_json_error(err: serde_json::Error) -> DecodeError {
    let message = err.to_string();
    // serde_json keeps its error codes private; the text of the recursion-limit error is the only
    // handle on it. Matching on the phrase alone (not on the " at line .. column .." suffix)
    // survives changes to position formatting, and a test pins the phrase against the serde_json
    // version in use.
    if err.classify() == serde_json::error::Category::Syntax
        && message.contains("recursion limit exceeded")
    {
        return DecodeError::TooDeep;
    }
    DecodeError::NotJson {
        detail: truncate_chars(message, MAX_DETAIL_CHARS),
    }
}

fn truncate_chars(mut text: String, max_chars: usize) -> String {
    if let Some((cut, _)) = text.char_indices().nth(max_chars) {
        text.truncate(cut);
    }
    text
}

/// What a top-level value turned into: what was built or, for a well-formed payload, why it is
/// not an event.
type Outcome<T> = Result<T, DecodeError>;

/// What decoding builds from a well-formed event.
trait Build {
    type Out;
    /// `wrapped`: the body was the inner object of the serde form.
    fn build(body: Body<'_>, level: Level, wrapped: bool) -> Outcome<Self::Out>;
}

/// The whole [`LogEvent`].
struct WholeEvent;

impl Build for WholeEvent {
    type Out = LogEvent;
    fn build(body: Body<'_>, level: Level, _: bool) -> Outcome<LogEvent> {
        body.into_event(level)
    }
}

/// The level and the service, once the body is known to be valid, and whether it was wrapped.
struct LevelAndService;

impl Build for LevelAndService {
    type Out = (Routing, bool);
    fn build(body: Body<'_>, level: Level, wrapped: bool) -> Outcome<(Routing, bool)> {
        body.check()?;
        Ok(((level, body.service.value.map(Box::from)), wrapped))
    }
}

/// Only the level, once the body is known to be valid, and whether it was wrapped.
struct LevelOnly;

impl Build for LevelOnly {
    type Out = (Level, bool);
    fn build(body: Body<'_>, level: Level, wrapped: bool) -> Outcome<(Level, bool)> {
        body.check()?;
        Ok((level, wrapped))
    }
}

/// Visits the top-level JSON value.
struct TopVisitor<B>(std::marker::PhantomData<B>);

impl<'de, B: Build> Visitor<'de> for TopVisitor<B> {
    type Value = Outcome<B::Out>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut level: Slot<Cow<'de, str>> = Slot::default();
        let mut body = Body::default();
        let mut entries = 0usize;
        // The seed-form candidate: the first key, if capitalised, and its value's body when that
        // value is an object. Whether it is used is only known once the map has ended.
        let mut wrapped: Option<(Cow<'de, str>, Option<Body<'de>>)> = None;

        while let Some(key) = map.next_key_seed(KeySeed)? {
            entries += 1;
            match key {
                Key::Level => {
                    let value = map.next_value_seed(ScalarSeed)?;
                    level.fill("level", required_level(value), &mut body.problem);
                }
                Key::Body(field) => {
                    let value = map.next_value_seed(ScalarSeed)?;
                    body.accept(field, value);
                }
                Key::Capitalised(name) if entries == 1 => {
                    let inner = map.next_value_seed(WrappedSeed)?;
                    wrapped = Some((name, inner));
                }
                Key::Capitalised(_) | Key::Other => {
                    map.next_value_seed(Skip)?;
                }
            }
        }

        if level.seen {
            // Canonical form; a capitalised first key was just an unknown field.
            if let Some(problem) = body.problem.take() {
                return Ok(Err(problem));
            }
            // `seen` with no value only happens after a problem was noted, which returned above;
            // falling back to an error keeps this total without an unwrap.
            let Some(raw) = level.value else {
                return Ok(Err(DecodeError::MissingField { field: "level" }));
            };
            return Ok(B::build(body, Level::new(&raw), false));
        }
        match wrapped {
            Some((name, Some(inner))) if entries == 1 => {
                Ok(B::build(inner, Level::new(&name), true))
            }
            _ => Ok(Err(DecodeError::MissingField { field: "level" })),
        }
    }

    // Non-objects are still walked to the end so that broken or too-deep JSON inside them is
    // reported as such rather than as "not an object".
    not_an_object!();
}

fn not_object<T>(found: &'static str) -> Outcome<T> {
    Err(DecodeError::NotObject { found })
}

/// A known field's state while the map is walked: `seen` catches duplicates even when the first
/// occurrence was null or invalid.
struct Slot<T> {
    seen: bool,
    value: Option<T>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            seen: false,
            value: None,
        }
    }
}

impl<T> Slot<T> {
    /// Records one occurrence of the field; `parsed` is the value (None for null) or a type error.
    fn fill(
        &mut self,
        field: &'static str,
        parsed: Result<Option<T>, String>,
        problem: &mut Option<DecodeError>,
    ) {
        if self.seen {
            note(problem, DecodeError::DuplicateField { field });
            return;
        }
        self.seen = true;
        match parsed {
            Ok(value) => self.value = value,
            Err(detail) => note(problem, DecodeError::WrongType { field, detail }),
        }
    }
}

/// Keeps the first problem only, so the reported error follows document order and is stable.
fn note(problem: &mut Option<DecodeError>, error: DecodeError) {
    if problem.is_none() {
        *problem = Some(error);
    }
}

/// The fields shared by both forms, plus the first problem met while reading them.
#[derive(Default)]
struct Body<'de> {
    message: Slot<Cow<'de, str>>,
    code: Slot<u32>,
    service: Slot<Cow<'de, str>>,
    ts: Slot<Cow<'de, str>>,
    problem: Option<DecodeError>,
}

impl<'de> Body<'de> {
    fn accept(&mut self, field: BodyField, value: Scalar<'de>) {
        match field {
            BodyField::Message => {
                let parsed = required_string(value);
                self.message.fill("message", parsed, &mut self.problem);
            }
            BodyField::Code => self.code.fill("code", code(value), &mut self.problem),
            BodyField::Service => {
                self.service
                    .fill("service", optional_string(value), &mut self.problem);
            }
            BodyField::Ts => self
                .ts
                .fill("ts", optional_string(value), &mut self.problem),
        }
    }

    /// The first problem with the fields, if any.
    fn check(&self) -> Outcome<()> {
        if let Some(problem) = &self.problem {
            return Err(problem.clone());
        }
        if self.message.value.is_none() {
            return Err(DecodeError::MissingField { field: "message" });
        }
        Ok(())
    }

    fn into_event(self, level: Level) -> Outcome<LogEvent> {
        self.check()?;
        let message = self
            .message
            .value
            .ok_or(DecodeError::MissingField { field: "message" })?;
        Ok(LogEvent {
            level,
            message: message.into_owned(),
            code: self.code.value,
            service: self.service.value.map(Cow::into_owned),
            ts: self.ts.value.map(Cow::into_owned),
        })
    }
}

/// Parses the value of a capitalised first key: the body when it is an object, nothing otherwise.
struct WrappedSeed;

impl<'de> DeserializeSeed<'de> for WrappedSeed {
    type Value = Option<Body<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(WrappedVisitor)
    }
}

struct WrappedVisitor;

impl<'de> Visitor<'de> for WrappedVisitor {
    type Value = Option<Body<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut body = Body::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match key {
                Key::Body(field) => {
                    let value = map.next_value_seed(ScalarSeed)?;
                    body.accept(field, value);
                }
                // The key already carries the level, so an inner `level` is just unknown.
                Key::Level | Key::Capitalised(_) | Key::Other => {
                    map.next_value_seed(Skip)?;
                }
            }
        }
        Ok(Some(body))
    }

    other_values!(None);
}

/// A map key, classified without allocating unless it may name a seed-form level.
enum Key<'de> {
    Level,
    Body(BodyField),
    /// Starts with an ASCII uppercase letter: a seed-form level if it turns out to be the only key.
    Capitalised(Cow<'de, str>),
    Other,
}

#[derive(Clone, Copy)]
enum BodyField {
    Message,
    Code,
    Service,
    Ts,
}

impl<'de> Key<'de> {
    fn classify(name: &str, keep: impl FnOnce() -> Cow<'de, str>) -> Key<'de> {
        match name {
            "level" => Key::Level,
            "message" => Key::Body(BodyField::Message),
            "code" => Key::Body(BodyField::Code),
            "service" => Key::Body(BodyField::Service),
            "ts" => Key::Body(BodyField::Ts),
            _ if name.as_bytes().first().is_some_and(u8::is_ascii_uppercase) => {
                Key::Capitalised(keep())
            }
            _ => Key::Other,
        }
    }
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key<'de>, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Key<'de>, E> {
        Ok(Key::classify(name, || Cow::Borrowed(name)))
    }

    // Only keys with escapes arrive here, as a transient copy.
    fn visit_str<E: de::Error>(self, name: &str) -> Result<Key<'de>, E> {
        Ok(Key::classify(name, || Cow::Owned(name.to_owned())))
    }
}

/// Any JSON value, reduced to what field checks need. Strings stay borrowed when they had no
/// escapes; arrays and objects are skipped without building anything.
enum Scalar<'de> {
    Str(Cow<'de, str>),
    Unsigned(u64),
    Signed(i64),
    Float,
    Bool,
    Null,
    Array,
    Object,
}

impl Scalar<'_> {
    /// Names the JSON type for error details; payload text is deliberately left out so details
    /// stay short and free of user data.
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Str(_) => "a string",
            Scalar::Unsigned(_) | Scalar::Signed(_) | Scalar::Float => "a number",
            Scalar::Bool => "a boolean",
            Scalar::Null => "null",
            Scalar::Array => "an array",
            Scalar::Object => "an object",
        }
    }
}

struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Scalar<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Scalar<'de>, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Unsigned(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Signed(v))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Float)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
        SkipVisitor.visit_seq(seq)?;
        Ok(Scalar::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
        SkipVisitor.visit_map(map)?;
        Ok(Scalar::Object)
    }
}

/// Skips one JSON value without building it.
///
/// `IgnoredAny` alone is not enough: serde_json skips it with an iterative scanner that has no
/// nesting limit, so a 10 000-deep array inside an unknown field would be accepted. Walking every
/// value through `deserialize_any` keeps serde_json's recursion limit, and so `TooDeep`, in force
/// everywhere (which also bounds this visitor's own recursion). Nothing is allocated: strings are
/// borrowed or unescaped into serde_json's scratch buffer and dropped.
struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Keys are always strings and cannot nest, so serde_json's fast skip is safe for them.
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }
}

fn optional_string(value: Scalar<'_>) -> Result<Option<Cow<'_, str>>, String> {
    match value {
        Scalar::Str(s) => Ok(Some(s)),
        Scalar::Null => Ok(None),
        other => Err(format!("expected a string, found {}", other.kind())),
    }
}

/// Required fields reject null outright: an explicit null is a wrong value, not an absent one.
fn required_string(value: Scalar<'_>) -> Result<Option<Cow<'_, str>>, String> {
    match value {
        Scalar::Null => Err("expected a string, found null".to_owned()),
        other => optional_string(other),
    }
}

fn required_level(value: Scalar<'_>) -> Result<Option<Cow<'_, str>>, String> {
    match required_string(value)? {
        Some(level) if level.is_empty() => Err("empty".to_owned()),
        level => Ok(level),
    }
}

fn code(value: Scalar<'_>) -> Result<Option<u32>, String> {
    const EXPECTED: &str = "expected an integer in 0..=4294967295";
    match value {
        Scalar::Unsigned(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| format!("{EXPECTED}, found {n}")),
        Scalar::Signed(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| format!("{EXPECTED}, found {n}")),
        // Anything written with a fraction or exponent is rejected, even 503.0: producers that
        // send floats for codes are sending something other than what the schema means.
        Scalar::Float => Err(format!("{EXPECTED}, found a non-integer number")),
        Scalar::Null => Ok(None),
        other => Err(format!("{EXPECTED}, found {}", other.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dec(text: &str) -> Result<LogEvent, DecodeError> {
        decode(Some(text.as_bytes()), DEFAULT_MAX_PAYLOAD_BYTES)
    }

    fn err(text: &str) -> DecodeError {
        match dec(text) {
            Ok(event) => panic!("expected an error for {text:?}, got {event:?}"),
            Err(e) => e,
        }
    }

    fn event(level: &str, message: &str) -> LogEvent {
        LogEvent {
            level: Level::new(level),
            message: message.to_owned(),
            code: None,
            service: None,
            ts: None,
        }
    }

    fn wrong_type(field: &'static str, text: &str) -> String {
        match err(text) {
            DecodeError::WrongType { field: f, detail } if f == field => detail,
            other => panic!("expected WrongType for `{field}` in {text:?}, got {other:?}"),
        }
    }

    fn nested_arrays(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn canonical_error_example() {
        let got = dec(r#"{"level":"error","code":503,"message":"upstream timeout","service":"checkout","ts":"2026-11-27T10:00:00Z"}"#).unwrap();
        assert_eq!(
            got,
            LogEvent {
                level: Level::new("error"),
                message: "upstream timeout".into(),
                code: Some(503),
                service: Some("checkout".into()),
                ts: Some("2026-11-27T10:00:00Z".into()),
            }
        );
        assert_eq!(got.level.as_str(), "error");
    }

    #[test]
    fn canonical_warning_example() {
        let got = dec(r#"{"level":"warning","message":"disk 91% full","service":"db"}"#).unwrap();
        let mut want = event("warning", "disk 91% full");
        want.service = Some("db".into());
        assert_eq!(got, want);
    }

    #[test]
    fn seed_form_error_with_code() {
        let got = dec(r#"{"Error":{"code":503,"message":"x"}}"#).unwrap();
        let mut want = event("error", "x");
        want.code = Some(503);
        assert_eq!(got, want);
    }

    #[test]
    fn seed_form_warning_and_info() {
        assert_eq!(
            dec(r#"{"Warning":{"message":"y"}}"#).unwrap(),
            event("warning", "y")
        );
        assert_eq!(
            dec(r#" {"Info" : {"message":"z","service":"api","ts":"t","host":{"a":[1]},"level":"error"}} "#)
                .unwrap(),
            LogEvent {
                service: Some("api".into()),
                ts: Some("t".into()),
                ..event("info", "z")
            }
        );
        // Aliases and case fold in the seed form too.
        assert_eq!(
            dec(r#"{"Warn":{"message":"w"}}"#).unwrap(),
            event("warning", "w")
        );
        assert_eq!(
            dec(r#"{"NOTICE":{"message":"n"}}"#).unwrap(),
            event("notice", "n")
        );
    }

    #[test]
    fn seed_form_field_errors() {
        assert_eq!(
            err(r#"{"Error":{"code":503}}"#),
            DecodeError::MissingField { field: "message" }
        );
        wrong_type("code", r#"{"Error":{"code":"503","message":"x"}}"#);
        assert_eq!(
            err(r#"{"Error":{"message":"x","message":"y"}}"#),
            DecodeError::DuplicateField { field: "message" }
        );
    }

    #[test]
    fn seed_form_only_when_it_is_the_single_capitalised_object_key() {
        let missing = DecodeError::MissingField { field: "level" };
        // Two keys: not the seed form.
        assert_eq!(err(r#"{"Error":{"message":"x"},"id":1}"#), missing);
        assert_eq!(err(r#"{"id":1,"Error":{"message":"x"}}"#), missing);
        assert_eq!(
            err(r#"{"Error":{"message":"x"},"Error":{"message":"x"}}"#),
            missing
        );
        // Lowercase key or non-object value: not the seed form.
        assert_eq!(err(r#"{"error":{"message":"x"}}"#), missing);
        assert_eq!(err(r#"{"Error":"x"}"#), missing);
        assert_eq!(err(r#"{"Error":[{"message":"x"}]}"#), missing);
        assert_eq!(err(r#"{"Error":null}"#), missing);
        assert_eq!(err(r#"{}"#), missing);
        // A `level` key makes it canonical, and the capitalised key is just an unknown field.
        assert_eq!(
            dec(r#"{"Error":{"message":"inner"},"level":"info","message":"outer"}"#).unwrap(),
            event("info", "outer")
        );
        // Even when the capitalised key's body is broken as a seed-form body.
        assert_eq!(
            dec(r#"{"Error":{"code":-1},"level":"info","message":"outer"}"#).unwrap(),
            event("info", "outer")
        );
        // An escaped key is still a key.
        assert_eq!(
            dec(r#"{"\u0045rror":{"message":"x"}}"#).unwrap(),
            event("error", "x")
        );
    }

    #[test]
    fn level_normalisation() {
        for (raw, want) in [
            ("warn", "warning"),
            ("WARN", "warning"),
            ("Warning", "warning"),
            ("err", "error"),
            ("ERR", "error"),
            ("ErRoR", "error"),
            ("INFO", "info"),
            ("notice", "notice"),
            ("NOTICE", "notice"),
            ("Émergency", "Émergency"),
        ] {
            let text = format!(r#"{{"level":"{raw}","message":"m"}}"#);
            assert_eq!(dec(&text).unwrap().level.as_str(), want, "level {raw}");
            assert_eq!(Level::new(raw).to_string(), want);
        }
        // Known levels compare equal whether they came out static or owned.
        assert_eq!(Level::new("Error"), Level(Cow::Owned("error".into())));
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let got = dec(r#"{"id":7,"host":{"name":"a","tags":[1,2,{"x":null}]},"level":"info","list":[[[]]],"message":"m","f":1.5e3,"b":true,"n":null,"id":"dup"}"#).unwrap();
        assert_eq!(got, event("info", "m"));
    }

    #[test]
    fn null_optional_fields_are_absent() {
        let got =
            dec(r#"{"level":"info","message":"m","code":null,"service":null,"ts":null}"#).unwrap();
        assert_eq!(got, event("info", "m"));
    }

    #[test]
    fn escapes_and_unicode_in_strings() {
        let got = dec(
            r#"{"level":"info","message":"a\"b\\c\nd\u00e9\ud83d\ude00 é😀","service":"s\/x"}"#,
        )
        .unwrap();
        assert_eq!(got.message, "a\"b\\c\nd\u{e9}\u{1F600} é😀");
        assert_eq!(got.service.as_deref(), Some("s/x"));
    }

    #[test]
    fn empty_payloads() {
        for e in [
            decode(None, DEFAULT_MAX_PAYLOAD_BYTES).unwrap_err(),
            decode(Some(b""), DEFAULT_MAX_PAYLOAD_BYTES).unwrap_err(),
            decode(Some(b""), 0).unwrap_err(),
        ] {
            assert_eq!(e, DecodeError::Empty);
            assert_eq!(e.reason(), "empty");
            assert_eq!(e.to_string(), "payload is empty");
        }
    }

    #[test]
    fn too_large_is_checked_before_parsing() {
        let payload = b"\xff not even utf-8 or json";
        let e = decode(Some(payload), 10).unwrap_err();
        assert_eq!(
            e,
            DecodeError::TooLarge {
                size: payload.len(),
                limit: 10
            }
        );
        assert_eq!(e.reason(), "too_large");
        // Exactly at the limit is fine.
        let ok = br#"{"level":"info","message":"m"}"#;
        assert!(decode(Some(ok), ok.len()).is_ok());
        assert_eq!(
            decode(Some(ok), ok.len() - 1).unwrap_err().reason(),
            "too_large"
        );
    }

    #[test]
    fn invalid_utf8() {
        let inside = b"{\"level\":\"info\",\"message\":\"a\xffb\"}";
        let e = decode(Some(inside), DEFAULT_MAX_PAYLOAD_BYTES).unwrap_err();
        assert_eq!(e, DecodeError::NotUtf8 { valid_up_to: 28 });
        assert_eq!(e.reason(), "not_utf8");
        assert_eq!(
            e.to_string(),
            "payload is not valid UTF-8 (valid up to byte 28)"
        );

        let top = b"\xc3\x28{}";
        assert_eq!(
            decode(Some(top), DEFAULT_MAX_PAYLOAD_BYTES).unwrap_err(),
            DecodeError::NotUtf8 { valid_up_to: 0 }
        );
        // Offsets count the BOM, so they point into the payload as stored.
        let after_bom = b"\xEF\xBB\xBF{\xff}";
        assert_eq!(
            decode(Some(after_bom), DEFAULT_MAX_PAYLOAD_BYTES).unwrap_err(),
            DecodeError::NotUtf8 { valid_up_to: 4 }
        );
    }

    #[test]
    fn bom_is_skipped() {
        let payload = b"\xEF\xBB\xBF {\"level\":\"info\",\"message\":\"m\"}\n";
        assert_eq!(
            decode(Some(payload), DEFAULT_MAX_PAYLOAD_BYTES).unwrap(),
            event("info", "m")
        );
        assert_eq!(json_body(payload), &payload[3..]);
        assert_eq!(json_body(b"{}"), b"{}");
        assert_eq!(json_body(b"\xEF\xBB"), b"\xEF\xBB");
        // Only one BOM is skipped.
        assert_eq!(err("\u{feff}\u{feff}{}").reason(), "not_json");
    }

    #[test]
    fn whitespace_around_json_is_allowed() {
        assert_eq!(
            dec(" \t\r\n{ \"level\" : \"info\" , \"message\" : \"m\" } \n\t").unwrap(),
            event("info", "m")
        );
        assert_eq!(err("   ").reason(), "not_json");
    }

    #[test]
    fn not_json() {
        for text in [
            r#"{"level":"info","message":"m""#,
            r#"{"level":"info","mess"#,
            r#"{"level":"info","message":"m"} trailing"#,
            r#"{"level":"info","message":"m"}{}"#,
            r#"{"level":"info","message":"m",}"#,
            r#"{level:"info"}"#,
            r#"{"level":"info","message":"\ud800"}"#,
            "nul",
            "{\"level\":\"info\",\"message\":\"a\tb\"}",
        ] {
            let e = err(text);
            match &e {
                DecodeError::NotJson { detail } => {
                    assert!(!detail.is_empty() && detail.chars().count() <= MAX_DETAIL_CHARS)
                }
                other => panic!("expected NotJson for {text:?}, got {other:?}"),
            }
            assert_eq!(e.reason(), "not_json");
            assert!(e.to_string().starts_with("payload is not valid JSON: "));
        }
        // Trailing garbage is reported even when the event itself is also wrong.
        assert_eq!(err(r#"{"level":5} x"#).reason(), "not_json");
        assert_eq!(err(r#"[1] x"#).reason(), "not_json");
    }

    #[test]
    fn detail_is_truncated_on_char_boundaries() {
        assert_eq!(truncate_chars("é".repeat(200), 120), "é".repeat(120));
        assert_eq!(truncate_chars("short".into(), 120), "short");
    }

    #[test]
    fn too_deep_top_level_arrays() {
        let e = err(&nested_arrays(10_000));
        assert_eq!(e, DecodeError::TooDeep);
        assert_eq!(e.reason(), "too_deep");
    }

    #[test]
    fn too_deep_inside_unknown_field() {
        let text = format!(
            r#"{{"level":"info","message":"m","x":{}}}"#,
            nested_arrays(200)
        );
        assert_eq!(err(&text), DecodeError::TooDeep);
        // Depth beats a field error that comes earlier in the document.
        let text = format!(r#"{{"level":1,"x":{}}}"#, nested_arrays(200));
        assert_eq!(err(&text), DecodeError::TooDeep);
    }

    /// Pins serde_json's limit (the 128th open container fails, the top-level object included) and the
    /// wording `from_json_error` relies on: if either changes, this fails rather than deep
    /// payloads silently turning into `not_json`.
    #[test]
    fn too_deep_boundary_is_pinned() {
        let at = |arrays: usize| {
            format!(
                r#"{{"level":"info","message":"m","x":{}}}"#,
                nested_arrays(arrays)
            )
        };
        assert_eq!(dec(&at(126)).unwrap(), event("info", "m"));
        assert_eq!(err(&at(127)), DecodeError::TooDeep);

        let raw = serde_json::from_str::<serde_json::Value>(&nested_arrays(200)).unwrap_err();
        assert!(
            raw.to_string().contains("recursion limit exceeded"),
            "{raw}"
        );
        assert_eq!(raw.classify(), serde_json::error::Category::Syntax);
    }

    #[test]
    fn not_object() {
        for (text, found) in [
            ("[]", "array"),
            (r#"[{"level":"info","message":"m"}]"#, "array"),
            (r#""hello""#, "string"),
            ("42", "number"),
            ("-1.5e3", "number"),
            ("true", "boolean"),
            ("null", "null"),
        ] {
            let e = err(text);
            assert_eq!(e, DecodeError::NotObject { found }, "{text}");
            assert_eq!(e.reason(), "not_object");
        }
        assert_eq!(
            err("[]").to_string(),
            "payload is a JSON array, not an object"
        );
    }

    #[test]
    fn missing_fields() {
        let e = err(r#"{"message":"m","service":"s"}"#);
        assert_eq!(e, DecodeError::MissingField { field: "level" });
        assert_eq!(e.reason(), "missing_field");
        assert_eq!(e.to_string(), "missing field `level`");

        assert_eq!(
            err(r#"{"level":"info","code":1}"#),
            DecodeError::MissingField { field: "message" }
        );
    }

    #[test]
    fn code_out_of_range_or_not_an_integer() {
        for code in [
            "4294967296",
            "-1",
            "1.5",
            r#""503""#,
            "503.0",
            "1e3",
            "true",
            "[503]",
            "{}",
            "-0",
            "18446744073709551616",
        ] {
            let text = format!(r#"{{"level":"error","message":"m","code":{code}}}"#);
            let e = err(&text);
            assert_eq!(e.reason(), "wrong_type", "{code}");
            assert!(
                e.to_string()
                    .starts_with("field `code` has the wrong type: "),
                "{e}"
            );
        }
        assert_eq!(
            wrong_type(
                "code",
                r#"{"level":"error","message":"m","code":4294967296}"#
            ),
            "expected an integer in 0..=4294967295, found 4294967296"
        );
        assert_eq!(
            wrong_type("code", r#"{"level":"error","message":"m","code":-1}"#),
            "expected an integer in 0..=4294967295, found -1"
        );
        assert_eq!(
            wrong_type("code", r#"{"level":"error","message":"m","code":"503"}"#),
            "expected an integer in 0..=4294967295, found a string"
        );
        // The bounds themselves are accepted.
        for (code, want) in [("0", 0), ("4294967295", u32::MAX)] {
            let text = format!(r#"{{"level":"error","message":"m","code":{code}}}"#);
            assert_eq!(dec(&text).unwrap().code, Some(want));
        }
    }

    #[test]
    fn wrong_types_of_string_fields() {
        let e = err(r#"{"level":5,"message":"m"}"#);
        assert_eq!(
            e,
            DecodeError::WrongType {
                field: "level",
                detail: "expected a string, found a number".into()
            }
        );
        assert_eq!(e.reason(), "wrong_type");
        assert_eq!(
            e.to_string(),
            "field `level` has the wrong type: expected a string, found a number"
        );
        assert_eq!(
            wrong_type("level", r#"{"level":"","message":"m"}"#),
            "empty"
        );
        assert_eq!(
            wrong_type("level", r#"{"level":null,"message":"m"}"#),
            "expected a string, found null"
        );
        wrong_type("message", r#"{"level":"info","message":null}"#);
        wrong_type("message", r#"{"level":"info","message":["m"]}"#);
        wrong_type(
            "service",
            r#"{"level":"info","message":"m","service":{"a":1}}"#,
        );
        wrong_type("ts", r#"{"level":"info","message":"m","ts":1700000000}"#);
    }

    #[test]
    fn first_field_problem_wins() {
        assert_eq!(
            wrong_type("code", r#"{"code":"x","level":5,"message":"m"}"#),
            "expected an integer in 0..=4294967295, found a string"
        );
        // A field problem outranks a missing field.
        wrong_type("level", r#"{"level":5}"#);
    }

    #[test]
    fn duplicate_fields() {
        let e = err(r#"{"level":"info","message":"m","level":"error"}"#);
        assert_eq!(e, DecodeError::DuplicateField { field: "level" });
        assert_eq!(e.reason(), "duplicate_field");
        assert_eq!(e.to_string(), "duplicate field `level`");
        for field in ["message", "code", "service", "ts"] {
            let text = format!(
                r#"{{"level":"info","message":"m","code":1,"service":"s","ts":"t","{field}":null}}"#
            );
            assert_eq!(err(&text), DecodeError::DuplicateField { field });
        }
        // Duplicate unknown fields are fine.
        assert_eq!(
            dec(r#"{"id":1,"level":"info","id":2,"message":"m"}"#).unwrap(),
            event("info", "m")
        );
    }

    #[test]
    fn every_reason_is_distinct() {
        let errors = [
            DecodeError::Empty,
            DecodeError::TooLarge { size: 2, limit: 1 },
            DecodeError::NotUtf8 { valid_up_to: 0 },
            DecodeError::NotJson {
                detail: String::new(),
            },
            DecodeError::TooDeep,
            DecodeError::NotObject { found: "array" },
            DecodeError::MissingField { field: "level" },
            DecodeError::WrongType {
                field: "code",
                detail: String::new(),
            },
            DecodeError::DuplicateField { field: "level" },
            DecodeError::NotProtobuf {
                detail: String::new(),
            },
            DecodeError::TooManyRecords { count: 2, limit: 1 },
        ];
        let reasons: std::collections::HashSet<_> =
            errors.iter().map(DecodeError::reason).collect();
        assert_eq!(reasons.len(), errors.len());
        for e in &errors {
            let message = e.to_string();
            assert!(
                message.starts_with(|c: char| c.is_ascii_lowercase()),
                "{message}"
            );
        }
    }

    // ---- property tests ----

    /// A JSON value for an unknown field, nesting a little.
    fn extra_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec(("[a-zA-Z]{0,6}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[\"\\\\/\u{0}-\u{1f}\u{7f}a-z é€😀\u{2028}]{0,24}",
        ]
    }

    #[derive(Debug, Clone)]
    struct Generated {
        level: String,
        message: String,
        code: Option<u32>,
        service: Option<String>,
        ts: Option<String>,
        /// Write absent optional fields as explicit nulls.
        nulls: bool,
        extras: Vec<(String, serde_json::Value)>,
    }

    fn generated() -> impl Strategy<Value = Generated> {
        let level = prop_oneof![
            prop::sample::select(vec![
                "error", "ERROR", "Err", "err", "warn", "WARN", "warning", "Warning", "info",
                "debug", "trace", "critical", "fatal", "notice", "NOTICE",
            ])
            .prop_map(str::to_owned),
            "[A-Za-z][A-Za-z0-9_-]{0,10}",
            "[^\u{0}]{1,8}",
        ];
        (
            level,
            text(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            any::<bool>(),
            // Extra names never collide with known fields (they contain an underscore).
            prop::collection::vec(("x_[a-zA-Z0-9]{0,6}", extra_value()), 0..5),
        )
            .prop_map(
                |(level, message, code, service, ts, nulls, extras)| Generated {
                    level,
                    message,
                    code,
                    service,
                    ts,
                    nulls,
                    extras,
                },
            )
    }

    fn entries(g: &Generated) -> Vec<(String, serde_json::Value)> {
        use serde_json::Value;
        let mut out = vec![
            ("level".to_owned(), Value::from(g.level.clone())),
            ("message".to_owned(), Value::from(g.message.clone())),
        ];
        let optional = [
            ("code", g.code.map(Value::from)),
            ("service", g.service.clone().map(Value::from)),
            ("ts", g.ts.clone().map(Value::from)),
        ];
        for (name, value) in optional {
            match value {
                Some(v) => out.push((name.to_owned(), v)),
                None if g.nulls => out.push((name.to_owned(), Value::Null)),
                None => {}
            }
        }
        out.extend(g.extras.iter().cloned());
        out
    }

    fn render(entries: &[(String, serde_json::Value)], pretty: bool) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            if pretty {
                out.push_str("\n  ");
            }
            out.push_str(&serde_json::to_string(k).unwrap());
            out.push(':');
            if pretty {
                out.push(' ');
            }
            out.push_str(&serde_json::to_string(v).unwrap());
        }
        out.push('}');
        out
    }

    /// Every payload of the bad-input corpus gets the same verdict from both decoders.
    #[test]
    fn decode_level_agrees_with_decode_on_the_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/corpus");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus directory") {
            let path = entry.expect("corpus entry").path();
            if path.extension().is_none_or(|ext| ext != "bin") {
                continue;
            }
            let payload = std::fs::read(&path).expect("corpus file");
            let whole = decode(Some(&payload), 64 * 1024).map(|event| event.level);
            assert_eq!(
                decode_level(Some(&payload), 64 * 1024),
                whole,
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen > 100, "read {seen} corpus cases");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), limit in 0usize..600) {
            let _ = decode(Some(&bytes), limit);
            let _ = decode(Some(&bytes), DEFAULT_MAX_PAYLOAD_BYTES);
        }

        #[test]
        fn never_panics_on_strings(text in any::<String>()) {
            let _ = dec(&text);
        }

        #[test]
        fn never_panics_on_json_like_strings(text in "[{}\\[\\]\":,0-9a-zA-Z .eE+\\-\\\\nul]{0,64}") {
            let _ = dec(&text);
        }

        /// The level-only decoder accepts and rejects exactly what the full one does.
        #[test]
        fn decode_level_agrees_with_decode(
            text in prop_oneof![
                "[{}\\[\\]\":,0-9a-zA-Z .eE+\\-\\\\nul]{0,64}",
                generated().prop_map(|g| render(&entries(&g), false)),
            ],
            limit in 0usize..200,
        ) {
            for limit in [limit, DEFAULT_MAX_PAYLOAD_BYTES] {
                let whole = decode(Some(text.as_bytes()), limit).map(|event| event.level);
                prop_assert_eq!(decode_level(Some(text.as_bytes()), limit), whole);
            }
        }

        #[test]
        fn valid_events_round_trip(
            (g, fields) in generated().prop_flat_map(|g| {
                let fields = entries(&g);
                (Just(g), Just(fields).prop_shuffle())
            }),
            pretty in any::<bool>(),
            bom in any::<bool>(),
        ) {
            let mut payload = Vec::new();
            if bom {
                payload.extend_from_slice(BOM);
            }
            payload.extend_from_slice(render(&fields, pretty).as_bytes());

            let want = LogEvent {
                level: Level::new(&g.level),
                message: g.message.clone(),
                code: g.code,
                service: g.service.clone(),
                ts: g.ts.clone(),
            };
            prop_assert_eq!(decode(Some(&payload), DEFAULT_MAX_PAYLOAD_BYTES), Ok(want));
            prop_assert_eq!(json_body(&payload), &payload[if bom { 3 } else { 0 }..]);
        }

        #[test]
        fn seed_form_round_trips(level in "[A-Z][a-zA-Z]{0,8}", message in text(), code in proptest::option::of(any::<u32>())) {
            let mut inner = serde_json::Map::new();
            inner.insert("message".into(), message.clone().into());
            if let Some(c) = code {
                inner.insert("code".into(), c.into());
            }
            let mut outer = serde_json::Map::new();
            outer.insert(level.clone(), inner.into());
            let text = serde_json::to_string(&outer).unwrap();
            let want = LogEvent { level: Level::new(&level), message, code, service: None, ts: None };
            prop_assert_eq!(dec(&text), Ok(want));
        }
    }
}

//! Templates: text with per-event parts, for destinations (a Kafka topic, an Elasticsearch
//! index, a file path) and for values that transforms set.
//!
//! Syntax:
//! - literal text; `{{` and `}}` are literal braces, `%%` a literal percent sign;
//! - `{path}`: a field of the event ([`FieldPath`] syntax), `{path|fallback}` with literal
//!   text for when it is missing (`{user.id|anonymous}`, `{x|}` for nothing). Strings insert
//!   their text, numbers and booleans their JSON text; null counts as missing, and an object
//!   or array is not a scalar and is refused like a missing field;
//! - `{level}` and `{service}`: what logbridge decoded for the record, `unknown` when it has
//!   none (as the Elasticsearch index template always did), or the fallback if one is written;
//!   `{date}`: `%Y.%m.%d`. These names are reserved: write `{"level"}` for the event's own
//!   field called `level`;
//! - `{@topic}`, `{@partition}`, `{@key}` (the record key as UTF-8; a key that is absent or not
//!   UTF-8 is missing);
//! - `%Y %m %d %H %M %S %j %y`: the record's Kafka timestamp in UTC, or the current time when
//!   the record has none.
//!
//! What an event supplies is made safe for the destination ([`Sanitize`]); the literal text is
//! the user's own and is checked once, at parse time.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{Context, FieldPath, ShapeError};

/// How values taken from the event or the record are made safe for the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sanitize {
    /// Inserted as they are (a value a transform sets).
    None,
    /// A Kafka topic name: each inserted value has the characters outside `[A-Za-z0-9._-]`
    /// replaced by `_`; the whole name is cut to 249 bytes, and a name that is empty, `.` or
    /// `..` becomes `_`. Literal text must already be valid.
    KafkaTopic,
    /// An Elasticsearch index name: each inserted value has `\ / * ? " < > | , # :` and space
    /// replaced by `_`; the whole name is lowercased, loses leading `-`, `_` and `+`, is cut to
    /// 255 bytes, and is `unknown` when nothing is left (or only `.` or `..`). Literal text
    /// may not hold those characters.
    IndexName,
    /// One or more segments of a file path: each inserted value has `/`, `\` and NUL replaced
    /// by `_`, is `_` when it is `.` or `..`, and is cut to 200 bytes, so an event can never
    /// lead out of the directory the literal text names.
    PathSegment,
}

/// A compiled template.
#[derive(Debug, Clone)]
pub struct Template {
    /// The text as written, for messages and `Display`.
    text: String,
    parts: Vec<Part>,
    sanitize: Sanitize,
    /// The whole result, when nothing varies.
    fixed: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Time(TimeField),
    Field {
        path: FieldPath,
        fallback: Option<String>,
    },
    Level(Option<String>),
    Service(Option<String>),
    Topic,
    Partition,
    Key(Option<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeField {
    Year,
    Year2,
    Month,
    Day,
    DayOfYear,
    Hour,
    Minute,
    Second,
}

/// A value a template needs is not in the event or the record, and the template gives no
/// fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingField {
    /// The reference as written in the template (`user.id`, `@key`).
    pub field: String,
    /// What was found instead of a scalar (`"an object"`, `"an array"`); `None` when the
    /// value is absent or null.
    pub found: Option<&'static str>,
}

impl fmt::Display for MissingField {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = &self.field;
        match self.found {
            Some(found) => write!(formatter, "`{field}` is {found}, not a scalar"),
            None => write!(formatter, "`{field}` is missing"),
        }?;
        write!(formatter, " (a fallback is written `{{{field}|text}}`)")
    }
}

impl std::error::Error for MissingField {}

/// Longest Kafka topic name.
const MAX_TOPIC_BYTES: usize = 249;
/// Longest Elasticsearch index name.
const MAX_INDEX_BYTES: usize = 255;
/// Longest value inserted into a file path (file systems take 255 per name).
const MAX_SEGMENT_BYTES: usize = 200;
/// Characters Elasticsearch refuses in index names.
const INDEX_FORBIDDEN: [char; 12] = ['\\', '/', '*', '?', '"', '<', '>', '|', ',', '#', ':', ' '];

impl Template {
    /// Parses `text`, found at `key`, for a destination made safe as `sanitize` says.
    pub fn parse(text: &str, sanitize: Sanitize, key: &str) -> Result<Template, ShapeError> {
        let parts = parse_parts(text).map_err(|message| ShapeError::new(key, message))?;
        check_literals(&parts, sanitize).map_err(|message| ShapeError::new(key, message))?;
        let fixed = match parts.as_slice() {
            [] => Some(finish(String::new(), sanitize)),
            [Part::Literal(literal)] => Some(finish(literal.clone(), sanitize)),
            _ => None,
        };
        Ok(Template {
            text: text.to_string(),
            parts,
            sanitize,
            fixed,
        })
    }

    /// The text for one record. `event` is `None` when the caller did not parse the event
    /// (see [`Template::references_event`]); its fields then count as missing.
    pub fn render(&self, event: Option<&Value>, ctx: &Context) -> Result<String, MissingField> {
        if let Some(fixed) = &self.fixed {
            return Ok(fixed.clone());
        }
        let mut out = String::new();
        let mut time: Option<CivilTime> = None;
        for part in &self.parts {
            match part {
                Part::Literal(literal) => out.push_str(literal),
                Part::Time(field) => {
                    let time = *time.get_or_insert_with(|| {
                        CivilTime::from_millis(ctx.timestamp_ms.unwrap_or_else(now_millis))
                    });
                    time.write(*field, &mut out);
                }
                Part::Field { path, fallback } => {
                    let found = event.and_then(|event| path.get(event));
                    let text = match found {
                        Some(Value::String(text)) => Some(text.clone()),
                        Some(Value::Number(number)) => Some(number.to_string()),
                        Some(Value::Bool(flag)) => Some(flag.to_string()),
                        Some(Value::Null) | None => None,
                        Some(Value::Array(_) | Value::Object(_)) => None,
                    };
                    match (text, fallback) {
                        (Some(text), _) => self.push_value(&mut out, &text),
                        (None, Some(fallback)) => self.push_value(&mut out, fallback),
                        (None, None) => {
                            return Err(MissingField {
                                field: path.to_string(),
                                found: match found {
                                    Some(Value::Array(_)) => Some("an array"),
                                    Some(Value::Object(_)) => Some("an object"),
                                    _ => None,
                                },
                            })
                        }
                    }
                }
                Part::Level(fallback) => {
                    let level = ctx.level.or(fallback.as_deref()).unwrap_or("unknown");
                    self.push_value(&mut out, level);
                }
                Part::Service(fallback) => {
                    let service = ctx.service.or(fallback.as_deref()).unwrap_or("unknown");
                    self.push_value(&mut out, service);
                }
                Part::Topic => self.push_value(&mut out, ctx.topic),
                Part::Partition => self.push_value(&mut out, &ctx.partition.to_string()),
                Part::Key(fallback) => {
                    let key = ctx.key.and_then(|key| std::str::from_utf8(key).ok());
                    match key.or(fallback.as_deref()) {
                        Some(key) => self.push_value(&mut out, key),
                        None => {
                            return Err(MissingField {
                                field: "@key".to_string(),
                                found: None,
                            })
                        }
                    }
                }
            }
        }
        Ok(finish(out, self.sanitize))
    }

    /// The result, when it is the same for every record.
    pub fn is_static(&self) -> Option<&str> {
        self.fixed.as_deref()
    }

    /// Whether the template reads fields of the event (if not, the caller need not parse it).
    pub fn references_event(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::Field { .. }))
    }

    /// The template in words, for `check-config`:
    /// `"logs-{level}-{date}" (as an index name; reads: level, record time)`.
    pub fn describe(&self) -> String {
        let mut reads: Vec<String> = Vec::new();
        let mut add = |item: String| {
            if !reads.contains(&item) {
                reads.push(item);
            }
        };
        for part in &self.parts {
            match part {
                Part::Literal(_) => {}
                Part::Time(_) => add("record time (UTC)".into()),
                Part::Field { path, fallback } => add(match fallback {
                    Some(fallback) => format!("field {path} (else {fallback:?})"),
                    None => format!("field {path}"),
                }),
                Part::Level(_) => add("level".into()),
                Part::Service(_) => add("service".into()),
                Part::Topic => add("@topic".into()),
                Part::Partition => add("@partition".into()),
                Part::Key(_) => add("@key".into()),
            }
        }
        let quoted = Value::String(self.text.clone()).to_string();
        let sanitize = match self.sanitize {
            Sanitize::None => "",
            Sanitize::KafkaTopic => "as a Kafka topic; ",
            Sanitize::IndexName => "as an index name; ",
            Sanitize::PathSegment => "as a file path; ",
        };
        if reads.is_empty() {
            format!("{quoted} ({sanitize}fixed)")
        } else {
            format!("{quoted} ({sanitize}reads: {})", reads.join(", "))
        }
    }

    /// Appends a value from the event or the record, made safe for the destination.
    fn push_value(&self, out: &mut String, value: &str) {
        match self.sanitize {
            Sanitize::None => out.push_str(value),
            Sanitize::KafkaTopic => out.extend(value.chars().map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })),
            Sanitize::IndexName => {
                out.extend(value.chars().map(
                    |c| {
                        if INDEX_FORBIDDEN.contains(&c) {
                            '_'
                        } else {
                            c
                        }
                    },
                ))
            }
            Sanitize::PathSegment => {
                if value == "." || value == ".." {
                    out.push('_');
                    return;
                }
                let capped = cap(value, MAX_SEGMENT_BYTES);
                out.extend(capped.chars().map(|c| match c {
                    '/' | '\\' | '\0' => '_',
                    other => other,
                }));
            }
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.text)
    }
}

/// The whole-name rules of the destination.
fn finish(mut out: String, sanitize: Sanitize) -> String {
    match sanitize {
        Sanitize::None | Sanitize::PathSegment => out,
        Sanitize::KafkaTopic => {
            out.truncate(cap(&out, MAX_TOPIC_BYTES).len());
            if matches!(out.as_str(), "" | "." | "..") {
                "_".to_string()
            } else {
                out
            }
        }
        Sanitize::IndexName => {
            let lower = out.to_lowercase();
            let trimmed = lower.trim_start_matches(['-', '_', '+']);
            let capped = cap(trimmed, MAX_INDEX_BYTES);
            if matches!(capped, "" | "." | "..") {
                "unknown".to_string()
            } else {
                capped.to_string()
            }
        }
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn cap(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Literal text must be valid for the destination already: it is the user's own, and a
/// mistake in it is better reported at start-up than repaired on every event.
fn check_literals(parts: &[Part], sanitize: Sanitize) -> Result<(), String> {
    for part in parts {
        let Part::Literal(literal) = part else {
            continue;
        };
        let bad = match sanitize {
            Sanitize::None | Sanitize::PathSegment => None,
            Sanitize::KafkaTopic => literal
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))),
            Sanitize::IndexName => literal.chars().find(|c| INDEX_FORBIDDEN.contains(c)),
        };
        if let Some(bad) = bad {
            let what = match sanitize {
                Sanitize::KafkaTopic => "a Kafka topic name holds only A-Z a-z 0-9 . _ -",
                _ => "an index name cannot hold \\ / * ? \" < > | , # : or space",
            };
            return Err(format!("`{bad}` in the literal text: {what}"));
        }
    }
    Ok(())
}

fn parse_parts(text: &str) -> Result<Vec<Part>, String> {
    let mut parts: Vec<Part> = Vec::new();
    let mut literal = String::new();
    let flush = |literal: &mut String, parts: &mut Vec<Part>| {
        if !literal.is_empty() {
            parts.push(Part::Literal(std::mem::take(literal)));
        }
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '}' => return Err("a `}` without its `{` (write `}}` for a literal brace)".into()),
            '{' => {
                let reference = read_reference(&mut chars)?;
                let part = reference_part(&reference)?;
                if let Part::Time(_) = part {
                    // `{date}` is three time parts around dots.
                    flush(&mut literal, &mut parts);
                    parts.push(Part::Time(TimeField::Year));
                    parts.push(Part::Literal(".".into()));
                    parts.push(Part::Time(TimeField::Month));
                    parts.push(Part::Literal(".".into()));
                    parts.push(Part::Time(TimeField::Day));
                } else {
                    flush(&mut literal, &mut parts);
                    parts.push(part);
                }
            }
            '%' => {
                let field = match chars.next() {
                    Some('%') => {
                        literal.push('%');
                        continue;
                    }
                    Some('Y') => TimeField::Year,
                    Some('y') => TimeField::Year2,
                    Some('m') => TimeField::Month,
                    Some('d') => TimeField::Day,
                    Some('j') => TimeField::DayOfYear,
                    Some('H') => TimeField::Hour,
                    Some('M') => TimeField::Minute,
                    Some('S') => TimeField::Second,
                    Some(other) => {
                        return Err(format!(
                            "unknown time specifier `%{other}`: use %Y %m %d %H %M %S %j %y, \
                             or %% for a percent sign"
                        ))
                    }
                    None => return Err("a `%` at the end: write `%%` for a percent sign".into()),
                };
                flush(&mut literal, &mut parts);
                parts.push(Part::Time(field));
            }
            other => literal.push(other),
        }
    }
    flush(&mut literal, &mut parts);
    Ok(parts)
}

/// What lies between `{` and `}`: a `}` or `|` inside a quoted key does not end it.
fn read_reference(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<String, String> {
    let mut reference = String::new();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => {
                reference.push(c);
                match chars.next() {
                    Some(escaped) => reference.push(escaped),
                    None => break,
                }
                continue;
            }
            '}' if !quoted => return Ok(reference),
            '{' if !quoted => {
                return Err(format!(
                    "a `{{` inside `{{{reference}`: a reference cannot hold another (write `{{{{` \
                     for a literal brace)"
                ))
            }
            _ => {}
        }
        reference.push(c);
    }
    Err(format!(
        "`{{{reference}` has no closing `}}` (write `{{{{` for a literal brace)"
    ))
}

/// The part a reference stands for. `{date}` comes back as a single `Time` part that the
/// caller expands.
fn reference_part(reference: &str) -> Result<Part, String> {
    let (name, fallback) = split_fallback(reference);
    let fallback = fallback.map(str::to_string);
    let refuse_fallback = |part: Part| match &fallback {
        Some(_) => Err(format!(
            "`{{{reference}}}`: `{name}` is always there and takes no fallback"
        )),
        None => Ok(part),
    };
    match name {
        "" => {
            Err("an empty reference `{}`: name a field, or write `{{` for a literal brace".into())
        }
        "level" => Ok(Part::Level(fallback)),
        "service" => Ok(Part::Service(fallback)),
        "date" => refuse_fallback(Part::Time(TimeField::Year)),
        "@topic" => refuse_fallback(Part::Topic),
        "@partition" => refuse_fallback(Part::Partition),
        "@key" => Ok(Part::Key(fallback)),
        metadata if metadata.starts_with('@') => Err(format!(
            "unknown record metadata `{{{metadata}}}`: use {{@topic}}, {{@partition}} or {{@key}}"
        )),
        field => {
            let path = FieldPath::parse(field)?;
            Ok(Part::Field { path, fallback })
        }
    }
}

/// `path|fallback` split at the first `|` outside quotes.
fn split_fallback(reference: &str) -> (&str, Option<&str>) {
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in reference.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '|' if !quoted => return (&reference[..at], Some(&reference[at + 1..])),
            _ => {}
        }
    }
    (reference, None)
}

fn now_millis() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// A UTC date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CivilTime {
    year: i64,
    month: u32,
    day: u32,
    day_of_year: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl CivilTime {
    /// The UTC time of `ms` milliseconds since the epoch, for every `i64` (years far before
    /// and after the common era included: a record's timestamp is whatever its producer set).
    fn from_millis(ms: i64) -> CivilTime {
        let days = ms.div_euclid(86_400_000);
        let second_of_day = ms.rem_euclid(86_400_000) / 1000;
        let (year, month, day) = civil_from_days(days);
        // At most 366: both days lie in the same year.
        let day_of_year = (days - days_from_civil(year, 1, 1) + 1) as u32;
        CivilTime {
            year,
            month,
            day,
            day_of_year,
            hour: (second_of_day / 3600) as u32,
            minute: (second_of_day / 60 % 60) as u32,
            second: (second_of_day % 60) as u32,
        }
    }

    fn write(&self, field: TimeField, out: &mut String) {
        let text = match field {
            TimeField::Year if self.year < 0 => format!("-{:04}", -self.year),
            TimeField::Year => format!("{:04}", self.year),
            TimeField::Year2 => format!("{:02}", self.year.rem_euclid(100)),
            TimeField::Month => format!("{:02}", self.month),
            TimeField::Day => format!("{:02}", self.day),
            TimeField::DayOfYear => format!("{:03}", self.day_of_year),
            TimeField::Hour => format!("{:02}", self.hour),
            TimeField::Minute => format!("{:02}", self.minute),
            TimeField::Second => format!("{:02}", self.second),
        };
        out.push_str(&text);
    }
}

/// Year, month and day of `days` since 1970-01-01 (Howard Hinnant's `civil_from_days`, in
/// the proleptic Gregorian calendar). No overflow for any day an `i64` of milliseconds reaches.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 2024-05-01T12:34:56.789Z, day 122 of a leap year.
    const MAY_DAY: i64 = 1_714_566_896_789;

    fn ctx() -> Context<'static> {
        Context {
            topic: "app-logs",
            partition: 3,
            offset: 42,
            timestamp_ms: Some(MAY_DAY),
            key: Some(b"user-7"),
            level: Some("error"),
            service: Some("checkout"),
        }
    }

    fn template(text: &str, sanitize: Sanitize) -> Template {
        Template::parse(text, sanitize, "routes[0].sink.topic")
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn render(text: &str, event: &Value) -> String {
        template(text, Sanitize::None)
            .render(Some(event), &ctx())
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn refuse(text: &str, sanitize: Sanitize) -> ShapeError {
        Template::parse(text, sanitize, "routes[0].sink.topic").expect_err(text)
    }

    #[test]
    fn literal_text_and_escaped_braces() {
        let fixed = template("logs-{{raw}}-100%%", Sanitize::None);
        assert_eq!(fixed.is_static(), Some("logs-{raw}-100%"));
        assert_eq!(fixed.render(None, &ctx()), Ok("logs-{raw}-100%".into()));
        assert!(!fixed.references_event());
        assert_eq!(template("", Sanitize::None).is_static(), Some(""));
    }

    #[test]
    fn fields_insert_their_text() {
        let event = json!({ "service": { "name": "api" }, "status": 503, "ok": false,
                            "user": { "id": "u1" }, "log.level": "warn" });
        assert_eq!(
            render("{service.name}-{status}-{ok}", &event),
            "api-503-false"
        );
        assert_eq!(render("{user.id|anonymous}", &event), "u1");
        assert_eq!(render("{log.level}", &event), "warn");
        assert!(template("{user.id}", Sanitize::None).references_event());
        assert_eq!(template("{user.id}", Sanitize::None).is_static(), None);
    }

    #[test]
    fn fallbacks_stand_in_for_missing_null_and_non_scalar_values() {
        let event = json!({ "user": null, "tags": ["a"], "meta": {} });
        assert_eq!(render("{user|anonymous}", &event), "anonymous");
        assert_eq!(render("{nobody|}x", &event), "x");
        assert_eq!(render("{tags|many}", &event), "many");
        assert_eq!(render("{meta|none}", &event), "none");
    }

    #[test]
    fn missing_values_without_fallback_are_errors() {
        let event = json!({ "user": null, "tags": ["a"], "meta": {} });
        let render = |text: &str| template(text, Sanitize::None).render(Some(&event), &ctx());
        let missing = render("x-{user.id}").expect_err("missing");
        assert_eq!(missing.field, "user.id");
        assert_eq!(missing.found, None);
        assert!(missing.to_string().contains("is missing"), "{missing}");
        assert_eq!(render("{user}").expect_err("null").found, None);
        let array = render("{tags}").expect_err("array");
        assert_eq!(array.found, Some("an array"));
        assert!(array.to_string().contains("not a scalar"), "{array}");
        assert_eq!(
            render("{meta}").expect_err("object").found,
            Some("an object")
        );
        // Without the event, fields are missing.
        let unparsed = template("{user}", Sanitize::None).render(None, &ctx());
        assert_eq!(unparsed.expect_err("no event").field, "user");
    }

    #[test]
    fn quoted_keys_may_hold_braces_and_bars() {
        let event = json!({ "a}b": "x", "c|d": "y" });
        assert_eq!(render(r#"{"a}b"}-{"c|d"|z}"#, &event), "x-y");
        assert_eq!(render(r#"{"e|f"|z}"#, &event), "z");
    }

    #[test]
    fn reserved_names_read_the_record() {
        let event = json!({ "level": 50 });
        assert_eq!(render("{level}-{service}", &event), "error-checkout");
        assert_eq!(render("{\"level\"}", &event), "50");
        assert_eq!(
            render("{@topic}/{@partition}/{@key}", &event),
            "app-logs/3/user-7"
        );
        assert_eq!(render("logs-{date}", &event), "logs-2024.05.01");
        let bare = Context {
            level: None,
            service: None,
            key: None,
            ..ctx()
        };
        let none = |text: &str| template(text, Sanitize::None).render(Some(&event), &bare);
        assert_eq!(none("{level}-{service}"), Ok("unknown-unknown".into()));
        assert_eq!(none("{level|none}-{service|x}"), Ok("none-x".into()));
        assert_eq!(none("{@key|nokey}"), Ok("nokey".into()));
        assert_eq!(none("{@key}").expect_err("no key").field, "@key");
        let binary = Context {
            key: Some(&[0xff, 0xfe]),
            ..ctx()
        };
        let result = template("{@key}", Sanitize::None).render(None, &binary);
        assert_eq!(result.expect_err("not UTF-8").field, "@key");
        assert!(!template("{level}-{@key}-{date}", Sanitize::None).references_event());
    }

    #[test]
    fn strftime_specifiers_read_the_record_time_in_utc() {
        let event = json!({});
        assert_eq!(
            render("%Y-%m-%dT%H:%M:%S %y %j %%", &event),
            "2024-05-01T12:34:56 24 122 %"
        );
        let new_year = Context {
            timestamp_ms: Some(0),
            ..ctx()
        };
        let text = template("%Y.%m.%d %H:%M:%S %j", Sanitize::None).render(None, &new_year);
        assert_eq!(text, Ok("1970.01.01 00:00:00 001".into()));
        let leap_end = Context {
            // 2024-12-31T23:59:59.999Z
            timestamp_ms: Some(1_735_689_599_999),
            ..ctx()
        };
        let text = template("%Y %j %H:%M:%S", Sanitize::None).render(None, &leap_end);
        assert_eq!(text, Ok("2024 366 23:59:59".into()));
    }

    #[test]
    fn without_a_record_timestamp_the_current_time_is_used() {
        let untimed = Context {
            timestamp_ms: None,
            ..ctx()
        };
        let year = template("%Y", Sanitize::None)
            .render(None, &untimed)
            .expect("renders");
        let year: i64 = year.parse().expect("a year");
        assert!(year >= 2024, "{year}");
    }

    #[test]
    fn civil_dates_are_right_around_the_edges() {
        let at = |ms: i64| CivilTime::from_millis(ms);
        let date = |time: CivilTime| (time.year, time.month, time.day);
        assert_eq!(date(at(-1)), (1969, 12, 31));
        assert_eq!(at(-1).second, 59);
        assert_eq!(at(-1).day_of_year, 365);
        // 2000-02-29 (a leap day of a century divisible by 400).
        assert_eq!(date(at(951_782_400_000)), (2000, 2, 29));
        assert_eq!(at(951_782_400_000).day_of_year, 60);
        // 1900-03-01: 1900 has no leap day.
        assert_eq!(date(at(-2_203_891_200_000)), (1900, 3, 1));
        // Every day of 1600..2400 round-trips.
        for days in -135_140..157_000 {
            let (year, month, day) = civil_from_days(days);
            assert_eq!(days_from_civil(year, month, day), days);
        }
    }

    #[test]
    fn extreme_timestamps_do_not_panic() {
        for ms in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
            let time = CivilTime::from_millis(ms);
            assert!((1..=12).contains(&time.month));
            assert!((1..=31).contains(&time.day));
            assert!((1..=366).contains(&time.day_of_year));
            let extreme = Context {
                timestamp_ms: Some(ms),
                ..ctx()
            };
            let text = template("{date} %j %y %H%M%S", Sanitize::None)
                .render(None, &extreme)
                .expect("renders");
            assert!(!text.is_empty());
        }
        let past = Context {
            timestamp_ms: Some(i64::MIN),
            ..ctx()
        };
        let year = template("%Y", Sanitize::None)
            .render(None, &past)
            .expect("renders");
        assert_eq!(year, "-292275055");
    }

    #[test]
    fn kafka_topics_replace_what_a_topic_cannot_hold() {
        let topic = template("logs-{service.name}-{level}", Sanitize::KafkaTopic);
        let event = json!({ "service": { "name": "Pay ments/v2:eu" } });
        assert_eq!(
            topic.render(Some(&event), &ctx()),
            Ok("logs-Pay_ments_v2_eu-error".into())
        );
        let long = json!({ "s": "x".repeat(400) });
        let rendered = template("{s}", Sanitize::KafkaTopic)
            .render(Some(&long), &ctx())
            .expect("renders");
        assert_eq!(rendered.len(), 249);
        let dots = |value: &str| {
            template("{s}", Sanitize::KafkaTopic).render(Some(&json!({ "s": value })), &ctx())
        };
        assert_eq!(dots("."), Ok("_".into()));
        assert_eq!(dots(".."), Ok("_".into()));
        assert_eq!(dots(""), Ok("_".into()));
        assert_eq!(dots("..."), Ok("...".into()));
        let error = refuse("logs/{level}", Sanitize::KafkaTopic);
        assert_eq!(error.key, "routes[0].sink.topic");
        assert!(error.message.contains("`/`"), "{error}");
    }

    #[test]
    fn index_names_are_lowercase_and_start_well() {
        let index = template("Logs-{level}-{date}", Sanitize::IndexName);
        assert_eq!(
            index.render(None, &ctx()),
            Ok("logs-error-2024.05.01".into())
        );
        let event = json!({ "team": "Core Team/A,B" });
        let value = template("{team}-x", Sanitize::IndexName)
            .render(Some(&event), &ctx())
            .expect("renders");
        assert_eq!(value, "core_team_a_b-x");
        let leading = json!({ "team": "_+-Ops" });
        let trimmed = template("{team}", Sanitize::IndexName)
            .render(Some(&leading), &ctx())
            .expect("renders");
        assert_eq!(trimmed, "ops");
        let empty = json!({ "team": "_-" });
        let unknown = template("{team}", Sanitize::IndexName).render(Some(&empty), &ctx());
        assert_eq!(unknown, Ok("unknown".into()));
        let long = json!({ "team": "é".repeat(200) });
        let capped = template("{team}", Sanitize::IndexName)
            .render(Some(&long), &ctx())
            .expect("renders");
        assert!(
            capped.len() <= 255 && capped.len() >= 254,
            "{}",
            capped.len()
        );
        assert_eq!(
            template("STATIC", Sanitize::IndexName).is_static(),
            Some("static")
        );
        let error = refuse("logs*{level}", Sanitize::IndexName);
        assert!(error.message.contains("`*`"), "{error}");
    }

    #[test]
    fn path_segments_cannot_escape_their_directory() {
        let file = template("/var/log/{service.name}/{file}.log", Sanitize::PathSegment);
        let render = |event: Value| file.render(Some(&event), &ctx()).expect("renders");
        assert_eq!(
            render(json!({ "service": { "name": "api" }, "file": "out" })),
            "/var/log/api/out.log"
        );
        assert_eq!(
            render(json!({ "service": { "name": ".." }, "file": "../../etc/passwd" })),
            "/var/log/_/.._.._etc_passwd.log"
        );
        assert_eq!(
            render(json!({ "service": { "name": "." }, "file": "a\\b\u{0}c" })),
            "/var/log/_/a_b_c.log"
        );
        let long = render(json!({ "service": { "name": "x".repeat(300) }, "file": "f" }));
        assert_eq!(long, format!("/var/log/{}/f.log", "x".repeat(200)));
        // The literal text is the user's own.
        assert_eq!(
            template("../{level}", Sanitize::PathSegment).render(None, &ctx()),
            Ok("../error".into())
        );
    }

    #[test]
    fn malformed_templates_are_refused_naming_the_key() {
        let cases = [
            ("logs-{level", "no closing `}`"),
            ("logs-}", "without its `{`"),
            ("{a{b}}", "cannot hold another"),
            ("{}", "empty reference"),
            ("{a..b}", "empty key"),
            ("%Y-%q", "`%q`"),
            ("100%", "`%` at the end"),
            ("{@offset}", "unknown record metadata"),
            ("{date|today}", "takes no fallback"),
            ("{@topic|x}", "takes no fallback"),
        ];
        for (text, expected) in cases {
            let error = refuse(text, Sanitize::None);
            assert_eq!(error.key, "routes[0].sink.topic", "{text}");
            assert!(error.message.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn describe_and_display() {
        let index = template("logs-{level}-{date}", Sanitize::IndexName);
        assert_eq!(index.to_string(), "logs-{level}-{date}");
        assert_eq!(
            index.describe(),
            "\"logs-{level}-{date}\" (as an index name; reads: level, record time (UTC))"
        );
        let set = template("{user.id|anon}@{@topic}", Sanitize::None);
        assert_eq!(
            set.describe(),
            "\"{user.id|anon}@{@topic}\" (reads: field user.id (else \"anon\"), @topic)"
        );
        assert_eq!(
            template("fixed", Sanitize::KafkaTopic).describe(),
            "\"fixed\" (as a Kafka topic; fixed)"
        );
    }
}

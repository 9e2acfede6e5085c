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
//! - strftime specifiers (`%Y %m %d %H`, `%b`, `%V`, `%-d`, ...: chrono's set): the record's
//!   Kafka timestamp in UTC, or the current time when the record has none. A timestamp outside
//!   the years chrono can write (about -262 000 to 262 000) is an error, not a made-up date.
//!
//! What an event supplies is made safe for the destination ([`Sanitize`]); the literal text is
//! the user's own and is checked once, at parse time.

use std::fmt;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, Utc};

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
    /// One strftime specifier (`%Y`, `%-d`, `%.3f`), checked by chrono at parse time.
    Time(Vec<Item<'static>>),
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

/// Why a template has no text for a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// A field it names is missing (dead-letter reason `template_field_missing`).
    Missing(MissingField),
    /// It writes the record's date, and the record's timestamp lies outside the years a date
    /// can be written for (dead-letter reason `timestamp_out_of_range`).
    TimeOutOfRange { timestamp_ms: i64 },
}

impl RenderError {
    /// The dead-letter reason.
    pub fn reason(&self) -> &'static str {
        match self {
            RenderError::Missing(_) => "template_field_missing",
            RenderError::TimeOutOfRange { .. } => "timestamp_out_of_range",
        }
    }
}

impl fmt::Display for RenderError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenderError::Missing(missing) => missing.fmt(formatter),
            RenderError::TimeOutOfRange { timestamp_ms } => write!(
                formatter,
                "the record's timestamp {timestamp_ms} ms since 1970 is outside the years a date \
                 can be written for ({} to {})",
                DateTime::<Utc>::MIN_UTC.format("%Y"),
                DateTime::<Utc>::MAX_UTC.format("%Y")
            ),
        }
    }
}

impl std::error::Error for RenderError {}

impl From<MissingField> for RenderError {
    fn from(missing: MissingField) -> RenderError {
        RenderError::Missing(missing)
    }
}

/// The text a field's value puts in a name: a string's text, a number's or a boolean's JSON
/// text; `None` for null, an object or an array (not scalars).
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

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
    pub fn render(&self, event: Option<&Value>, ctx: &Context) -> Result<String, RenderError> {
        if let Some(fixed) = &self.fixed {
            return Ok(fixed.clone());
        }
        let mut out = String::new();
        let mut time: Option<DateTime<Utc>> = None;
        for part in &self.parts {
            match part {
                Part::Literal(literal) => out.push_str(literal),
                Part::Time(items) => {
                    let time = match time {
                        Some(time) => time,
                        None => {
                            let at = match ctx.timestamp_ms {
                                Some(ms) => DateTime::from_timestamp_millis(ms)
                                    .ok_or(RenderError::TimeOutOfRange { timestamp_ms: ms })?,
                                None => Utc::now(),
                            };
                            *time.insert(at)
                        }
                    };
                    let text = time.format_with_items(items.iter()).to_string();
                    self.push_value(&mut out, &text);
                }
                Part::Field { path, fallback } => {
                    let found = event.and_then(|event| path.get(event));
                    let text = found.and_then(scalar_text);
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
                            }
                            .into())
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
                            }
                            .into())
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

    /// The first part whose values are not bounded (a field of the event, the record key or a
    /// date), as written; `None` when every part has few possible values (`{level}`,
    /// `{service}`, `{@topic}`, `{@partition}`, literal text): for Loki's stream labels.
    pub fn unbounded_part(&self) -> Option<String> {
        self.parts.iter().find_map(|part| match part {
            Part::Field { path, .. } => Some(format!("{{{path}}}")),
            Part::Key(_) => Some("{@key}".into()),
            Part::Time(_) => Some("the record's date".into()),
            Part::Literal(_)
            | Part::Level(_)
            | Part::Service(_)
            | Part::Topic
            | Part::Partition => None,
        })
    }

    /// The first part that reads more than the record's coordinates and time (a field of
    /// the event, the key, the level or the service), as written; `None` when the template is
    /// made of `{@topic}`, `{@partition}`, dates and literal text: for object directories.
    pub fn reads_more_than_the_record(&self) -> Option<String> {
        self.parts.iter().find_map(|part| match part {
            Part::Field { path, .. } => Some(format!("{{{path}}}")),
            Part::Key(_) => Some("{@key}".into()),
            Part::Level(_) => Some("{level}".into()),
            Part::Service(_) => Some("{service}".into()),
            Part::Literal(_) | Part::Time(_) | Part::Topic | Part::Partition => None,
        })
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
                flush(&mut literal, &mut parts);
                parts.push(part);
            }
            '%' if chars.peek() == Some(&'%') => {
                chars.next();
                literal.push('%');
            }
            '%' => {
                let specifier = read_specifier(&mut chars)?;
                flush(&mut literal, &mut parts);
                parts.push(Part::Time(specifier));
            }
            other => literal.push(other),
        }
    }
    flush(&mut literal, &mut parts);
    Ok(parts)
}

/// A strftime specifier after its `%`: an optional padding flag (`-`, `_`, `0`), then `.`,
/// `:`, `#` or digits as chrono's `%.3f`, `%:z` and `%#z` have them, then the letter (or `+`).
/// chrono judges it; the message lists the usual ones.
fn read_specifier(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
) -> Result<Vec<Item<'static>>, String> {
    let mut specifier = String::from("%");
    if let Some(&flag @ ('-' | '_' | '0')) = chars.peek() {
        specifier.push(flag);
        chars.next();
    }
    while let Some(&c @ ('.' | ':' | '#' | '1'..='9')) = chars.peek() {
        specifier.push(c);
        chars.next();
    }
    match chars.next() {
        Some(c) => specifier.push(c),
        None => return Err("a `%` at the end: write `%%` for a percent sign".into()),
    }
    let items: Vec<Item<'static>> = StrftimeItems::new(&specifier)
        .map(|item| item.to_owned())
        .collect();
    // Composite ones (`%F`, `%c`) hold literal text between their fields.
    let known = !items.is_empty() && !items.iter().any(|item| matches!(item, Item::Error));
    if known {
        Ok(items)
    } else {
        Err(format!(
            "unknown time specifier `{specifier}`: use strftime's, such as %Y %m %d %H %M %S %j \
             %b %a %V, or %% for a percent sign"
        ))
    }
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

/// The part a reference stands for.
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
        "date" => refuse_fallback(Part::Time(
            StrftimeItems::new("%Y.%m.%d")
                .map(|item| item.to_owned())
                .collect(),
        )),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn missing_field(err: RenderError) -> MissingField {
        match err {
            RenderError::Missing(missing) => missing,
            other => panic!("not a missing field: {other}"),
        }
    }

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
        let render = |text: &str| {
            template(text, Sanitize::None)
                .render(Some(&event), &ctx())
                .map_err(missing_field)
        };
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
        assert_eq!(missing_field(unparsed.expect_err("no event")).field, "user");
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
        assert_eq!(
            missing_field(none("{@key}").expect_err("no key")).field,
            "@key"
        );
        let binary = Context {
            key: Some(&[0xff, 0xfe]),
            ..ctx()
        };
        let result = template("{@key}", Sanitize::None).render(None, &binary);
        assert_eq!(missing_field(result.expect_err("not UTF-8")).field, "@key");
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
    fn dates_are_right_around_the_edges() {
        let at = |ms: i64| {
            let ctx = Context {
                timestamp_ms: Some(ms),
                ..ctx()
            };
            template("%Y-%m-%d %j %H:%M:%S", Sanitize::None)
                .render(None, &ctx)
                .expect("renders")
        };
        assert_eq!(at(-1), "1969-12-31 365 23:59:59");
        // 2000-02-29 (a leap day of a century divisible by 400).
        assert_eq!(at(951_782_400_000), "2000-02-29 060 00:00:00");
        // 1900-03-01: 1900 has no leap day.
        assert_eq!(at(-2_203_891_200_000), "1900-03-01 060 00:00:00");
    }

    #[test]
    fn any_strftime_specifier_chrono_knows_is_taken_and_others_are_refused() {
        let event = json!({});
        // ISO week, month name, weekday, unpadded day, milliseconds, seconds since 1970.
        assert_eq!(
            render("%G-W%V %b %a %-d %.3f %s", &event),
            "2024-W18 May Wed 1 .789 1714566896"
        );
        for bad in ["%Q", "%-", "%", "%.9", "x-%E"] {
            let refused = Template::parse(bad, Sanitize::None, "path");
            assert!(refused.is_err(), "{bad} is refused: {refused:?}");
        }
        let message = Template::parse("logs-%Q", Sanitize::None, "path")
            .expect_err("refused")
            .to_string();
        assert!(message.contains("unknown time specifier `%Q`"), "{message}");
        // What a specifier writes is made safe for the destination like a field's value.
        let topic = template("logs-%b-%d", Sanitize::KafkaTopic)
            .render(None, &ctx())
            .expect("renders");
        assert_eq!(topic, "logs-May-01");
        let spaced = template("logs-%c", Sanitize::KafkaTopic)
            .render(None, &ctx())
            .expect("renders");
        assert_eq!(spaced, "logs-Wed_May__1_12_34_56_2024");
    }

    #[test]
    fn timestamps_past_the_writable_years_are_errors_not_made_up_dates() {
        let writable = |ms: i64| {
            let extreme = Context {
                timestamp_ms: Some(ms),
                ..ctx()
            };
            template("{date}/%H", Sanitize::PathSegment).render(None, &extreme)
        };
        // Microseconds taken for milliseconds: year 56 000, still a date.
        assert_eq!(
            writable(1_714_566_896_789_000).as_deref(),
            Ok("+56302.06.19/06")
        );
        for ms in [i64::MIN, i64::MIN + 1, i64::MAX - 1, i64::MAX] {
            let err = writable(ms).expect_err("out of range");
            assert_eq!(err, RenderError::TimeOutOfRange { timestamp_ms: ms });
            assert_eq!(err.reason(), "timestamp_out_of_range");
            assert!(err.to_string().contains("outside the years"), "{err}");
        }
        // A template without a date does not look at the timestamp.
        let untimed = Context {
            timestamp_ms: Some(i64::MAX),
            ..ctx()
        };
        assert_eq!(
            template("{@topic}", Sanitize::None).render(None, &untimed),
            Ok("app-logs".into())
        );
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
            ("%Y-%Q", "`%Q`"),
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

//! `[input] format = "text"`: each record's value is one line of plain text (a syslog or
//! nginx line, an application's own lines, logfmt). The line is the event's message. Its level
//! is the named group `level` of `input.level_pattern`, a fixed `input.level`, or (with
//! `input.logfmt`) the value of the logfmt key `input.level_field`; it is read through
//! `input.level_map` and the loggers' names the auto decoder knows (`WARN` → warning, `notice`
//! → info), and a name neither knows is a level of its own, as in the other formats.
//!
//! What each stage gets of a line:
//!
//! * routing: the level, and the service: the pattern's group `service`, else (with logfmt)
//!   the key `service`;
//! * route conditions (`when`), transforms and templates, and the sinks that write JSON (file,
//!   HTTP, Elasticsearch): the event as a JSON object, `level` (normalised) and `message` (the
//!   line) first, then the pattern's other named groups, then the logfmt pairs, all strings
//!   (logfmt has no types; comparisons such as `gte` read numbers in strings), the first of a
//!   name winning;
//! * the Kafka sink and the dead-letter topic: the original bytes; Loki: the line; OTLP: the
//!   line as the body, the other fields as attributes.
//!
//! The checks of the other formats apply first (tombstone, size, zero bytes, UTF-8: a payload
//! that is not UTF-8 is `not_utf8`, dead-lettered, never cut). A leading BOM and the line's
//! ending (`\n` or `\r\n`) are not part of the message, and a payload that is nothing else is
//! `empty`. A line the pattern does not match, or without the logfmt key, has no level
//! (`missing_field`); an empty level is `wrong_type`.

use std::borrow::Cow;

use regex::Regex;
use serde_json::{Map, Value};

use super::auto::Mapping;
use super::{checked_text, json_body, DecodeError, Level};

/// What `[input]` says about text lines, as written (checked by [`TextFormat::new`]).
#[derive(Debug, Clone, Default)]
pub struct TextSettings<'a> {
    /// `input.level_pattern`: a regular expression with a group named `level`.
    pub level_pattern: Option<&'a str>,
    /// `input.level`: the level of every line.
    pub level: Option<&'a str>,
    /// `input.level_field`: the logfmt key that holds the level (one key).
    pub level_field: Option<Vec<String>>,
    /// `input.logfmt`: read the line's `key=value` pairs as fields.
    pub logfmt: bool,
    /// `input.level_map`: names and the levels they mean.
    pub level_map: Vec<(&'a str, &'a str)>,
}

/// Why text settings cannot be used: the key (under `input.`) and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSettingsError {
    /// The key, without the `input.` prefix.
    pub key: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn refuse(key: &'static str, message: impl Into<String>) -> TextSettingsError {
    TextSettingsError {
        key,
        message: message.into(),
    }
}

/// Where a line's level is.
#[derive(Debug)]
enum LevelFrom {
    /// The pattern's group `level` (its index).
    Group(usize),
    /// The same for every line.
    Fixed(Level),
    /// The value of this logfmt key.
    Key(String),
}

/// How lines of text are read (`input.format = "text"`).
#[derive(Debug)]
pub struct TextFormat {
    level: LevelFrom,
    /// `input.level_pattern`.
    pattern: Option<Regex>,
    /// The pattern's group `service`, if it has one.
    service_group: Option<usize>,
    /// The pattern's named groups besides `level`, which become fields.
    field_groups: Vec<(usize, String)>,
    /// Whether `key=value` pairs are fields.
    logfmt: bool,
    /// `input.level_map`.
    names: Mapping,
}

impl TextFormat {
    /// The text format as `settings` say, or what is wrong with them (exactly one way to the
    /// level; a pattern that compiles and has a group `level`; a level key only with logfmt).
    pub fn new(settings: &TextSettings<'_>) -> Result<TextFormat, TextSettingsError> {
        let names = Mapping::new(None, settings.level_map.iter().copied());
        let ways = [
            settings.level_pattern.map(|_| "level_pattern"),
            settings.level.map(|_| "level"),
            settings.level_field.as_ref().map(|_| "level_field"),
        ];
        let given: Vec<&'static str> = ways.into_iter().flatten().collect();
        match given.as_slice() {
            [] => {
                return Err(refuse(
                    "format",
                    "the text format needs to know each line's level: a `level_pattern` with a \
                     group named `level` (e.g. '^\\S+ (?P<level>[A-Z]+) '), a fixed `level` \
                     (e.g. \"info\"), or with `logfmt = true` the `level_field` that holds it",
                ))
            }
            [_] => {}
            [first, second, ..] => {
                return Err(refuse(
                    second,
                    format!("give one of `level_pattern`, `level` and `level_field`, not both `{first}` and `{second}`"),
                ))
            }
        }
        let mut format = TextFormat {
            level: LevelFrom::Group(0),
            pattern: None,
            service_group: None,
            field_groups: Vec::new(),
            logfmt: settings.logfmt,
            names,
        };
        if let Some(pattern) = settings.level_pattern {
            let regex = Regex::new(pattern).map_err(|err| {
                refuse(
                    "level_pattern",
                    format!("not a valid regular expression: {err}"),
                )
            })?;
            let level = group(&regex, "level").ok_or_else(|| {
                refuse(
                    "level_pattern",
                    format!(
                        "`{pattern}` has no group named `level` to read the level from: write \
                         it as (?P<level>...), e.g. '^\\S+ (?P<level>[A-Z]+) '"
                    ),
                )
            })?;
            format.level = LevelFrom::Group(level);
            format.service_group = group(&regex, "service");
            format.field_groups = regex
                .capture_names()
                .enumerate()
                .filter_map(|(index, name)| Some((index, name?.to_string())))
                .filter(|(_, name)| name != "level")
                .collect();
            format.pattern = Some(regex);
        }
        if let Some(level) = settings.level {
            if level.trim().is_empty() {
                return Err(refuse("level", "must not be empty"));
            }
            format.level = LevelFrom::Fixed(format.names.level_of(level));
        }
        if let Some(keys) = &settings.level_field {
            if !settings.logfmt {
                return Err(refuse(
                    "level_field",
                    "with format = \"text\" the level field is a logfmt key: set `logfmt = \
                     true`, or read the level with a `level_pattern`",
                ));
            }
            match keys.as_slice() {
                [key] if !key.is_empty() => format.level = LevelFrom::Key(key.clone()),
                _ => {
                    return Err(refuse(
                        "level_field",
                        "a logfmt key is one key (`\"level\"`, `\"log.level\"`); a list of \
                         several keys is a path into JSON, which a line of text has not",
                    ))
                }
            }
        }
        Ok(format)
    }

    /// Every line at `level` (read through `names`), no fields: the text format with nothing
    /// configured, for tools and tests.
    pub(super) fn every_line_at(level: &str, names: Mapping) -> TextFormat {
        TextFormat {
            level: LevelFrom::Fixed(names.level_of(level)),
            pattern: None,
            service_group: None,
            field_groups: Vec::new(),
            logfmt: false,
            names,
        }
    }

    /// The level of `payload`'s line and, `with_service`, its service.
    pub(super) fn decode(
        &self,
        payload: Option<&[u8]>,
        max_bytes: usize,
        with_service: bool,
    ) -> Result<(Level, Option<Box<str>>), DecodeError> {
        let line = line(payload, max_bytes)?;
        let mut locations = self.pattern.as_ref().map(Regex::capture_locations);
        let matched = match (&self.pattern, &mut locations) {
            (Some(pattern), Some(locations)) => pattern.captures_read(locations, line).is_some(),
            _ => false,
        };
        let group = |index: usize| {
            locations
                .as_ref()
                .filter(|_| matched)
                .and_then(|locations| locations.get(index))
                .map(|(start, end)| &line[start..end])
        };
        let level = match &self.level {
            LevelFrom::Fixed(level) => level.clone(),
            LevelFrom::Group(index) => self.read_level(group(*index))?,
            LevelFrom::Key(key) => {
                let value = Pairs::new(line).find(|(name, _)| name == key);
                self.read_level(value.as_ref().map(|(_, value)| value.as_ref()))?
            }
        };
        if !with_service {
            return Ok((level, None));
        }
        let from_group = self
            .service_group
            .and_then(group)
            .filter(|service| !service.is_empty())
            .map(Box::from);
        let service = from_group.or_else(|| {
            self.logfmt
                .then(|| Pairs::new(line).find(|(name, _)| *name == "service"))
                .flatten()
                .filter(|(_, value)| !value.is_empty())
                .map(|(_, value)| Box::from(value.as_ref()))
        });
        Ok((level, service))
    }

    /// The line of a payload that decoded as one (without its BOM and line ending).
    pub fn line_of(payload: &[u8]) -> Option<&str> {
        line(Some(payload), usize::MAX).ok()
    }

    fn read_level(&self, name: Option<&str>) -> Result<Level, DecodeError> {
        match name {
            None => Err(DecodeError::MissingField { field: "level" }),
            Some("") => Err(DecodeError::WrongType {
                field: "level",
                detail: "empty".to_string(),
            }),
            Some(name) => Ok(self.names.level_of(name)),
        }
    }

    /// The event of a line that decoded at `level`: `level`, `message` (the line), the pattern's
    /// other named groups that took part in the match, then the logfmt pairs; the first of a name
    /// wins. `None` if the payload is no line (it did not decode).
    pub(super) fn event(&self, payload: &[u8], level: &Level) -> Option<Map<String, Value>> {
        let line = line(Some(payload), usize::MAX).ok()?;
        let mut event = Map::new();
        event.insert("level".to_string(), level.as_str().into());
        event.insert("message".to_string(), line.into());
        if let Some(pattern) = &self.pattern {
            if let Some(captures) = pattern.captures(line) {
                for (index, name) in &self.field_groups {
                    if let Some(value) = captures.get(*index) {
                        if !event.contains_key(name) {
                            event.insert(name.clone(), value.as_str().into());
                        }
                    }
                }
            }
        }
        if self.logfmt {
            for (name, value) in Pairs::new(line) {
                if !event.contains_key(name) {
                    event.insert(name.to_string(), value.into_owned().into());
                }
            }
        }
        Some(event)
    }
}

/// The index of `regex`'s group `name`.
fn group(regex: &Regex, name: &str) -> Option<usize> {
    regex.capture_names().position(|group| group == Some(name))
}

/// The line of a payload, after the checks every format makes: without a BOM and without its
/// line ending; `empty` if nothing else is left.
fn line(payload: Option<&[u8]>, max_bytes: usize) -> Result<&str, DecodeError> {
    let text = checked_text(payload, max_bytes, json_body)?;
    let line = text
        .strip_suffix('\n')
        .map_or(text, |line| line.strip_suffix('\r').unwrap_or(line));
    if line.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(line)
}

/// The `key=value` pairs of a line, in order (logfmt). A key is a run of characters other than
/// whitespace, `=` and `"`; its value is a quoted string (with the escapes `\"`, `\\`, `\n`,
/// `\r` and `\t`; unterminated, it runs to the end of the line) or a run of characters other
/// than whitespace, empty in `key=`. The words around the pairs (a line's free text) are
/// skipped, so `12:00:01 ERROR db down retry=3` has the one pair `retry=3`.
struct Pairs<'l> {
    rest: &'l str,
}

impl<'l> Pairs<'l> {
    fn new(line: &'l str) -> Pairs<'l> {
        Pairs { rest: line }
    }
}

impl<'l> Iterator for Pairs<'l> {
    type Item = (&'l str, Cow<'l, str>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let rest = self
                .rest
                .trim_start_matches(|c: char| c.is_ascii_whitespace());
            if rest.is_empty() {
                self.rest = rest;
                return None;
            }
            let key_end = rest
                .find(|c: char| c.is_ascii_whitespace() || c == '=' || c == '"')
                .unwrap_or(rest.len());
            let (key, after) = rest.split_at(key_end);
            // Every branch moves past at least one character: `key` is empty only when the
            // first character is `=` or `"`.
            match after.as_bytes().first() {
                Some(b'=') => {
                    let (value, remaining) = value(&after[1..]);
                    self.rest = remaining;
                    if !key.is_empty() {
                        return Some((key, value));
                    }
                }
                Some(b'"') => {
                    // A quoted string that is no value (`"text"` or `word"text"`): skipped.
                    let (_, remaining) = quoted(&after[1..]);
                    self.rest = remaining;
                }
                // A bare word: free text.
                _ => self.rest = after,
            }
        }
    }
}

/// A value at the start of `text` and what follows it.
fn value(text: &str) -> (Cow<'_, str>, &str) {
    if let Some(inside) = text.strip_prefix('"') {
        return quoted(inside);
    }
    let end = text
        .find(|c: char| c.is_ascii_whitespace())
        .unwrap_or(text.len());
    (Cow::Borrowed(&text[..end]), &text[end..])
}

/// A quoted string's content (`text` starts after the opening quote), unescaped, and what
/// follows its closing quote.
fn quoted(text: &str) -> (Cow<'_, str>, &str) {
    let mut unescaped: Option<String> = None;
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => {
                let content = unescaped.map_or(Cow::Borrowed(&text[..at]), Cow::Owned);
                return (content, &text[at + 1..]);
            }
            '\\' => {
                let owned = unescaped.get_or_insert_with(|| text[..at].to_string());
                match chars.next() {
                    Some((_, 'n')) => owned.push('\n'),
                    Some((_, 'r')) => owned.push('\r'),
                    Some((_, 't')) => owned.push('\t'),
                    Some((_, escaped @ ('"' | '\\'))) => owned.push(escaped),
                    // Any other escape is kept as written.
                    Some((_, other)) => {
                        owned.push('\\');
                        owned.push(other);
                    }
                    None => owned.push('\\'),
                }
            }
            c => {
                if let Some(owned) = &mut unescaped {
                    owned.push(c);
                }
            }
        }
    }
    // Unterminated: the rest of the line.
    (unescaped.map_or(Cow::Borrowed(text), Cow::Owned), "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings() -> TextSettings<'static> {
        TextSettings::default()
    }

    fn format(settings: TextSettings<'_>) -> TextFormat {
        TextFormat::new(&settings).expect("valid settings")
    }

    fn with_pattern(pattern: &str) -> TextFormat {
        format(TextSettings {
            level_pattern: Some(pattern),
            ..settings()
        })
    }

    fn logfmt(key: &str) -> TextFormat {
        format(TextSettings {
            level_field: Some(vec![key.to_string()]),
            logfmt: true,
            ..settings()
        })
    }

    fn level(format: &TextFormat, line: &[u8]) -> Result<String, DecodeError> {
        format
            .decode(Some(line), usize::MAX, false)
            .map(|(level, _)| level.as_str().to_string())
    }

    fn service(format: &TextFormat, line: &str) -> Option<String> {
        format
            .decode(Some(line.as_bytes()), usize::MAX, true)
            .expect("decodes")
            .1
            .map(String::from)
    }

    fn event(format: &TextFormat, line: &str) -> Value {
        let (level, _) = format
            .decode(Some(line.as_bytes()), usize::MAX, false)
            .expect("decodes");
        Value::Object(format.event(line.as_bytes(), &level).expect("an event"))
    }

    fn pairs(line: &str) -> Vec<(String, String)> {
        Pairs::new(line)
            .map(|(key, value)| (key.to_string(), value.into_owned()))
            .collect()
    }

    const SYSLOGISH: &str = r"^\S+ (?P<level>[A-Za-z]+) ";

    #[test]
    fn the_level_comes_from_the_patterns_group_and_is_normalised() {
        let format = with_pattern(SYSLOGISH);
        for (line, expected) in [
            ("2024-05-01T10:00:00Z ERROR db down", "error"),
            ("2024-05-01T10:00:00Z WARN disk 91% full", "warning"),
            ("2024-05-01T10:00:00Z warning disk", "warning"),
            ("2024-05-01T10:00:00Z Information started", "info"),
            ("2024-05-01T10:00:00Z NOTICE started", "info"),
            ("2024-05-01T10:00:00Z CRIT broken", "critical"),
            ("2024-05-01T10:00:00Z EMERG gone", "fatal"),
            // Unknown names are levels of their own, lowercased, as the other decoders keep them.
            ("2024-05-01T10:00:00Z AUDIT login", "audit"),
        ] {
            assert_eq!(
                level(&format, line.as_bytes()),
                Ok(expected.to_string()),
                "{line}"
            );
        }
    }

    #[test]
    fn lines_without_a_level_are_refused_with_a_reason() {
        let format = with_pattern(SYSLOGISH);
        // The pattern does not match.
        assert_eq!(
            level(&format, b"no-level-here"),
            Err(DecodeError::MissingField { field: "level" })
        );
        // The group is optional and took no part in the match.
        let optional = with_pattern(r"^(?:\[(?P<level>[a-z]*)\])? ?.*$");
        assert_eq!(
            level(&optional, b"plain"),
            Err(DecodeError::MissingField { field: "level" })
        );
        // The group matched nothing.
        let empty = level(&optional, b"[] text");
        assert_eq!(
            empty,
            Err(DecodeError::WrongType {
                field: "level",
                detail: "empty".to_string()
            })
        );
        assert_eq!(empty.map_err(|err| err.reason()), Err("wrong_type"));
        // logfmt without the key, and with an empty one.
        let keyed = logfmt("level");
        assert_eq!(
            level(&keyed, b"msg=hello"),
            Err(DecodeError::MissingField { field: "level" })
        );
        assert_eq!(
            level(&keyed, b"level= msg=hello").map_err(|err| err.reason()),
            Err("wrong_type")
        );
    }

    #[test]
    fn what_every_format_checks_comes_first() {
        let format = with_pattern(SYSLOGISH);
        assert_eq!(level(&format, b""), Err(DecodeError::Empty));
        assert_eq!(
            format.decode(None, usize::MAX, false),
            Err(DecodeError::Empty)
        );
        assert_eq!(level(&format, b"\n"), Err(DecodeError::Empty));
        assert_eq!(level(&format, b"\r\n"), Err(DecodeError::Empty));
        assert_eq!(
            format.decode(Some(b"t ERROR long line"), 8, false),
            Err(DecodeError::TooLarge { size: 17, limit: 8 })
        );
        // Invalid UTF-8 is refused, wherever it is, with where it begins (a BOM counted).
        let not_utf8 = level(&format, b"\xEF\xBB\xBFt ERROR caf\xE9");
        assert_eq!(not_utf8, Err(DecodeError::NotUtf8 { valid_up_to: 14 }));
        assert_eq!(not_utf8.map_err(|err| err.reason()), Err("not_utf8"));
        // A fixed level does not make bad bytes a line either.
        let fixed = format_fixed("info");
        assert_eq!(
            level(&fixed, b"\xff\xfe").map_err(|err| err.reason()),
            Err("not_utf8")
        );
    }

    fn format_fixed(level: &str) -> TextFormat {
        format(TextSettings {
            level: Some(level),
            ..settings()
        })
    }

    #[test]
    fn a_fixed_level_names_every_line_and_goes_through_the_names() {
        assert_eq!(
            level(&format_fixed("info"), b"anything at all"),
            Ok("info".to_string())
        );
        assert_eq!(
            level(&format_fixed("WARN"), b"x"),
            Ok("warning".to_string())
        );
        let mapped = format(TextSettings {
            level: Some("sev2"),
            level_map: vec![("SEV2", "error")],
            ..settings()
        });
        assert_eq!(level(&mapped, b"x"), Ok("error".to_string()));
    }

    #[test]
    fn level_map_comes_first_for_captured_names() {
        let format = format(TextSettings {
            level_pattern: Some(r"^(?P<level>\w+):"),
            level_map: vec![("W", "warning"), ("E", "error"), ("notice", "warning")],
            ..settings()
        });
        assert_eq!(level(&format, b"W: late"), Ok("warning".to_string()));
        assert_eq!(level(&format, b"e: broken"), Ok("error".to_string()));
        // Before the built-in names.
        assert_eq!(level(&format, b"NOTICE: x"), Ok("warning".to_string()));
        assert_eq!(level(&format, b"INFO: x"), Ok("info".to_string()));
    }

    #[test]
    fn the_message_is_the_line_without_its_ending_and_bom() {
        let format = with_pattern(SYSLOGISH);
        for payload in [
            &b"t ERROR db down"[..],
            b"t ERROR db down\n",
            b"t ERROR db down\r\n",
            b"\xEF\xBB\xBFt ERROR db down",
        ] {
            let (level, _) = format
                .decode(Some(payload), usize::MAX, false)
                .expect("decodes");
            let event = format.event(payload, &level).expect("an event");
            assert_eq!(event["message"], "t ERROR db down", "{payload:?}");
            assert_eq!(event["level"], "error");
        }
        // Lines within a record (a stack trace) stay one message.
        let trace = event(&format, "t ERROR boom\n  at main.rs:1\n");
        assert_eq!(trace["message"], "t ERROR boom\n  at main.rs:1");
    }

    #[test]
    fn the_event_has_the_patterns_groups_then_the_logfmt_pairs() {
        let format = format(TextSettings {
            level_pattern: Some(
                r"^(?P<time>\S+) (?P<level>[A-Z]+) \[(?P<service>[a-z]+)\](?: (?P<absent>#\d+))?",
            ),
            logfmt: true,
            ..settings()
        });
        let line = r#"10:00:01 ERROR [checkout] payment failed user=ada status=503 reason="card declined" level=debug message=x time=late"#;
        let got = event(&format, line);
        let keys: Vec<&str> = got
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["level", "message", "time", "service", "user", "status", "reason"]
        );
        assert_eq!(got["level"], "error", "the line's level, not logfmt's");
        assert_eq!(got["message"], line);
        assert_eq!(got["time"], "10:00:01", "the group before the pair");
        assert_eq!(got["service"], "checkout");
        assert_eq!(got["status"], "503", "logfmt values are strings");
        assert_eq!(got["reason"], "card declined");
        assert_eq!(service(&format, line).as_deref(), Some("checkout"));
        // Without logfmt the pairs are not fields.
        let plain = with_pattern(SYSLOGISH);
        let got = event(&plain, "t ERROR user=ada");
        assert_eq!(got.as_object().map(Map::len), Some(2));
    }

    #[test]
    fn logfmt_lines_give_level_service_and_fields() {
        let format = logfmt("level");
        let line =
            r#"ts=2024-05-01T10:00:00Z level=warn service=billing msg="invoice late" id=991"#;
        assert_eq!(level(&format, line.as_bytes()), Ok("warning".to_string()));
        assert_eq!(service(&format, line).as_deref(), Some("billing"));
        let got = event(&format, line);
        assert_eq!(got["msg"], "invoice late");
        assert_eq!(got["id"], "991");
        assert_eq!(got["level"], "warning");
        // No service key, or an empty one: no service.
        assert_eq!(service(&format, "level=info msg=x"), None);
        assert_eq!(service(&format, "level=info service="), None);
        // A key with a dot is one key.
        let dotted = logfmt("log.level");
        assert_eq!(
            level(&dotted, b"log.level=ERROR msg=x"),
            Ok("error".to_string())
        );
        // A quoted level.
        assert_eq!(
            level(&format, br#"level="error" msg=x"#),
            Ok("error".to_string())
        );
    }

    #[test]
    fn logfmt_pairs_are_read_as_written() {
        let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect()
        };
        assert_eq!(
            pairs(r#"a=1 b="two words" c= d="q\"uote\\d" e="line\nbreak""#),
            owned(&[
                ("a", "1"),
                ("b", "two words"),
                ("c", ""),
                ("d", "q\"uote\\d"),
                ("e", "line\nbreak")
            ])
        );
        // Free text around the pairs is skipped, and so are quoted strings that are no value.
        assert_eq!(
            pairs(r#"12:00:01 ERROR "db down" retry=3 now word"x y" =orphan z=9"#),
            owned(&[("retry", "3"), ("z", "9")])
        );
        // Unterminated quotes run to the end; unknown escapes stay as written.
        assert_eq!(pairs(r#"a="open \d b=2"#), owned(&[("a", r"open \d b=2")]));
        assert_eq!(
            pairs("a=1\tb=2  c=é"),
            owned(&[("a", "1"), ("b", "2"), ("c", "é")])
        );
        assert_eq!(pairs(""), owned(&[]));
        assert_eq!(pairs("   "), owned(&[]));
        assert_eq!(pairs(r#"a="x\"#), owned(&[("a", "x\\")]));
        // Duplicate keys: every pair is there; the event keeps the first.
        assert_eq!(pairs("a=1 a=2"), owned(&[("a", "1"), ("a", "2")]));
        let format = logfmt("level");
        assert_eq!(event(&format, "level=info a=1 a=2")["a"], "1");
    }

    #[test]
    fn settings_errors_name_the_key() {
        let error =
            |settings: TextSettings<'_>| TextFormat::new(&settings).err().map(|err| err.key);
        assert_eq!(error(settings()), Some("format"));
        assert_eq!(
            error(TextSettings {
                level_pattern: Some(SYSLOGISH),
                level: Some("info"),
                ..settings()
            }),
            Some("level")
        );
        assert_eq!(
            error(TextSettings {
                level: Some("info"),
                level_field: Some(vec!["level".into()]),
                logfmt: true,
                ..settings()
            }),
            Some("level_field")
        );
        assert_eq!(
            error(TextSettings {
                level_pattern: Some("(unclosed"),
                ..settings()
            }),
            Some("level_pattern")
        );
        let no_group = TextFormat::new(&TextSettings {
            level_pattern: Some(r"^\S+ ([A-Z]+) "),
            ..settings()
        })
        .expect_err("no level group");
        assert_eq!(no_group.key, "level_pattern");
        assert!(
            no_group.message.contains("no group named `level`"),
            "{}",
            no_group.message
        );
        assert_eq!(
            error(TextSettings {
                level: Some(" "),
                ..settings()
            }),
            Some("level")
        );
        assert_eq!(
            error(TextSettings {
                level_field: Some(vec!["level".into()]),
                ..settings()
            }),
            Some("level_field"),
            "a level key needs logfmt"
        );
        assert_eq!(
            error(TextSettings {
                level_field: Some(vec!["log".into(), "level".into()]),
                logfmt: true,
                ..settings()
            }),
            Some("level_field"),
            "a logfmt key is one key"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256), limit in 0usize..300) {
            for format in [with_pattern(SYSLOGISH), logfmt("level"), format_fixed("info")] {
                if let Ok((level, _)) = format.decode(Some(&bytes), limit, true) {
                    let event = format.event(&bytes, &level);
                    prop_assert!(event.is_some());
                }
            }
        }

        #[test]
        fn logfmt_never_panics_and_always_ends(line in r#"[a-z =" \\\t\n"é]{0,64}"#) {
            let count = Pairs::new(&line).count();
            prop_assert!(count <= line.len());
        }

        /// A line written as logfmt pairs reads back as the same pairs.
        #[test]
        fn logfmt_round_trips(
            pairs_in in prop::collection::vec(("[a-z][a-z0-9_.]{0,8}", "[ -~]{0,12}"), 0..6),
        ) {
            let line: Vec<String> = pairs_in
                .iter()
                .map(|(key, value)| {
                    let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
                    format!("{key}=\"{escaped}\"")
                })
                .collect();
            let read = pairs(&line.join(" "));
            prop_assert_eq!(read, pairs_in);
        }
    }
}

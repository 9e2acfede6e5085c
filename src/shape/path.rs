//! Field paths: how conditions, transforms and templates name a field of an event.
//!
//! Syntax: keys separated by dots (`http.request.method`), array indexes after a key
//! (`items[0]`, `a.b[2].c`, `matrix[1][0]`), and double-quoted keys for keys that hold dots or
//! other special characters (`"log.level"`, `kubernetes.labels."app.kubernetes.io/name"`;
//! inside quotes, `\"` is a quote and `\\` a backslash). The event is an object, so a path
//! starts with a key.
//!
//! ECS-style flat keys: loggers write `log.level` either nested (`{"log":{"level":..}}`) or as
//! one key with a dot (`{"log.level":..}`), and some mix both (`{"http":{"request.method":..}}`).
//! So lookup goes key by key as written, and when an object has no key for the next segment,
//! the next segments joined with `.` are tried as one key at that object, longest first, up to
//! the next index. Nested keys win when both exist. The joined keys are built once, when the
//! path is parsed, so a lookup never allocates.

use std::fmt;

use serde_json::{Map, Value};

/// A parsed field path (see the module documentation for its syntax and lookup rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    /// The path as the user wrote it, for messages.
    text: String,
    segments: Vec<Segment>,
    /// For each key segment `i`: the flat keys made of segments `i..=m` joined with dots, with
    /// the segment after them, longest first. Empty for an index.
    flat: Vec<Vec<(String, usize)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl FieldPath {
    /// Parses `text`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        let segments = parse_segments(text)
            .map_err(|problem| format!("invalid field path `{text}`: {problem}"))?;
        let flat = flat_keys(&segments);
        Ok(FieldPath {
            text: text.to_string(),
            segments,
            flat,
        })
    }

    /// The value at this path, if present (a JSON null is present).
    pub fn get<'v>(&self, event: &'v Value) -> Option<&'v Value> {
        let mut current = event;
        let mut at = 0;
        while at < self.segments.len() {
            current = match (&self.segments[at], current) {
                (Segment::Key(_), Value::Object(object)) => {
                    let (key, next) = self.step(object, at)?;
                    at = next;
                    object.get(key)?
                }
                (Segment::Index(index), Value::Array(items)) => {
                    at += 1;
                    items.get(*index)?
                }
                _ => return None,
            };
        }
        Some(current)
    }

    /// The value at this path, to change in place.
    pub fn get_mut<'v>(&self, event: &'v mut Value) -> Option<&'v mut Value> {
        let mut current = event;
        let mut at = 0;
        while at < self.segments.len() {
            current = match (&self.segments[at], current) {
                (Segment::Key(_), Value::Object(object)) => {
                    let (key, next) = self.step(object, at)?;
                    at = next;
                    object.get_mut(key)?
                }
                (Segment::Index(index), Value::Array(items)) => {
                    at += 1;
                    items.get_mut(*index)?
                }
                _ => return None,
            };
        }
        Some(current)
    }

    /// Takes the value at this path out of the event. The keys around it keep their order;
    /// removing an array element shifts the ones after it.
    pub fn remove(&self, event: &mut Value) -> Option<Value> {
        let last = self.segments.len();
        let mut current = event;
        let mut at = 0;
        loop {
            current = match (&self.segments[at], current) {
                (Segment::Key(_), Value::Object(object)) => {
                    let (key, next) = self.step(object, at)?;
                    if next == last {
                        // Not `shift_remove`: it exists only with serde_json's
                        // `preserve_order`, and `remove` there moves the last key into the
                        // gap. `retain` keeps the order either way.
                        let value = object.get_mut(key).map(Value::take)?;
                        object.retain(|name, _| name != key);
                        return Some(value);
                    }
                    at = next;
                    object.get_mut(key)?
                }
                (Segment::Index(index), Value::Array(items)) => {
                    if at + 1 == last {
                        return (*index < items.len()).then(|| items.remove(*index));
                    }
                    at += 1;
                    items.get_mut(*index)?
                }
                _ => return None,
            };
        }
    }

    /// Puts `value` at this path, replacing what is there (an existing flat key such as
    /// `"log.level"` is replaced in place) and creating the missing objects on the way. Fails,
    /// changing nothing, when something on the way is not an object (or not an array where an
    /// index is), or an index is out of range: arrays are never grown.
    pub fn set(&self, event: &mut Value, value: Value) -> Result<(), String> {
        let last = self.segments.len();
        let mut current = event;
        let mut at = 0;
        loop {
            let found = describe_type(current);
            current = match (&self.segments[at], current) {
                (Segment::Key(key), Value::Object(object)) => {
                    let (key, next) = match self.step(object, at) {
                        Some(found) => found,
                        None => {
                            // Nothing may be created before an index: the array it needs
                            // cannot be made up, and a failed set must leave the event as
                            // it was.
                            if self.segments[at..]
                                .iter()
                                .any(|segment| matches!(segment, Segment::Index(_)))
                            {
                                return Err(format!(
                                    "cannot set `{}`: `{}` is missing, and an index needs an \
                                     existing array",
                                    self.text,
                                    render(&self.segments[..=at])
                                ));
                            }
                            (key.as_str(), at + 1)
                        }
                    };
                    if next == last {
                        object.insert(key.to_string(), value);
                        return Ok(());
                    }
                    at = next;
                    object
                        .entry(key.to_string())
                        .or_insert_with(|| Value::Object(Map::new()))
                }
                (Segment::Index(index), Value::Array(items)) => {
                    let length = items.len();
                    let Some(slot) = items.get_mut(*index) else {
                        return Err(format!(
                            "cannot set `{}`: index {index} is out of range (`{}` has {length} \
                             items)",
                            self.text,
                            render(&self.segments[..at])
                        ));
                    };
                    if at + 1 == last {
                        *slot = value;
                        return Ok(());
                    }
                    at += 1;
                    slot
                }
                (segment, _) => {
                    let wanted = match segment {
                        Segment::Key(_) => "an object",
                        Segment::Index(_) => "an array",
                    };
                    let holder = if at == 0 {
                        "the event".to_string()
                    } else {
                        format!("`{}`", render(&self.segments[..at]))
                    };
                    return Err(format!(
                        "cannot set `{}`: {holder} is {found}, not {wanted}",
                        self.text
                    ));
                }
            };
        }
    }

    /// The key of `object` that segment `at` names, and the segment after it: the key itself,
    /// else the longest flat key made of it and the following keys. The key borrows from the
    /// path, not the object, so the caller may then borrow the object mutably.
    fn step(&self, object: &Map<String, Value>, at: usize) -> Option<(&str, usize)> {
        let Segment::Key(key) = &self.segments[at] else {
            return None;
        };
        if object.contains_key(key) {
            return Some((key, at + 1));
        }
        self.flat[at]
            .iter()
            .find(|(joined, _)| object.contains_key(joined))
            .map(|(joined, next)| (joined.as_str(), *next))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.text)
    }
}

/// `"an object"`, `"a string"`, ... for messages.
pub fn describe_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Segments back as path text, quoting keys that need it.
fn render(segments: &[Segment]) -> String {
    let mut text = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                if !text.is_empty() {
                    text.push('.');
                }
                if key.is_empty() || key.contains(['.', '[', ']', '"']) {
                    text.push('"');
                    text.push_str(&key.replace('\\', "\\\\").replace('"', "\\\""));
                    text.push('"');
                } else {
                    text.push_str(key);
                }
            }
            Segment::Index(index) => {
                text.push('[');
                text.push_str(&index.to_string());
                text.push(']');
            }
        }
    }
    text
}

fn parse_segments(text: &str) -> Result<Vec<Segment>, String> {
    if text.is_empty() {
        return Err("it is empty: name a field, such as `message` or `http.status`".into());
    }
    let mut segments = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        // A key: at the start and after each dot.
        let key = match chars.peek() {
            None => return Err("it ends with `.`: a key is missing after it".into()),
            Some('.') if segments.is_empty() => {
                return Err("it starts with `.`: a key is missing before it".into())
            }
            Some('.') => return Err("an empty key between two dots".into()),
            Some('[') if segments.is_empty() => {
                return Err(
                    "it starts with an index: the event is an object, so a path starts \
                            with a key"
                        .into(),
                )
            }
            Some('[') => return Err("an empty key before `[`".into()),
            Some(']') => return Err("a `]` without its `[`".into()),
            Some('"') => {
                chars.next();
                let mut key = String::new();
                loop {
                    match chars.next() {
                        None => return Err("a `\"` without its closing `\"`".into()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(escaped) => key.push(escaped),
                            None => return Err("a `\"` without its closing `\"`".into()),
                        },
                        Some(other) => key.push(other),
                    }
                }
                if key.is_empty() {
                    return Err("an empty quoted key `\"\"`".into());
                }
                key
            }
            Some(_) => {
                let mut key = String::new();
                while let Some(&next) = chars.peek() {
                    match next {
                        '.' | '[' => break,
                        ']' => return Err("a `]` without its `[`".into()),
                        '"' => {
                            return Err(format!(
                                "a `\"` inside the key `{key}...`: quote a whole key, as in \
                                 `a.\"b.c\"`"
                            ))
                        }
                        other => {
                            key.push(other);
                            chars.next();
                        }
                    }
                }
                key
            }
        };
        segments.push(Segment::Key(key));

        // After a key: indexes, then a dot or the end.
        loop {
            match chars.next() {
                None => return Ok(segments),
                Some('.') => break,
                Some('[') => {
                    let mut digits = String::new();
                    loop {
                        match chars.next() {
                            None => return Err("a `[` without its `]`".into()),
                            Some(']') => break,
                            Some(other) => digits.push(other),
                        }
                    }
                    if digits.is_empty() {
                        return Err("an empty index `[]`".into());
                    }
                    if !digits.bytes().all(|byte| byte.is_ascii_digit()) {
                        return Err(format!("`[{digits}]`: an index is a whole number from 0"));
                    }
                    let index = digits
                        .parse::<usize>()
                        .map_err(|_| format!("`[{digits}]`: the index is too large"))?;
                    segments.push(Segment::Index(index));
                }
                Some(']') => return Err("a `]` without its `[`".into()),
                Some(other) => {
                    return Err(format!(
                        "`{other}` after a quoted key or an index: separate keys with `.`"
                    ))
                }
            }
        }
    }
}

/// The flat keys of each key segment (see [`FieldPath::flat`]).
fn flat_keys(segments: &[Segment]) -> Vec<Vec<(String, usize)>> {
    (0..segments.len())
        .map(|start| {
            let run_end = segments[start..]
                .iter()
                .position(|segment| matches!(segment, Segment::Index(_)))
                .map_or(segments.len(), |offset| start + offset);
            let mut joined = Vec::new();
            let mut key = String::new();
            for (at, segment) in segments.iter().enumerate().take(run_end).skip(start) {
                if let Segment::Key(part) = segment {
                    if at > start {
                        key.push('.');
                    }
                    key.push_str(part);
                    if at > start {
                        joined.push((key.clone(), at + 1));
                    }
                }
            }
            joined.reverse();
            joined
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(text: &str) -> FieldPath {
        FieldPath::parse(text).unwrap_or_else(|error| panic!("{error}"))
    }

    fn keys(path: &FieldPath) -> Vec<Segment> {
        path.segments.clone()
    }

    fn key(text: &str) -> Segment {
        Segment::Key(text.to_string())
    }

    #[test]
    fn parses_dots_indexes_and_quoted_keys() {
        assert_eq!(keys(&path("message")), vec![key("message")]);
        assert_eq!(
            keys(&path("a.b[2].c")),
            vec![key("a"), key("b"), Segment::Index(2), key("c")]
        );
        assert_eq!(
            keys(&path("matrix[1][0]")),
            vec![key("matrix"), Segment::Index(1), Segment::Index(0)]
        );
        assert_eq!(keys(&path("\"log.level\"")), vec![key("log.level")]);
        assert_eq!(
            keys(&path("kubernetes.labels.\"app.kubernetes.io/name\"")),
            vec![
                key("kubernetes"),
                key("labels"),
                key("app.kubernetes.io/name")
            ]
        );
        assert_eq!(
            keys(&path(r#""say \"hi\"".x"#)),
            vec![key("say \"hi\""), key("x")]
        );
        assert_eq!(keys(&path("@timestamp")), vec![key("@timestamp")]);
        assert_eq!(keys(&path("\"a\"[0]")), vec![key("a"), Segment::Index(0)]);
    }

    #[test]
    fn malformed_paths_say_what_is_wrong() {
        let cases = [
            ("", "empty"),
            ("a..b", "empty key between two dots"),
            (".a", "starts with `.`"),
            ("a.", "ends with `.`"),
            ("[0]", "starts with an index"),
            ("a.[0]", "empty key before `[`"),
            ("a[0", "`[` without its `]`"),
            ("a]", "`]` without its `[`"),
            ("a[]", "empty index"),
            ("a[x]", "whole number"),
            ("a[-1]", "whole number"),
            ("a[99999999999999999999999]", "too large"),
            ("\"a.b", "without its closing"),
            ("a\"b\"", "quote a whole key"),
            ("\"a\"b", "separate keys with `.`"),
            ("a[0]b", "separate keys with `.`"),
            ("\"\"", "empty quoted key"),
        ];
        for (text, expected) in cases {
            let error = FieldPath::parse(text).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains(&format!("`{text}`")), "{text:?}: {error}");
        }
    }

    #[test]
    fn display_gives_back_the_path() {
        let text = "kubernetes.labels.\"app.kubernetes.io/name\"[0]";
        assert_eq!(path(text).to_string(), text);
    }

    #[test]
    fn finds_nested_values_and_array_items() {
        let event = json!({ "http": { "status": 503 }, "items": [{ "id": "a" }, { "id": "b" }] });
        assert_eq!(path("http.status").get(&event), Some(&json!(503)));
        assert_eq!(path("items[1].id").get(&event), Some(&json!("b")));
        assert_eq!(path("items[2].id").get(&event), None);
        assert_eq!(path("http.status.code").get(&event), None);
        assert_eq!(path("http[0]").get(&event), None);
        assert_eq!(path("missing").get(&event), None);
    }

    #[test]
    fn a_null_is_present() {
        let event = json!({ "user": null });
        assert_eq!(path("user").get(&event), Some(&Value::Null));
        assert_eq!(path("user.name").get(&event), None);
    }

    #[test]
    fn ecs_flat_keys_are_found_by_dotted_paths() {
        let ecs = json!({
            "@timestamp": "2024-05-01T12:00:00.000Z",
            "log.level": "error",
            "message": "disk full",
            "ecs.version": "8.11.0",
            "http": { "request.method": "GET" },
            "service": { "name": "api" }
        });
        assert_eq!(path("log.level").get(&ecs), Some(&json!("error")));
        assert_eq!(path("\"log.level\"").get(&ecs), Some(&json!("error")));
        assert_eq!(path("http.request.method").get(&ecs), Some(&json!("GET")));
        assert_eq!(path("service.name").get(&ecs), Some(&json!("api")));
        assert_eq!(
            path("@timestamp").get(&ecs),
            Some(&json!("2024-05-01T12:00:00.000Z"))
        );
        let nested = json!({ "log": { "level": "warn" } });
        assert_eq!(path("log.level").get(&nested), Some(&json!("warn")));
        // A quoted key is one key: it never looks into nested objects.
        assert_eq!(path("\"log.level\"").get(&nested), None);
    }

    #[test]
    fn nested_keys_win_over_flat_ones_and_longer_flat_keys_first() {
        let both = json!({ "log": { "level": "nested" }, "log.level": "flat" });
        assert_eq!(path("log.level").get(&both), Some(&json!("nested")));
        let flat = json!({ "a.b": { "c": 1 }, "a.b.c": 2 });
        assert_eq!(path("a.b.c").get(&flat), Some(&json!(2)));
        let partly = json!({ "a.b": { "c": 1 } });
        assert_eq!(path("a.b.c").get(&partly), Some(&json!(1)));
        let before_index = json!({ "a.b": [10, 20] });
        assert_eq!(path("a.b[1]").get(&before_index), Some(&json!(20)));
    }

    #[test]
    fn real_logger_shapes() {
        let pino = json!({ "level": 30, "time": 1714564800000_i64, "pid": 7, "hostname": "h",
                           "msg": "request completed", "res": { "statusCode": 200 } });
        assert_eq!(path("res.statusCode").get(&pino), Some(&json!(200)));
        let bunyan = json!({ "name": "api", "hostname": "h", "pid": 1, "level": 50,
                             "msg": "boom", "time": "2024-05-01T12:00:00.000Z", "v": 0,
                             "err": { "message": "boom", "stack": "Error: boom" } });
        assert_eq!(path("err.message").get(&bunyan), Some(&json!("boom")));
        let zap = json!({ "level": "error", "ts": 1714564800.123, "caller": "main.go:42",
                          "msg": "failed", "stacktrace": "main.main" });
        assert_eq!(path("caller").get(&zap), Some(&json!("main.go:42")));
        let otel = json!({ "timeUnixNano": "1714564800000000000", "severityText": "ERROR",
                           "severityNumber": 17, "body": { "stringValue": "failed" },
                           "resource": { "attributes": [
                               { "key": "service.name", "value": { "stringValue": "api" } } ] } });
        assert_eq!(path("severityText").get(&otel), Some(&json!("ERROR")));
        assert_eq!(
            path("resource.attributes[0].value.stringValue").get(&otel),
            Some(&json!("api"))
        );
        let gcp = json!({ "severity": "ERROR", "message": "failed",
                          "logging.googleapis.com/trace": "projects/p/traces/t" });
        assert_eq!(
            path("\"logging.googleapis.com/trace\"").get(&gcp),
            Some(&json!("projects/p/traces/t"))
        );
        // Unquoted, the flat fallback finds it too.
        assert_eq!(
            path("logging.googleapis.com/trace").get(&gcp),
            Some(&json!("projects/p/traces/t"))
        );
    }

    #[test]
    fn get_mut_changes_in_place_also_through_flat_keys() {
        let mut event = json!({ "log.level": "ERROR", "items": [1, 2] });
        *path("log.level").get_mut(&mut event).expect("present") = json!("error");
        *path("items[0]").get_mut(&mut event).expect("present") = json!(9);
        assert_eq!(event, json!({ "log.level": "error", "items": [9, 2] }));
        assert!(path("items[5]").get_mut(&mut event).is_none());
        assert!(path("nope.x").get_mut(&mut event).is_none());
    }

    #[test]
    fn remove_takes_the_value_out_and_keeps_the_order() {
        let mut event = json!({ "a": 1, "user": { "name": "x", "password": "p" }, "z": 2,
                                "log.level": "info", "tags": ["t0", "t1"] });
        assert_eq!(path("user.password").remove(&mut event), Some(json!("p")));
        assert_eq!(path("a").remove(&mut event), Some(json!(1)));
        assert_eq!(path("log.level").remove(&mut event), Some(json!("info")));
        assert_eq!(path("tags[0]").remove(&mut event), Some(json!("t0")));
        assert_eq!(path("tags[5]").remove(&mut event), None);
        assert_eq!(path("missing.deep").remove(&mut event), None);
        assert_eq!(path("z.deep").remove(&mut event), None);
        assert_eq!(
            event,
            json!({ "user": { "name": "x" }, "z": 2, "tags": ["t1"] })
        );
        // The remaining keys keep the order a map built afresh would have (insertion order
        // with serde_json's `preserve_order`, sorted without it).
        let keys = |value: &Value| -> Vec<String> {
            value.as_object().expect("object").keys().cloned().collect()
        };
        let fresh = json!({ "user": { "name": "x" }, "z": 2, "tags": ["t1"] });
        assert_eq!(keys(&event), keys(&fresh));
    }

    #[test]
    fn set_creates_objects_and_replaces_values() {
        let mut event = json!({ "msg": "m" });
        path("a.b.c").set(&mut event, json!(1)).expect("created");
        path("msg").set(&mut event, json!("n")).expect("replaced");
        path("a.b.d").set(&mut event, json!(true)).expect("beside");
        assert_eq!(
            event,
            json!({ "msg": "n", "a": { "b": { "c": 1, "d": true } } })
        );
    }

    #[test]
    fn set_replaces_an_existing_flat_key_instead_of_nesting_beside_it() {
        let mut event = json!({ "log.level": "ERROR" });
        path("log.level")
            .set(&mut event, json!("error"))
            .expect("set");
        assert_eq!(event, json!({ "log.level": "error" }));
    }

    #[test]
    fn set_into_arrays_needs_existing_items() {
        let mut event = json!({ "items": [{ "id": 1 }] });
        path("items[0].seen")
            .set(&mut event, json!(true))
            .expect("set");
        assert_eq!(event, json!({ "items": [{ "id": 1, "seen": true }] }));
        let error = path("items[3].seen")
            .set(&mut event, json!(true))
            .expect_err("out of range");
        assert!(error.contains("index 3 is out of range"), "{error}");
        assert!(error.contains("`items` has 1 items"), "{error}");
        let error = path("list[0]")
            .set(&mut event, json!(1))
            .expect_err("no array");
        assert!(error.contains("`list` is missing"), "{error}");
        assert_eq!(event, json!({ "items": [{ "id": 1, "seen": true }] }));
    }

    #[test]
    fn set_through_a_scalar_fails_naming_it() {
        let mut event = json!({ "msg": "text", "user": { "id": 5 } });
        let before = event.clone();
        let error = path("msg.length")
            .set(&mut event, json!(4))
            .expect_err("msg is a string");
        assert_eq!(
            error,
            "cannot set `msg.length`: `msg` is a string, not an object"
        );
        let error = path("user.id.x")
            .set(&mut event, json!(4))
            .expect_err("id is a number");
        assert!(error.contains("`user.id` is a number"), "{error}");
        let error = path("user[0]")
            .set(&mut event, json!(4))
            .expect_err("user is an object");
        assert!(
            error.contains("`user` is an object, not an array"),
            "{error}"
        );
        assert_eq!(event, before);
    }

    #[test]
    fn set_on_a_top_level_that_is_not_an_object_fails() {
        let mut event = json!(["not", "an", "object"]);
        let error = path("a").set(&mut event, json!(1)).expect_err("array");
        assert!(error.contains("the event is an array"), "{error}");
    }
}

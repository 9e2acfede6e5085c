//! Settings of a route's shaping: the condition that picks its events (`when`), the transforms
//! that change them on the way, and the field paths and templates they name. Only settings live
//! here; [`crate::shape`] compiles them once at start-up (where every error is reported with the
//! key as written) and applies them to each event.

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// A condition on an event, written as one TOML table with one operator:
/// `{ field = "http.status", gte = 500 }`, `{ field = "level", one_of = ["error", "fatal"] }`,
/// `{ not = { field = "url", prefix = "/health" } }`, `{ all = [ ... ] }`, `{ any = [ ... ] }`.
///
/// A field operator (`equals`, `one_of`, `prefix`, `regex`, `exists`, `gt`, `gte`, `lt`, `lte`)
/// needs `field`; `not`, `all` and `any` take none. A missing field fails every operator except
/// `exists = false`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    /// The field the operator reads: dotted keys (`http.status`), array indexes (`items[0]`) and
    /// double-quoted keys that contain dots (`kubernetes.labels."app.kubernetes.io/name"`).
    /// A dotted path also finds ECS-style flat keys: `log.level` reads `{"log.level": ..}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The field equals this value. Numbers compare by value (`1` equals `1.0`); a string
    /// equals only a string (`"500"` does not equal `500`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<serde_json::Value>,
    /// The field equals one of these values (compared as `equals` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<serde_json::Value>>,
    /// The field is a string that starts with this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The field matches this regular expression anywhere (unanchored: write `^...$` for a
    /// whole match; Rust `regex` syntax). Strings are matched as they are, numbers and booleans
    /// on their JSON text (`500`, `true`); null, objects and arrays never match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// `true`: the field is present and not null. `false`: it is missing or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// The field is a number (or a string holding one, such as `"503"`) greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<f64>,
    /// The field is a number (or a string holding one) greater than or equal to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gte: Option<f64>,
    /// The field is a number (or a string holding one) less than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<f64>,
    /// The field is a number (or a string holding one) less than or equal to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lte: Option<f64>,
    /// The inner condition does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<ConditionConfig>>,
    /// Every condition of the list holds (at least one condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<ConditionConfig>>,
    /// At least one condition of the list holds (at least one condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<ConditionConfig>>,
}

/// One transform of a route, written as one TOML table whose operation key says what it does:
///
/// - `{ set = "env", value = "prod" }`: sets a field (a string value holding `{` is a template,
///   `{ set = "summary", value = "{service}: {msg}" }`);
/// - `{ rename = "msg", to = "message" }`;
/// - `{ remove = "password" }` or `{ remove = ["a", "b.c"] }`;
/// - `{ redact = "message", pattern = "\\d{16}" }` (or `redact = "*"` for every string);
/// - `{ parse_json = "payload" }`, optionally `into = "parsed"`;
/// - `{ add_metadata = "kafka" }`, optionally `cluster = "eu-1"`;
/// - `{ sample = 10 }`: keeps 1 event in 10;
/// - `{ throttle = 100.0 }`: at most 100 events a second per record key.
///
/// The other keys are settings of one operation and are refused with any other.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Sets the field at this path to `value`, creating the objects on the way. An existing
    /// field is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    /// `set` only: the value, any TOML value. A string holding `{` is a template: `{path}`
    /// inserts a field of the event, `{path|text}` with a fallback, `{level}`, `{service}`,
    /// `{date}`, `{@topic}`, `{@partition}`, `{@key}`, and strftime specifiers (`%Y %m %d %H`,
    /// `%b`, `%V`, ...) the record's time in UTC (`%%` and `{{ }}` for the characters themselves). A string without
    /// `{` is set as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    /// Moves the field at this path to `to`. A missing field changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rename: Option<String>,
    /// `rename` only: the new path of the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Removes the field, or each field of the list. Missing fields change nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove: Option<PathList>,
    /// Replaces every match of `pattern` in the string field, or each string field of the list;
    /// `"*"` means every string value anywhere in the event (write `"\"*\""` for a key named
    /// `*`). Fields that are not strings are left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact: Option<PathList>,
    /// `redact` only: the regular expression to replace (Rust `regex` syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `redact` only: what each match becomes. Default: `"[redacted]"`. `$1` or `${name}`
    /// insert a group of the match (keep the last digits of a card number), `$$` is a `$`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
    /// The string field at this path holds JSON: it is replaced by the parsed value (or the
    /// value is written to `into`). A missing field or one that is not a string changes
    /// nothing; a string that is not JSON fails the event (reason `transform_failed`) unless
    /// `on_error = "keep"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_json: Option<String>,
    /// `parse_json` only: where the parsed value goes; the string stays where it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
    /// `parse_json` only: what a string that is not JSON does: `fail` (the default: the event
    /// is dead-lettered with reason `transform_failed`) or `keep` (the event goes on unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnError>,
    /// Writes the record's Kafka metadata as an object at this path: `topic`, `partition`,
    /// `offset`, `timestamp` (milliseconds, when the record has one), `key` (when it is UTF-8)
    /// and `cluster` (when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_metadata: Option<String>,
    /// `add_metadata` only: the name written as `cluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Keeps 1 event in this many (at least 1). The choice is a hash of the record key, so all
    /// events of one key are kept or dropped together, alike on every replay and every
    /// instance; records without a key are chosen by topic, partition and offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<u64>,
    /// `sample` and `throttle` only: decide by this field of the event instead of the record
    /// key (a string by its text, other values by their JSON text). Events without the field
    /// are decided as if `by` were not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// At most this many events a second (more than 0) per record key, or per value of `by`;
    /// records without a key share one allowance. The rest are dropped or dead-lettered
    /// (`excess`). Each worker keeps its own allowance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<f64>,
    /// `throttle` only: how many events may pass at once after a quiet spell (at least 1).
    /// Default: the rate, and at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<f64>,
    /// `throttle` only: what happens to events over the rate: `drop` (the default: finished and
    /// counted) or `dead-letter` (parked with reason `throttled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excess: Option<Excess>,
    /// `throttle` only: how many keys each worker tracks (at least 1). Default: 10 000. When
    /// full, the key seen least recently is forgotten (its next event starts a full burst).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<usize>,
}

/// One field path or a list of them (`remove = "a"`, `remove = ["a", "b.c"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PathList {
    /// A single path.
    One(String),
    /// Several paths.
    Many(Vec<String>),
}

impl PathList {
    /// The paths as written, with the key suffix each is reported under (`""` for a single
    /// path, `"[1]"` for the second of a list).
    pub fn entries(&self) -> Vec<(String, &str)> {
        match self {
            PathList::One(path) => vec![(String::new(), path.as_str())],
            PathList::Many(paths) => paths
                .iter()
                .enumerate()
                .map(|(index, path)| (format!("[{index}]"), path.as_str()))
                .collect(),
        }
    }
}

// By hand rather than derived: an untagged enum's error ("did not match any variant") does not
// say what to write.
impl<'de> Deserialize<'de> for PathList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PathListVisitor;

        impl<'de> Visitor<'de> for PathListVisitor {
            type Value = PathList;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a field path or a list of field paths")
            }

            fn visit_str<E: de::Error>(self, path: &str) -> Result<PathList, E> {
                Ok(PathList::One(path.to_string()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PathList, A::Error> {
                let mut paths = Vec::new();
                while let Some(path) = seq.next_element::<String>()? {
                    paths.push(path);
                }
                Ok(PathList::Many(paths))
            }
        }

        deserializer.deserialize_any(PathListVisitor)
    }
}

/// What `parse_json` does with a string that is not JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// The event fails with reason `transform_failed` (and is dead-lettered).
    #[default]
    Fail,
    /// The event goes on unchanged.
    Keep,
}

/// What `throttle` does with events over the rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Excess {
    /// Finished and counted, not delivered.
    #[default]
    Drop,
    /// Parked in the dead-letter topic with reason `throttled`.
    DeadLetter,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Route {
        when: ConditionConfig,
        #[serde(default)]
        transforms: Vec<TransformConfig>,
    }

    #[test]
    fn a_field_condition_parses_from_an_inline_table() {
        let route: Route = toml::from_str(r#"when = { field = "http.status", gte = 500 }"#)
            .expect("valid condition");
        assert_eq!(
            route.when,
            ConditionConfig {
                field: Some("http.status".into()),
                gte: Some(500.0),
                ..ConditionConfig::default()
            }
        );
    }

    #[test]
    fn nested_conditions_parse() {
        let route: Route = toml::from_str(
            r#"when = { all = [ { field = "level", one_of = ["error","fatal"] }, { not = { field = "url", prefix = "/health" } } ] }"#,
        )
        .expect("valid condition");
        let all = route.when.all.expect("all");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].one_of, Some(vec![json!("error"), json!("fatal")]));
        let not = all[1].not.as_deref().expect("not");
        assert_eq!(not.field.as_deref(), Some("url"));
        assert_eq!(not.prefix.as_deref(), Some("/health"));
    }

    #[test]
    fn an_unknown_operator_is_refused_naming_the_known_ones() {
        let error = toml::from_str::<Route>(r#"when = { field = "msg", contains = "x" }"#)
            .expect_err("unknown operator");
        let message = error.to_string();
        assert!(message.contains("unknown field `contains`"), "{message}");
        assert!(message.contains("`one_of`"), "{message}");
        assert!(message.contains("`regex`"), "{message}");
    }

    #[test]
    fn transforms_parse_with_any_value_and_path_lists() {
        let route: Route = toml::from_str(
            r#"
            when = { field = "level", equals = "error" }
            transforms = [
                { set = "tags", value = { team = "core", weight = 2 } },
                { remove = ["password", "user.token"] },
                { redact = "*", pattern = "\\d{16}" },
                { parse_json = "payload", on_error = "keep" },
                { throttle = 100, excess = "dead-letter" },
                { sample = 10, by = "trace_id" },
            ]
            "#,
        )
        .expect("valid transforms");
        let transforms = route.transforms;
        assert_eq!(
            transforms[0].value,
            Some(json!({ "team": "core", "weight": 2 }))
        );
        assert_eq!(
            transforms[1].remove,
            Some(PathList::Many(vec!["password".into(), "user.token".into()]))
        );
        assert_eq!(transforms[2].redact, Some(PathList::One("*".into())));
        assert_eq!(transforms[2].pattern.as_deref(), Some("\\d{16}"));
        assert_eq!(transforms[3].on_error, Some(OnError::Keep));
        // An integer rate reads as a float.
        assert_eq!(transforms[4].throttle, Some(100.0));
        assert_eq!(transforms[4].excess, Some(Excess::DeadLetter));
        assert_eq!(transforms[5].sample, Some(10));
    }

    #[test]
    fn a_path_list_of_the_wrong_type_says_what_to_write() {
        let error = toml::from_str::<TransformConfig>("remove = 3").expect_err("a number");
        assert!(
            error
                .to_string()
                .contains("a field path or a list of field paths"),
            "{error}"
        );
    }

    #[test]
    fn an_unknown_transform_key_is_refused() {
        let error = toml::from_str::<TransformConfig>(r#"uppercase = "msg""#)
            .expect_err("unknown operation");
        assert!(error.to_string().contains("unknown field `uppercase`"));
    }

    #[test]
    fn path_list_entries_name_their_keys() {
        let one = PathList::One("a".into());
        assert_eq!(one.entries(), vec![(String::new(), "a")]);
        let many = PathList::Many(vec!["a".into(), "b".into()]);
        assert_eq!(
            many.entries(),
            vec![("[0]".to_string(), "a"), ("[1]".to_string(), "b")]
        );
    }

    #[test]
    fn settings_round_trip_without_empty_keys() {
        let config = TransformConfig {
            rename: Some("msg".into()),
            to: Some("message".into()),
            ..TransformConfig::default()
        };
        let text = toml::to_string(&config).expect("serialises");
        assert_eq!(text.trim(), "rename = \"msg\"\nto = \"message\"");
        let back: TransformConfig = toml::from_str(&text).expect("parses back");
        assert_eq!(back, config);
    }
}

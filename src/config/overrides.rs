//! `LOGBRIDGE_<SECTION>__<KEY>` environment overrides, typed by the field they set.
//!
//! An environment variable is text; the config file's fields are strings, numbers, booleans and
//! lists. A value is first read as what it looks like (`4096` a number, `true` a boolean,
//! `[a, b]` a list), but only where that reading gives back the same text (`0123` stays text);
//! where the field it sets wants a string (`password = 12345678`, a numeric `group_id`) it is
//! taken as the text it is, and a field that wants a list takes `a,b` as two items. A number in
//! a path is an index into a list of the file: `LOGBRIDGE_ROUTES__0__SINK__PATH` sets the first
//! route's sink path (an index past the end is an error naming the variable).

use figment::error::Kind;
use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;

use super::references::env_key;

const PREFIX: &str = "LOGBRIDGE_";

/// Extracts `T` from `base` (the config file) with the process's environment overrides on top.
pub fn extract<T: DeserializeOwned>(base: Figment) -> Result<T, Box<figment::Error>> {
    extract_with(base, std::env::vars_os())
}

/// [`extract`] with the given environment.
pub fn extract_with<T, I>(base: Figment, env: I) -> Result<T, Box<figment::Error>>
where
    T: DeserializeOwned,
    I: IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
{
    let file = base
        .data()
        .ok()
        .and_then(|mut profiles| profiles.remove(&Profile::Default))
        .unwrap_or_default();
    let mut overrides = Overrides::read(env, file)?;
    // Each round either succeeds, fails for good, or reads one more variable as what its field
    // wants; a variable changes its reading at most twice (guess, then text or list).
    for _ in 0..=2 * overrides.items.len() {
        match base.clone().merge(&overrides).extract::<T>() {
            Ok(value) => return Ok(value),
            Err(err) => {
                if !overrides.retype(&err) {
                    return Err(Box::new(err));
                }
            }
        }
    }
    base.merge(&overrides).extract::<T>().map_err(Box::new)
}

/// How a variable's text is read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reading {
    /// As what it looks like, where that gives back the same text.
    Guess,
    /// As the text it is.
    Text,
    /// As a list of the comma-separated items.
    List,
}

#[derive(Debug, Clone)]
struct Override {
    /// Lower case, one level per `__` (below `options`, `_` read as `.`).
    path: Vec<String>,
    raw: String,
    reading: Reading,
}

impl Override {
    fn value(&self) -> Value {
        match self.reading {
            Reading::Text => Value::from(self.raw.clone()),
            Reading::List => Value::from(
                self.raw
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| Value::from(item.to_string()))
                    .collect::<Vec<_>>(),
            ),
            Reading::Guess => guess(&self.raw),
        }
    }
}

/// `raw` as a boolean, number or list where it looks like one and reads back as the same text;
/// otherwise the text.
fn guess(raw: &str) -> Value {
    match raw {
        "true" => return Value::from(true),
        "false" => return Value::from(false),
        _ => {}
    }
    if let Ok(number) = raw.parse::<u64>() {
        if number.to_string() == raw {
            return Value::from(number);
        }
    }
    if let Ok(number) = raw.parse::<i64>() {
        if number.to_string() == raw {
            return Value::from(number);
        }
    }
    if let Ok(number) = raw.parse::<f64>() {
        if number.is_finite() && number.to_string() == raw {
            return Value::from(number);
        }
    }
    if raw.starts_with('[') && raw.ends_with(']') {
        if let Ok(list @ Value::Array(..)) = raw.parse::<Value>() {
            return list;
        }
    }
    Value::from(raw.to_string())
}

/// The overrides found in the environment, and the file's values they may index into.
#[derive(Debug, Clone)]
struct Overrides {
    items: Vec<Override>,
    file: Dict,
}

impl Overrides {
    fn read<I>(env: I, file: Dict) -> Result<Overrides, Box<figment::Error>>
    where
        I: IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    {
        let mut items = Vec::new();
        for (name, value) in env {
            let Some(name) = name.to_str() else { continue };
            let Some(key) = name.strip_prefix(PREFIX) else {
                continue;
            };
            // Every key lives in a section, so an override always has a `__`; other LOGBRIDGE_
            // variables (the log filter LOGBRIDGE_LOG, test settings) are not configuration.
            if !key.contains("__") {
                continue;
            }
            let Some(raw) = value.to_str() else {
                return Err(Box::new(figment::Error::from(format!(
                    "environment variable {name} is not valid UTF-8"
                ))));
            };
            let path: Vec<String> = env_key(key).split("__").map(str::to_string).collect();
            if path.iter().any(String::is_empty) {
                return Err(Box::new(figment::Error::from(format!(
                    "environment variable {name}: an empty level (`____` or a trailing `__`)"
                ))));
            }
            items.push(Override {
                path,
                raw: raw.to_string(),
                reading: Reading::Guess,
            });
        }
        // Deterministic: a later variable of the same key cannot depend on the environment's order.
        items.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Overrides { items, file })
    }

    /// Reads differently each variable whose field refused its value for its type; whether one did.
    fn retype(&mut self, err: &figment::Error) -> bool {
        let mut changed = false;
        for error in err.clone() {
            let Kind::InvalidType(_, expected) = &error.kind else {
                continue;
            };
            let next = if expected.contains("string") {
                Reading::Text
            } else if expected.contains("sequence") {
                Reading::List
            } else {
                continue;
            };
            let path: Vec<String> = error.path.iter().map(|p| p.to_ascii_lowercase()).collect();
            for item in &mut self.items {
                if item.path == path && item.reading == Reading::Guess {
                    item.reading = next;
                    changed = true;
                }
            }
        }
        changed
    }
}

/// The variable that sets `path`, as errors name it.
fn variable(path: &[&str]) -> String {
    let levels: Vec<String> = path
        .iter()
        .map(|level| level.to_ascii_uppercase().replace('.', "_"))
        .collect();
    format!("{PREFIX}{}", levels.join("__"))
}

/// Sets `value` at `path` below `node`; a level missing in `node` starts as the file's value
/// there if that is a list (so that an index reaches the file's items), else as a new table
/// (merged with the file's by figment).
fn set(
    node: &mut Value,
    file: Option<&Value>,
    path: &[String],
    walked: &[String],
    value: Value,
) -> Result<(), String> {
    let Some((level, rest)) = path.split_first() else {
        *node = value;
        return Ok(());
    };
    let walked: Vec<String> = walked.iter().chain([level]).cloned().collect();
    match node {
        Value::Array(_, items) => {
            let index: usize = level.parse().map_err(|_| {
                format!(
                    "`{}` is a list: the level after it is an index (0, 1, ...), not `{level}`",
                    walked[..walked.len() - 1].join(".")
                )
            })?;
            let len = items.len();
            let item = items.get_mut(index).ok_or_else(|| {
                format!(
                    "`{}` has {len} item(s) in the file: index {index} is past the end",
                    walked[..walked.len() - 1].join(".")
                )
            })?;
            set(item, None, rest, &walked, value)
        }
        Value::Dict(_, dict) => {
            let file_child = file.and_then(|file| match file {
                Value::Dict(_, fields) => fields.get(level.as_str()),
                _ => None,
            });
            let child = dict
                .entry(level.clone())
                .or_insert_with(|| match file_child {
                    Some(list @ Value::Array(..)) => list.clone(),
                    _ => Value::from(Dict::new()),
                });
            set(child, file_child, rest, &walked, value)
        }
        _ => {
            // A value where the path goes on: the path wins (the extraction names what is wrong).
            *node = Value::from(Dict::new());
            set(node, None, path, &walked[..walked.len() - 1], value)
        }
    }
}

impl Provider for Overrides {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("`{PREFIX}` environment variable(s)"))
            .interpolater(|_: &Profile, path: &[&str]| variable(path))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Value::from(Dict::new());
        let file = Value::Dict(Tag::Default, self.file.clone());
        for item in &self.items {
            set(&mut root, Some(&file), &item.path, &[], item.value()).map_err(|why| {
                let path: Vec<&str> = item.path.iter().map(String::as_str).collect();
                figment::Error::from(format!("environment variable {}: {why}", variable(&path)))
            })?;
        }
        let Value::Dict(_, dict) = root else {
            unreachable!("the root is a table")
        };
        let mut profiles = Map::new();
        profiles.insert(Profile::Default, dict);
        Ok(profiles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::{Format, Toml};
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Sample {
        section: Section,
        #[serde(default)]
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    struct Section {
        text: Option<String>,
        number: Option<u32>,
        flag: Option<bool>,
        list: Option<Vec<String>>,
        ratio: Option<f64>,
    }

    #[derive(Debug, Deserialize)]
    struct Item {
        name: String,
        path: Option<String>,
    }

    fn load(file: &str, env: &[(&str, &str)]) -> Result<Sample, String> {
        let env = env
            .iter()
            .map(|(name, value)| (name.into(), value.into()))
            .collect::<Vec<_>>();
        extract_with(Figment::new().merge(Toml::string(file)), env).map_err(|err| err.to_string())
    }

    const FILE: &str =
        "[section]\n[[items]]\nname = \"a\"\n[[items]]\nname = \"b\"\npath = \"/b\"\n";

    #[test]
    fn a_value_is_read_as_the_type_of_the_field_it_sets() {
        let sample = load(
            FILE,
            &[
                ("LOGBRIDGE_SECTION__TEXT", "12345678"),
                ("LOGBRIDGE_SECTION__NUMBER", "4096"),
                ("LOGBRIDGE_SECTION__FLAG", "true"),
                ("LOGBRIDGE_SECTION__RATIO", "0.25"),
                ("LOGBRIDGE_SECTION__LIST", "logs, audit"),
            ],
        )
        .expect("loads");
        assert_eq!(sample.section.text.as_deref(), Some("12345678"));
        assert_eq!(sample.section.number, Some(4096));
        assert_eq!(sample.section.flag, Some(true));
        assert_eq!(sample.section.ratio, Some(0.25));
        assert_eq!(
            sample.section.list,
            Some(vec!["logs".to_string(), "audit".to_string()])
        );
        for text in ["true", "0123", "-7", "1.50", "[x]", "  spaced  "] {
            let sample = load(FILE, &[("LOGBRIDGE_SECTION__TEXT", text)]).expect("loads");
            assert_eq!(sample.section.text.as_deref(), Some(text), "{text}");
        }
        let sample = load(FILE, &[("LOGBRIDGE_SECTION__LIST", "[logs, audit]")]).expect("loads");
        assert_eq!(sample.section.list.map(|list| list.len()), Some(2));
    }

    #[test]
    fn a_value_a_number_field_cannot_take_is_an_error_naming_the_variable() {
        let err = load(FILE, &[("LOGBRIDGE_SECTION__NUMBER", "lots")]).expect_err("not a number");
        assert!(err.contains("LOGBRIDGE_SECTION__NUMBER"), "{err}");
        // Leading zeros are text, which a number field refuses rather than misreads.
        let err = load(FILE, &[("LOGBRIDGE_SECTION__NUMBER", "0123")]).expect_err("text");
        assert!(err.contains("LOGBRIDGE_SECTION__NUMBER"), "{err}");
    }

    #[test]
    fn an_index_sets_a_field_of_one_item_of_a_list_of_the_file() {
        let sample = load(
            FILE,
            &[
                ("LOGBRIDGE_ITEMS__0__PATH", "/a"),
                ("LOGBRIDGE_ITEMS__1__NAME", "renamed"),
            ],
        )
        .expect("loads");
        assert_eq!(sample.items.len(), 2);
        assert_eq!(sample.items[0].name, "a");
        assert_eq!(sample.items[0].path.as_deref(), Some("/a"));
        assert_eq!(sample.items[1].name, "renamed");
        assert_eq!(sample.items[1].path.as_deref(), Some("/b"));
        let err = load(FILE, &[("LOGBRIDGE_ITEMS__2__PATH", "/c")]).expect_err("past the end");
        assert!(
            err.contains("LOGBRIDGE_ITEMS__2__PATH") && err.contains("2 item(s)"),
            "{err}"
        );
        let err = load(FILE, &[("LOGBRIDGE_ITEMS__FIRST__PATH", "/c")]).expect_err("no index");
        assert!(
            err.contains("LOGBRIDGE_ITEMS__FIRST__PATH") && err.contains("index"),
            "{err}"
        );
    }

    #[test]
    fn other_variables_are_not_configuration() {
        let sample = load(
            FILE,
            &[("LOGBRIDGE_LOG", "debug"), ("OTHER__SECTION__TEXT", "x")],
        )
        .expect("loads");
        assert_eq!(sample.section.text, None);
    }
}

//! What a configuration that cannot be loaded is told as: the key as it is written in the
//! config file (`routes[0].workers`), where it is (the file's line, or the environment
//! variable that set it), what is wrong, and for a misspelt key the closest one that exists.

use figment::error::Kind;
use toml_edit::{ImDocument, Item, Value};

/// One line per error of `err` (figment reports one at a time, but may chain several). `text`
/// is the TOML the file held, to find lines in.
pub fn describe(err: &figment::Error, text: Option<&str>) -> String {
    let document = text.and_then(|text| ImDocument::parse(text.to_string()).ok());
    let lines: Vec<String> = err
        .clone()
        .into_iter()
        .map(|error| describe_one(&error, document.as_ref()))
        .collect();
    lines.join("; ")
}

fn describe_one(error: &figment::Error, document: Option<&ImDocument<String>>) -> String {
    let mut path: Vec<String> = error.path.clone();
    // Some unknown keys (inside a sink, whose `type` picks its keys) come with the path of
    // their table only.
    if let Kind::UnknownField(name, _) = &error.kind {
        if path.last() != Some(name) {
            path.push(name.clone());
        }
    }
    let from_env = error
        .metadata
        .as_ref()
        .is_some_and(|metadata| metadata.name.contains("environment"));
    // Where: the variable for a value from the environment, the file's line otherwise.
    let place = if from_env {
        error.metadata.as_ref().map(|metadata| {
            let keys: Vec<&str> = path.iter().map(String::as_str).collect();
            let profile = error.profile.clone().unwrap_or_default();
            format!(" (set by {})", metadata.interpolate(&profile, &keys))
        })
    } else {
        document
            .and_then(|document| line_of(document, &path))
            .map(|line| format!(" (line {line})"))
    }
    .unwrap_or_default();
    let what = match &error.kind {
        Kind::UnknownField(name, known) => {
            let suggestion = closest(name, known)
                .map(|known| format!(": did you mean `{known}`?"))
                .unwrap_or_default();
            let listed: Vec<String> = known.iter().map(|known| format!("`{known}`")).collect();
            format!(
                "unknown key{suggestion} (the keys here: {})",
                listed.join(", ")
            )
        }
        Kind::MissingField(name) => {
            let key = key_text(&path);
            let full = if key.is_empty() {
                name.to_string()
            } else {
                format!("{key}.{name}")
            };
            return format!("`{full}` is required, and missing{place}");
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!("expected {}, found {actual}", plain(expected))
        }
        Kind::InvalidLength(length, expected) => {
            format!("expected {expected}, found {length} item(s)")
        }
        Kind::UnknownVariant(name, known) => {
            let suggestion = closest(name, known)
                .map(|known| format!(": did you mean `{known}`?"))
                .unwrap_or_default();
            let listed: Vec<String> = known.iter().map(|known| format!("`{known}`")).collect();
            format!(
                "unknown value `{name}`{suggestion} (one of {})",
                listed.join(", ")
            )
        }
        Kind::DuplicateField(name) => format!("`{name}` is given twice"),
        Kind::Message(message) => message.clone(),
        other => other.to_string(),
    };
    let key = key_text(&path);
    if key.is_empty() {
        // Not about one key: a file that cannot be read or is not TOML (the parser's message
        // names the line and column), or an environment variable that cannot be used.
        let source = error
            .metadata
            .as_ref()
            .and_then(|metadata| metadata.source.as_ref())
            .map(|source| format!(" ({source})"))
            .unwrap_or_default();
        format!("{}{source}", what.trim_end())
    } else {
        format!("`{key}`{place}: {what}")
    }
}

/// serde's names of Rust types in words.
fn plain(expected: &str) -> &str {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" | "bool" => "true or false",
        other => other,
    }
}

/// `routes[0].sink.path`, as the other configuration errors name keys; names with dots
/// quoted (`kafka.options."sasl.password"`).
fn key_text(path: &[String]) -> String {
    let mut out = String::new();
    for level in path {
        if level.parse::<usize>().is_ok() {
            out.push_str(&format!("[{level}]"));
            continue;
        }
        if !out.is_empty() {
            out.push('.');
        }
        if level.contains('.') {
            out.push_str(&format!("\"{level}\""));
        } else {
            out.push_str(level);
        }
    }
    out
}

/// The known name closest to `name`, if one is close enough to be a misspelling of it.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|known| (strsim::jaro_winkler(name, known), *known))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, known)| known)
}

/// The line (from 1) of the deepest part of `path` the document holds: the key itself, or the
/// table or item it should be in.
fn line_of(document: &ImDocument<String>, path: &[String]) -> Option<usize> {
    let mut best = None;
    locate(document.as_item(), path, &mut best);
    let start = best?;
    let text = document.raw();
    Some(text.get(..start)?.matches('\n').count() + 1)
}

/// Walks `path` below `item`, keeping in `best` the start of the last part found.
fn locate(item: &Item, path: &[String], best: &mut Option<usize>) {
    let Some((level, rest)) = path.split_first() else {
        return;
    };
    if let Ok(index) = level.parse::<usize>() {
        match item {
            Item::ArrayOfTables(tables) => {
                if let Some(table) = tables.get(index) {
                    if let Some(span) = table.span() {
                        *best = Some(span.start);
                    }
                    locate_in_table(table, rest, best);
                }
            }
            Item::Value(Value::Array(array)) => {
                if let Some(value) = array.get(index) {
                    if let Some(span) = value.span() {
                        *best = Some(span.start);
                    }
                    if let Value::InlineTable(table) = value {
                        locate_in_table(table, rest, best);
                    }
                }
            }
            _ => {}
        }
        return;
    }
    if let Some(table) = item.as_table_like() {
        if let Some((key, child)) = table.get_key_value(level) {
            if let Some(span) = key.span().or_else(|| child.span()) {
                *best = Some(span.start);
            }
            locate(child, rest, best);
        }
    }
}

fn locate_in_table(table: &dyn toml_edit::TableLike, path: &[String], best: &mut Option<usize>) {
    let Some((level, rest)) = path.split_first() else {
        return;
    };
    if let Some((key, child)) = table.get_key_value(level) {
        if let Some(span) = key.span().or_else(|| child.span()) {
            *best = Some(span.start);
        }
        locate(child, rest, best);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_named_as_written_with_their_line() {
        assert_eq!(
            key_text(&["routes".into(), "0".into(), "sink".into(), "path".into()]),
            "routes[0].sink.path"
        );
        assert_eq!(
            key_text(&["kafka".into(), "options".into(), "sasl.password".into()]),
            "kafka.options.\"sasl.password\""
        );
        let text = "[kafka]\nbrokers = \"b\"\ngroup = \"g\"\n\n[[routes]]\nname = \"a\"\n[[routes]]\nname = \"b\"\nsink = { type = \"file\", pat = \"x\" }\n";
        let document = ImDocument::parse(text.to_string()).expect("toml");
        let line = |path: &[&str]| {
            let path: Vec<String> = path.iter().map(|level| level.to_string()).collect();
            line_of(&document, &path)
        };
        assert_eq!(line(&["kafka", "group"]), Some(3));
        assert_eq!(line(&["routes", "1", "sink", "pat"]), Some(9));
        assert_eq!(
            line(&["routes", "1", "workers"]),
            Some(7),
            "the item it belongs in"
        );
        assert_eq!(line(&["nowhere"]), None);
    }

    #[test]
    fn a_misspelt_name_gets_the_closest_known_one() {
        let known = ["brokers", "group_id", "topics", "security", "options"];
        assert_eq!(closest("group", &known), Some("group_id"));
        assert_eq!(closest("brokerz", &known), Some("brokers"));
        assert_eq!(closest("topic", &known), Some("topics"));
        assert_eq!(closest("zzz", &known), None);
    }
}

//! Values that point elsewhere, so that secrets never sit in the file: `${env:NAME}` (an
//! environment variable) and `${file:/path}` (a file's content, one trailing newline dropped)
//! anywhere inside a string value, as Kafka Connect's config providers do. Also the shape of
//! librdkafka option tables: dotted names, whether written flat (`"sasl.password" = ...`), as
//! nested tables, or through environment overrides (which can only nest).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::{invalid, ConfigError, OptionValue};

/// Replaces every reference inside the string values of `value`. `key` is the path of `value`
/// (empty at the root); errors name the key whose reference cannot be resolved.
pub fn resolve(value: &mut Value, key: &str) -> Result<(), ConfigError> {
    match value {
        Value::String(text) => {
            if text.contains("${") {
                let resolved = expand(text, key)?;
                if text.contains("${file:") {
                    remember(&resolved, text);
                }
                *text = resolved;
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                resolve(item, &format!("{key}[{index}]"))?;
            }
        }
        Value::Object(fields) => {
            for (name, field) in fields.iter_mut() {
                resolve(field, &child_key(key, name))?;
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// `parent.name`, with names that hold dots quoted as the rest of the errors do
/// (`kafka.options."sasl.password"`).
fn child_key(parent: &str, name: &str) -> String {
    let name = if name.contains('.') {
        format!("\"{name}\"")
    } else {
        name.to_string()
    };
    if parent.is_empty() {
        name
    } else {
        format!("{parent}.{name}")
    }
}

fn expand(text: &str, key: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        // `$${` is a literal `${`.
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(invalid(
                key,
                "`${` without a closing `}`: write ${env:NAME}, ${env:NAME:-default} or ${file:/path} (`$${` is a literal `${`)",
            ));
        };
        out.push_str(&lookup(&after[..end], key)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup(reference: &str, key: &str) -> Result<String, ConfigError> {
    if let Some(name) = reference.strip_prefix("env:") {
        // `${env:NAME:-default}`: the default where NAME is unset or empty, as in the shell.
        if let Some((name, default)) = name.split_once(":-") {
            return Ok(match std::env::var(name) {
                Ok(value) if !value.is_empty() => value,
                _ => default.to_string(),
            });
        }
        return std::env::var(name).map_err(|err| {
            let why = match err {
                std::env::VarError::NotPresent => "is not set",
                std::env::VarError::NotUnicode(_) => "is not valid UTF-8",
            };
            invalid(key, format!("environment variable `{name}` {why}"))
        });
    }
    if let Some(path) = reference.strip_prefix("file:") {
        let content = std::fs::read_to_string(path)
            .map_err(|err| invalid(key, format!("cannot read {path}: {err}")))?;
        // `echo secret > file` leaves a newline that is not part of the secret.
        let content = content
            .strip_suffix('\n')
            .map(|line| line.strip_suffix('\r').unwrap_or(line))
            .unwrap_or(&content);
        return Ok(content.to_string());
    }
    Err(invalid(
        key,
        format!(
            "unknown reference `${{{reference}}}`: write ${{env:NAME}}, ${{env:NAME:-default}} or ${{file:/path}} (`$${{` is a literal `${{`)"
        ),
    ))
}

/// Values resolved from `${file:...}` references (the whole string value), each with the text
/// it was resolved from, so that a client holding the value can read the file again when it is
/// rewritten (a rotated token or password): see [`Reloading`]. A process loads one
/// configuration, so this holds a handful; it never takes more than [`MAX_FILE_VALUES`].
static FILE_VALUES: std::sync::LazyLock<std::sync::Mutex<HashMap<String, String>>> =
    std::sync::LazyLock::new(Default::default);

const MAX_FILE_VALUES: usize = 256;

fn remember(resolved: &str, template: &str) {
    let mut values = FILE_VALUES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if values.len() < MAX_FILE_VALUES || values.contains_key(resolved) {
        values.insert(resolved.to_string(), template.to_string());
    }
}

/// A value read through `${file:...}` references, read again (at most once per given interval)
/// to notice that a file was rewritten.
#[derive(Debug, Clone)]
pub struct Reloading {
    template: String,
    value: String,
    checked: Instant,
}

impl Reloading {
    /// `value` as read from its files, if it came from a `${file:...}` reference.
    pub fn of(value: &str) -> Option<Reloading> {
        let values = FILE_VALUES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        values.get(value).map(|template| Reloading {
            template: template.clone(),
            value: value.to_string(),
            checked: Instant::now(),
        })
    }

    /// Reads the files again if `every` has passed since the last time, and returns the new
    /// value if it differs. A file that cannot be read now (mid-rotation, gone) keeps the
    /// value as it was, with a warning.
    pub fn changed(&mut self, now: Instant, every: Duration) -> Option<&str> {
        if now.saturating_duration_since(self.checked) < every {
            return None;
        }
        self.checked = now;
        match expand(&self.template, "reloaded value") {
            Ok(fresh) if fresh != self.value => {
                remember(&fresh, &self.template);
                self.value = fresh;
                Some(&self.value)
            }
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read a referenced file again; keeping the value read before");
                None
            }
        }
    }
}

/// Maps an environment override's name (after the `LOGBRIDGE_` prefix) to a key path before
/// `__` is split into levels: below `options`, where librdkafka's names have dots and never
/// underscores, `_` stands for `.`. So `LOGBRIDGE_KAFKA__OPTIONS__SASL_PASSWORD` sets
/// `kafka.options."sasl.password"`.
pub fn env_key(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    match name.split_once("__options__") {
        Some((section, option)) => format!("{section}__options__{}", option.replace('_', ".")),
        None => name,
    }
}

/// An options table as written: values, or tables that nest dotted names.
#[derive(Deserialize)]
#[serde(untagged)]
enum OptionNode {
    Value(OptionValue),
    Table(BTreeMap<String, OptionNode>),
}

/// Reads an options table whose dotted names may have been nested (TOML `[kafka.options.sasl]`
/// or an environment override) into flat librdkafka names.
pub fn flat_options<'de, D>(deserializer: D) -> Result<BTreeMap<String, OptionValue>, D::Error>
where
    D: Deserializer<'de>,
{
    fn flatten(
        prefix: &str,
        table: BTreeMap<String, OptionNode>,
        out: &mut BTreeMap<String, OptionValue>,
    ) {
        for (name, node) in table {
            let name = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}.{name}")
            };
            match node {
                OptionNode::Value(value) => {
                    out.insert(name, value);
                }
                OptionNode::Table(table) => flatten(&name, table, out),
            }
        }
    }
    let table = BTreeMap::<String, OptionNode>::deserialize(deserializer)?;
    let mut out = BTreeMap::new();
    flatten("", table, &mut out);
    Ok(out)
}

#[cfg(test)]
// figment's Jail closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn env_and_file_references_are_replaced_inside_strings() {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cr3t\n").expect("write");
        let mut value = serde_json::json!({
            "kafka": {
                "brokers": "plain:9092",
                "security": {
                    "username": "${env:LOGBRIDGE_TEST_REFERENCE_USER}",
                    "password": format!("${{file:{}}}", secret.display()),
                },
                "options": {"sasl.oauthbearer.config": "id=${env:LOGBRIDGE_TEST_REFERENCE_USER} x"},
                "topics": ["a-${env:LOGBRIDGE_TEST_REFERENCE_USER}"],
            },
            "n": 3,
        });
        // Under figment's jail lock: the config tests clear the environment while they run.
        figment::Jail::expect_with(|jail| {
            jail.set_env("LOGBRIDGE_TEST_REFERENCE_USER", "alice");
            resolve(&mut value, "").map_err(|err| err.to_string())?;
            Ok(())
        });
        assert_eq!(value["kafka"]["security"]["username"], "alice");
        assert_eq!(value["kafka"]["security"]["password"], "s3cr3t");
        assert_eq!(
            value["kafka"]["options"]["sasl.oauthbearer.config"],
            "id=alice x"
        );
        assert_eq!(value["kafka"]["topics"][0], "a-alice");
        assert_eq!(value["kafka"]["brokers"], "plain:9092");
    }

    #[test]
    fn a_default_stands_in_for_an_unset_or_empty_variable_and_a_doubled_dollar_is_literal() {
        let mut value = serde_json::json!({
            "set": "${env:LOGBRIDGE_TEST_REFERENCE_SET:-fallback}",
            "unset": "${env:LOGBRIDGE_TEST_REFERENCE_UNSET:-fallback}",
            "empty": "${env:LOGBRIDGE_TEST_REFERENCE_EMPTY:-fallback}",
            "empty_default": "a${env:LOGBRIDGE_TEST_REFERENCE_UNSET:-}b",
            "literal": "$${env:LOGBRIDGE_TEST_REFERENCE_SET} costs $$5 and $${",
            "both": "$${x} ${env:LOGBRIDGE_TEST_REFERENCE_SET}",
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("LOGBRIDGE_TEST_REFERENCE_SET", "value");
            jail.set_env("LOGBRIDGE_TEST_REFERENCE_EMPTY", "");
            resolve(&mut value, "").map_err(|err| err.to_string())?;
            Ok(())
        });
        assert_eq!(value["set"], "value");
        assert_eq!(value["unset"], "fallback");
        assert_eq!(value["empty"], "fallback");
        assert_eq!(value["empty_default"], "ab");
        assert_eq!(
            value["literal"],
            "${env:LOGBRIDGE_TEST_REFERENCE_SET} costs $$5 and ${"
        );
        assert_eq!(value["both"], "${x} value");
    }

    #[test]
    fn a_file_value_is_read_again_when_the_file_is_rewritten() {
        let dir = tempfile::tempdir().expect("temp dir");
        let token = dir.path().join("token");
        std::fs::write(&token, "t1\n").expect("write");
        let mut value =
            serde_json::json!({"auth": format!("Bearer ${{file:{}}}", token.display())});
        resolve(&mut value, "").expect("resolves");
        assert_eq!(value["auth"], "Bearer t1");
        let mut reloading = Reloading::of("Bearer t1").expect("came from a file");
        assert!(Reloading::of("Bearer never-read").is_none());
        let every = Duration::from_secs(5);
        let start = Instant::now();
        assert_eq!(reloading.changed(start + every, every), None, "unchanged");
        std::fs::write(&token, "t2\n").expect("rewrite");
        assert_eq!(
            reloading.changed(start + every, every),
            None,
            "checked at most every 5 s"
        );
        assert_eq!(
            reloading.changed(start + every * 2, every),
            Some("Bearer t2")
        );
        assert_eq!(
            reloading.changed(start + every * 3, every),
            None,
            "read once"
        );
        // Mid-rotation the file is missing: the last value stays.
        std::fs::remove_file(&token).expect("remove");
        assert_eq!(reloading.changed(start + every * 4, every), None);
        assert!(
            Reloading::of("Bearer t2").is_some(),
            "the new value is known too"
        );
    }

    #[test]
    fn an_unresolvable_reference_names_its_key() {
        let cases = [
            (
                serde_json::json!({"kafka": {"security": {"password": "${env:LOGBRIDGE_TEST_SURELY_UNSET}"}}}),
                "`kafka.security.password`: environment variable `LOGBRIDGE_TEST_SURELY_UNSET` is not set",
            ),
            (
                serde_json::json!({"kafka": {"options": {"sasl.password": "${file:/nonexistent/pw}"}}}),
                "`kafka.options.\"sasl.password\"`: cannot read /nonexistent/pw",
            ),
            (
                serde_json::json!({"routes": [{"sink": {"topic": "${vault:x}"}}]}),
                "`routes[0].sink.topic`: unknown reference `${vault:x}`",
            ),
            (
                serde_json::json!({"kafka": {"brokers": "${env:X"}}),
                "`kafka.brokers`: `${` without a closing `}`",
            ),
        ];
        for (mut value, expected) in cases {
            let err = resolve(&mut value, "")
                .expect_err("unresolvable")
                .to_string();
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
    }

    #[test]
    fn option_names_from_the_environment_get_their_dots() {
        assert_eq!(
            env_key("KAFKA__OPTIONS__SASL_PASSWORD"),
            "kafka__options__sasl.password"
        );
        assert_eq!(
            env_key("DEAD_LETTER__OPTIONS__MESSAGE_TIMEOUT_MS"),
            "dead_letter__options__message.timeout.ms"
        );
        assert_eq!(
            env_key("KAFKA__SECURITY__CA_FILE"),
            "kafka__security__ca_file"
        );
        assert_eq!(
            env_key("PIPELINE__ROUTER_CAPACITY"),
            "pipeline__router_capacity"
        );
    }

    #[test]
    fn nested_option_tables_flatten_to_dotted_names() {
        #[derive(Deserialize)]
        struct Holder {
            #[serde(deserialize_with = "flat_options")]
            options: BTreeMap<String, OptionValue>,
        }
        let holder: Holder = toml::from_str(
            "[options]\n\"fetch.max.bytes\" = 10\n[options.sasl]\npassword = \"p\"\n[options.ssl.key]\npassword = \"k\"",
        )
        .expect("parses");
        let flat: Vec<String> = holder
            .options
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        assert_eq!(
            flat,
            [
                "fetch.max.bytes=10",
                "sasl.password=p",
                "ssl.key.password=k"
            ]
        );
    }
}

//! Conditions on events (a route's `when`): compiled once from [`ConditionConfig`], with regular
//! expressions and paths parsed up front, then evaluated per event without allocating.

use regex::Regex;
use serde_json::Value;

use super::{FieldPath, ShapeError};
use crate::config::shape::ConditionConfig;

/// A compiled condition.
#[derive(Debug, Clone)]
pub struct Condition {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Field { path: FieldPath, test: FieldTest },
    Not(Box<Condition>),
    All(Vec<Condition>),
    Any(Vec<Condition>),
}

#[derive(Debug, Clone)]
enum FieldTest {
    Equals(Value),
    OneOf(Vec<Value>),
    Prefix(String),
    Regex(Regex),
    Exists(bool),
    Compare(Comparison, f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comparison {
    Gt,
    Gte,
    Lt,
    Lte,
}

impl Comparison {
    fn symbol(self) -> &'static str {
        match self {
            Comparison::Gt => ">",
            Comparison::Gte => ">=",
            Comparison::Lt => "<",
            Comparison::Lte => "<=",
        }
    }

    fn holds(self, value: f64, bound: f64) -> bool {
        match self {
            Comparison::Gt => value > bound,
            Comparison::Gte => value >= bound,
            Comparison::Lt => value < bound,
            Comparison::Lte => value <= bound,
        }
    }
}

/// The operators, as written, for messages.
const OPERATORS: &str = "equals, one_of, prefix, regex, exists, gt, gte, lt, lte (with `field`), \
                         or not, all, any";

impl Condition {
    /// A condition no event meets (`any` of nothing).
    pub fn never() -> Condition {
        Condition {
            kind: Kind::Any(Vec::new()),
        }
    }

    /// Compiles `config`, found at `key` (such as `routes[2].when`); errors name the key of the
    /// part at fault (`routes[2].when.all[1].regex`).
    pub fn compile(config: &ConditionConfig, key: &str) -> Result<Condition, ShapeError> {
        let mut operators: Vec<&str> = Vec::new();
        let present = [
            ("equals", config.equals.is_some()),
            ("one_of", config.one_of.is_some()),
            ("prefix", config.prefix.is_some()),
            ("regex", config.regex.is_some()),
            ("exists", config.exists.is_some()),
            ("gt", config.gt.is_some()),
            ("gte", config.gte.is_some()),
            ("lt", config.lt.is_some()),
            ("lte", config.lte.is_some()),
            ("not", config.not.is_some()),
            ("all", config.all.is_some()),
            ("any", config.any.is_some()),
        ];
        for (name, is_set) in present {
            if is_set {
                operators.push(name);
            }
        }
        let operator = match operators.as_slice() {
            [] => {
                return Err(ShapeError::new(
                    key,
                    format!("no operator: write one of {OPERATORS}"),
                ))
            }
            [one] => *one,
            [first, second, ..] => {
                return Err(ShapeError::new(
                    key,
                    format!(
                        "`{first}` and `{second}` in one table: a condition has one operator; \
                         combine several with `all = [ ... ]` or `any = [ ... ]`"
                    ),
                ))
            }
        };

        let kind = match operator {
            "not" | "all" | "any" => {
                if config.field.is_some() {
                    return Err(ShapeError::new(
                        format!("{key}.field"),
                        format!(
                            "`{operator}` takes no `field`: put the field in the conditions \
                             inside it"
                        ),
                    ));
                }
                compile_group(config, operator, key)?
            }
            _ => {
                let Some(field) = &config.field else {
                    return Err(ShapeError::new(
                        key,
                        format!("`{operator}` needs a `field` to read"),
                    ));
                };
                let path = FieldPath::parse(field)
                    .map_err(|message| ShapeError::new(format!("{key}.field"), message))?;
                Kind::Field {
                    path,
                    test: compile_test(config, operator, key)?,
                }
            }
        };
        Ok(Condition { kind })
    }

    /// Whether the condition holds for `event`.
    pub fn holds(&self, event: &Value) -> bool {
        match &self.kind {
            Kind::Field { path, test } => test.holds(path.get(event)),
            Kind::Not(inner) => !inner.holds(event),
            Kind::All(conditions) => conditions.iter().all(|condition| condition.holds(event)),
            Kind::Any(conditions) => conditions.iter().any(|condition| condition.holds(event)),
        }
    }

    /// The condition in words, for `check-config`:
    /// `http.status >= 500 and not (url starts with "/health")`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Field { path, test } => match test {
                FieldTest::Equals(value) => format!("{path} == {value}"),
                FieldTest::OneOf(values) => {
                    let values: Vec<String> = values.iter().map(Value::to_string).collect();
                    format!("{path} is one of [{}]", values.join(", "))
                }
                FieldTest::Prefix(prefix) => format!("{path} starts with {}", quoted(prefix)),
                FieldTest::Regex(regex) => format!("{path} matches /{}/", regex.as_str()),
                FieldTest::Exists(true) => format!("{path} exists"),
                FieldTest::Exists(false) => format!("{path} does not exist"),
                FieldTest::Compare(comparison, bound) => {
                    format!("{path} {} {}", comparison.symbol(), number(*bound))
                }
            },
            Kind::Not(inner) => format!("not ({})", inner.describe()),
            Kind::All(conditions) => join(conditions, " and "),
            Kind::Any(conditions) => join(conditions, " or "),
        }
    }
}

/// Conditions joined by `and` or `or`, with a group inside another in parentheses so that
/// the reading is never ambiguous.
fn join(conditions: &[Condition], separator: &str) -> String {
    if let [only] = conditions {
        return only.describe();
    }
    conditions
        .iter()
        .map(|condition| match &condition.kind {
            Kind::All(inner) | Kind::Any(inner) if inner.len() > 1 => {
                format!("({})", condition.describe())
            }
            _ => condition.describe(),
        })
        .collect::<Vec<_>>()
        .join(separator)
}

fn quoted(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

/// `500` rather than `500.0` for whole numbers.
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        value.to_string()
    }
}

fn compile_group(config: &ConditionConfig, operator: &str, key: &str) -> Result<Kind, ShapeError> {
    if let Some(inner) = &config.not {
        return Ok(Kind::Not(Box::new(Condition::compile(
            inner,
            &format!("{key}.not"),
        )?)));
    }
    let list = match operator {
        "all" => config.all.as_deref(),
        _ => config.any.as_deref(),
    }
    .unwrap_or_default();
    if list.is_empty() {
        return Err(ShapeError::new(
            format!("{key}.{operator}"),
            "is empty: give it at least one condition",
        ));
    }
    let conditions = list
        .iter()
        .enumerate()
        .map(|(index, inner)| Condition::compile(inner, &format!("{key}.{operator}[{index}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match operator {
        "all" => Kind::All(conditions),
        _ => Kind::Any(conditions),
    })
}

fn compile_test(
    config: &ConditionConfig,
    operator: &str,
    key: &str,
) -> Result<FieldTest, ShapeError> {
    let bound = |value: Option<f64>, comparison: Comparison| -> Result<FieldTest, ShapeError> {
        match value {
            Some(bound) if bound.is_finite() => Ok(FieldTest::Compare(comparison, bound)),
            _ => Err(ShapeError::new(
                format!("{key}.{operator}"),
                "must be a finite number",
            )),
        }
    };
    match operator {
        "equals" => Ok(FieldTest::Equals(config.equals.clone().unwrap_or_default())),
        "one_of" => {
            let values = config.one_of.clone().unwrap_or_default();
            if values.is_empty() {
                return Err(ShapeError::new(
                    format!("{key}.one_of"),
                    "is empty: nothing would match; give it at least one value",
                ));
            }
            Ok(FieldTest::OneOf(values))
        }
        "prefix" => Ok(FieldTest::Prefix(config.prefix.clone().unwrap_or_default())),
        "regex" => {
            let pattern = config.regex.as_deref().unwrap_or_default();
            Regex::new(pattern)
                .map(FieldTest::Regex)
                .map_err(|error| ShapeError::new(format!("{key}.regex"), error.to_string()))
        }
        "exists" => Ok(FieldTest::Exists(config.exists.unwrap_or(true))),
        "gt" => bound(config.gt, Comparison::Gt),
        "gte" => bound(config.gte, Comparison::Gte),
        "lt" => bound(config.lt, Comparison::Lt),
        _ => bound(config.lte, Comparison::Lte),
    }
}

impl FieldTest {
    /// Whether the test holds for the field's value (`None`: the field is missing).
    fn holds(&self, value: Option<&Value>) -> bool {
        let Some(value) = value else {
            return matches!(self, FieldTest::Exists(false));
        };
        match self {
            FieldTest::Equals(expected) => equal(value, expected),
            FieldTest::OneOf(expected) => expected.iter().any(|one| equal(value, one)),
            FieldTest::Prefix(prefix) => value
                .as_str()
                .is_some_and(|text| text.starts_with(prefix.as_str())),
            FieldTest::Regex(regex) => match value {
                Value::String(text) => regex.is_match(text),
                // Numbers and booleans by their JSON text, so `regex = "^5\\d\\d$"` reads a
                // status code whichever way the logger wrote it.
                Value::Number(number) => regex.is_match(&number.to_string()),
                Value::Bool(flag) => regex.is_match(if *flag { "true" } else { "false" }),
                Value::Null | Value::Array(_) | Value::Object(_) => false,
            },
            FieldTest::Exists(expected) => *expected != value.is_null(),
            FieldTest::Compare(comparison, bound) => {
                numeric(value).is_some_and(|number| comparison.holds(number, *bound))
            }
        }
    }
}

/// A number, or a string that holds a finite one (`"503"`, `" 1.5 "`).
fn numeric(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|number| number.is_finite()),
        _ => None,
    }
}

/// JSON equality, except that numbers compare by value (`1` equals `1.0`), also inside arrays
/// and objects.
fn equal(value: &Value, expected: &Value) -> bool {
    match (value, expected) {
        (Value::Number(left), Value::Number(right)) => {
            // Integers exactly (an f64 cannot tell large ones apart), others by value.
            match (left.as_i64(), right.as_i64(), left.as_u64(), right.as_u64()) {
                (Some(left), Some(right), _, _) => left == right,
                (_, _, Some(left), Some(right)) => left == right,
                _ => left.as_f64() == right.as_f64(),
            }
        }
        (Value::Array(left), Value::Array(right)) => {
            left.len() == right.len() && left.iter().zip(right).all(|(l, r)| equal(l, r))
        }
        (Value::Object(left), Value::Object(right)) => {
            left.len() == right.len()
                && left
                    .iter()
                    .all(|(key, l)| right.get(key).is_some_and(|r| equal(l, r)))
        }
        _ => value == expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(text: &str) -> Condition {
        let config: ConditionConfig = toml::from_str(text).expect("valid TOML");
        Condition::compile(&config, "routes[0].when").unwrap_or_else(|error| panic!("{error}"))
    }

    fn refuse(text: &str) -> ShapeError {
        let config: ConditionConfig = toml::from_str(text).expect("valid TOML");
        Condition::compile(&config, "routes[0].when").expect_err("must not compile")
    }

    #[test]
    fn equals_compares_numbers_by_value_and_strings_as_strings() {
        let status = compile("field = \"status\"\nequals = 500");
        assert!(status.holds(&json!({ "status": 500 })));
        assert!(status.holds(&json!({ "status": 500.0 })));
        assert!(!status.holds(&json!({ "status": "500" })));
        assert!(!status.holds(&json!({ "status": 501 })));
        assert!(!status.holds(&json!({})));
        let ratio = compile("field = \"ratio\"\nequals = 1.0");
        assert!(ratio.holds(&json!({ "ratio": 1 })));
        let level = compile("field = \"level\"\nequals = \"error\"");
        assert!(level.holds(&json!({ "level": "error" })));
        assert!(!level.holds(&json!({ "level": "Error" })));
        let flag = compile("field = \"ok\"\nequals = false");
        assert!(flag.holds(&json!({ "ok": false })));
        assert!(!flag.holds(&json!({ "ok": 0 })));
        let tags = compile("field = \"tags\"\nequals = [1, \"a\"]");
        assert!(tags.holds(&json!({ "tags": [1.0, "a"] })));
        assert!(!tags.holds(&json!({ "tags": [1, "a", 2] })));
        let object = compile("field = \"o\"\nequals = { a = 1 }");
        assert!(object.holds(&json!({ "o": { "a": 1.0 } })));
        assert!(!object.holds(&json!({ "o": { "b": 1 } })));
    }

    #[test]
    fn equals_keeps_large_integers_apart() {
        let exact = Condition {
            kind: Kind::Field {
                path: FieldPath::parse("id").expect("path"),
                test: FieldTest::Equals(json!(9_007_199_254_740_993_u64)),
            },
        };
        assert!(exact.holds(&json!({ "id": 9_007_199_254_740_993_u64 })));
        assert!(!exact.holds(&json!({ "id": 9_007_199_254_740_992_u64 })));
    }

    #[test]
    fn one_of_matches_any_value() {
        let pino = compile("field = \"level\"\none_of = [50, 60]");
        assert!(pino.holds(&json!({ "level": 50, "msg": "boom", "time": 1 })));
        assert!(pino.holds(&json!({ "level": 60.0 })));
        assert!(!pino.holds(&json!({ "level": 30 })));
        let otel = compile("field = \"severityText\"\none_of = [\"ERROR\", \"FATAL\"]");
        assert!(otel.holds(&json!({ "severityText": "FATAL", "severityNumber": 21 })));
        assert!(!otel.holds(&json!({ "severityText": "INFO" })));
        assert!(!otel.holds(&json!({})));
    }

    #[test]
    fn prefix_reads_strings_only() {
        let health = compile("field = \"url\"\nprefix = \"/health\"");
        assert!(health.holds(&json!({ "url": "/healthz" })));
        assert!(!health.holds(&json!({ "url": "/api/health" })));
        assert!(!health.holds(&json!({ "url": ["/health"] })));
        assert!(!health.holds(&json!({})));
    }

    #[test]
    fn regex_is_unanchored_and_reads_numbers_and_booleans_as_json_text() {
        let timeout = compile("field = \"msg\"\nregex = \"time(d )?out\"");
        assert!(timeout.holds(&json!({ "msg": "upstream timed out after 30s" })));
        assert!(!timeout.holds(&json!({ "msg": "ok" })));
        let server_error = compile("field = \"status\"\nregex = '^5\\d\\d$'");
        assert!(server_error.holds(&json!({ "status": 503 })));
        assert!(server_error.holds(&json!({ "status": "502" })));
        assert!(!server_error.holds(&json!({ "status": 404 })));
        let truth = compile("field = \"ok\"\nregex = \"^true$\"");
        assert!(truth.holds(&json!({ "ok": true })));
        let anything = compile("field = \"x\"\nregex = \"\"");
        assert!(!anything.holds(&json!({ "x": null })));
        assert!(!anything.holds(&json!({ "x": {} })));
        assert!(!anything.holds(&json!({})));
    }

    #[test]
    fn exists_treats_null_as_absent() {
        let present = compile("field = \"trace_id\"\nexists = true");
        let absent = compile("field = \"trace_id\"\nexists = false");
        for (event, exists) in [
            (json!({ "trace_id": "abc" }), true),
            (json!({ "trace_id": "" }), true),
            (json!({ "trace_id": null }), false),
            (json!({}), false),
        ] {
            assert_eq!(present.holds(&event), exists, "{event}");
            assert_eq!(absent.holds(&event), !exists, "{event}");
        }
    }

    #[test]
    fn comparisons_read_numbers_and_numeric_strings() {
        let gt = compile("field = \"n\"\ngt = 5");
        let gte = compile("field = \"n\"\ngte = 5");
        let lt = compile("field = \"n\"\nlt = 5");
        let lte = compile("field = \"n\"\nlte = 5");
        let check = |n: Value, expected: [bool; 4]| {
            let event = json!({ "n": n });
            let got = [
                gt.holds(&event),
                gte.holds(&event),
                lt.holds(&event),
                lte.holds(&event),
            ];
            assert_eq!(got, expected, "{event}");
        };
        check(json!(4), [false, false, true, true]);
        check(json!(5), [false, true, false, true]);
        check(json!(5.5), [true, true, false, false]);
        check(json!("6"), [true, true, false, false]);
        check(json!(" 4.5 "), [false, false, true, true]);
        // Not numbers: every comparison fails.
        check(json!("six"), [false; 4]);
        check(json!("inf"), [false; 4]);
        check(json!("NaN"), [false; 4]);
        check(json!(true), [false; 4]);
        check(json!(null), [false; 4]);
        assert!(!gt.holds(&json!({})));
        assert!(!lt.holds(&json!({})));
    }

    #[test]
    fn not_all_and_any_combine() {
        let condition = compile(
            r#"all = [ { field = "level", one_of = ["error","fatal"] }, { not = { field = "url", prefix = "/health" } } ]"#,
        );
        assert!(condition.holds(&json!({ "level": "error", "url": "/api" })));
        assert!(condition.holds(&json!({ "level": "fatal" })));
        assert!(!condition.holds(&json!({ "level": "error", "url": "/healthz" })));
        assert!(!condition.holds(&json!({ "level": "info", "url": "/api" })));

        let any = compile(
            r#"any = [ { field = "severity", equals = "ERROR" }, { field = "log.level", equals = "error" } ]"#,
        );
        // GCP and ECS shapes.
        assert!(any.holds(&json!({ "severity": "ERROR", "message": "m" })));
        assert!(any.holds(&json!({ "@timestamp": "t", "log.level": "error", "message": "m" })));
        assert!(!any.holds(&json!({ "severity": "INFO" })));
    }

    #[test]
    fn describe_reads_like_the_condition() {
        let condition = compile(
            r#"all = [ { field = "http.status", gte = 500 }, { not = { field = "url", prefix = "/health" } } ]"#,
        );
        assert_eq!(
            condition.describe(),
            r#"http.status >= 500 and not (url starts with "/health")"#
        );
        let nested = compile(
            r#"any = [ { field = "a", exists = true }, { all = [ { field = "b", lt = 1.5 }, { field = "c", regex = "x+" } ] } ]"#,
        );
        assert_eq!(
            nested.describe(),
            "a exists or (b < 1.5 and c matches /x+/)"
        );
        let one_of = compile(
            r#"field = "level"
one_of = ["error", 50]"#,
        );
        assert_eq!(one_of.describe(), r#"level is one of ["error", 50]"#);
        assert_eq!(
            compile("field = \"x\"\nequals = \"y\"").describe(),
            r#"x == "y""#
        );
        assert_eq!(
            compile("field = \"x\"\nexists = false").describe(),
            "x does not exist"
        );
        assert_eq!(
            compile("all = [ { field = \"x\", gt = 1 } ]").describe(),
            "x > 1"
        );
    }

    #[test]
    fn a_table_without_an_operator_is_refused() {
        let error = refuse("field = \"x\"");
        assert_eq!(error.key, "routes[0].when");
        assert!(error.message.contains("no operator"), "{error}");
        assert!(error.message.contains("one_of"), "{error}");
    }

    #[test]
    fn two_operators_in_one_table_are_refused() {
        let error = refuse("field = \"x\"\ngt = 1\nlt = 5");
        assert_eq!(error.key, "routes[0].when");
        assert!(error.message.contains("`gt` and `lt`"), "{error}");
    }

    #[test]
    fn field_operators_need_a_field_and_groups_refuse_one() {
        let error = refuse("prefix = \"/\"");
        assert_eq!(error.key, "routes[0].when");
        assert!(error.message.contains("needs a `field`"), "{error}");
        let error = refuse("field = \"x\"\nnot = { field = \"y\", exists = true }");
        assert_eq!(error.key, "routes[0].when.field");
        assert!(error.message.contains("takes no `field`"), "{error}");
    }

    #[test]
    fn empty_lists_are_refused() {
        assert_eq!(refuse("all = []").key, "routes[0].when.all");
        assert_eq!(refuse("any = []").key, "routes[0].when.any");
        assert_eq!(
            refuse("field = \"x\"\none_of = []").key,
            "routes[0].when.one_of"
        );
    }

    #[test]
    fn nested_errors_name_the_nested_key() {
        let error = refuse(
            r#"all = [ { field = "a", exists = true }, { not = { field = "b", regex = "(unclosed" } } ]"#,
        );
        assert_eq!(error.key, "routes[0].when.all[1].not.regex");
        assert!(error.message.contains("unclosed group"), "{error}");
        let error = refuse(r#"any = [ { field = "a..b", exists = true } ]"#);
        assert_eq!(error.key, "routes[0].when.any[0].field");
        assert!(error.message.contains("empty key"), "{error}");
    }

    #[test]
    fn a_bound_that_is_not_finite_is_refused() {
        let error = refuse("field = \"x\"\ngt = nan");
        assert_eq!(error.key, "routes[0].when.gt");
        let error = refuse("field = \"x\"\nlte = inf");
        assert_eq!(error.key, "routes[0].when.lte");
    }
}

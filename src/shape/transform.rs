//! Transforms: the changes a route makes to its events before they reach its sink (set,
//! rename, remove, redact, parse embedded JSON, add Kafka metadata) and the two that let only
//! some through (sample, throttle).
//!
//! [`Transforms`] is compiled once from the route's [`TransformConfig`] list and shared by all
//! workers; each worker owns a [`TransformState`] (the throttle buckets), so applying needs no
//! lock. Time is passed in, which keeps the throttle testable without sleeping.
//!
//! [`Outcome::Keep`] says whether anything really changed: an unchanged event is forwarded as
//! its original bytes, so a transform that finds nothing to do must not report a change.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use regex::Regex;
use serde_json::{Map, Value};

use super::{Context, FieldPath, Sanitize, ShapeError, Template};
use crate::config::shape::{Excess, OnError, PathList, TransformConfig};

/// The compiled transforms of one route, applied in order.
#[derive(Debug, Clone, Default)]
pub struct Transforms {
    steps: Vec<Step>,
}

/// Mutable state of one worker's transforms: a token bucket per key for each throttle.
#[derive(Debug, Default)]
pub struct TransformState {
    throttles: Vec<Buckets>,
}

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event goes on; `changed` is false when every transform left it as it was (the
    /// original bytes can then be forwarded).
    Keep {
        /// Some transform changed the event.
        changed: bool,
    },
    /// A `sample` left the event out.
    SampledOut,
    /// A `throttle` found the event over its rate.
    Throttled {
        /// `excess = "dead-letter"`: park the event rather than drop it.
        dead_letter: bool,
    },
}

/// An event a transform could not handle (a string that is not JSON, a field to set inside a
/// string). The event may be partly changed: dead-letter the original bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TransformError {
    /// The dead-letter reason: always `transform_failed`.
    pub reason: &'static str,
    /// Which transform (its key and operation) and which field, and what went wrong.
    pub message: String,
}

/// The dead-letter reason of a [`TransformError`].
const TRANSFORM_FAILED: &str = "transform_failed";

/// The operation keys, as written, for messages.
const OPERATIONS: [&str; 8] = [
    "set",
    "rename",
    "remove",
    "redact",
    "parse_json",
    "add_metadata",
    "sample",
    "throttle",
];

/// Default of `replacement`.
const REDACTED: &str = "[redacted]";

/// Default of `max_keys`.
const DEFAULT_MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone)]
struct Step {
    /// The key of this transform (`routes[0].transforms[2]`), for messages.
    key: String,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Set {
        path: FieldPath,
        value: SetValue,
    },
    Rename {
        from: FieldPath,
        to: FieldPath,
    },
    Remove {
        paths: Vec<FieldPath>,
    },
    Redact {
        fields: RedactFields,
        pattern: Regex,
        replacement: String,
    },
    ParseJson {
        field: FieldPath,
        into: Option<FieldPath>,
        keep_on_error: bool,
    },
    AddMetadata {
        path: FieldPath,
        cluster: Option<String>,
    },
    Sample {
        one_in: u64,
        by: Option<FieldPath>,
    },
    Throttle {
        rate: f64,
        burst: f64,
        by: Option<FieldPath>,
        dead_letter: bool,
        max_keys: usize,
        /// This throttle's buckets in [`TransformState::throttles`].
        slot: usize,
    },
}

#[derive(Debug, Clone)]
enum SetValue {
    Fixed(Value),
    Template(Template),
}

#[derive(Debug, Clone)]
enum RedactFields {
    /// `redact = "*"`: every string value anywhere in the event.
    Everything,
    Paths(Vec<FieldPath>),
}

impl Transforms {
    /// Compiles the transforms found at `key` (such as `routes[0].transforms`); errors name the
    /// key of the setting at fault (`routes[0].transforms[2].pattern`).
    pub fn compile(configs: &[TransformConfig], key: &str) -> Result<Transforms, ShapeError> {
        let mut throttles = 0;
        let steps = configs
            .iter()
            .enumerate()
            .map(|(index, config)| {
                let key = format!("{key}[{index}]");
                let op = compile_op(config, &key, &mut throttles)?;
                Ok(Step { key, op })
            })
            .collect::<Result<Vec<_>, ShapeError>>()?;
        Ok(Transforms { steps })
    }

    /// A fresh state for one worker.
    pub fn state(&self) -> TransformState {
        let throttles = self
            .steps
            .iter()
            .filter(|step| matches!(step.op, Op::Throttle { .. }))
            .count();
        TransformState {
            throttles: (0..throttles).map(|_| Buckets::default()).collect(),
        }
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether applying reads the event. When only `sample` and `throttle` without `by` are
    /// configured it does not, and the caller may pass any value (`Value::Null`) instead of
    /// parsing the record.
    pub fn needs_event(&self) -> bool {
        self.steps.iter().any(|step| {
            !matches!(
                step.op,
                Op::Sample { by: None, .. } | Op::Throttle { by: None, .. }
            )
        })
    }

    /// One line per transform, as understood, for `check-config`.
    pub fn describe(&self) -> Vec<String> {
        self.steps.iter().map(|step| step.op.describe()).collect()
    }

    /// Applies the transforms in order to `event` (a JSON object) until one leaves the event
    /// out. `now` is the time the throttles count with.
    pub fn apply(
        &self,
        state: &mut TransformState,
        event: &mut Value,
        ctx: &Context,
        now: Instant,
    ) -> Result<Outcome, TransformError> {
        let mut changed = false;
        for step in &self.steps {
            match &step.op {
                Op::Set { path, value } => {
                    let value = match value {
                        SetValue::Fixed(value) => value.clone(),
                        SetValue::Template(template) => template
                            .render(Some(event), ctx)
                            .map(Value::String)
                            .map_err(|missing| step.fail(missing.to_string()))?,
                    };
                    path.set(event, value)
                        .map_err(|message| step.fail(message))?;
                    changed = true;
                }
                Op::Rename { from, to } => {
                    if let Some(value) = from.remove(event) {
                        to.set(event, value).map_err(|message| step.fail(message))?;
                        changed = true;
                    }
                }
                Op::Remove { paths } => {
                    for path in paths {
                        changed |= path.remove(event).is_some();
                    }
                }
                Op::Redact {
                    fields,
                    pattern,
                    replacement,
                } => {
                    let mut redact = |text: &mut String| redact(text, pattern, replacement);
                    match fields {
                        RedactFields::Everything => changed |= redact_all(event, &mut redact),
                        RedactFields::Paths(paths) => {
                            for path in paths {
                                if let Some(Value::String(text)) = path.get_mut(event) {
                                    changed |= redact(text);
                                }
                            }
                        }
                    }
                }
                Op::ParseJson {
                    field,
                    into,
                    keep_on_error,
                } => {
                    let Some(Value::String(text)) = field.get(event) else {
                        continue;
                    };
                    let parsed = match serde_json::from_str::<Value>(text) {
                        Ok(parsed) => parsed,
                        Err(_) if *keep_on_error => continue,
                        Err(error) => {
                            return Err(step.fail(format!("`{field}` is not JSON: {error}")))
                        }
                    };
                    let target = into.as_ref().unwrap_or(field);
                    target
                        .set(event, parsed)
                        .map_err(|message| step.fail(message))?;
                    changed = true;
                }
                Op::AddMetadata { path, cluster } => {
                    path.set(event, metadata(ctx, cluster.as_deref()))
                        .map_err(|message| step.fail(message))?;
                    changed = true;
                }
                Op::Sample { one_in, by } => {
                    let hash = by
                        .as_ref()
                        .and_then(|by| field_hash(by, event))
                        .unwrap_or_else(|| record_hash(ctx));
                    if !sampled_in(hash, *one_in) {
                        return Ok(Outcome::SampledOut);
                    }
                }
                Op::Throttle {
                    rate,
                    burst,
                    by,
                    dead_letter,
                    max_keys,
                    slot,
                } => {
                    let key = by
                        .as_ref()
                        .and_then(|by| field_hash(by, event))
                        .or_else(|| ctx.key.map(|key| fnv1a(FNV_OFFSET, key)));
                    // A state made by another `Transforms` (it never is) gets the buckets it
                    // lacks rather than a panic.
                    if state.throttles.len() <= *slot {
                        state.throttles.resize_with(*slot + 1, Buckets::default);
                    }
                    let buckets = &mut state.throttles[*slot];
                    if !buckets.admit(key, *rate, *burst, *max_keys, now) {
                        return Ok(Outcome::Throttled {
                            dead_letter: *dead_letter,
                        });
                    }
                }
            }
        }
        Ok(Outcome::Keep { changed })
    }
}

impl TransformState {
    /// How many throttle keys were forgotten because `max_keys` were tracked, in all throttles.
    pub fn evictions(&self) -> u64 {
        self.throttles.iter().map(|buckets| buckets.evictions).sum()
    }

    /// How many throttle keys are tracked now, in all throttles.
    pub fn tracked_keys(&self) -> usize {
        self.throttles
            .iter()
            .map(|buckets| buckets.by_key.len() + usize::from(buckets.shared.is_some()))
            .sum()
    }
}

impl Step {
    fn fail(&self, problem: String) -> TransformError {
        TransformError {
            reason: TRANSFORM_FAILED,
            message: format!("`{}` ({}): {problem}", self.key, self.op.name()),
        }
    }
}

impl Op {
    /// The operation and its main field, as written: `parse_json payload`.
    fn name(&self) -> String {
        match self {
            Op::Set { path, .. } => format!("set {path}"),
            Op::Rename { from, to } => format!("rename {from} to {to}"),
            Op::Remove { .. } => "remove".to_string(),
            Op::Redact { .. } => "redact".to_string(),
            Op::ParseJson { field, .. } => format!("parse_json {field}"),
            Op::AddMetadata { path, .. } => format!("add_metadata {path}"),
            Op::Sample { .. } => "sample".to_string(),
            Op::Throttle { .. } => "throttle".to_string(),
        }
    }

    fn describe(&self) -> String {
        let list = |paths: &[FieldPath]| {
            paths
                .iter()
                .map(FieldPath::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let by = |by: &Option<FieldPath>| match by {
            Some(path) => format!("field {path}"),
            None => "record key".to_string(),
        };
        match self {
            Op::Set {
                path,
                value: SetValue::Fixed(value),
            } => format!("set {path} = {value}"),
            Op::Set {
                path,
                value: SetValue::Template(template),
            } => format!("set {path} = template {}", template.describe()),
            Op::Rename { from, to } => format!("rename {from} to {to}"),
            Op::Remove { paths } => format!("remove {}", list(paths)),
            Op::Redact {
                fields,
                pattern,
                replacement,
            } => {
                let fields = match fields {
                    RedactFields::Everything => "every string".to_string(),
                    RedactFields::Paths(paths) => list(paths),
                };
                let replacement = Value::String(replacement.clone());
                format!(
                    "redact /{}/ with {replacement} in {fields}",
                    pattern.as_str()
                )
            }
            Op::ParseJson {
                field,
                into,
                keep_on_error,
            } => {
                let into = match into {
                    Some(into) => format!(" into {into}"),
                    None => String::new(),
                };
                let otherwise = if *keep_on_error {
                    "keep the event as it is"
                } else {
                    "fail the event"
                };
                format!("parse_json {field}{into} (not JSON: {otherwise})")
            }
            Op::AddMetadata { path, cluster } => match cluster {
                Some(cluster) => format!(
                    "add_metadata at {path} (cluster {})",
                    Value::String(cluster.clone())
                ),
                None => format!("add_metadata at {path}"),
            },
            Op::Sample { one_in, by: field } => format!("sample 1 in {one_in} by {}", by(field)),
            Op::Throttle {
                rate,
                burst,
                by: field,
                dead_letter,
                max_keys,
                ..
            } => {
                let per = match field {
                    Some(path) => format!("per value of field {path}"),
                    None => "per record key".to_string(),
                };
                let excess = if *dead_letter {
                    "dead-lettered"
                } else {
                    "dropped"
                };
                format!(
                    "throttle {rate}/s (burst {burst}) {per}, excess {excess}, at most \
                     {max_keys} keys per worker"
                )
            }
        }
    }
}

fn compile_op(
    config: &TransformConfig,
    key: &str,
    throttles: &mut usize,
) -> Result<Op, ShapeError> {
    let present = [
        config.set.is_some(),
        config.rename.is_some(),
        config.remove.is_some(),
        config.redact.is_some(),
        config.parse_json.is_some(),
        config.add_metadata.is_some(),
        config.sample.is_some(),
        config.throttle.is_some(),
    ];
    let named: Vec<&str> = OPERATIONS
        .iter()
        .zip(present)
        .filter_map(|(name, is_set)| is_set.then_some(*name))
        .collect();
    let operation = match named.as_slice() {
        [] => {
            return Err(ShapeError::new(
                key,
                format!("no operation: write one of {}", OPERATIONS.join(", ")),
            ))
        }
        [one] => *one,
        [first, second, ..] => {
            return Err(ShapeError::new(
                key,
                format!(
                    "`{first}` and `{second}` in one table: a transform does one of {}; write \
                     one table for each",
                    OPERATIONS.join(", ")
                ),
            ))
        }
    };

    // Settings of another operation are mistakes (a `to` under `set` is a rename that will
    // not happen), so they are refused rather than ignored.
    let settings: [(&str, bool, &[&str]); 11] = [
        ("value", config.value.is_some(), &["set"]),
        ("to", config.to.is_some(), &["rename"]),
        ("pattern", config.pattern.is_some(), &["redact"]),
        ("replacement", config.replacement.is_some(), &["redact"]),
        ("into", config.into.is_some(), &["parse_json"]),
        ("on_error", config.on_error.is_some(), &["parse_json"]),
        ("cluster", config.cluster.is_some(), &["add_metadata"]),
        ("by", config.by.is_some(), &["sample", "throttle"]),
        ("burst", config.burst.is_some(), &["throttle"]),
        ("excess", config.excess.is_some(), &["throttle"]),
        ("max_keys", config.max_keys.is_some(), &["throttle"]),
    ];
    for (setting, is_set, owners) in settings {
        if is_set && !owners.contains(&operation) {
            let owners = owners
                .iter()
                .map(|owner| format!("`{owner}`"))
                .collect::<Vec<_>>()
                .join(" and ");
            return Err(ShapeError::new(
                format!("{key}.{setting}"),
                format!("is a setting of {owners}, not of `{operation}`"),
            ));
        }
    }

    let path = |text: &Option<String>, name: &str| -> Result<FieldPath, ShapeError> {
        FieldPath::parse(text.as_deref().unwrap_or_default())
            .map_err(|message| ShapeError::new(format!("{key}.{name}"), message))
    };
    let optional_path = |text: &Option<String>, name: &str| -> Result<_, ShapeError> {
        text.as_ref().map(|_| path(text, name)).transpose()
    };
    let required = |is_set: bool, setting: &str| -> Result<(), ShapeError> {
        if is_set {
            Ok(())
        } else {
            Err(ShapeError::new(
                key,
                format!("`{operation}` needs `{setting}`"),
            ))
        }
    };

    let op = match operation {
        "set" => {
            let Some(value) = &config.value else {
                return Err(ShapeError::new(key, "`set` needs `value`"));
            };
            let value =
                match value {
                    Value::String(text) if text.contains('{') => SetValue::Template(
                        Template::parse(text, Sanitize::None, &format!("{key}.value"))?,
                    ),
                    other => SetValue::Fixed(other.clone()),
                };
            Op::Set {
                path: path(&config.set, "set")?,
                value,
            }
        }
        "rename" => {
            required(config.to.is_some(), "to")?;
            Op::Rename {
                from: path(&config.rename, "rename")?,
                to: path(&config.to, "to")?,
            }
        }
        "remove" => Op::Remove {
            paths: path_list(config.remove.as_ref(), key, "remove")?,
        },
        "redact" => {
            required(config.pattern.is_some(), "pattern")?;
            let pattern = Regex::new(config.pattern.as_deref().unwrap_or_default())
                .map_err(|error| ShapeError::new(format!("{key}.pattern"), error.to_string()))?;
            let everything = match &config.redact {
                Some(PathList::One(path)) => path == "*",
                Some(PathList::Many(paths)) => paths.iter().any(|path| path == "*"),
                None => false,
            };
            let fields = if everything {
                RedactFields::Everything
            } else {
                RedactFields::Paths(path_list(config.redact.as_ref(), key, "redact")?)
            };
            Op::Redact {
                fields,
                pattern,
                replacement: config
                    .replacement
                    .clone()
                    .unwrap_or_else(|| REDACTED.to_string()),
            }
        }
        "parse_json" => Op::ParseJson {
            field: path(&config.parse_json, "parse_json")?,
            into: optional_path(&config.into, "into")?,
            keep_on_error: config.on_error == Some(OnError::Keep),
        },
        "add_metadata" => Op::AddMetadata {
            path: path(&config.add_metadata, "add_metadata")?,
            cluster: config.cluster.clone(),
        },
        "sample" => {
            let one_in = config.sample.unwrap_or_default();
            if one_in == 0 {
                return Err(ShapeError::new(
                    format!("{key}.sample"),
                    "must be at least 1 (1 keeps every event, 10 keeps one in ten)",
                ));
            }
            Op::Sample {
                one_in,
                by: optional_path(&config.by, "by")?,
            }
        }
        _ => {
            let rate = config.throttle.unwrap_or_default();
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ShapeError::new(
                    format!("{key}.throttle"),
                    "must be a number of events a second greater than 0",
                ));
            }
            let burst = config.burst.unwrap_or(rate.max(1.0));
            if !(burst.is_finite() && burst >= 1.0) {
                return Err(ShapeError::new(
                    format!("{key}.burst"),
                    "must be at least 1: a smaller bucket would never let an event through",
                ));
            }
            let max_keys = config.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
            if max_keys == 0 {
                return Err(ShapeError::new(
                    format!("{key}.max_keys"),
                    "must be at least 1",
                ));
            }
            let slot = *throttles;
            *throttles += 1;
            Op::Throttle {
                rate,
                burst,
                by: optional_path(&config.by, "by")?,
                dead_letter: config.excess == Some(Excess::DeadLetter),
                max_keys,
                slot,
            }
        }
    };
    Ok(op)
}

/// The paths of `remove` or `redact`, each error naming its entry (`remove[1]`).
fn path_list(
    list: Option<&PathList>,
    key: &str,
    setting: &str,
) -> Result<Vec<FieldPath>, ShapeError> {
    let entries = list.map(PathList::entries).unwrap_or_default();
    if entries.is_empty() {
        return Err(ShapeError::new(
            format!("{key}.{setting}"),
            "is empty: name at least one field",
        ));
    }
    entries
        .into_iter()
        .map(|(suffix, text)| {
            FieldPath::parse(text)
                .map_err(|message| ShapeError::new(format!("{key}.{setting}{suffix}"), message))
        })
        .collect()
}

/// Replaces the matches in `text`; whether it changed.
fn redact(text: &mut String, pattern: &Regex, replacement: &str) -> bool {
    let replaced = pattern.replace_all(text, replacement);
    // Borrowed: no match. Owned can still equal the input (a match replaced by itself).
    if replaced == text.as_str() {
        return false;
    }
    *text = replaced.into_owned();
    true
}

/// Redacts every string value in `value`, however deep; whether anything changed.
fn redact_all(value: &mut Value, redact: &mut impl FnMut(&mut String) -> bool) -> bool {
    match value {
        Value::String(text) => redact(text),
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, item| redact_all(item, redact) | changed),
        Value::Object(object) => object
            .values_mut()
            .fold(false, |changed, item| redact_all(item, redact) | changed),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// The `add_metadata` object.
fn metadata(ctx: &Context, cluster: Option<&str>) -> Value {
    let mut object = Map::new();
    object.insert("topic".into(), Value::from(ctx.topic));
    object.insert("partition".into(), Value::from(ctx.partition));
    object.insert("offset".into(), Value::from(ctx.offset));
    if let Some(timestamp) = ctx.timestamp_ms {
        object.insert("timestamp".into(), Value::from(timestamp));
    }
    if let Some(key) = ctx.key.and_then(|key| std::str::from_utf8(key).ok()) {
        object.insert("key".into(), Value::from(key));
    }
    if let Some(cluster) = cluster {
        object.insert("cluster".into(), Value::from(cluster));
    }
    Value::Object(object)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64, continued from `hash`: stable across processes, versions and machines (unlike
/// `std`'s `DefaultHasher`), which sampling needs so that replays and instances decide alike.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The hash of the record key, or without one of its topic, partition and offset.
fn record_hash(ctx: &Context) -> u64 {
    match ctx.key {
        Some(key) => fnv1a(FNV_OFFSET, key),
        None => {
            let hash = fnv1a(FNV_OFFSET, ctx.topic.as_bytes());
            // A byte no topic name holds ends the topic, so `a` + 1 and `a1` + … differ.
            let hash = fnv1a(hash, &[0]);
            let hash = fnv1a(hash, &ctx.partition.to_be_bytes());
            fnv1a(hash, &ctx.offset.to_be_bytes())
        }
    }
}

/// The hash of a field's value: a string by its text (so `by = "trace_id"` decides as a
/// record key holding the same text would), anything else by its JSON text. `None` when the
/// field is missing or null.
fn field_hash(path: &FieldPath, event: &Value) -> Option<u64> {
    match path.get(event)? {
        Value::Null => None,
        Value::String(text) => Some(fnv1a(FNV_OFFSET, text.as_bytes())),
        other => Some(fnv1a(FNV_OFFSET, other.to_string().as_bytes())),
    }
}

/// Whether a hash falls in the kept 1/`one_in` of the range.
///
/// FNV-1a alone is poorly mixed: its high bits barely follow the last bytes of a short key
/// (`user-0` to `user-9999`: 43% kept for 1 in 2, 0.4% for 1 in 100), and its low `k` bits
/// follow only the low `k` bits of each byte (keys differing in letter case alone decide alike
/// for 1 in 16). So the hash goes through MurmurHash3's 64-bit finaliser first, then is scaled
/// to `0..one_in` (`hash * one_in >> 64`). Both steps are fixed arithmetic: the decision is the same on every
/// instance and every replay, and must never change between versions.
fn sampled_in(hash: u64, one_in: u64) -> bool {
    (u128::from(fmix64(hash)) * u128::from(one_in)) >> 64 == 0
}

/// MurmurHash3's 64-bit finaliser: every input bit affects every output bit.
fn fmix64(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The token buckets of one throttle: one per key, the least recently used forgotten first
/// when `max_keys` are tracked, and one shared by records without a key.
///
/// Keys are tracked by their 64-bit hash rather than their bytes: memory stays at about 64
/// bytes a key whatever the key's length, and two keys that collide merely share a bucket.
#[derive(Debug, Default)]
struct Buckets {
    shared: Option<Bucket>,
    /// Key hash → bucket and the tick of its last use.
    by_key: HashMap<u64, (Bucket, u64)>,
    /// Tick of last use → key hash, oldest first.
    recency: BTreeMap<u64, u64>,
    tick: u64,
    evictions: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Buckets {
    /// Takes a token for `key`; whether the event may pass.
    fn admit(
        &mut self,
        key: Option<u64>,
        rate: f64,
        burst: f64,
        max_keys: usize,
        now: Instant,
    ) -> bool {
        let Some(key) = key else {
            return self
                .shared
                .get_or_insert_with(|| Bucket::full(burst, now))
                .take(rate, burst, now);
        };
        self.tick += 1;
        let tick = self.tick;
        if let Some((bucket, last_used)) = self.by_key.get_mut(&key) {
            self.recency.remove(last_used);
            *last_used = tick;
            self.recency.insert(tick, key);
            return bucket.take(rate, burst, now);
        }
        if self.by_key.len() >= max_keys {
            if let Some((_, oldest)) = self.recency.pop_first() {
                self.by_key.remove(&oldest);
                self.evictions += 1;
            }
        }
        let mut bucket = Bucket::full(burst, now);
        let admitted = bucket.take(rate, burst, now);
        self.by_key.insert(key, (bucket, tick));
        self.recency.insert(tick, key);
        admitted
    }
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        // Workers may pass instants slightly out of order; time never runs back for a bucket.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn compile(text: &str) -> Transforms {
        let configs = parse(text);
        Transforms::compile(&configs, "routes[0].transforms").unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse(text: &str) -> Vec<TransformConfig> {
        #[derive(serde::Deserialize)]
        struct Route {
            transforms: Vec<TransformConfig>,
        }
        let route: Route = toml::from_str(&format!("transforms = [ {text} ]")).expect("TOML");
        route.transforms
    }

    fn refuse(text: &str) -> ShapeError {
        Transforms::compile(&parse(text), "routes[0].transforms").expect_err(text)
    }

    fn ctx() -> Context<'static> {
        Context {
            topic: "app-logs",
            partition: 2,
            offset: 1041,
            timestamp_ms: Some(1_714_566_896_789),
            key: Some(b"order-17"),
            level: Some("error"),
            service: Some("checkout"),
        }
    }

    /// Applies `transforms` once, with a fresh state.
    fn run(transforms: &Transforms, event: &mut Value) -> Result<Outcome, TransformError> {
        transforms.apply(&mut transforms.state(), event, &ctx(), Instant::now())
    }

    const KEEP_CHANGED: Outcome = Outcome::Keep { changed: true };
    const KEEP_UNCHANGED: Outcome = Outcome::Keep { changed: false };

    fn pino() -> Value {
        json!({ "level": 50, "time": 1_714_566_896_789_i64, "pid": 7, "hostname": "web-1",
                "msg": "payment failed for card 4111111111111111",
                "req": { "id": 9, "headers": { "authorization": "Bearer abc.def" } } })
    }

    fn ecs() -> Value {
        json!({ "@timestamp": "2024-05-01T12:34:56.789Z", "log.level": "error",
                "message": "disk full", "ecs.version": "8.11.0",
                "service": { "name": "storage" }, "http": { "request.method": "PUT" } })
    }

    #[test]
    fn an_empty_chain_keeps_everything_unchanged() {
        let transforms = compile("");
        assert!(transforms.is_empty());
        assert!(!transforms.needs_event());
        let mut event = pino();
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_UNCHANGED));
        assert_eq!(event, pino());
    }

    #[test]
    fn set_writes_values_and_always_changes() {
        let transforms = compile(
            r#"{ set = "env", value = "prod" }, { set = "labels", value = { team = "core", n = 2 } },
               { set = "service.name", value = "storage-v2" }"#,
        );
        let mut event = ecs();
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(event["env"], json!("prod"));
        assert_eq!(event["labels"], json!({ "team": "core", "n": 2 }));
        assert_eq!(event["service"]["name"], json!("storage-v2"));
        let mut again = event.clone();
        assert_eq!(run(&transforms, &mut again), Ok(KEEP_CHANGED));
        assert_eq!(again, event);
    }

    #[test]
    fn set_with_a_template_renders_from_the_event_and_record() {
        let transforms = compile(
            r#"{ set = "summary", value = "{service.name}@{@topic}/{@partition}: {message} ({level})" },
               { set = "day", value = "%Y-%m-%d" }"#,
        );
        let mut event = ecs();
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(
            event["summary"],
            json!("storage@app-logs/2: disk full (error)")
        );
        // No `{`: set as written.
        assert_eq!(event["day"], json!("%Y-%m-%d"));
        let mut bare = json!({ "message": "m" });
        let error = run(&transforms, &mut bare).expect_err("no service.name");
        assert_eq!(error.reason, "transform_failed");
        assert!(
            error
                .message
                .contains("`routes[0].transforms[0]` (set summary)"),
            "{error}"
        );
        assert!(
            error.message.contains("`service.name` is missing"),
            "{error}"
        );
    }

    #[test]
    fn set_on_a_top_level_that_is_not_an_object_fails() {
        let transforms = compile(r#"{ set = "env", value = "prod" }"#);
        let mut event = json!("just a string");
        let error = run(&transforms, &mut event).expect_err("not an object");
        assert!(error.message.contains("the event is a string"), "{error}");
        let mut scalar_parent = json!({ "env": "x" });
        let nested = compile(r#"{ set = "env.name", value = 1 }"#);
        let error = run(&nested, &mut scalar_parent).expect_err("env is a string");
        assert!(error.message.contains("`env` is a string"), "{error}");
    }

    #[test]
    fn rename_moves_a_field_and_a_missing_one_changes_nothing() {
        let transforms =
            compile(r#"{ rename = "msg", to = "message" }, { rename = "time", to = "ts.ms" }"#);
        let mut event = pino();
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(
            event["message"],
            json!("payment failed for card 4111111111111111")
        );
        assert_eq!(event["ts"], json!({ "ms": 1_714_566_896_789_i64 }));
        assert!(event.get("msg").is_none() && event.get("time").is_none());
        let mut zap = json!({ "level": "error", "ts": 1714566896.789, "caller": "main.go:42", "message": "x" });
        let before = zap.clone();
        assert_eq!(run(&transforms, &mut zap), Ok(KEEP_UNCHANGED));
        assert_eq!(zap, before);
    }

    #[test]
    fn rename_reads_ecs_flat_keys() {
        let transforms = compile(r#"{ rename = "log.level", to = "level" }"#);
        let mut event = ecs();
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(event["level"], json!("error"));
        assert!(event.get("log.level").is_none());
    }

    #[test]
    fn remove_takes_fields_out_and_missing_ones_change_nothing() {
        let transforms =
            compile(r#"{ remove = ["pid", "hostname", "req.headers.authorization"] }"#);
        let mut event = pino();
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_CHANGED));
        assert!(event.get("pid").is_none() && event.get("hostname").is_none());
        assert_eq!(event["req"], json!({ "id": 9, "headers": {} }));
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_UNCHANGED));
        let single = compile(r#"{ remove = "ecs.version" }"#);
        let mut event = ecs();
        assert_eq!(run(&single, &mut event), Ok(KEEP_CHANGED));
        assert!(event.get("ecs.version").is_none());
    }

    #[test]
    fn redact_replaces_matches_in_named_string_fields() {
        let transforms = compile(
            r#"{ redact = ["msg", "level", "req.headers.authorization"], pattern = "\\d{12}(\\d{4})", replacement = "************$1" }"#,
        );
        let mut event = pino();
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(
            event["msg"],
            json!("payment failed for card ************1111")
        );
        // Not strings, or no match: untouched.
        assert_eq!(event["level"], json!(50));
        assert_eq!(
            event["req"]["headers"]["authorization"],
            json!("Bearer abc.def")
        );
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_UNCHANGED));
    }

    #[test]
    fn redact_defaults_its_replacement_and_counts_no_match_as_unchanged() {
        let transforms = compile(r#"{ redact = "message", pattern = "secret=\\S+" }"#);
        let mut event = json!({ "message": "login secret=hunter2 ok" });
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(event["message"], json!("login [redacted] ok"));
        let mut clean = json!({ "message": "nothing here" });
        assert_eq!(run(&transforms, &mut clean), Ok(KEEP_UNCHANGED));
        let mut missing = json!({ "msg": "secret=x" });
        assert_eq!(run(&transforms, &mut missing), Ok(KEEP_UNCHANGED));
        // A match replaced by the same text is no change.
        let same = compile(r#"{ redact = "message", pattern = "ok", replacement = "ok" }"#);
        let mut event = json!({ "message": "ok" });
        assert_eq!(run(&same, &mut event), Ok(KEEP_UNCHANGED));
    }

    #[test]
    fn redact_everywhere_walks_every_string() {
        let transforms = compile(
            r#"{ redact = "*", pattern = "Bearer [A-Za-z0-9.]+", replacement = "Bearer ***" }"#,
        );
        let mut event = json!({
            "resourceLogs": [{ "scopeLogs": [{ "logRecords": [{
                "severityText": "ERROR", "severityNumber": 17,
                "body": { "stringValue": "auth with Bearer abc.def failed" },
                "attributes": [{ "key": "h", "value": { "stringValue": "Bearer xyz" } }]
            }]}]}]
        });
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_CHANGED));
        let record = &event["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0];
        assert_eq!(
            record["body"]["stringValue"],
            json!("auth with Bearer *** failed")
        );
        assert_eq!(
            record["attributes"][0]["value"]["stringValue"],
            json!("Bearer ***")
        );
        assert_eq!(record["severityNumber"], json!(17));
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_UNCHANGED));
    }

    #[test]
    fn parse_json_replaces_the_string_or_writes_beside_it() {
        let gcp = || {
            json!({ "severity": "ERROR", "message": "{\"code\":7,\"detail\":\"denied\"}",
                    "logging.googleapis.com/trace": "projects/p/traces/t" })
        };
        let in_place = compile(r#"{ parse_json = "message" }"#);
        let mut event = gcp();
        assert_eq!(run(&in_place, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(event["message"], json!({ "code": 7, "detail": "denied" }));
        // Already parsed, or missing: nothing to do.
        assert_eq!(run(&in_place, &mut event), Ok(KEEP_UNCHANGED));
        let mut missing = json!({ "severity": "INFO" });
        assert_eq!(run(&in_place, &mut missing), Ok(KEEP_UNCHANGED));

        let beside = compile(r#"{ parse_json = "message", into = "payload" }"#);
        let mut event = gcp();
        assert_eq!(run(&beside, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(event["payload"]["code"], json!(7));
        assert_eq!(event["message"], gcp()["message"]);
    }

    #[test]
    fn parse_json_fails_on_a_string_that_is_not_json_unless_told_to_keep() {
        let strict = compile(r#"{ parse_json = "msg" }"#);
        let mut event = json!({ "msg": "plain text" });
        let error = run(&strict, &mut event).expect_err("not JSON");
        assert_eq!(error.reason, "transform_failed");
        assert!(
            error
                .message
                .starts_with("`routes[0].transforms[0]` (parse_json msg): `msg` is not JSON"),
            "{error}"
        );
        let lenient =
            compile(r#"{ parse_json = "msg", on_error = "keep" }, { set = "x", value = 1 }"#);
        let mut event = json!({ "msg": "plain text" });
        assert_eq!(run(&lenient, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(event, json!({ "msg": "plain text", "x": 1 }));
        let only = compile(r#"{ parse_json = "msg", on_error = "keep" }"#);
        let mut event = json!({ "msg": "plain text" });
        assert_eq!(run(&only, &mut event), Ok(KEEP_UNCHANGED));
    }

    #[test]
    fn add_metadata_writes_the_record_coordinates() {
        let transforms = compile(r#"{ add_metadata = "kafka", cluster = "eu-1" }"#);
        let mut event = ecs();
        assert_eq!(run(&transforms, &mut event), Ok(KEEP_CHANGED));
        assert_eq!(
            event["kafka"],
            json!({ "topic": "app-logs", "partition": 2, "offset": 1041,
                    "timestamp": 1_714_566_896_789_i64, "key": "order-17", "cluster": "eu-1" })
        );
        let plain = compile(r#"{ add_metadata = "meta.kafka" }"#);
        let bare = Context {
            timestamp_ms: None,
            key: Some(&[0xff, 0x00]),
            ..ctx()
        };
        let mut event = json!({});
        let outcome = plain.apply(&mut plain.state(), &mut event, &bare, Instant::now());
        assert_eq!(outcome, Ok(KEEP_CHANGED));
        assert_eq!(
            event,
            json!({ "meta": { "kafka": { "topic": "app-logs", "partition": 2, "offset": 1041 } } })
        );
    }

    #[test]
    fn sample_decides_alike_every_time_for_a_key() {
        let transforms = compile("{ sample = 4 }");
        assert!(!transforms.needs_event());
        let decide = |key: &[u8], offset: i64| {
            let ctx = Context {
                key: Some(key),
                offset,
                ..ctx()
            };
            let mut event = Value::Null;
            transforms.apply(&mut transforms.state(), &mut event, &ctx, Instant::now())
        };
        for index in 0..200 {
            let key = format!("user-{index}");
            let first = decide(key.as_bytes(), 0);
            // Another offset, another state: the same decision for the whole key.
            for offset in 1..5 {
                assert_eq!(decide(key.as_bytes(), offset), first, "{key}");
            }
        }
        // The decision is fixed arithmetic (FNV-1a 64, MurmurHash3's finaliser, scaling): it
        // must never change, or a replay would sample other keys.
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        let kept: Vec<bool> = ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .map(|key| sampled_in(fnv1a(FNV_OFFSET, key.as_bytes()), 2))
            .collect();
        assert_eq!(kept, [false, true, true, false, true, false, true, true]);
    }

    #[test]
    fn sample_keeps_about_one_in_n() {
        for one_in in [2_u64, 4, 10, 16, 100] {
            let transforms = compile(&format!("{{ sample = {one_in} }}"));
            let mut state = transforms.state();
            let mut kept = 0;
            let total = 10_000;
            for index in 0..total {
                let key = format!("user-{index}");
                let ctx = Context {
                    key: Some(key.as_bytes()),
                    ..ctx()
                };
                let mut event = Value::Null;
                match transforms.apply(&mut state, &mut event, &ctx, Instant::now()) {
                    Ok(Outcome::Keep { changed: false }) => kept += 1,
                    Ok(Outcome::SampledOut) => {}
                    other => panic!("{other:?}"),
                }
            }
            let expected = total as f64 / one_in as f64;
            // Five standard deviations of a binomial count.
            let tolerance = 5.0 * (expected * (1.0 - 1.0 / one_in as f64)).sqrt();
            assert!(
                (kept as f64 - expected).abs() <= tolerance,
                "1 in {one_in}: kept {kept}, expected about {expected}"
            );
        }
        // 1 in 1 keeps everything.
        let all = compile("{ sample = 1 }");
        let mut event = Value::Null;
        assert_eq!(run(&all, &mut event), Ok(KEEP_UNCHANGED));
    }

    #[test]
    fn sample_without_a_key_decides_by_record_coordinates() {
        let transforms = compile("{ sample = 3 }");
        let decide = |offset: i64| {
            let ctx = Context {
                key: None,
                offset,
                ..ctx()
            };
            let mut event = Value::Null;
            transforms.apply(&mut transforms.state(), &mut event, &ctx, Instant::now())
        };
        let decisions: Vec<_> = (0..3000).map(decide).collect();
        let again: Vec<_> = (0..3000).map(decide).collect();
        assert_eq!(decisions, again);
        let kept = decisions
            .iter()
            .filter(|outcome| matches!(outcome, Ok(Outcome::Keep { .. })))
            .count();
        assert!((800..1200).contains(&kept), "kept {kept} of 3000");
    }

    #[test]
    fn sample_by_a_field_decides_as_a_key_with_its_text_would() {
        let by_field = compile(r#"{ sample = 5, by = "trace_id" }"#);
        let by_key = compile("{ sample = 5 }");
        assert!(by_field.needs_event());
        for index in 0..300 {
            let trace = format!("trace-{index}");
            let mut event = json!({ "trace_id": trace, "msg": "m" });
            let field_decision = run(&by_field, &mut event);
            let ctx = Context {
                key: Some(trace.as_bytes()),
                ..ctx()
            };
            let mut other = json!({});
            let key_decision = by_key.apply(&mut by_key.state(), &mut other, &ctx, Instant::now());
            assert_eq!(field_decision, key_decision, "{trace}");
        }
        // Without the field: by the record key.
        let mut event = json!({ "msg": "m" });
        let mut keyed = json!({});
        assert_eq!(run(&by_field, &mut event), run(&by_key, &mut keyed));
    }

    #[test]
    fn sample_and_throttle_stop_the_chain() {
        let dropped =
            compile(r#"{ set = "a", value = 1 }, { sample = 1000000 }, { set = "b", value = 2 }"#);
        let mut seen_out = false;
        for index in 0..50 {
            let key = format!("k{index}");
            let ctx = Context {
                key: Some(key.as_bytes()),
                ..ctx()
            };
            let mut event = json!({});
            let outcome = dropped.apply(&mut dropped.state(), &mut event, &ctx, Instant::now());
            if outcome == Ok(Outcome::SampledOut) {
                seen_out = true;
                assert!(event.get("b").is_none());
            }
        }
        assert!(seen_out);
    }

    #[test]
    fn throttle_lets_a_burst_through_then_the_rate() {
        let transforms = compile("{ throttle = 2.0, burst = 3 }");
        assert!(!transforms.needs_event());
        let mut state = transforms.state();
        let start = Instant::now();
        let mut at = |millis: u64| {
            let mut event = Value::Null;
            transforms.apply(
                &mut state,
                &mut event,
                &ctx(),
                start + Duration::from_millis(millis),
            )
        };
        let throttled = Ok(Outcome::Throttled { dead_letter: false });
        for _ in 0..3 {
            assert_eq!(at(0), Ok(KEEP_UNCHANGED));
        }
        assert_eq!(at(0), throttled);
        assert_eq!(at(400), throttled);
        // 2 a second: a token every 500 ms.
        assert_eq!(at(500), Ok(KEEP_UNCHANGED));
        assert_eq!(at(600), throttled);
        assert_eq!(at(1000), Ok(KEEP_UNCHANGED));
        // A quiet spell refills the burst, never more.
        for _ in 0..3 {
            assert_eq!(at(60_000), Ok(KEEP_UNCHANGED));
        }
        assert_eq!(at(60_000), throttled);
        // An instant from the past does not refill or panic.
        assert_eq!(at(10), throttled);
    }

    #[test]
    fn throttle_keeps_one_bucket_per_key_and_one_shared_without_key() {
        let transforms = compile(r#"{ throttle = 1, excess = "dead-letter" }"#);
        let mut state = transforms.state();
        let now = Instant::now();
        let mut with_key = |key: Option<&[u8]>| {
            let ctx = Context { key, ..ctx() };
            let mut event = Value::Null;
            transforms.apply(&mut state, &mut event, &ctx, now)
        };
        let throttled = Ok(Outcome::Throttled { dead_letter: true });
        assert_eq!(with_key(Some(b"a")), Ok(KEEP_UNCHANGED));
        assert_eq!(with_key(Some(b"a")), throttled);
        assert_eq!(with_key(Some(b"b")), Ok(KEEP_UNCHANGED));
        assert_eq!(with_key(None), Ok(KEEP_UNCHANGED));
        assert_eq!(with_key(None), throttled);
        assert_eq!(state.tracked_keys(), 3);
    }

    #[test]
    fn throttle_by_a_field() {
        let transforms = compile(r#"{ throttle = 1, by = "service.name" }"#);
        assert!(transforms.needs_event());
        let mut state = transforms.state();
        let now = Instant::now();
        let mut send = |mut event: Value| transforms.apply(&mut state, &mut event, &ctx(), now);
        let throttled = Ok(Outcome::Throttled { dead_letter: false });
        // Record key "order-17" for all of them: the field decides.
        assert_eq!(send(ecs()), Ok(KEEP_UNCHANGED));
        assert_eq!(send(ecs()), throttled);
        let mut other = ecs();
        other["service"]["name"] = json!("billing");
        assert_eq!(send(other), Ok(KEEP_UNCHANGED));
        // Without the field: the record key.
        assert_eq!(send(json!({ "msg": "x" })), Ok(KEEP_UNCHANGED));
        assert_eq!(send(json!({ "msg": "y" })), throttled);
    }

    #[test]
    fn throttle_forgets_the_least_recently_used_key_when_full() {
        let transforms = compile("{ throttle = 1, max_keys = 2 }");
        let mut state = transforms.state();
        let now = Instant::now();
        let send = |state: &mut TransformState, key: &[u8]| {
            let ctx = Context {
                key: Some(key),
                ..ctx()
            };
            let mut event = Value::Null;
            transforms.apply(state, &mut event, &ctx, now)
        };
        let throttled = Ok(Outcome::Throttled { dead_letter: false });
        assert_eq!(send(&mut state, b"a"), Ok(KEEP_UNCHANGED));
        assert_eq!(send(&mut state, b"b"), Ok(KEEP_UNCHANGED));
        // `a` used again: `b` is now the least recently used.
        assert_eq!(send(&mut state, b"a"), throttled);
        assert_eq!(state.evictions(), 0);
        assert_eq!(send(&mut state, b"c"), Ok(KEEP_UNCHANGED));
        assert_eq!(state.evictions(), 1);
        assert_eq!(state.tracked_keys(), 2);
        // `a` was kept (still throttled); `b` was forgotten and starts full again.
        assert_eq!(send(&mut state, b"a"), throttled);
        assert_eq!(send(&mut state, b"b"), Ok(KEEP_UNCHANGED));
        assert_eq!(state.evictions(), 2);
        // `c` was the least recently used of `a`, `c`: forgotten for `b`.
        assert_eq!(send(&mut state, b"c"), Ok(KEEP_UNCHANGED));
        assert_eq!(state.evictions(), 3);
    }

    #[test]
    fn each_worker_state_throttles_on_its_own() {
        let transforms = compile("{ throttle = 1 }, { throttle = 1, by = \"x\" }");
        let mut first = transforms.state();
        let mut second = transforms.state();
        let now = Instant::now();
        let mut event = json!({ "x": 1 });
        assert_eq!(
            transforms.apply(&mut first, &mut event, &ctx(), now),
            Ok(KEEP_UNCHANGED)
        );
        assert_eq!(
            transforms.apply(&mut second, &mut event, &ctx(), now),
            Ok(KEEP_UNCHANGED)
        );
        assert_eq!(
            transforms.apply(&mut first, &mut event, &ctx(), now),
            Ok(Outcome::Throttled { dead_letter: false })
        );
        // A state from elsewhere is grown, not a panic.
        let mut foreign = TransformState::default();
        assert_eq!(
            transforms.apply(&mut foreign, &mut event, &ctx(), now),
            Ok(KEEP_UNCHANGED)
        );
    }

    #[test]
    fn a_chain_of_real_world_shapes() {
        // Bunyan in, ECS-like out.
        let transforms = compile(
            r#"{ rename = "msg", to = "message" }, { rename = "name", to = "service.name" },
               { remove = ["v", "pid"] }, { redact = "err.stack", pattern = "/home/\\w+", replacement = "/home/~" },
               { add_metadata = "kafka" }"#,
        );
        let mut bunyan = json!({ "name": "api", "hostname": "h", "pid": 1, "level": 50,
            "msg": "boom", "time": "2024-05-01T12:00:00.000Z", "v": 0,
            "err": { "message": "boom", "stack": "Error: boom\n at /home/alice/app.js:3" } });
        assert_eq!(run(&transforms, &mut bunyan), Ok(KEEP_CHANGED));
        assert_eq!(bunyan["message"], json!("boom"));
        assert_eq!(bunyan["service"], json!({ "name": "api" }));
        assert_eq!(
            bunyan["err"]["stack"],
            json!("Error: boom\n at /home/~/app.js:3")
        );
        assert!(bunyan.get("v").is_none() && bunyan.get("pid").is_none());
        assert_eq!(bunyan["kafka"]["offset"], json!(1041));
    }

    #[test]
    fn describe_says_what_each_transform_does() {
        let transforms = compile(
            r#"{ set = "env", value = "prod" }, { set = "s", value = "{a}-x" }, { rename = "msg", to = "message" },
               { remove = ["a", "b.c"] }, { redact = "*", pattern = "\\d+" }, { parse_json = "p", into = "q", on_error = "keep" },
               { add_metadata = "kafka", cluster = "eu" }, { sample = 10, by = "trace_id" },
               { throttle = 100.5, excess = "dead-letter" }"#,
        );
        assert_eq!(
            transforms.describe(),
            vec![
                r#"set env = "prod""#.to_string(),
                r#"set s = template "{a}-x" (reads: field a)"#.to_string(),
                "rename msg to message".to_string(),
                "remove a, b.c".to_string(),
                r#"redact /\d+/ with "[redacted]" in every string"#.to_string(),
                "parse_json p into q (not JSON: keep the event as it is)".to_string(),
                r#"add_metadata at kafka (cluster "eu")"#.to_string(),
                "sample 1 in 10 by field trace_id".to_string(),
                "throttle 100.5/s (burst 100.5) per record key, excess dead-lettered, at most \
                 10000 keys per worker"
                    .to_string(),
            ]
        );
    }

    #[test]
    fn zero_or_two_operations_are_refused() {
        let error = refuse(r#"{ value = 1 }"#);
        assert_eq!(error.key, "routes[0].transforms[0]");
        assert!(error.message.contains("no operation"), "{error}");
        assert!(error.message.contains("parse_json"), "{error}");
        let error = refuse(r#"{ set = "a", value = 1 }, { set = "a", rename = "b", to = "c" }"#);
        assert_eq!(error.key, "routes[0].transforms[1]");
        assert!(error.message.contains("`set` and `rename`"), "{error}");
    }

    #[test]
    fn settings_of_another_operation_are_refused_naming_the_key() {
        let error = refuse(r#"{ set = "a", value = 1, to = "b" }"#);
        assert_eq!(error.key, "routes[0].transforms[0].to");
        assert_eq!(error.message, "is a setting of `rename`, not of `set`");
        let error = refuse(r#"{ remove = "a", by = "b" }"#);
        assert_eq!(error.key, "routes[0].transforms[0].by");
        assert!(error.message.contains("`sample` and `throttle`"), "{error}");
        let error = refuse(r#"{ sample = 2, burst = 3 }"#);
        assert_eq!(error.key, "routes[0].transforms[0].burst");
    }

    #[test]
    fn missing_and_invalid_settings_are_refused_naming_the_key() {
        let cases = [
            (
                r#"{ set = "a" }"#,
                "routes[0].transforms[0]",
                "needs `value`",
            ),
            (
                r#"{ rename = "a" }"#,
                "routes[0].transforms[0]",
                "needs `to`",
            ),
            (
                r#"{ redact = "a" }"#,
                "routes[0].transforms[0]",
                "needs `pattern`",
            ),
            (
                r#"{ set = "a..b", value = 1 }"#,
                "routes[0].transforms[0].set",
                "empty key",
            ),
            (
                r#"{ rename = "a", to = "b[" }"#,
                "routes[0].transforms[0].to",
                "`[`",
            ),
            (
                r#"{ remove = ["a", "b."] }"#,
                "routes[0].transforms[0].remove[1]",
                "ends with",
            ),
            (
                r#"{ remove = [] }"#,
                "routes[0].transforms[0].remove",
                "is empty",
            ),
            (
                r#"{ redact = "m", pattern = "(" }"#,
                "routes[0].transforms[0].pattern",
                "unclosed group",
            ),
            (
                r#"{ parse_json = "p", into = "" }"#,
                "routes[0].transforms[0].into",
                "empty",
            ),
            (
                r#"{ add_metadata = "[0]" }"#,
                "routes[0].transforms[0].add_metadata",
                "index",
            ),
            (
                r#"{ sample = 0 }"#,
                "routes[0].transforms[0].sample",
                "at least 1",
            ),
            (
                r#"{ sample = 2, by = "x]" }"#,
                "routes[0].transforms[0].by",
                "`]`",
            ),
            (
                r#"{ throttle = 0 }"#,
                "routes[0].transforms[0].throttle",
                "greater than 0",
            ),
            (
                r#"{ throttle = -1.5 }"#,
                "routes[0].transforms[0].throttle",
                "greater than 0",
            ),
            (
                r#"{ throttle = nan }"#,
                "routes[0].transforms[0].throttle",
                "greater than 0",
            ),
            (
                r#"{ throttle = 5, burst = 0.5 }"#,
                "routes[0].transforms[0].burst",
                "at least 1",
            ),
            (
                r#"{ throttle = 5, max_keys = 0 }"#,
                "routes[0].transforms[0].max_keys",
                "at least 1",
            ),
            (
                r#"{ set = "a", value = "{user" }"#,
                "routes[0].transforms[0].value",
                "no closing",
            ),
            (
                r#"{ set = "a", value = "{x} %Q" }"#,
                "routes[0].transforms[0].value",
                "`%Q`",
            ),
        ];
        for (text, key, expected) in cases {
            let error = refuse(text);
            assert_eq!(error.key, key, "{text}: {error}");
            assert!(error.message.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn a_slow_throttle_defaults_its_burst_to_one() {
        let transforms = compile("{ throttle = 0.5 }");
        let mut state = transforms.state();
        let now = Instant::now();
        let mut event = Value::Null;
        assert_eq!(
            transforms.apply(&mut state, &mut event, &ctx(), now),
            Ok(KEEP_UNCHANGED)
        );
        assert_eq!(
            transforms.apply(&mut state, &mut event, &ctx(), now + Duration::from_secs(1)),
            Ok(Outcome::Throttled { dead_letter: false })
        );
        assert_eq!(
            transforms.apply(&mut state, &mut event, &ctx(), now + Duration::from_secs(2)),
            Ok(KEEP_UNCHANGED)
        );
    }
}

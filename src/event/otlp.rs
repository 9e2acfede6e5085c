//! `[input] format = "otlp_proto"` and `"otlp_json"`: each Kafka record holds an OTLP logs
//! export request (`ExportLogsServiceRequest`), as the OpenTelemetry Collector's Kafka exporter
//! writes it: protobuf binary (`otlp_proto`), or the OTLP JSON encoding (`otlp_json`: camelCase
//! keys, enums as numbers, trace and span ids as hex, 64-bit integers as strings; the proto
//! field names, numbers for the integers and enum names are read too).
//!
//! One Kafka record holds a batch: every log record in it is an event of its own. [`split`]
//! reads the whole payload and gives one [`Part`] per log record, in the order of the request;
//! the router turns the parts into records that share the Kafka record's offset and one
//! countdown ([`crate::record::FanOut`]), so the offset is committed only once every log record
//! is finished.
//!
//! What a log record becomes (the event every stage reads, a JSON object):
//!
//! | event field | from |
//! |---|---|
//! | `level` | `severity_number` 1–24 (1–4 trace, 5–8 debug, 9–12 info, 13–16 warning, 17–20 error, 21–24 fatal), else `severity_text` (normalised as the auto format does: `WARN` → warning, `notice` → info) |
//! | `message` | a string body; another body as its JSON text (a kvlist as an object, an array as an array, bytes as base64); no body: `""` |
//! | `service` | the resource attribute `service.name`, if it is a string |
//! | `ts` | `time_unix_nano`, else `observed_time_unix_nano`, as RFC 3339 UTC with nanoseconds; both 0: absent |
//! | `severityNumber`, `severityText` | as given (absent when 0 or empty) |
//! | `traceId`, `spanId` | lowercase hex (absent when empty) |
//! | `eventName` | as given (absent when empty) |
//! | `otel.scope.name`, `otel.scope.version` | the instrumentation scope's (absent when empty) |
//! | every attribute | the resource's, then the scope's, then the log record's, each by its own key (`http.status_code`); a later one of the same key wins; one whose key is a field above is kept in an object `attributes` instead |
//!
//! A payload that is not a request at all is rejected whole: empty (`empty`), over the size
//! limit (`too_large`), not protobuf (`not_protobuf`, truncated or garbled; nested past prost's
//! limit of 100: `too_deep`), for JSON not UTF-8, not JSON, too deep or not an object (the
//! JSON formats' reasons), a request whose structure above the log records is wrong
//! (`wrong_type`, naming the field), one without any log record (`missing_field`,
//! `logRecords`), or one with more than [`MAX_LOG_RECORDS`] (`too_many_records`). A log record
//! that is not an event is rejected alone, with its reason, and the others go on: no severity
//! at all (`missing_field`, `severity`), a severity number outside 0–24 without a text, a trace
//! or span id of the wrong length, and for JSON a field of the wrong type (`wrong_type`, naming
//! the field). Such a record travels as a request holding it alone (its resource, its scope and
//! it), in the payload's own encoding: what the dead-letter topic gets.

use base64::Engine as _;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use prost::Message as _;
use serde_json::{Map, Value};

use super::auto::{normalise, severity_level};
use super::{
    checked_payload, checked_text, from_json_error, json_body, truncate_chars, DecodeError, Level,
};

/// Most log records one Kafka record may hold: each becomes a record of its own in the
/// pipeline, so a small payload of many empty log records could otherwise take far more memory
/// than its size says.
pub const MAX_LOG_RECORDS: usize = 10_000;

/// How the requests are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpEncoding {
    /// Protobuf binary (`otlp_proto`).
    Proto,
    /// OTLP JSON (`otlp_json`).
    Json,
}

/// One log record of a batch.
#[derive(Debug)]
pub struct Part {
    /// Its level and service, or why it is not an event.
    pub decoded: Result<(Level, Option<Box<str>>), DecodeError>,
    /// What the pipeline carries for it: the event as a JSON object or, for a log record that
    /// is not an event, a request holding it alone, in the payload's encoding.
    pub payload: Vec<u8>,
}

/// The log records of `payload`, in order; `Err` when the payload is not a request with at
/// least one log record (see the module docs).
pub fn split(
    encoding: OtlpEncoding,
    payload: Option<&[u8]>,
    max_bytes: usize,
) -> Result<Vec<Part>, DecodeError> {
    match encoding {
        OtlpEncoding::Proto => split_proto(payload, max_bytes),
        OtlpEncoding::Json => split_json(payload, max_bytes),
    }
}

fn split_proto(payload: Option<&[u8]>, max_bytes: usize) -> Result<Vec<Part>, DecodeError> {
    let payload = checked_payload(payload, max_bytes)?;
    let request = ExportLogsServiceRequest::decode(payload).map_err(from_prost_error)?;
    let count = request
        .resource_logs
        .iter()
        .flat_map(|resource_logs| &resource_logs.scope_logs)
        .map(|scope_logs| scope_logs.log_records.len())
        .sum();
    check_count(count)?;
    let mut parts = Vec::with_capacity(count);
    for resource_logs in &request.resource_logs {
        let resource_attributes = resource_logs
            .resource
            .as_ref()
            .map_or(&[][..], |resource| &resource.attributes[..]);
        for scope_logs in &resource_logs.scope_logs {
            let around = Around::new(resource_attributes, scope_logs.scope.as_ref());
            for log_record in &scope_logs.log_records {
                parts.push(match around.event(log_record) {
                    Ok(part) => part,
                    Err(err) => Part {
                        decoded: Err(err),
                        payload: alone_proto(resource_logs, scope_logs, log_record),
                    },
                });
            }
        }
    }
    Ok(parts)
}

fn check_count(count: usize) -> Result<(), DecodeError> {
    if count == 0 {
        return Err(DecodeError::MissingField {
            field: "logRecords",
        });
    }
    if count > MAX_LOG_RECORDS {
        return Err(DecodeError::TooManyRecords {
            count,
            limit: MAX_LOG_RECORDS,
        });
    }
    Ok(())
}

/// prost's errors: its nesting limit is `too_deep` (prost keeps the error kind private; its
/// message is the only handle on it, and a test pins it), anything else `not_protobuf`.
fn from_prost_error(err: prost::DecodeError) -> DecodeError {
    let message = err.to_string();
    if message.contains("recursion limit") {
        return DecodeError::TooDeep;
    }
    DecodeError::NotProtobuf {
        detail: truncate_chars(message, super::MAX_DETAIL_CHARS),
    }
}

/// A request holding `log_record` alone, with its resource and scope, in protobuf.
fn alone_proto(
    resource_logs: &ResourceLogs,
    scope_logs: &ScopeLogs,
    log_record: &LogRecord,
) -> Vec<u8> {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: resource_logs.resource.clone(),
            scope_logs: vec![ScopeLogs {
                scope: scope_logs.scope.clone(),
                log_records: vec![log_record.clone()],
                schema_url: scope_logs.schema_url.clone(),
            }],
            schema_url: resource_logs.schema_url.clone(),
        }],
    }
    .encode_to_vec()
}

/// What the log records of one scope share: the resource's and the scope's fields, and the
/// service.
struct Around {
    /// `otel.scope.name` and `otel.scope.version`, then the resource's and scope's attributes.
    scope: Map<String, Value>,
    attributes: Map<String, Value>,
    service: Option<Box<str>>,
}

impl Around {
    fn new(resource: &[KeyValue], scope: Option<&InstrumentationScope>) -> Around {
        let mut attributes = Map::new();
        put_attributes(&mut attributes, resource);
        let mut named = Map::new();
        if let Some(scope) = scope {
            if !scope.name.is_empty() {
                named.insert("otel.scope.name".into(), scope.name.clone().into());
            }
            if !scope.version.is_empty() {
                named.insert("otel.scope.version".into(), scope.version.clone().into());
            }
            put_attributes(&mut attributes, &scope.attributes);
        }
        let service = resource
            .iter()
            .rev()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(name) => Some(Box::from(name.as_str())),
                _ => None,
            });
        Around {
            scope: named,
            attributes,
            service,
        }
    }

    /// The event of `log_record`, or why it is not one.
    fn event(&self, log_record: &LogRecord) -> Result<Part, DecodeError> {
        let level = level_of(log_record.severity_number, &log_record.severity_text)?;
        let trace_id = id_hex(&log_record.trace_id, 16, "traceId")?;
        let span_id = id_hex(&log_record.span_id, 8, "spanId")?;
        let message = match log_record.body.as_ref().map(json_of) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(text)) => text,
            Some(other) => other.to_string(),
        };
        let mut event = Map::new();
        event.insert("level".into(), level.as_str().into());
        event.insert("message".into(), message.into());
        if let Some(service) = &self.service {
            event.insert("service".into(), Value::from(&**service));
        }
        let time = match log_record.time_unix_nano {
            0 => log_record.observed_time_unix_nano,
            time => time,
        };
        if let Some(ts) = rfc3339(time) {
            event.insert("ts".into(), ts.into());
        }
        if log_record.severity_number != 0 {
            event.insert("severityNumber".into(), log_record.severity_number.into());
        }
        if !log_record.severity_text.is_empty() {
            event.insert(
                "severityText".into(),
                log_record.severity_text.clone().into(),
            );
        }
        if let Some(trace_id) = trace_id {
            event.insert("traceId".into(), trace_id.into());
        }
        if let Some(span_id) = span_id {
            event.insert("spanId".into(), span_id.into());
        }
        if !log_record.event_name.is_empty() {
            event.insert("eventName".into(), log_record.event_name.clone().into());
        }
        event.extend(self.scope.clone());
        let mut attributes = self.attributes.clone();
        put_attributes(&mut attributes, &log_record.attributes);
        let mut clashes = Map::new();
        for (key, value) in attributes {
            if event.contains_key(&key) || key == "attributes" {
                clashes.insert(key, value);
            } else {
                event.insert(key, value);
            }
        }
        if !clashes.is_empty() {
            event.insert("attributes".into(), Value::Object(clashes));
        }
        // Serialising a map of JSON values into a Vec cannot fail.
        let payload = serde_json::to_vec(&Value::Object(event)).unwrap_or_default();
        Ok(Part {
            decoded: Ok((level, self.service.clone())),
            payload,
        })
    }
}

/// The level of a severity: the number where it is one of 1–24, else the text.
fn level_of(number: i32, text: &str) -> Result<Level, DecodeError> {
    match (severity_level(number), number) {
        (Some(name), _) => Ok(Level::new(name)),
        (None, _) if !text.trim().is_empty() => Ok(normalise(text)),
        (None, 0) => Err(DecodeError::MissingField { field: "severity" }),
        (None, n) => Err(DecodeError::WrongType {
            field: "severityNumber",
            detail: format!("expected 0 to 24, found {n}"),
        }),
    }
}

/// An id in lowercase hex (`None` when empty), if it is `bytes` long.
fn id_hex(id: &[u8], bytes: usize, field: &'static str) -> Result<Option<String>, DecodeError> {
    if id.is_empty() {
        return Ok(None);
    }
    if id.len() != bytes {
        return Err(DecodeError::WrongType {
            field,
            detail: format!("expected {bytes} bytes, found {}", id.len()),
        });
    }
    Ok(Some(id.iter().map(|byte| format!("{byte:02x}")).collect()))
}

/// Nanoseconds since the epoch as RFC 3339 UTC; `None` for 0 (unknown).
fn rfc3339(nanos: u64) -> Option<String> {
    if nanos == 0 {
        return None;
    }
    let seconds = i64::try_from(nanos / 1_000_000_000).ok()?;
    // Below 10^9 by construction.
    let rest = (nanos % 1_000_000_000) as u32;
    chrono::DateTime::from_timestamp(seconds, rest)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
}

/// Puts attributes into `fields`, a later one of a key replacing an earlier one.
fn put_attributes(fields: &mut Map<String, Value>, attributes: &[KeyValue]) {
    for kv in attributes {
        let value = kv.value.as_ref().map_or(Value::Null, json_of);
        fields.insert(kv.key.clone(), value);
    }
}

/// An OTLP value as JSON: a kvlist as an object, an array as an array, bytes as base64, a
/// double that JSON cannot hold (NaN, infinities) as null.
fn json_of(value: &AnyValue) -> Value {
    match &value.value {
        None => Value::Null,
        Some(any_value::Value::StringValue(text)) => Value::String(text.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::IntValue(n)) => Value::from(*n),
        Some(any_value::Value::DoubleValue(x)) => {
            serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number)
        }
        Some(any_value::Value::ArrayValue(array)) => {
            Value::Array(array.values.iter().map(json_of).collect())
        }
        Some(any_value::Value::KvlistValue(list)) => {
            let mut object = Map::new();
            put_attributes(&mut object, &list.values);
            Value::Object(object)
        }
        Some(any_value::Value::BytesValue(bytes)) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        // Only profiles use string tables; a log record has nothing to look it up in.
        Some(any_value::Value::StringValueStrindex(_)) => Value::Null,
    }
}

// ---- the JSON encoding ----

fn split_json(payload: Option<&[u8]>, max_bytes: usize) -> Result<Vec<Part>, DecodeError> {
    let text = checked_text(payload, max_bytes, json_body)?;
    // serde_json's recursion limit holds for a `Value` too: too deep is `too_deep`.
    let request: Value = serde_json::from_str(text).map_err(from_json_error)?;
    let request = match request {
        Value::Object(request) => request,
        other => {
            return Err(DecodeError::NotObject {
                found: kind(&other),
            })
        }
    };
    let resource_logs = list(&request, "resourceLogs", "resource_logs")?;
    let mut count = 0;
    for resource_logs in resource_logs {
        let resource_logs = object(resource_logs, "resourceLogs")?;
        for scope_logs in list(resource_logs, "scopeLogs", "scope_logs")? {
            let scope_logs = object(scope_logs, "scopeLogs")?;
            count += list(scope_logs, "logRecords", "log_records")?.len();
        }
    }
    check_count(count)?;
    let mut parts = Vec::with_capacity(count);
    for resource_logs in resource_logs {
        let resource_logs = object(resource_logs, "resourceLogs")?;
        let resource = field(resource_logs, "resource", "resource");
        let resource_attributes = match resource {
            None | Some(Value::Null) => Vec::new(),
            Some(resource) => key_values(
                field(object(resource, "resource")?, "attributes", "attributes"),
                "resource",
            )?,
        };
        for scope_logs in list(resource_logs, "scopeLogs", "scope_logs")? {
            let scope_logs = object(scope_logs, "scopeLogs")?;
            let scope_value = field(scope_logs, "scope", "scope");
            let scope = match scope_value {
                None | Some(Value::Null) => None,
                Some(scope) => Some(json_scope(object(scope, "scope")?)?),
            };
            let around = Around::new(&resource_attributes, scope.as_ref());
            for log_record in list(scope_logs, "logRecords", "log_records")? {
                let part = json_log_record(log_record).and_then(|record| around.event(&record));
                parts.push(part.unwrap_or_else(|err| Part {
                    decoded: Err(err),
                    payload: alone_json(resource, scope_value, log_record),
                }));
            }
        }
    }
    Ok(parts)
}

/// A request holding `log_record` alone, with its resource and scope, in JSON.
fn alone_json(resource: Option<&Value>, scope: Option<&Value>, log_record: &Value) -> Vec<u8> {
    let mut scope_logs = Map::new();
    if let Some(scope) = scope {
        scope_logs.insert("scope".into(), scope.clone());
    }
    scope_logs.insert("logRecords".into(), Value::Array(vec![log_record.clone()]));
    let mut resource_logs = Map::new();
    if let Some(resource) = resource {
        resource_logs.insert("resource".into(), resource.clone());
    }
    resource_logs.insert(
        "scopeLogs".into(),
        Value::Array(vec![Value::Object(scope_logs)]),
    );
    let request = serde_json::json!({ "resourceLogs": [resource_logs] });
    serde_json::to_vec(&request).unwrap_or_default()
}

/// The JSON type of `value`, for errors (never its text).
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn wrong(field: &'static str, expected: &str, found: &Value) -> DecodeError {
    wrong_found(field, expected, crate::shape::describe_type(found))
}

/// `field` holds something other than `expected`: `found` (a kind of value, never its text).
fn wrong_found(field: &'static str, expected: &str, found: &str) -> DecodeError {
    DecodeError::WrongType {
        field,
        detail: format!("expected {expected}, found {found}"),
    }
}

/// A field by its JSON name or its proto name (both are valid OTLP JSON).
fn field<'v>(object: &'v Map<String, Value>, camel: &str, snake: &str) -> Option<&'v Value> {
    object.get(camel).or_else(|| object.get(snake))
}

fn object<'v>(value: &'v Value, name: &'static str) -> Result<&'v Map<String, Value>, DecodeError> {
    match value {
        Value::Object(object) => Ok(object),
        other => Err(wrong(name, "an object", other)),
    }
}

/// A list field; absent or null is empty.
fn list<'v>(
    object: &'v Map<String, Value>,
    camel: &'static str,
    snake: &str,
) -> Result<&'v [Value], DecodeError> {
    match field(object, camel, snake) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(wrong(camel, "an array", other)),
    }
}

fn json_scope(scope: &Map<String, Value>) -> Result<InstrumentationScope, DecodeError> {
    Ok(InstrumentationScope {
        name: string(field(scope, "name", "name"), "scope")?,
        version: string(field(scope, "version", "version"), "scope")?,
        attributes: key_values(field(scope, "attributes", "attributes"), "scope")?,
        ..Default::default()
    })
}

/// A string field; absent or null is empty.
fn string(value: Option<&Value>, name: &'static str) -> Result<String, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(wrong(name, "a string", other)),
    }
}

/// An unsigned integer, as a string of digits (the JSON encoding of 64-bit integers) or a
/// number; absent or null is 0.
fn unsigned(value: Option<&Value>, name: &'static str) -> Result<u64, DecodeError> {
    let expected = "an unsigned integer (a number or a string of digits)";
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(text)) => text
            .parse::<u64>()
            .map_err(|_| wrong_found(name, expected, "another string")),
        Some(Value::Number(number)) => number
            .as_u64()
            .ok_or_else(|| wrong_found(name, expected, "another number")),
        Some(other) => Err(wrong(name, expected, other)),
    }
}

/// A severity number: a number, or an enum name (`SEVERITY_NUMBER_WARN2`).
fn severity_number(value: Option<&Value>) -> Result<i32, DecodeError> {
    const FIELD: &str = "severityNumber";
    let expected = "a severity number (an integer or a SEVERITY_NUMBER_ name)";
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(number)) => number
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| wrong_found(FIELD, expected, "another number")),
        Some(Value::String(name)) => {
            severity_name(name).ok_or_else(|| wrong_found(FIELD, expected, "another string"))
        }
        Some(other) => Err(wrong(FIELD, expected, other)),
    }
}

/// The number of a `SeverityNumber` enum name.
fn severity_name(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("SEVERITY_NUMBER_")?;
    if rest == "UNSPECIFIED" {
        return Some(0);
    }
    let bases = [
        ("TRACE", 1),
        ("DEBUG", 5),
        ("INFO", 9),
        ("WARN", 13),
        ("ERROR", 17),
        ("FATAL", 21),
    ];
    bases.iter().find_map(|&(word, base)| {
        let step = rest.strip_prefix(word)?;
        match step {
            "" => Some(base),
            "2" => Some(base + 1),
            "3" => Some(base + 2),
            "4" => Some(base + 3),
            _ => None,
        }
    })
}

/// A trace or span id: hex of `bytes` bytes, or empty.
fn id(value: Option<&Value>, bytes: usize, name: &'static str) -> Result<Vec<u8>, DecodeError> {
    let text = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(text)) => text,
        Some(other) => return Err(wrong(name, "a hex string", other)),
    };
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let invalid = || DecodeError::WrongType {
        field: name,
        detail: format!("expected {} hex digits", bytes * 2),
    };
    if text.len() != bytes * 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    (0..bytes)
        .map(|i| u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).map_err(|_| invalid()))
        .collect()
}

/// A list of `{"key": .., "value": ..}`; absent or null is empty.
fn key_values(value: Option<&Value>, name: &'static str) -> Result<Vec<KeyValue>, DecodeError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(wrong(name, "an array of key-values", other)),
    };
    items
        .iter()
        .map(|item| {
            let item = object(item, name)?;
            let key = match field(item, "key", "key") {
                Some(Value::String(key)) => key.clone(),
                Some(other) => return Err(wrong(name, "a string key", other)),
                None => return Err(wrong(name, "a string key", &Value::Null)),
            };
            let value = match field(item, "value", "value") {
                None | Some(Value::Null) => None,
                Some(value) => Some(json_any(value, name)?),
            };
            Ok(KeyValue {
                key,
                value,
                ..Default::default()
            })
        })
        .collect()
}

/// An `AnyValue` (`{"stringValue": ".."}`, `{"intValue": "5"}`, ...); `{}` is no value.
fn json_any(value: &Value, name: &'static str) -> Result<AnyValue, DecodeError> {
    let fields = object(value, name)?;
    let found = |camel: &str, snake: &str| field(fields, camel, snake);
    let mistyped = |detail: &str| DecodeError::WrongType {
        field: name,
        detail: detail.into(),
    };
    let value = if let Some(text) = found("stringValue", "string_value") {
        match text {
            Value::String(text) => Some(any_value::Value::StringValue(text.clone())),
            other => return Err(wrong(name, "a string in stringValue", other)),
        }
    } else if let Some(b) = found("boolValue", "bool_value") {
        match b {
            Value::Bool(b) => Some(any_value::Value::BoolValue(*b)),
            other => return Err(wrong(name, "a boolean in boolValue", other)),
        }
    } else if let Some(n) = found("intValue", "int_value") {
        let n = match n {
            Value::String(text) => text.parse::<i64>().ok(),
            Value::Number(number) => number.as_i64(),
            _ => None,
        };
        Some(any_value::Value::IntValue(n.ok_or_else(|| {
            mistyped("expected a 64-bit integer in intValue")
        })?))
    } else if let Some(x) = found("doubleValue", "double_value") {
        let x = match x {
            Value::Number(number) => number.as_f64(),
            Value::String(text) => match text.as_str() {
                "NaN" => Some(f64::NAN),
                "Infinity" => Some(f64::INFINITY),
                "-Infinity" => Some(f64::NEG_INFINITY),
                text => text.parse::<f64>().ok(),
            },
            _ => None,
        };
        Some(any_value::Value::DoubleValue(x.ok_or_else(|| {
            mistyped("expected a number in doubleValue")
        })?))
    } else if let Some(array) = found("arrayValue", "array_value") {
        let array = object(array, name)?;
        let values = match field(array, "values", "values") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| json_any(item, name))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(wrong(name, "an array in arrayValue.values", other)),
        };
        Some(any_value::Value::ArrayValue(ArrayValue { values }))
    } else if let Some(list) = found("kvlistValue", "kvlist_value") {
        let list = object(list, name)?;
        let values = key_values(field(list, "values", "values"), name)?;
        Some(any_value::Value::KvlistValue(KeyValueList { values }))
    } else if let Some(bytes) = found("bytesValue", "bytes_value") {
        let decoded = match bytes {
            Value::String(text) => base64::engine::general_purpose::STANDARD.decode(text).ok(),
            _ => None,
        };
        Some(any_value::Value::BytesValue(
            decoded.ok_or_else(|| mistyped("expected base64 in bytesValue"))?,
        ))
    } else {
        None
    };
    Ok(AnyValue { value })
}

/// A log record of the JSON encoding, as protobuf's.
fn json_log_record(value: &Value) -> Result<LogRecord, DecodeError> {
    let record = object(value, "logRecords")?;
    let get = |camel: &str, snake: &str| field(record, camel, snake);
    let body = match get("body", "body") {
        None | Some(Value::Null) => None,
        Some(body) => Some(json_any(body, "body")?),
    };
    Ok(LogRecord {
        time_unix_nano: unsigned(get("timeUnixNano", "time_unix_nano"), "timeUnixNano")?,
        observed_time_unix_nano: unsigned(
            get("observedTimeUnixNano", "observed_time_unix_nano"),
            "observedTimeUnixNano",
        )?,
        severity_number: severity_number(get("severityNumber", "severity_number"))?,
        severity_text: string(get("severityText", "severity_text"), "severityText")?,
        body,
        attributes: key_values(get("attributes", "attributes"), "attributes")?,
        trace_id: id(get("traceId", "trace_id"), 16, "traceId")?,
        span_id: id(get("spanId", "span_id"), 8, "spanId")?,
        event_name: string(get("eventName", "event_name"), "eventName")?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use proptest::prelude::*;

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn text(value: &str) -> any_value::Value {
        any_value::Value::StringValue(value.into())
    }

    fn record(number: i32, severity_text: &str, body: Option<any_value::Value>) -> LogRecord {
        LogRecord {
            time_unix_nano: 1_700_000_000_123_456_789,
            severity_number: number,
            severity_text: severity_text.into(),
            body: body.map(|value| AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    /// What the collector's Kafka exporter writes: one resource (with `service.name`), one
    /// scope, three log records.
    fn batch(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", text("checkout")),
                        kv("host.name", text("web-1")),
                        kv("region", text("eu")),
                    ],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "app.payments".into(),
                        version: "1.2.0".into(),
                        attributes: vec![kv("region", text("eu-west"))],
                        ..Default::default()
                    }),
                    log_records: records,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn three() -> Vec<LogRecord> {
        let mut error = record(17, "ERROR", Some(text("payment failed")));
        error.attributes = vec![
            kv("http.status_code", any_value::Value::IntValue(503)),
            kv("region", text("eu-west-1")),
            kv("message", text("clash")),
        ];
        error.trace_id = (1..=16).collect();
        error.span_id = (1..=8).collect();
        let mut warning = record(
            0,
            "WARN",
            Some(any_value::Value::KvlistValue(KeyValueList {
                values: vec![kv("retry", any_value::Value::BoolValue(true))],
            })),
        );
        warning.time_unix_nano = 0;
        warning.observed_time_unix_nano = 1_700_000_001_000_000_000;
        let info = record(9, "", Some(any_value::Value::IntValue(7)));
        vec![error, warning, info]
    }

    fn event(part: &Part) -> Value {
        serde_json::from_slice(&part.payload).expect("an event is JSON")
    }

    fn levels(parts: &[Part]) -> Vec<Result<String, &'static str>> {
        parts
            .iter()
            .map(|part| match &part.decoded {
                Ok((level, _)) => Ok(level.to_string()),
                Err(err) => Err(err.reason()),
            })
            .collect()
    }

    fn proto(request: &ExportLogsServiceRequest) -> Vec<Part> {
        split(OtlpEncoding::Proto, Some(&request.encode_to_vec()), 1 << 20).expect("a batch")
    }

    /// The same three log records in the OTLP JSON encoding, as the collector writes it.
    const JSON_BATCH: &str = r#"{"resourceLogs":[{"resource":{"attributes":[
        {"key":"service.name","value":{"stringValue":"checkout"}},
        {"key":"host.name","value":{"stringValue":"web-1"}},
        {"key":"region","value":{"stringValue":"eu"}}]},
      "scopeLogs":[{"scope":{"name":"app.payments","version":"1.2.0",
          "attributes":[{"key":"region","value":{"stringValue":"eu-west"}}]},
        "logRecords":[
          {"timeUnixNano":"1700000000123456789","severityNumber":17,"severityText":"ERROR",
           "body":{"stringValue":"payment failed"},
           "attributes":[{"key":"http.status_code","value":{"intValue":"503"}},
             {"key":"region","value":{"stringValue":"eu-west-1"}},
             {"key":"message","value":{"stringValue":"clash"}}],
           "traceId":"0102030405060708090A0B0C0D0E0F10","spanId":"0102030405060708"},
          {"observedTimeUnixNano":"1700000001000000000","severityText":"WARN",
           "body":{"kvlistValue":{"values":[{"key":"retry","value":{"boolValue":true}}]}}},
          {"timeUnixNano":1700000000123456789,"severityNumber":"SEVERITY_NUMBER_INFO",
           "body":{"intValue":7}}]}]}]}"#;

    #[test]
    fn each_log_record_of_a_protobuf_batch_is_an_event() {
        let parts = proto(&batch(three()));
        assert_eq!(
            levels(&parts),
            vec![Ok("error".into()), Ok("warning".into()), Ok("info".into())]
        );
        for part in &parts {
            let service = part.decoded.as_ref().ok().and_then(|(_, s)| s.as_deref());
            assert_eq!(service, Some("checkout"));
        }
        assert_eq!(
            event(&parts[0]),
            serde_json::json!({
                "level": "error",
                "message": "payment failed",
                "service": "checkout",
                "ts": "2023-11-14T22:13:20.123456789Z",
                "severityNumber": 17,
                "severityText": "ERROR",
                "traceId": "0102030405060708090a0b0c0d0e0f10",
                "spanId": "0102030405060708",
                "otel.scope.name": "app.payments",
                "otel.scope.version": "1.2.0",
                "service.name": "checkout",
                "host.name": "web-1",
                // The log record's attribute wins over the scope's, which wins over the
                // resource's.
                "region": "eu-west-1",
                "http.status_code": 503,
                // An attribute named like a field of the event is kept apart.
                "attributes": {"message": "clash"},
            })
        );
        let warning = event(&parts[1]);
        assert_eq!(warning["message"], r#"{"retry":true}"#, "a kvlist as JSON");
        assert_eq!(
            warning["ts"], "2023-11-14T22:13:21.000000000Z",
            "observed time without a time"
        );
        assert!(warning.get("severityNumber").is_none());
        assert_eq!(event(&parts[2])["message"], "7");
    }

    #[test]
    fn the_json_encoding_gives_the_same_events() {
        let json = split(OtlpEncoding::Json, Some(JSON_BATCH.as_bytes()), 1 << 20).expect("ok");
        let proto = proto(&batch(three()));
        assert_eq!(json.len(), 3);
        for (json, proto) in json.iter().zip(&proto) {
            assert_eq!(event(json), event(proto));
            assert_eq!(json.decoded, proto.decoded);
        }
        // The proto field names are valid OTLP JSON too.
        let snake = r#"{"resource_logs":[{"scope_logs":[{"log_records":[
            {"severity_number":21,"body":{"string_value":"down"}}]}]}]}"#;
        let parts = split(OtlpEncoding::Json, Some(snake.as_bytes()), 1 << 20).expect("ok");
        assert_eq!(levels(&parts), vec![Ok("fatal".into())]);
        assert_eq!(event(&parts[0])["message"], "down");
        assert!(event(&parts[0]).get("service").is_none());
    }

    #[test]
    fn severity_numbers_then_texts_make_the_level() {
        let by_number = [
            (1, "trace"),
            (4, "trace"),
            (5, "debug"),
            (8, "debug"),
            (9, "info"),
            (12, "info"),
            (13, "warning"),
            (16, "warning"),
            (17, "error"),
            (20, "error"),
            (21, "fatal"),
            (24, "fatal"),
        ];
        for (number, want) in by_number {
            // The number wins over a text that says otherwise.
            assert_eq!(
                level_of(number, "INFO").map(|l| l.to_string()),
                Ok(want.into())
            );
        }
        for (text, want) in [
            ("WARN", "warning"),
            ("Error", "error"),
            ("notice", "info"),
            ("CRIT", "critical"),
            ("audit", "audit"),
        ] {
            assert_eq!(level_of(0, text).map(|l| l.to_string()), Ok(want.into()));
            assert_eq!(level_of(99, text).map(|l| l.to_string()), Ok(want.into()));
        }
        assert_eq!(
            level_of(0, ""),
            Err(DecodeError::MissingField { field: "severity" })
        );
        assert_eq!(
            level_of(-3, " ").map_err(|e| e.to_string()),
            Err("field `severityNumber` has the wrong type: expected 0 to 24, found -3".into())
        );
        assert_eq!(severity_name("SEVERITY_NUMBER_WARN2"), Some(14));
        assert_eq!(severity_name("SEVERITY_NUMBER_FATAL4"), Some(24));
        assert_eq!(severity_name("SEVERITY_NUMBER_UNSPECIFIED"), Some(0));
        assert_eq!(severity_name("SEVERITY_NUMBER_WARN5"), None);
        assert_eq!(severity_name("WARN"), None);
    }

    #[test]
    fn a_bad_log_record_is_refused_alone_and_travels_alone() {
        let mut records = three();
        records.insert(1, record(0, "", Some(text("no severity"))));
        let mut bad_id = record(9, "", Some(text("short trace id")));
        bad_id.trace_id = vec![1, 2, 3];
        records.push(bad_id);
        let request = batch(records);
        let parts = proto(&request);
        assert_eq!(
            levels(&parts),
            vec![
                Ok("error".into()),
                Err("missing_field"),
                Ok("warning".into()),
                Ok("info".into()),
                Err("wrong_type"),
            ]
        );
        assert_eq!(
            parts[4].decoded.as_ref().map_err(ToString::to_string).err(),
            Some("field `traceId` has the wrong type: expected 16 bytes, found 3".into())
        );
        // What the dead-letter topic gets: the request with that record alone.
        let alone = ExportLogsServiceRequest::decode(&parts[1].payload[..]).expect("protobuf");
        assert_eq!(alone.resource_logs.len(), 1);
        assert_eq!(
            alone.resource_logs[0].resource,
            request.resource_logs[0].resource
        );
        let scope_logs = &alone.resource_logs[0].scope_logs;
        assert_eq!(
            scope_logs[0].scope,
            request.resource_logs[0].scope_logs[0].scope
        );
        assert_eq!(
            scope_logs[0].log_records,
            vec![request.resource_logs[0].scope_logs[0].log_records[1].clone()]
        );
    }

    #[test]
    fn a_bad_json_log_record_is_refused_alone_and_travels_alone() {
        let text = r#"{"resourceLogs":[{"resource":{"attributes":[
            {"key":"service.name","value":{"stringValue":"cart"}}]},"scopeLogs":[{"logRecords":[
            {"severityNumber":9,"body":{"stringValue":"ok"}},
            {"severityNumber":"loud","body":{"stringValue":"bad"}},
            {"severityNumber":17,"traceId":"zz"},
            {"severityNumber":17,"timeUnixNano":"soon"},
            {"severityNumber":17,"attributes":[{"key":"a","value":{"intValue":"x"}}]},
            {"severityNumber":13,"body":{"stringValue":"also ok"}}]}]}]}"#;
        let parts = split(OtlpEncoding::Json, Some(text.as_bytes()), 1 << 20).expect("batch");
        assert_eq!(
            levels(&parts),
            vec![
                Ok("info".into()),
                Err("wrong_type"),
                Err("wrong_type"),
                Err("wrong_type"),
                Err("wrong_type"),
                Ok("warning".into()),
            ]
        );
        let fields: Vec<&str> = parts[1..5]
            .iter()
            .map(|part| match &part.decoded {
                Err(DecodeError::WrongType { field, .. }) => *field,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            fields,
            ["severityNumber", "traceId", "timeUnixNano", "attributes"]
        );
        let alone: Value = serde_json::from_slice(&parts[1].payload).expect("JSON");
        assert_eq!(
            alone,
            serde_json::json!({"resourceLogs":[{
                "resource":{"attributes":[{"key":"service.name","value":{"stringValue":"cart"}}]},
                "scopeLogs":[{"logRecords":[{"severityNumber":"loud","body":{"stringValue":"bad"}}]}]
            }]})
        );
    }

    fn reason(encoding: OtlpEncoding, payload: Option<&[u8]>) -> &'static str {
        match split(encoding, payload, 4096) {
            Ok(parts) => panic!("expected a refusal, got {} parts", parts.len()),
            Err(err) => err.reason(),
        }
    }

    /// A kvlist body nested `depth` deep.
    fn nested(depth: usize) -> AnyValue {
        let mut value = AnyValue {
            value: Some(text("leaf")),
        };
        for _ in 0..depth {
            value = AnyValue {
                value: Some(any_value::Value::KvlistValue(KeyValueList {
                    values: vec![KeyValue {
                        key: "k".into(),
                        value: Some(value),
                        ..Default::default()
                    }],
                })),
            };
        }
        value
    }

    #[test]
    fn payloads_that_are_not_requests_are_refused_whole_with_a_reason() {
        use OtlpEncoding::{Json, Proto};
        let good = batch(three()).encode_to_vec();
        assert_eq!(reason(Proto, None), "empty");
        assert_eq!(reason(Proto, Some(b"")), "empty");
        assert_eq!(reason(Json, Some(b"")), "empty");
        assert_eq!(reason(Proto, Some(&good[..good.len() - 3])), "not_protobuf");
        assert_eq!(reason(Proto, Some(b"\xff\xff\xff\xff")), "not_protobuf");
        assert_eq!(reason(Proto, Some(JSON_BATCH.as_bytes())), "not_protobuf");
        assert_eq!(reason(Proto, Some(&[0u8; 5000])), "too_large");
        // Valid protobuf without a single log record (an empty message is a valid one).
        let no_records = batch(Vec::new()).encode_to_vec();
        assert_eq!(reason(Proto, Some(&no_records)), "missing_field");
        assert_eq!(reason(Json, Some(b"{}")), "missing_field");
        assert_eq!(
            reason(Json, Some(br#"{"resourceLogs":[]}"#)),
            "missing_field"
        );
        assert_eq!(reason(Json, Some(b"{\"resourceLogs\":")), "not_json");
        assert_eq!(reason(Json, Some(b"[1]")), "not_object");
        assert_eq!(reason(Json, Some(b"{\"a\":\"\xff\"}")), "not_utf8");
        assert_eq!(reason(Json, Some(br#"{"resourceLogs":5}"#)), "wrong_type");
        assert_eq!(reason(Json, Some(br#"{"resourceLogs":[7]}"#)), "wrong_type");
        let as_json = reason(Json, Some(&good));
        assert!(
            ["not_utf8", "not_json"].contains(&as_json),
            "protobuf read as JSON: {as_json}"
        );
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        assert_eq!(reason(Json, Some(deep.as_bytes())), "too_deep");
        // Past prost's nesting limit (100).
        let mut too_deep = record(9, "", None);
        too_deep.body = Some(nested(120));
        let mut request = batch(vec![too_deep]);
        let payload = request.encode_to_vec();
        assert_eq!(
            split(Proto, Some(&payload), 1 << 20)
                .map(|_| ())
                .map_err(|e| e.reason()),
            Err("too_deep")
        );
        // Within it: a body of 20 nested kvlists (three messages each) is fine.
        request.resource_logs[0].scope_logs[0].log_records[0].body = Some(nested(20));
        assert!(split(Proto, Some(&request.encode_to_vec()), 1 << 20).is_ok());
        // Many tiny log records: more than one Kafka record may hold.
        let many = batch(vec![record(9, "", None); MAX_LOG_RECORDS + 1]).encode_to_vec();
        assert_eq!(
            split(Proto, Some(&many), 1 << 20)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(format!(
                "payload holds too many log records ({}, limit {MAX_LOG_RECORDS})",
                MAX_LOG_RECORDS + 1
            ))
        );
        let limit = batch(vec![record(9, "", None); MAX_LOG_RECORDS]).encode_to_vec();
        assert_eq!(
            split(Proto, Some(&limit), 1 << 20).map(|parts| parts.len()),
            Ok(MAX_LOG_RECORDS)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = split(OtlpEncoding::Proto, Some(&bytes), 4096);
            let _ = split(OtlpEncoding::Json, Some(&bytes), 4096);
        }

        /// Cutting a valid request anywhere never panics, and what decodes still has its
        /// records in order.
        #[test]
        fn truncated_requests_never_panic(cut in 0usize..400) {
            let payload = batch(three()).encode_to_vec();
            let cut = cut.min(payload.len());
            let _ = split(OtlpEncoding::Proto, Some(&payload[..cut]), 4096);
            let _ = split(OtlpEncoding::Json, Some(&JSON_BATCH.as_bytes()[..cut.min(JSON_BATCH.len())]), 4096);
        }
    }
}

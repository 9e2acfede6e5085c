//! `type = "otlp"`: a batch as an OTLP/HTTP logs export (`ExportLogsServiceRequest`, protobuf,
//! gzip by default) to a collector's `/v1/logs`. The request itself (client, retries,
//! credentials, redaction, halving on 400/413) is the HTTP sink's ([`crate::http_sink`]); this
//! module maps each event onto the OpenTelemetry log data model and reads the answer.
//!
//! Mapping, for every logger shape the auto decoder reads ([`crate::event`]):
//!
//! | LogRecord | from |
//! |---|---|
//! | `severity_number` | the decoded level: trace 1, debug 5, info 9, warning 13, error 17, critical and fatal 21 (the event's own `severityNumber` where it has one of 1–24); another level: 0 (unspecified) |
//! | `severity_text` | the event's own `severityText`, else the level as the event wrote it (`WARN`, `Fatal`); a number (pino's `30`) or none (Serilog's default): the decoded name |
//! | `body` | the first of `message`, `msg`, `@m`, `body`, `event`, `fields.message` (as a string where it is one), else Serilog's `@mt` rendered with the event's properties |
//! | `time_unix_nano` | the first of `time`, `timestamp`, `ts`, `@timestamp`, `@t`, `timeUnixNano` that reads as a time (RFC 3339, or epoch seconds, milliseconds, microseconds or nanoseconds by magnitude); else the Kafka record's timestamp |
//! | `observed_time_unix_nano` | when the request is built |
//! | `trace_id`, `span_id` | `traceId`, `trace_id` or `trace.id`; `spanId`, `span_id` or `span.id` (32 and 16 hex digits; other values stay attributes) |
//! | `attributes` | every other field (objects as `kvlist`, arrays as `array`, integers as `int`, other numbers as `double`); an OpenTelemetry-shaped event's own `attributes` object is merged in; plus `logbridge.source.topic`, `logbridge.source.partition` and `logbridge.source.offset` |
//! | resource `service.name` | the decoded service (`service`, `service.name`, `serviceContext.service`); records are grouped into one `ResourceLogs` per service; none: no `service.name` |
//! | scope | `logbridge`, with logbridge's version |
//!
//! The fields used for the level, the message, the time and the service are not repeated as
//! attributes. A record whose payload is not a JSON object cannot be mapped: it fails for good
//! with reason `otlp_not_encodable` (dead-lettered) and the rest of the batch is sent.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use serde_json::{Map, Value};

use crate::record::Record;
use crate::sink::SinkError;

/// The path a base URL gets (OTLP/HTTP's default for logs).
pub const LOGS_PATH: &str = "/v1/logs";

/// Fields that hold the level, in the auto decoder's order (`log` → `level` is handled apart).
const LEVEL_FIELDS: &[&str] = &[
    "level",
    "log.level",
    "severity",
    "severityText",
    "severityNumber",
    "levelname",
    "@l",
];
/// Fields that hold the message, first found wins (`fields` → `message` after `event`).
const MESSAGE_FIELDS: &[&str] = &["message", "msg", "@m", "body", "event"];
/// Fields that hold the trace and span ids (hex), first that reads as one wins.
const TRACE_ID_FIELDS: &[&str] = &["traceId", "trace_id", "trace.id"];
const SPAN_ID_FIELDS: &[&str] = &["spanId", "span_id", "span.id"];
/// Fields that hold the event's time, first that reads as a time wins.
const TIME_FIELDS: &[&str] = &[
    "time",
    "timestamp",
    "ts",
    "@timestamp",
    "@t",
    "timeUnixNano",
];

/// The OpenTelemetry severity number of a decoded level (the first of its range of four).
pub fn severity_number(level: &str) -> i32 {
    match level {
        "trace" => 1,
        "debug" => 5,
        "info" => 9,
        "warning" => 13,
        "error" => 17,
        "critical" | "fatal" => 21,
        _ => 0,
    }
}

/// Writes the request for `records` to `out`, and returns, for each record that could not be
/// mapped (and is not in the request), why.
pub fn encode(
    records: &[&Record],
    observed_unix_nano: u64,
    out: &mut Vec<u8>,
) -> Vec<Option<SinkError>> {
    let mut failures = Vec::with_capacity(records.len());
    // One ResourceLogs per service, in the order services first appear.
    let mut resources: Vec<(Option<&str>, Vec<LogRecord>)> = Vec::new();
    for record in records {
        let log = match log_record(record, observed_unix_nano) {
            Ok(log) => log,
            Err(err) => {
                failures.push(Some(err));
                continue;
            }
        };
        failures.push(None);
        let service = record.service.as_deref();
        match resources.iter_mut().find(|(known, _)| *known == service) {
            Some((_, logs)) => logs.push(log),
            None => resources.push((service, vec![log])),
        }
    }
    let request = ExportLogsServiceRequest {
        resource_logs: resources
            .into_iter()
            .map(|(service, log_records)| ResourceLogs {
                resource: Some(Resource {
                    attributes: service
                        .map(|name| key_value("service.name", string(name)))
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "logbridge".to_string(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        ..Default::default()
                    }),
                    log_records,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    };
    out.reserve(request.encoded_len());
    // A Vec grows as needed: `encode_raw` cannot run out of room.
    request.encode_raw(out);
    failures
}

/// Now, in nanoseconds since the epoch.
pub fn now_unix_nano() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

fn not_encodable(detail: impl Into<String>) -> SinkError {
    SinkError::permanent("otlp_not_encodable", detail)
}

/// One event as a LogRecord.
fn log_record(record: &Record, observed_unix_nano: u64) -> Result<LogRecord, SinkError> {
    let level = match &record.decoded {
        Some(Ok(level)) => level.as_str().to_string(),
        _ => return Err(not_encodable("the record was not decoded as a log event")),
    };
    // The event: the payload's object, the serde form's inner one (with its level), or what a
    // line of text makes of it (the line as `message`, its fields).
    let mut fields = match record.event() {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => return Err(not_encodable("the payload is not a JSON object")),
        Err(err) => return Err(not_encodable(format!("the payload is not JSON: {err}"))),
    };

    // OpenTelemetry-shaped events carry their own number; the text is the first level field.
    let own_number = fields
        .get("severityNumber")
        .and_then(Value::as_i64)
        .filter(|n| (1..=24).contains(n))
        .and_then(|n| i32::try_from(n).ok());
    // An OpenTelemetry-shaped event's own text wins over a `level` beside it (the otlp input
    // formats write both: `level` normalised for routing, `severityText` as the producer wrote it).
    let mut severity_text = fields
        .get("severityText")
        .and_then(Value::as_str)
        .filter(|text| !text.is_empty())
        .map(str::to_string);
    let mut otel_shaped = false;
    for name in LEVEL_FIELDS {
        if let Some(value) = fields.shift_remove(*name) {
            otel_shaped |= matches!(*name, "severityText" | "severityNumber");
            if severity_text.is_none() {
                severity_text = value.as_str().map(str::to_string);
                if severity_text.is_none() && !value.is_null() {
                    severity_text = Some(level.clone());
                }
            }
        }
        if *name == "log.level" {
            // ECS nested: `log` → `level` (other `log` fields stay).
            if let Some(Value::Object(log)) = fields.get_mut("log") {
                if let Some(value) = log.shift_remove("level") {
                    if severity_text.is_none() {
                        severity_text = Some(value.as_str().map_or(level.clone(), str::to_string));
                    }
                }
                if log.is_empty() {
                    fields.shift_remove("log");
                }
            }
        }
    }
    let severity_number = own_number.unwrap_or_else(|| severity_number(&level));

    // structlog's `event` is its message; ECS's `event` is an object of its own.
    let event_is_text = fields.get("event").is_some_and(Value::is_string);
    let mut body = MESSAGE_FIELDS
        .iter()
        .filter(|name| **name != "event" || event_is_text)
        .find_map(|name| fields.shift_remove(*name).filter(|value| !value.is_null()));
    if body.is_none() {
        if let Some(Value::Object(nested)) = fields.get_mut("fields") {
            // tracing-subscriber's JSON.
            body = nested.shift_remove("message");
            if nested.is_empty() {
                fields.shift_remove("fields");
            }
        }
    }
    if body.is_none() {
        // Serilog's compact JSON without `@m`: the message template, rendered with the event's
        // properties (which stay attributes).
        body = fields.shift_remove("@mt").map(|template| match template {
            Value::String(template) => Value::String(render_template(&template, &fields)),
            other => other,
        });
    }

    let mut time_unix_nano = None;
    for name in TIME_FIELDS {
        if let Some(nanos) = fields.get(*name).and_then(unix_nano) {
            fields.shift_remove(*name);
            time_unix_nano = Some(nanos);
            break;
        }
    }
    let time_unix_nano = time_unix_nano
        .or_else(|| {
            record
                .timestamp
                .and_then(|ms| u64::try_from(ms).ok())
                .map(|ms| ms.saturating_mul(1_000_000))
        })
        .unwrap_or(0);

    let trace_id = take_id(&mut fields, TRACE_ID_FIELDS, 16);
    let span_id = take_id(&mut fields, SPAN_ID_FIELDS, 8);

    // The service is the resource's.
    if record.service.is_some() {
        match fields.get_mut("service") {
            Some(Value::String(_)) => {
                fields.shift_remove("service");
            }
            Some(Value::Object(service)) => {
                service.shift_remove("name");
                if service.is_empty() {
                    fields.shift_remove("service");
                }
            }
            _ => {}
        }
        fields.shift_remove("service.name");
    }
    // An OpenTelemetry-shaped event's attributes are the record's attributes.
    if otel_shaped {
        if let Some(Value::Object(own)) = fields.get("attributes") {
            let own = own.clone();
            fields.shift_remove("attributes");
            for (key, value) in own {
                fields.entry(key).or_insert(value);
            }
        }
    }

    let mut attributes: Vec<KeyValue> = fields
        .into_iter()
        .map(|(key, value)| KeyValue {
            key,
            value: Some(any_value(value)),
            ..Default::default()
        })
        .collect();
    attributes.push(key_value(
        "logbridge.source.topic",
        string(&record.source.topic),
    ));
    attributes.push(key_value(
        "logbridge.source.partition",
        int(i64::from(record.source.partition)),
    ));
    attributes.push(key_value("logbridge.source.offset", int(record.offset)));

    Ok(LogRecord {
        time_unix_nano,
        observed_time_unix_nano: observed_unix_nano,
        severity_number,
        severity_text: severity_text.unwrap_or(level),
        body: body.map(any_value),
        attributes,
        trace_id,
        span_id,
        ..Default::default()
    })
}

/// The first of `names` whose value is `bytes` bytes in hex, not all zero (an invalid id in
/// OTLP), removed from `fields` and decoded; empty (no id) if none is.
fn take_id(fields: &mut Map<String, Value>, names: &[&str], bytes: usize) -> Vec<u8> {
    for name in names {
        let Some(Value::String(text)) = fields.get(*name) else {
            continue;
        };
        let Some(id) = hex(text).filter(|id| id.len() == bytes && id.iter().any(|b| *b != 0))
        else {
            continue;
        };
        fields.shift_remove(*name);
        return id;
    }
    Vec::new()
}

/// `text` as hex digits, two a byte.
fn hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |byte: u8| char::from(byte).to_digit(16);
    text.as_bytes()
        .chunks(2)
        .map(|pair| u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok())
        .collect()
}

/// A Serilog message template with each `{Name}` (also `{@Name}`, `{$Name}`, `{Name:format}`,
/// `{Name,width}`) replaced by the property's value (a string as it is, anything else as JSON;
/// the format and width are not applied), `{{` and `}}` as braces; a hole without a property is
/// left as written.
fn render_template(template: &str, properties: &Map<String, Value>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        let hole = tail.starts_with('{').then(|| tail.find('}')).flatten();
        let Some(end) = hole else {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
            continue;
        };
        let inner = &tail[1..end];
        let name = inner
            .trim_start_matches(['@', '$'])
            .split([':', ','])
            .next()
            .unwrap_or_default();
        match properties.get(name) {
            Some(Value::String(text)) => out.push_str(text),
            Some(value) => out.push_str(&value.to_string()),
            None => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A time field's value in nanoseconds since the epoch: RFC 3339 text, or a number (or a string
/// of digits) of seconds, milliseconds, microseconds or nanoseconds, told apart by magnitude
/// (any time after 1973 is unambiguous).
fn unix_nano(value: &Value) -> Option<u64> {
    let nanos = match value {
        Value::String(text) => match text.parse::<u64>() {
            Ok(n) => scale(n),
            Err(_) => {
                let parsed = chrono::DateTime::parse_from_rfc3339(text).ok()?;
                u64::try_from(parsed.timestamp_nanos_opt()?).ok()?
            }
        },
        Value::Number(number) => match number.as_u64() {
            Some(n) => scale(n),
            // Seconds with a fraction (zap's `ts`); `as` saturates past 2554.
            None => (number.as_f64()? * 1e9) as u64,
        },
        _ => return None,
    };
    (nanos > 0).then_some(nanos)
}

/// An integer epoch time of unknown unit, in nanoseconds.
fn scale(n: u64) -> u64 {
    const SECONDS_BELOW: u64 = 100_000_000_000;
    const MILLIS_BELOW: u64 = 100_000_000_000_000;
    const MICROS_BELOW: u64 = 100_000_000_000_000_000;
    match n {
        0..SECONDS_BELOW => n * 1_000_000_000,
        SECONDS_BELOW..MILLIS_BELOW => n * 1_000_000,
        MILLIS_BELOW..MICROS_BELOW => n * 1_000,
        _ => n,
    }
}

fn key_value(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(value),
        ..Default::default()
    }
}

fn string(text: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(text.to_string())),
    }
}

fn int(n: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(n)),
    }
}

/// A JSON value as an AnyValue: null is an AnyValue without a value (OTLP's empty value).
fn any_value(value: Value) -> AnyValue {
    let value = match value {
        Value::Null => None,
        Value::Bool(flag) => Some(any_value::Value::BoolValue(flag)),
        Value::Number(number) => Some(match number.as_i64() {
            Some(n) => any_value::Value::IntValue(n),
            // A fraction, or an integer past i64 (u64 above i64::MAX).
            None => any_value::Value::DoubleValue(number.as_f64().unwrap_or(f64::NAN)),
        }),
        Value::String(text) => Some(any_value::Value::StringValue(text)),
        Value::Array(items) => Some(any_value::Value::ArrayValue(ArrayValue {
            values: items.into_iter().map(any_value).collect(),
        })),
        Value::Object(entries) => Some(any_value::Value::KvlistValue(kvlist(entries))),
    };
    AnyValue { value }
}

fn kvlist(entries: Map<String, Value>) -> KeyValueList {
    KeyValueList {
        values: entries
            .into_iter()
            .map(|(key, value)| KeyValue {
                key,
                value: Some(any_value(value)),
                ..Default::default()
            })
            .collect(),
    }
}

/// What a 2xx answer says: the records the collector rejected for good (OTLP's partial
/// success) and its message. An empty or undecodable answer is full success (OTLP: a server
/// that accepted everything may answer without a body).
pub fn rejected(answer: &[u8]) -> Option<(i64, String)> {
    let response = ExportLogsServiceResponse::decode(answer).ok()?;
    let partial = response.partial_success?;
    (partial.rejected_log_records > 0 || !partial.error_message.is_empty())
        .then_some((partial.rejected_log_records, partial.error_message))
}

/// `google.rpc.Status`, the body of an OTLP/HTTP error answer in protobuf.
#[derive(Clone, PartialEq, prost::Message)]
struct Status {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// The message of an OTLP error answer (a protobuf `Status`), or `None` where the body is not
/// one (a proxy's text or HTML: shown as it is).
pub fn error_message(body: &[u8]) -> Option<String> {
    let status = Status::decode(body).ok()?;
    (!status.message.is_empty()).then_some(status.message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_record;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsPartialSuccess;

    fn record(offset: i64, payload: &str, level: &str, service: Option<&str>) -> Record {
        let mut record = test_record(0, offset, None, Some(payload.as_bytes()));
        record.decoded = Some(Ok(crate::event::Level::new(level)));
        record.service = service.map(Box::from);
        record.timestamp = Some(1_000);
        record
    }

    fn decode(body: &[u8]) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest::decode(body).expect("a request")
    }

    fn attribute<'a>(log: &'a LogRecord, key: &str) -> Option<&'a any_value::Value> {
        log.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    /// A log record read from an OTLP request (`input.format = "otlp_proto"`) is exported as
    /// the same log record: severity, body, time, ids, service and attributes.
    #[test]
    fn otlp_input_is_exported_as_the_log_record_it_was() {
        use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
        let string = |text: &str| AnyValue {
            value: Some(any_value::Value::StringValue(text.into())),
        };
        let original = LogRecord {
            time_unix_nano: 1_700_000_000_123_456_789,
            severity_number: 18,
            severity_text: "ERROR2".into(),
            body: Some(string("payment failed")),
            attributes: vec![KeyValue {
                key: "http.status_code".into(),
                value: Some(int(503)),
                ..Default::default()
            }],
            trace_id: (1..=16).collect(),
            span_id: (1..=8).collect(),
            ..Default::default()
        };
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(string("checkout")),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    log_records: vec![original.clone()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
        .encode_to_vec();
        let parts = crate::event::Decoder::from(crate::event::InputFormat::OtlpProto)
            .split(Some(&request), usize::MAX)
            .expect("splits")
            .expect("a request");
        let source = test_record(0, 9, None, Some(&request));
        let part = &parts[0];
        let record = source.part(0, &part.payload, part.decoded.clone(), None);
        let mut body = Vec::new();
        assert_eq!(encode(&[&record], 7, &mut body), vec![None]);
        let exported = decode(&body);
        let resource = &exported.resource_logs[0];
        assert_eq!(
            resource.resource.as_ref().expect("a resource").attributes[0].value,
            Some(string("checkout"))
        );
        let log = &resource.scope_logs[0].log_records[0];
        assert_eq!(log.time_unix_nano, original.time_unix_nano);
        assert_eq!(log.severity_number, 18);
        assert_eq!(log.severity_text, "ERROR2");
        assert_eq!(log.body, original.body);
        assert_eq!(
            (&log.trace_id, &log.span_id),
            (&original.trace_id, &original.span_id)
        );
        assert_eq!(
            attribute(log, "http.status_code"),
            Some(&any_value::Value::IntValue(503))
        );
        assert!(attribute(log, "level").is_none() && attribute(log, "message").is_none());
    }

    #[test]
    fn events_map_onto_the_log_data_model_grouped_by_service() {
        let records = [
            record(
                1,
                r#"{"level":"WARN","msg":"slow","time":"2024-05-01T10:00:00Z","service":"cart","n":3,"x":1.5,"ok":true,"tags":["a",2],"ctx":{"k":"v"},"none":null}"#,
                "warning",
                Some("cart"),
            ),
            record(
                2,
                r#"{"level":30,"msg":"hi","time":1714557600000}"#,
                "info",
                None,
            ),
            record(
                3,
                r#"{"severityNumber":18,"severityText":"ERROR2","body":"b","attributes":{"a":1},"service.name":"cart","traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"eee19b7ec3c1b174","span.id":"00"}"#,
                "error",
                Some("cart"),
            ),
            record(4, "[1]", "info", None),
        ];
        let refs: Vec<&Record> = records.iter().collect();
        let mut body = Vec::new();
        let failures = encode(&refs, 7, &mut body);
        assert!(failures[..3].iter().all(Option::is_none));
        assert_eq!(
            failures[3].as_ref().map(|err| err.reason),
            Some("otlp_not_encodable")
        );
        let request = decode(&body);
        assert_eq!(request.resource_logs.len(), 2, "cart, and no service");
        let cart = &request.resource_logs[0];
        assert_eq!(
            cart.resource.as_ref().unwrap().attributes[0].key,
            "service.name"
        );
        let scope = &cart.scope_logs[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "logbridge");
        let [first, third] = &scope.log_records[..] else {
            panic!("two cart records");
        };
        assert_eq!(first.severity_number, 13);
        assert_eq!(first.severity_text, "WARN");
        assert_eq!(
            first.body.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("slow".into()))
        );
        assert_eq!(first.time_unix_nano, 1_714_557_600_000_000_000);
        assert_eq!(first.observed_time_unix_nano, 7);
        assert_eq!(attribute(first, "n"), Some(&any_value::Value::IntValue(3)));
        assert_eq!(
            attribute(first, "x"),
            Some(&any_value::Value::DoubleValue(1.5))
        );
        assert_eq!(
            attribute(first, "ok"),
            Some(&any_value::Value::BoolValue(true))
        );
        assert!(matches!(
            attribute(first, "tags"),
            Some(any_value::Value::ArrayValue(_))
        ));
        assert!(matches!(
            attribute(first, "ctx"),
            Some(any_value::Value::KvlistValue(_))
        ));
        assert!(first.attributes.iter().any(|kv| kv.key == "none"));
        for used in ["level", "msg", "time", "service"] {
            assert!(attribute(first, used).is_none(), "{used} repeated");
        }
        assert_eq!(
            attribute(first, "logbridge.source.offset"),
            Some(&any_value::Value::IntValue(1))
        );
        assert_eq!(third.severity_number, 18, "the event's own number");
        assert_eq!(third.severity_text, "ERROR2");
        assert_eq!(attribute(third, "a"), Some(&any_value::Value::IntValue(1)));
        assert!(attribute(third, "service.name").is_none());
        assert_eq!(
            third.trace_id,
            [
                0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03, 0xd2, 0x69, 0xb6, 0x33, 0x81, 0x3f,
                0xc6, 0x0c
            ]
        );
        assert_eq!(
            third.span_id,
            [0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74]
        );
        assert!(attribute(third, "traceId").is_none());
        assert!(attribute(third, "span.id").is_some(), "not an id: kept");
        assert!(first.trace_id.is_empty());

        let plain = &request.resource_logs[1];
        assert!(plain.resource.as_ref().unwrap().attributes.is_empty());
        let pino = &plain.scope_logs[0].log_records[0];
        assert_eq!(pino.severity_number, 9);
        assert_eq!(pino.severity_text, "info", "a number: the decoded name");
        assert_eq!(pino.time_unix_nano, 1_714_557_600_000_000_000);
    }

    /// A line of text: the line is the body, its fields attributes, its service the resource's;
    /// a serde-form event: the object under its key.
    #[test]
    fn text_lines_and_the_serde_form_map_onto_the_log_data_model() {
        let line = crate::record::test_record_read(
            &crate::record::test_text_decoder(),
            1,
            b"cart [WARN] slow checkout ms=812\n",
        );
        let wrapped = crate::record::test_record_read(
            &crate::event::Decoder::from(crate::event::InputFormat::Auto),
            2,
            br#"{"Error":{"code":503,"message":"upstream timeout","service":"billing"}}"#,
        );
        let mut body = Vec::new();
        let failures = encode(&[&line, &wrapped], 0, &mut body);
        assert!(failures.iter().all(Option::is_none), "{failures:?}");
        let request = decode(&body);
        let by_service = |name: &str| {
            request
                .resource_logs
                .iter()
                .find(|resource| {
                    resource.resource.as_ref().is_some_and(|resource| {
                        resource.attributes.iter().any(|kv| {
                            kv.key == "service.name"
                                && kv.value.as_ref().and_then(|v| v.value.as_ref())
                                    == Some(&any_value::Value::StringValue(name.to_string()))
                        })
                    })
                })
                .map(|resource| resource.scope_logs[0].log_records[0].clone())
                .unwrap_or_else(|| panic!("no resource of service {name}"))
        };
        let text = by_service("cart");
        assert_eq!(text.severity_number, 13);
        assert_eq!(
            text.body.as_ref().and_then(|body| body.value.clone()),
            Some(any_value::Value::StringValue(
                "cart [WARN] slow checkout ms=812".to_string()
            ))
        );
        assert_eq!(
            attribute(&text, "ms"),
            Some(&any_value::Value::StringValue("812".to_string()))
        );
        assert!(attribute(&text, "level").is_none());
        let serde_form = by_service("billing");
        assert_eq!(serde_form.severity_number, 17);
        assert_eq!(
            serde_form.body.as_ref().and_then(|body| body.value.clone()),
            Some(any_value::Value::StringValue(
                "upstream timeout".to_string()
            ))
        );
        assert_eq!(
            attribute(&serde_form, "code"),
            Some(&any_value::Value::IntValue(503))
        );
        assert!(attribute(&serde_form, "Error").is_none());
    }

    #[test]
    fn times_read_by_magnitude_and_fall_back_to_the_kafka_timestamp() {
        let at = 1_714_557_600_000_000_000u64;
        assert_eq!(unix_nano(&serde_json::json!(1_714_557_600)), Some(at));
        assert_eq!(
            unix_nano(&serde_json::json!(1_714_557_600_000u64)),
            Some(at)
        );
        assert_eq!(
            unix_nano(&serde_json::json!(1_714_557_600_000_000u64)),
            Some(at)
        );
        assert_eq!(unix_nano(&serde_json::json!(at)), Some(at));
        assert_eq!(unix_nano(&serde_json::json!(at.to_string())), Some(at));
        assert_eq!(
            unix_nano(&serde_json::json!("2024-05-01T12:00:00+02:00")),
            Some(at)
        );
        assert_eq!(unix_nano(&serde_json::json!("yesterday")), None);
        let records = [record(1, r#"{"level":"info","time":"soon"}"#, "info", None)];
        let mut body = Vec::new();
        encode(&[&records[0]], 0, &mut body);
        let log = &decode(&body).resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(log.time_unix_nano, 1_000_000_000, "the Kafka timestamp");
        assert!(attribute(log, "time").is_some(), "kept when not a time");
        assert!(log.body.is_none());
    }

    #[test]
    fn serilog_templates_are_rendered_with_the_properties() {
        let properties = serde_json::json!({"User": "ann", "Amount": 9.5, "Items": [1, 2]});
        let Value::Object(properties) = properties else {
            unreachable!("an object literal")
        };
        for (template, rendered) in [
            ("{User} paid {Amount:0.00}", "ann paid 9.5"),
            ("{@Items} for {$User,10}", "[1,2] for ann"),
            ("{{literal}} {Missing} }", "{literal} {Missing} }"),
            ("no holes", "no holes"),
            ("{unclosed", "{unclosed"),
        ] {
            assert_eq!(
                render_template(template, &properties),
                rendered,
                "{template}"
            );
        }
        let records = [record(
            1,
            r#"{"@mt":"{User} logged in","User":"ann"}"#,
            "info",
            None,
        )];
        let mut body = Vec::new();
        encode(&[&records[0]], 0, &mut body);
        let log = &decode(&body).resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(
            log.body.as_ref().and_then(|body| body.value.clone()),
            Some(any_value::Value::StringValue("ann logged in".into()))
        );
        assert!(
            attribute(log, "User").is_some(),
            "properties stay attributes"
        );
    }

    #[test]
    fn answers_say_what_was_rejected() {
        let answer = ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess {
                rejected_log_records: 2,
                error_message: "too old".into(),
            }),
        };
        assert_eq!(
            rejected(&answer.encode_to_vec()),
            Some((2, "too old".to_string()))
        );
        assert_eq!(rejected(b""), None);
        assert_eq!(
            rejected(&ExportLogsServiceResponse::default().encode_to_vec()),
            None
        );
        let status = Status {
            code: 3,
            message: "bad".into(),
        };
        assert_eq!(error_message(&status.encode_to_vec()), Some("bad".into()));
    }
}

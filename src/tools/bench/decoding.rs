//! The decoder cost: CPU seconds per million events of each input format, on one thread, over
//! the benchmark's own events (which both JSON formats read) and, for `auto`, over the same
//! events as pino writes them (a numeric `level`, `msg`, `time`) and in the seed article's serde
//! form (`{"Error":{...}}`), and, for `text`, over the same events as plain lines (the level
//! found by a pattern) and as logfmt (the level in a key), and for `otlp_proto` over the same
//! events as the OpenTelemetry Collector's Kafka exporter writes them (protobuf requests of
//! [`OTLP_BATCH`] log records; the cost is per log record, splitting the request included),
//! and for a Schema Registry's Avro and Protobuf over the same events in Confluent's wire
//! format (reading with the schema, then the `auto` format over the JSON that makes).

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::measurement::{median, thread_cpu_seconds};
use super::options::BenchOptions;
use crate::event::{Decoder, InputFormat, TextFormat, TextSettings};
use crate::tools::produce::{pad_event, sample_event};

/// Events decoded per run of each format.
const EVENTS: u64 = 200_000;

/// The pattern of the plain text lines: a timestamp, the level, the service in brackets.
const LINE_PATTERN: &str = r"^\S+ (?P<level>[A-Z]+) \[(?P<service>[^\]]*)\] ";

/// Log records per OTLP request in the `otlp_proto` row.
const OTLP_BATCH: usize = 100;

/// Measures and prints the decoder cost of every format (medians of `options.runs`).
pub(super) fn decoder_cost(options: &BenchOptions) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut strict = Vec::with_capacity(EVENTS as usize);
    let mut pino = Vec::with_capacity(EVENTS as usize);
    let mut wrapped = Vec::with_capacity(EVENTS as usize);
    let mut lines = Vec::with_capacity(EVENTS as usize);
    let mut logfmt = Vec::with_capacity(EVENTS as usize);
    for id in 0..EVENTS {
        let (_, mut payload, _) = sample_event(&mut rng, id, options.keys, 0.0);
        let event: serde_json::Value = serde_json::from_slice(&payload)?;
        let name = event["level"].as_str().unwrap_or("info");
        let level = match name {
            "trace" => 10,
            "debug" => 20,
            "info" => 30,
            "warning" => 40,
            "error" => 50,
            _ => 60,
        };
        let mut logged = serde_json::json!({
            "level": level, "time": 1_796_000_000_000u64 + id, "pid": 4242,
            "hostname": "web-1", "id": id, "msg": event["message"],
        })
        .to_string()
        .into_bytes();
        let (message, service) = (
            event["message"].as_str().unwrap_or_default(),
            event["service"].as_str().unwrap_or_default(),
        );
        let mut line = format!(
            "2026-11-27T10:00:00.000Z {} [{service}] {message} id={id}",
            name.to_ascii_uppercase()
        )
        .into_bytes();
        let mut pairs = format!(
            "ts=2026-11-27T10:00:00.000Z level={name} service={service} id={id} msg=\"{message}\""
        )
        .into_bytes();
        pad_event(&mut payload, options.payload_bytes);
        pad_event(&mut logged, options.payload_bytes);
        pad_line(&mut line, options.payload_bytes);
        pad_line(&mut pairs, options.payload_bytes);
        // The padded event, its level as the key (the serde form): a few bytes more than it.
        let mut inner: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&payload)?;
        inner.remove("level");
        let variant = format!("{}{}", name[..1].to_ascii_uppercase(), &name[1..]);
        wrapped.push(serde_json::to_vec(&serde_json::json!({ variant: inner }))?);
        strict.push(payload);
        pino.push(logged);
        lines.push(line);
        logfmt.push(pairs);
    }
    let plain_text = TextFormat::new(&TextSettings {
        level_pattern: Some(LINE_PATTERN),
        ..TextSettings::default()
    })
    .map_err(|err| anyhow::anyhow!("{}: {}", err.key, err.message))?;
    let logfmt_text = TextFormat::new(&TextSettings {
        level_field: Some(vec!["level".to_string()]),
        logfmt: true,
        ..TextSettings::default()
    })
    .map_err(|err| anyhow::anyhow!("{}: {}", err.key, err.message))?;
    let auto = Decoder::from(InputFormat::Auto);
    let cases: [(&str, Decoder, &[Vec<u8>]); 6] = [
        (
            "logbridge format, logbridge events",
            Decoder::from(InputFormat::Logbridge),
            &strict,
        ),
        ("auto format, logbridge events", auto.clone(), &strict),
        ("auto format, pino events", auto.clone(), &pino),
        ("auto format, serde-form events", auto, &wrapped),
        (
            "text format, lines (level_pattern)",
            Decoder::text(plain_text),
            &lines,
        ),
        (
            "text format, logfmt (level_field)",
            Decoder::text(logfmt_text),
            &logfmt,
        ),
    ];
    let otlp = otlp_requests(&strict, options.payload_bytes)?;
    let registered = registry_payloads(&strict)?;
    let mut costs: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut otlp_costs = Vec::new();
    let mut registry_costs: Vec<Vec<f64>> = vec![Vec::new(); registered.len()];
    for _ in 0..options.runs {
        for ((name, decoder, payloads), costs) in cases.iter().zip(&mut costs) {
            costs.push(cost(name, decoder, payloads)?);
        }
        otlp_costs.push(otlp_cost(&otlp)?);
        for ((name, schema, payloads), costs) in registered.iter().zip(&mut registry_costs) {
            costs.push(registry_cost(name, schema, payloads)?);
        }
    }
    println!();
    println!(
        "decoder cost: {EVENTS} events of {} bytes per run, one thread, medians of {} runs",
        options.payload_bytes, options.runs
    );
    let medians: Vec<f64> = costs.into_iter().map(median).collect();
    for ((name, _, _), median) in cases.iter().zip(&medians) {
        println!("{name:<36} {median:.3} cpu s/M ev");
    }
    let otlp_median = median(otlp_costs);
    println!(
        "{:<36} {otlp_median:.3} cpu s/M ev",
        format!("otlp_proto format, {OTLP_BATCH} per request")
    );
    let registry_medians: Vec<f64> = registry_costs.into_iter().map(median).collect();
    for ((name, _, _), median) in registered.iter().zip(&registry_medians) {
        println!("{name:<36} {median:.3} cpu s/M ev");
    }
    println!(
        "auto / logbridge on the same events = {:.2} (target <= 1.20)",
        medians[1] / medians[0]
    );
    println!(
        "text (pattern, logfmt) / logbridge = {:.2}, {:.2}",
        medians[4] / medians[0],
        medians[5] / medians[0]
    );
    println!(
        "schema registry (avro, protobuf) / auto = {:.2}, {:.2}",
        registry_medians[0] / medians[1],
        registry_medians[1] / medians[1]
    );
    Ok(())
}

/// The Avro schema of the benchmark's events (as `produce` writes them, padded).
const AVRO_EVENT: &str = r#"{"type":"record","name":"Event","fields":[
    {"name":"id","type":"long"},{"name":"level","type":"string"},
    {"name":"code","type":["null","int"],"default":null},{"name":"message","type":"string"},
    {"name":"service","type":"string"},{"name":"ts","type":"string"},
    {"name":"detail","type":["null","string"],"default":null}]}"#;

/// The Protobuf schema of the same events.
const PROTO_EVENT: &str = "syntax = \"proto3\"; message Event { int64 id = 1; string level = 2; \
    optional int32 code = 3; string message = 4; string service = 5; string ts = 6; \
    optional string detail = 7; }";

/// A decoder-cost row of the Schema Registry: its name, its schema, its payloads.
type RegistryRow = (&'static str, crate::schema_registry::Schema, Vec<Vec<u8>>);

/// The benchmark's events in Confluent's wire format, Avro and Protobuf, each row's schema
/// (the registry is not asked: the cost is reading a record with a schema already kept, and
/// the configured JSON format reading its level from the JSON that makes).
fn registry_payloads(events: &[Vec<u8>]) -> anyhow::Result<Vec<RegistryRow>> {
    use crate::schema_registry::Schema;
    use apache_avro::types::Value;
    use prost::Message as _;
    let avro = apache_avro::Schema::parse_str(AVRO_EVENT)?;
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&avro).build()?;
    let proto = Schema::parse("PROTOBUF", PROTO_EVENT, Vec::new()).map_err(anyhow::Error::msg)?;
    let Schema::Protobuf { file } = &proto else {
        anyhow::bail!("the Protobuf schema did not compile as one");
    };
    let message = file
        .messages()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no message in the Protobuf schema"))?;
    let wire = |id: u8, indexes: &[u8], body: Vec<u8>| {
        let mut payload = vec![0, 0, 0, 0, id];
        payload.extend_from_slice(indexes);
        payload.extend(body);
        payload
    };
    let (mut avro_payloads, mut proto_payloads) = (Vec::new(), Vec::new());
    for event in events {
        let json: serde_json::Value = serde_json::from_slice(event)?;
        let text = |name: &str| Value::String(json[name].as_str().unwrap_or_default().into());
        let optional = |value: Option<Value>| match value {
            Some(value) => Value::Union(1, Box::new(value)),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        let record = Value::Record(vec![
            ("id".into(), Value::Long(json["id"].as_i64().unwrap_or(0))),
            ("level".into(), text("level")),
            (
                "code".into(),
                optional(json["code"].as_i64().map(|code| Value::Int(code as i32))),
            ),
            ("message".into(), text("message")),
            ("service".into(), text("service")),
            ("ts".into(), text("ts")),
            (
                "detail".into(),
                optional(json["detail"].as_str().map(|d| Value::String(d.into()))),
            ),
        ]);
        avro_payloads.push(wire(1, &[], writer.write_value_to_vec(record)?));
        let dynamic = prost_reflect::DynamicMessage::deserialize(
            message.clone(),
            &mut serde_json::Deserializer::from_slice(event),
        )?;
        proto_payloads.push(wire(2, &[0], dynamic.encode_to_vec()));
    }
    Ok(vec![
        (
            "avro via schema registry, auto",
            Schema::parse("AVRO", AVRO_EVENT, Vec::new()).map_err(anyhow::Error::msg)?,
            avro_payloads,
        ),
        ("protobuf via schema registry, auto", proto, proto_payloads),
    ])
}

/// CPU seconds per million events to read every payload with `schema` as JSON and decode its
/// level with the `auto` format; fails if one does not decode.
fn registry_cost(
    name: &str,
    schema: &crate::schema_registry::Schema,
    payloads: &[Vec<u8>],
) -> anyhow::Result<f64> {
    let decoder = Decoder::from(InputFormat::Auto);
    let started = thread_cpu_seconds();
    let mut refused = 0usize;
    for payload in payloads {
        let level = match schema.json(1, &std::hint::black_box(payload)[5..]) {
            Some(Ok(json)) => decoder.decode_level(Some(&json), usize::MAX).is_ok(),
            _ => false,
        };
        refused += usize::from(!std::hint::black_box(level));
    }
    let seconds = thread_cpu_seconds() - started;
    anyhow::ensure!(refused == 0, "{name}: refused {refused} benchmark events");
    Ok(seconds * 1e6 / payloads.len().max(1) as f64)
}

/// The benchmark's events as OTLP protobuf requests of [`OTLP_BATCH`] log records each: the
/// level as the severity, the message as the body (padded to `payload_bytes` as the JSON events
/// are), the service as the resource's `service.name` (one resource per service, as the
/// collector groups them), the id as an attribute.
fn otlp_requests(events: &[Vec<u8>], payload_bytes: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use prost::Message as _;

    let text = |text: &str| AnyValue {
        value: Some(any_value::Value::StringValue(text.to_string())),
    };
    let mut requests = Vec::new();
    for chunk in events.chunks(OTLP_BATCH) {
        let mut by_service: std::collections::BTreeMap<String, Vec<LogRecord>> = Default::default();
        for (id, payload) in chunk.iter().enumerate() {
            let event: serde_json::Value = serde_json::from_slice(payload)?;
            let level = crate::event::Level::new(event["level"].as_str().unwrap_or("info"));
            let number = match level.as_str() {
                "trace" => 1,
                "debug" => 5,
                "info" => 9,
                "warning" => 13,
                "error" => 17,
                _ => 21,
            };
            let mut message = event["message"].as_str().unwrap_or_default().to_string();
            if message.len() < payload_bytes.saturating_sub(100) {
                message.extend(std::iter::repeat_n(
                    'x',
                    payload_bytes - 100 - message.len(),
                ));
            }
            by_service
                .entry(event["service"].as_str().unwrap_or("none").to_string())
                .or_default()
                .push(LogRecord {
                    time_unix_nano: 1_796_000_000_000_000_000 + id as u64,
                    severity_number: number,
                    body: Some(text(&message)),
                    attributes: vec![KeyValue {
                        key: "id".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::IntValue(id as i64)),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                });
        }
        let request = ExportLogsServiceRequest {
            resource_logs: by_service
                .into_iter()
                .map(|(service, log_records)| ResourceLogs {
                    resource: Some(Resource {
                        attributes: vec![KeyValue {
                            key: "service.name".into(),
                            value: Some(text(&service)),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    scope_logs: vec![ScopeLogs {
                        log_records,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
        };
        requests.push(request.encode_to_vec());
    }
    Ok(requests)
}

/// CPU seconds per million log records to split every request and decode its log records;
/// fails if one does not decode.
fn otlp_cost(requests: &[Vec<u8>]) -> anyhow::Result<f64> {
    let decoder = Decoder::from(InputFormat::OtlpProto);
    let started = thread_cpu_seconds();
    let (mut events, mut refused) = (0usize, 0usize);
    for payload in requests {
        match decoder.split(Some(std::hint::black_box(payload)), usize::MAX) {
            Some(Ok(parts)) => {
                events += parts.len();
                refused += parts.iter().filter(|part| part.decoded.is_err()).count();
                std::hint::black_box(parts);
            }
            _ => refused += OTLP_BATCH,
        }
    }
    let seconds = thread_cpu_seconds() - started;
    anyhow::ensure!(
        refused == 0,
        "otlp_proto: refused {refused} benchmark events"
    );
    Ok(seconds * 1e6 / events.max(1) as f64)
}

/// Pads a text line to `target` bytes with a logfmt pair at its end (` detail=xxx...`), as
/// [`pad_event`] pads JSON with a field.
fn pad_line(line: &mut Vec<u8>, target: usize) {
    const PAIR: &[u8] = b" detail=";
    if line.len() + PAIR.len() > target {
        return;
    }
    let fill = target - line.len() - PAIR.len();
    line.extend_from_slice(PAIR);
    line.extend(std::iter::repeat_n(b'x', fill));
}

/// CPU seconds per million events to decode every payload's level with `decoder`; fails if
/// one does not decode (the benchmark's events are all valid).
fn cost(name: &str, decoder: &Decoder, payloads: &[Vec<u8>]) -> anyhow::Result<f64> {
    let started = thread_cpu_seconds();
    let mut refused = 0usize;
    for payload in payloads {
        let level = decoder.decode_level(Some(std::hint::black_box(payload)), usize::MAX);
        refused += usize::from(std::hint::black_box(level).is_err());
    }
    let seconds = thread_cpu_seconds() - started;
    anyhow::ensure!(refused == 0, "{name}: refused {refused} benchmark events");
    Ok(seconds * 1e6 / payloads.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The otlp_proto row's requests hold the benchmark's events, each decoding at its level.
    #[test]
    fn the_otlp_rows_requests_split_into_the_events() {
        let mut rng = StdRng::seed_from_u64(7);
        let events: Vec<Vec<u8>> = (0..250)
            .map(|id| sample_event(&mut rng, id, 10, 0.0).1)
            .collect();
        let requests = otlp_requests(&events, 200).expect("requests");
        assert_eq!(requests.len(), 3, "100, 100 and 50 log records");
        let decoder = Decoder::from(InputFormat::OtlpProto);
        let mut levels = std::collections::BTreeMap::<String, usize>::new();
        for request in &requests {
            let parts = decoder.split(Some(request), usize::MAX).expect("splits");
            for part in parts.expect("a request") {
                let (level, service) = part.decoded.expect("an event");
                assert!(service.is_some());
                *levels.entry(level.to_string()).or_default() += 1;
            }
        }
        let mut want = std::collections::BTreeMap::<String, usize>::new();
        for event in &events {
            let event: serde_json::Value = serde_json::from_slice(event).expect("JSON");
            let level = crate::event::Level::new(event["level"].as_str().expect("a level"));
            *want.entry(level.to_string()).or_default() += 1;
        }
        assert_eq!(levels, want);
        assert!(otlp_cost(&requests).expect("all decode") > 0.0);
    }

    /// The registry rows' payloads read back as the benchmark's events, at their levels.
    #[test]
    fn the_registry_rows_payloads_read_back_as_the_events() {
        let mut rng = StdRng::seed_from_u64(7);
        let events: Vec<Vec<u8>> = (0..50)
            .map(|id| {
                let mut payload = sample_event(&mut rng, id, 10, 0.0).1;
                pad_event(&mut payload, 300);
                payload
            })
            .collect();
        for (name, schema, payloads) in registry_payloads(&events).expect("payloads") {
            for (event, payload) in events.iter().zip(&payloads) {
                let json = schema
                    .json(1, &payload[5..])
                    .expect("not JSON")
                    .expect(name);
                let read: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
                let event: serde_json::Value = serde_json::from_slice(event).expect("JSON");
                for field in ["id", "level", "message", "service", "detail"] {
                    assert_eq!(read[field], event[field], "{name}: {field}");
                }
            }
            assert!(registry_cost(name, &schema, &payloads).expect("all decode") > 0.0);
        }
    }

    #[test]
    fn a_padded_line_has_the_target_length_and_keeps_its_level() {
        let mut line = b"2026-11-27T10:00:00.000Z ERROR [db] down id=1".to_vec();
        pad_line(&mut line, 100);
        assert_eq!(line.len(), 100);
        let format = TextFormat::new(&TextSettings {
            level_pattern: Some(LINE_PATTERN),
            ..TextSettings::default()
        })
        .expect("valid pattern");
        assert_eq!(
            Decoder::text(format)
                .decode_routing(Some(&line), usize::MAX)
                .map(|(level, service)| (level.to_string(), service.map(String::from))),
            Ok(("error".to_string(), Some("db".to_string())))
        );
        // Too short a target: unchanged.
        let mut short = b"x ERROR [a] b".to_vec();
        pad_line(&mut short, 4);
        assert_eq!(short, b"x ERROR [a] b");
    }
}

//! Payloads in Confluent's wire format, read with their schemas from a Schema Registry
//! (`[input.schema_registry]`).
//!
//! The format: a zero byte, the schema's id (4 bytes, big-endian), for Protobuf the message
//! indexes (a count and the indexes, zigzag varints; a count of 0 stands for `[0]`, the file's
//! first message), then the Avro binary datum, the Protobuf message or JSON text. The router
//! hands each batch here before it decodes anything:
//!
//! * **Ids it does not know** are fetched (`GET <url>/schemas/ids/<id>`, references through
//!   `GET <url>/subjects/<subject>/versions/<version>`) once, and kept (at most `max_schemas`;
//!   past that the oldest is dropped and fetched again when needed).
//! * **The registry down or failing** (unreachable, a timeout, a 5xx, credentials refused, a
//!   404 that is not the registry's "schema not found"): the batch waits in the router and
//!   the request is retried with backoff. Records wait behind it (the router's channel fills
//!   and the consumer pauses its partitions), nothing is committed past them, and `/readyz`
//!   says why. Never a dead letter for the registry's fault.
//! * **An id the registry does not have** (its 404 with error code 40403): those records are
//!   dead-lettered with reason `unknown_schema` (the answer is kept a minute, so a topic of
//!   such records does not ask for each). A payload that does not read with its schema:
//!   `schema_mismatch`; a schema that cannot be compiled here: `unreadable_schema`.
//! * **What the rest of the pipeline sees.** An Avro or Protobuf record is read as the JSON
//!   object it stands for (Avro unions as their value, bytes as base64, enums and Protobuf enums
//!   by name, Protobuf fields by their names in the `.proto`, default values included); the
//!   configured JSON format then finds its level, service and message there, as in any JSON
//!   event. Sinks that forward bytes (Kafka, the dead-letter topic) forward the original
//!   payload; sinks that write JSON write that object. A JSON Schema record is its JSON text.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustc_hash::FxHashMap;
use serde::Deserialize;

use crate::config::SchemaRegistryConfig;
use crate::event::{DecodeError, Decoder, Form};
use crate::record::Record;

/// How long the registry's "no such schema" is believed before asking again.
const MISSING_KEPT: Duration = Duration::from_secs(60);
/// Most schemas one schema may reference, directly or not.
const MAX_REFERENCES: usize = 100;
/// Most levels of references.
const MAX_REFERENCE_DEPTH: usize = 10;
/// Most message indexes of a Protobuf record (nesting of the message in its file).
const MAX_MESSAGE_INDEXES: usize = 32;
/// Deepest value an Avro record may nest (as serde_json allows for JSON).
const MAX_DEPTH: usize = 128;
/// Most bytes of the registry's answer kept for a message.
const ANSWER_KEPT: usize = 300;

/// The schema id of a payload in Confluent's wire format.
pub fn wire_id(payload: &[u8]) -> Option<u32> {
    match payload {
        [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// A schema as the registry gave it, ready to read payloads.
pub enum Schema {
    /// An Avro schema and the named schemas it references.
    Avro {
        schema: apache_avro::Schema,
        named: Vec<apache_avro::Schema>,
    },
    /// A Protobuf file (its imports compiled with it).
    Protobuf { file: prost_reflect::FileDescriptor },
    /// A JSON Schema: the payload past the prefix is the JSON text.
    Json,
    /// The registry has no schema of this id (as of `since`).
    Missing { why: String, since: Instant },
    /// The registry gave a schema that cannot be used here.
    Unreadable(String),
}

impl Schema {
    /// The schema of type `kind` (`AVRO`, `PROTOBUF`, `JSON`) written `text`, with the
    /// schemas it references (import name, text; those referenced first); `Err` says why it
    /// cannot be used.
    pub fn parse(
        kind: &str,
        text: &str,
        referenced: Vec<(String, String)>,
    ) -> Result<Schema, String> {
        match kind {
            "AVRO" => {
                let (schema, named) = apache_avro::Schema::parse_str_with_list(
                    text,
                    referenced.iter().map(|(_, text)| text),
                )
                .map_err(|err| format!("not an Avro schema: {err}"))?;
                Ok(Schema::Avro { schema, named })
            }
            "PROTOBUF" => {
                let file = compile_proto("logbridge-schema.proto", text, referenced)
                    .map_err(|err| format!("not a Protobuf schema: {err}"))?;
                Ok(Schema::Protobuf { file })
            }
            "JSON" => Ok(Schema::Json),
            other => Err(format!("schema type `{other}` is not read here")),
        }
    }

    /// The JSON text a payload's `body` (past the 5-byte prefix) in this schema stands for;
    /// `None` for a JSON Schema (the body is JSON already).
    pub fn json(&self, id: u32, body: &[u8]) -> Option<Result<Vec<u8>, DecodeError>> {
        let value = match self {
            Schema::Json => return None,
            Schema::Missing { why, .. } => Err(DecodeError::UnknownSchema {
                id,
                detail: truncate(why),
            }),
            Schema::Unreadable(why) => Err(DecodeError::UnreadableSchema {
                id,
                detail: truncate(why),
            }),
            Schema::Avro { schema, named } => read_avro(schema, named, body),
            Schema::Protobuf { file } => read_protobuf(file, body),
        };
        Some(
            value
                .and_then(|value| serde_json::to_vec(&value).map_err(mismatch))
                .map_err(|err| match err {
                    DecodeError::SchemaMismatch { detail, .. } => {
                        DecodeError::SchemaMismatch { id, detail }
                    }
                    other => other,
                }),
        )
    }
}

/// The schemas of one batch's records.
#[derive(Default)]
pub struct Lookup {
    schemas: FxHashMap<u32, Arc<Schema>>,
    /// Ids neither known nor fetched yet, in the order the batch has them.
    pub wanted: Vec<u32>,
}

impl Lookup {
    /// Records `schema` as the schema of `id`.
    pub fn insert(&mut self, id: u32, schema: Arc<Schema>) {
        self.schemas.insert(id, schema);
        self.wanted.retain(|wanted| *wanted != id);
    }
}

struct Cache {
    schemas: FxHashMap<u32, Arc<Schema>>,
    /// Ids in the order they were kept, oldest first.
    order: VecDeque<u32>,
    limit: usize,
}

/// A Schema Registry client and the schemas it fetched.
pub struct SchemaRegistry {
    client: reqwest::Client,
    /// The base URL, without a trailing `/`.
    base: String,
    credentials: Option<crate::http_sink::Credentials>,
    cache: Mutex<Cache>,
    /// Why records wait for the registry, while they do (shown by `/readyz` and `/status`).
    trouble: tokio::sync::watch::Sender<Option<String>>,
}

/// The registry's answer for a schema.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

#[derive(Deserialize)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error_code: i64,
}

/// Why a fetch did not give a schema: the record's fault (`Missing`) or the registry's.
enum Failure {
    Missing(String),
    Registry(String),
}

impl SchemaRegistry {
    /// A client of the registry `config` names.
    pub fn new(config: &SchemaRegistryConfig) -> anyhow::Result<SchemaRegistry> {
        let client = crate::http_sink::http_client(
            Duration::from_millis(config.timeout_ms),
            config.ca_file.as_deref(),
        )?;
        let credentials = config
            .auth
            .as_ref()
            .map(crate::http_sink::Credentials::new)
            .transpose()
            .context("input.schema_registry.auth")?;
        Ok(SchemaRegistry {
            client,
            base: config.url.trim_end_matches('/').to_string(),
            credentials,
            cache: Mutex::new(Cache {
                schemas: FxHashMap::default(),
                order: VecDeque::new(),
                limit: config.max_schemas,
            }),
            trouble: tokio::sync::watch::channel(None).0,
        })
    }

    /// Why records wait for the registry, while they do.
    pub fn trouble(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.trouble.subscribe()
    }

    /// Says why records wait (`None`: they no longer do).
    pub fn set_trouble(&self, why: Option<String>) {
        self.trouble.send_if_modified(|now| {
            let changed = *now != why;
            *now = why;
            changed
        });
    }

    /// The schemas the batch's records in the wire format need that are known, and the ids
    /// that are not (a "no such schema" older than [`MISSING_KEPT`] is asked again).
    pub fn lookup(&self, batch: &[Record]) -> Lookup {
        let mut lookup = Lookup::default();
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        for record in batch {
            let Some(id) = pending_id(record) else {
                continue;
            };
            if lookup.schemas.contains_key(&id) || lookup.wanted.contains(&id) {
                continue;
            }
            match cache.schemas.get(&id) {
                Some(schema) if !stale(schema) => {
                    lookup.schemas.insert(id, schema.clone());
                }
                _ => lookup.wanted.push(id),
            }
        }
        lookup
    }

    /// Fetches the schema of `id` (and what it references) and keeps it; `Err` says why the
    /// registry did not answer with a schema or a "no such schema" (to retry).
    pub async fn fetch(&self, id: u32) -> Result<Arc<Schema>, String> {
        let schema = match self.get_answer(&format!("/schemas/ids/{id}")).await {
            Ok(answer) => match self.compile(id, answer).await {
                Ok(schema) => schema,
                Err(Failure::Registry(why)) => return Err(why),
                Err(Failure::Missing(why)) => Schema::Unreadable(why),
            },
            Err(Failure::Missing(why)) => Schema::Missing {
                why,
                since: Instant::now(),
            },
            Err(Failure::Registry(why)) => return Err(why),
        };
        let schema = Arc::new(schema);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.schemas.insert(id, schema.clone()).is_none() {
            cache.order.push_back(id);
        }
        while cache.order.len() > cache.limit {
            if let Some(oldest) = cache.order.pop_front() {
                cache.schemas.remove(&oldest);
            }
        }
        Ok(schema)
    }

    /// Schemas kept now.
    pub fn kept(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .schemas
            .len()
    }

    /// Whether the registry answers (`GET <url>/subjects`), for `check-config --connect`.
    pub async fn probe(&self) -> Result<String, String> {
        let response = self.get("/subjects").await.map_err(|why| why.to_string())?;
        let status = response.status();
        if status.is_success() {
            Ok(format!("answered GET /subjects with {}", status.as_u16()))
        } else {
            let body = response.bytes().await.unwrap_or_default();
            Err(format!(
                "GET /subjects answered HTTP {}: {}",
                status.as_u16(),
                excerpt(&body)
            ))
        }
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response, String> {
        let mut request = self.client.get(format!("{}{path}", self.base)).header(
            reqwest::header::ACCEPT,
            "application/vnd.schemaregistry.v1+json, application/json",
        );
        if let Some(credentials) = &self.credentials {
            let (header, _) = credentials.current(crate::http_sink::CREDENTIALS_CHECK_EVERY);
            request = request.header(reqwest::header::AUTHORIZATION, header);
        }
        request.send().await.map_err(|err| {
            let message = crate::http_sink::with_causes(&err);
            let message = crate::config::redact_url_in(&message, &self.base);
            format!("cannot reach the schema registry: {message}")
        })
    }

    /// The registry's answer at `path`: a schema, its "not found" (error code 40403 for a
    /// schema, 40401 and 40402 for a reference's subject and version), or a failure.
    async fn get_answer(&self, path: &str) -> Result<Answer, Failure> {
        let response = self.get(path).await.map_err(Failure::Registry)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|err| {
            Failure::Registry(format!(
                "the schema registry's answer to GET {path} broke off: {}",
                crate::http_sink::with_causes(&err)
            ))
        })?;
        if status == 200 {
            return serde_json::from_slice::<Answer>(&body).map_err(|err| {
                Failure::Registry(format!(
                    "the schema registry's answer to GET {path} is not a schema ({err}): {}",
                    excerpt(&body)
                ))
            });
        }
        let code = serde_json::from_slice::<ErrorAnswer>(&body).map(|answer| answer.error_code);
        match (status, code) {
            (404, Ok(40401..=40403)) => Err(Failure::Missing(format!(
                "the schema registry has none at {path}: {}",
                excerpt(&body)
            ))),
            (404, _) => Err(Failure::Registry(format!(
                "GET {path} answered HTTP 404 without the registry's error code (is \
                 input.schema_registry.url the API's base?): {}",
                excerpt(&body)
            ))),
            _ => Err(Failure::Registry(format!(
                "the schema registry answered GET {path} with HTTP {status}: {}",
                excerpt(&body)
            ))),
        }
    }

    /// The usable schema of `answer`, with its references fetched; `Failure::Missing` for a
    /// schema that cannot be used (a reference the registry lacks, a schema that does not
    /// compile, a type not known here).
    async fn compile(&self, id: u32, answer: Answer) -> Result<Schema, Failure> {
        let kind = answer
            .schema_type
            .as_deref()
            .unwrap_or("AVRO")
            .to_ascii_uppercase();
        let mut referenced: Vec<(String, String)> = Vec::new();
        self.references(&answer.references, 0, &mut referenced)
            .await?;
        Schema::parse(&kind, &answer.schema, referenced)
            .map_err(|why| Failure::Missing(format!("schema {id}: {why}")))
    }

    /// Fetches `references` and theirs, depth first (a schema after those it references),
    /// into `into` as (import name, text).
    async fn references(
        &self,
        references: &[Reference],
        depth: usize,
        into: &mut Vec<(String, String)>,
    ) -> Result<(), Failure> {
        if references.is_empty() {
            return Ok(());
        }
        if depth >= MAX_REFERENCE_DEPTH {
            return Err(Failure::Missing(format!(
                "references nest deeper than {MAX_REFERENCE_DEPTH} levels"
            )));
        }
        for reference in references {
            if into.iter().any(|(name, _)| *name == reference.name) {
                continue;
            }
            if into.len() >= MAX_REFERENCES {
                return Err(Failure::Missing(format!(
                    "more than {MAX_REFERENCES} references"
                )));
            }
            let subject: String = url_segment(&reference.subject);
            let answer = self
                .get_answer(&format!(
                    "/subjects/{subject}/versions/{}",
                    reference.version
                ))
                .await?;
            Box::pin(self.references(&answer.references, depth + 1, into)).await?;
            into.push((reference.name.clone(), answer.schema));
        }
        Ok(())
    }

    /// Reads each record of `batch` in the wire format whose schema `lookup` has, as the JSON
    /// it stands for, and decodes that with `decoder`; a record whose schema is missing or
    /// unusable, or that does not read with it, is marked with why (the router dead-letters
    /// it). Records of JSON schemas, and those `lookup` lacks, are left to the decoder.
    pub fn decode(lookup: &Lookup, batch: &mut [Record], decoder: &Decoder) {
        for record in batch.iter_mut() {
            let Some(id) = pending_id(record) else {
                continue;
            };
            let Some(schema) = lookup.schemas.get(&id) else {
                continue;
            };
            let Some(payload) = record.payload() else {
                continue;
            };
            let size = payload.len();
            let Some(json) = schema.json(id, &payload[5..]) else {
                continue;
            };
            record.decoded = Some(json.and_then(|json| {
                let decoded = decoder.decode(Some(&json), usize::MAX, true)?;
                record.service = decoded.service;
                // The decoded JSON is held beside the payload until the record is finished:
                // it counts against `max_in_flight_bytes` as the payload does.
                record.charge = record.charge.resized(size + json.len());
                record.form = Form::Registry(bytes::Bytes::from(json));
                Ok(decoded.level)
            }));
        }
    }
}

/// The schema id of a record that is in the wire format and not decoded yet.
fn pending_id(record: &Record) -> Option<u32> {
    if record.decoded.is_some() {
        return None;
    }
    record.payload().and_then(wire_id)
}

fn stale(schema: &Schema) -> bool {
    matches!(schema, Schema::Missing { since, .. } if since.elapsed() > MISSING_KEPT)
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(ANSWER_KEPT)]);
    text.trim().to_string()
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// A subject as one path segment (percent-encoded).
fn url_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn mismatch(detail: impl std::fmt::Display) -> DecodeError {
    DecodeError::SchemaMismatch {
        id: 0,
        detail: truncate(&detail.to_string()),
    }
}

/// The Avro datum `body` as JSON; it must be the whole body.
fn read_avro(
    schema: &apache_avro::Schema,
    named: &[apache_avro::Schema],
    body: &[u8],
) -> Result<serde_json::Value, DecodeError> {
    let mut reader = body;
    let value = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .writer_schemata(named.iter().collect())
        .map_err(mismatch)?
        .build()
        .map_err(mismatch)?
        .read_value(&mut reader)
        .map_err(mismatch)?;
    if !reader.is_empty() {
        return Err(mismatch(format!(
            "{} bytes left over after the datum",
            reader.len()
        )));
    }
    // The crate reads a string cut short by the end of the payload as a null: a datum that is
    // not a value of its schema ends early.
    let mut all = vec![schema];
    all.extend(named);
    let resolved = apache_avro::schema::ResolvedSchema::new_with_schemata(all).map_err(mismatch)?;
    if !value.validate_with_names(schema, resolved.get_names()) {
        return Err(mismatch("the datum ends before its schema does"));
    }
    avro_json(value, 0)
}

/// An Avro value as JSON: unions as their value, bytes and fixed as base64, enums by name,
/// logical types as their underlying number (dates in days, times and timestamps in their
/// unit), decimals as their unscaled integer's text, UUIDs as text.
fn avro_json(
    value: apache_avro::types::Value,
    depth: usize,
) -> Result<serde_json::Value, DecodeError> {
    use apache_avro::types::Value as Avro;
    use base64::Engine as _;
    use serde_json::Value as Json;
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    let base64 =
        |bytes: &[u8]| Json::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    let float = |number: f64| {
        serde_json::Number::from_f64(number)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(number.to_string()))
    };
    Ok(match value {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => Json::Bool(b),
        Avro::Int(n) | Avro::Date(n) | Avro::TimeMillis(n) => Json::from(n),
        Avro::Long(n)
        | Avro::TimeMicros(n)
        | Avro::TimestampMillis(n)
        | Avro::TimestampMicros(n)
        | Avro::TimestampNanos(n)
        | Avro::LocalTimestampMillis(n)
        | Avro::LocalTimestampMicros(n)
        | Avro::LocalTimestampNanos(n) => Json::from(n),
        Avro::Float(f) => float(f64::from(f)),
        Avro::Double(f) => float(f),
        Avro::Bytes(bytes) | Avro::Fixed(_, bytes) => base64(&bytes),
        Avro::String(text) | Avro::Enum(_, text) => Json::String(text),
        Avro::Union(_, inner) => avro_json(*inner, depth)?,
        Avro::Array(items) => Json::Array(
            items
                .into_iter()
                .map(|item| avro_json(item, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Avro::Map(entries) => {
            let mut entries: Vec<_> = entries.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Object(
                entries
                    .into_iter()
                    .map(|(key, item)| Ok((key, avro_json(item, depth + 1)?)))
                    .collect::<Result<_, DecodeError>>()?,
            )
        }
        Avro::Record(fields) => Json::Object(
            fields
                .into_iter()
                .map(|(key, item)| Ok((key, avro_json(item, depth + 1)?)))
                .collect::<Result<_, DecodeError>>()?,
        ),
        Avro::Decimal(decimal) => {
            let bytes: Vec<u8> = Vec::try_from(decimal).map_err(mismatch)?;
            Json::String(signed_decimal_text(&bytes))
        }
        Avro::BigDecimal(decimal) => Json::String(decimal.to_string()),
        Avro::Duration(duration) => serde_json::json!({
            "months": u32::from(duration.months()),
            "days": u32::from(duration.days()),
            "millis": u32::from(duration.millis()),
        }),
        Avro::Uuid(uuid) => Json::String(uuid.to_string()),
    })
}

/// The decimal text of a big-endian two's complement integer.
fn signed_decimal_text(bytes: &[u8]) -> String {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    // Magnitude, big-endian: the bytes themselves, or their two's complement negation.
    let mut magnitude: Vec<u8> = if negative {
        let mut inverted: Vec<u8> = bytes.iter().map(|b| !b).collect();
        for byte in inverted.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
        inverted
    } else {
        bytes.to_vec()
    };
    // Repeated division by 10 of the big-endian magnitude.
    let mut digits = Vec::new();
    while magnitude.iter().any(|b| *b != 0) {
        let mut remainder = 0u32;
        for byte in magnitude.iter_mut() {
            let current = (remainder << 8) | u32::from(*byte);
            *byte = (current / 10) as u8;
            remainder = current % 10;
        }
        digits.push(b'0' + remainder as u8);
    }
    if digits.is_empty() {
        digits.push(b'0');
    }
    if negative {
        digits.push(b'-');
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// Compiles the Protobuf file `text` (named `name`) with the files it imports: `references`
/// (import name, text) and Google's well-known types. Each text is `.proto` source, or a
/// serialized `FileDescriptorProto` in base64, as Confluent's serializers register schemas
/// (the Python client's `ProtobufSerializer` does; Confluent's registry turns them into source,
/// Apicurio's keeps them as they came); a descriptor is known by its own name.
fn compile_proto(
    name: &str,
    text: &str,
    references: Vec<(String, String)>,
) -> Result<prost_reflect::FileDescriptor, String> {
    struct Sources(FxHashMap<String, String>);
    impl protox::file::FileResolver for Sources {
        fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
            match self.0.get(name) {
                Some(text) => match descriptor(text) {
                    Some(file) => Ok(file),
                    None => protox::file::File::from_source(name, text),
                },
                None => Err(protox::Error::file_not_found(name)),
            }
        }
    }
    let mut sources: FxHashMap<String, String> = FxHashMap::default();
    for (import, text) in references {
        let import = descriptor(&text).map_or(import, |file| file.name().to_string());
        sources.insert(import, text);
    }
    let name = descriptor(text).map_or(name.to_string(), |file| file.name().to_string());
    sources.insert(name.clone(), text.to_string());
    let mut resolver = protox::file::ChainFileResolver::new();
    resolver.add(Sources(sources));
    resolver.add(protox::file::GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true);
    compiler.open_file(&name).map_err(|err| err.to_string())?;
    compiler
        .descriptor_pool()
        .get_file_by_name(&name)
        .ok_or_else(|| "the compiled file is missing".to_string())
}

/// The file a schema text holds as a base64 `FileDescriptorProto`, if it is one (`.proto`
/// source is never base64: it has spaces, quotes and semicolons).
fn descriptor(text: &str) -> Option<protox::file::File> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    let file = protox::file::File::decode_file_descriptor_proto(&bytes[..]).ok()?;
    (!file.name().is_empty()).then_some(file)
}

/// Reads one zigzag varint of `body` at `at`.
fn zigzag(body: &[u8], at: &mut usize) -> Option<i64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *body.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    None
}

/// The Protobuf record `body` (message indexes, then the message) as JSON.
fn read_protobuf(
    file: &prost_reflect::FileDescriptor,
    body: &[u8],
) -> Result<serde_json::Value, DecodeError> {
    let mut at = 0;
    let count = zigzag(body, &mut at).ok_or_else(|| mismatch("no message indexes"))?;
    let indexes: Vec<i64> = match count {
        0 => vec![0],
        1..=32 => (0..count)
            .map(|_| zigzag(body, &mut at).ok_or_else(|| mismatch("message indexes cut short")))
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(mismatch(format!(
                "{count} message indexes (at most {MAX_MESSAGE_INDEXES})"
            )))
        }
    };
    let position = |index: i64| usize::try_from(index).ok();
    let missing = |path: &[i64]| mismatch(format!("no message at indexes {path:?} in the schema"));
    let first = position(indexes[0]).ok_or_else(|| missing(&indexes))?;
    let mut message = file
        .messages()
        .nth(first)
        .ok_or_else(|| missing(&indexes))?;
    for &index in &indexes[1..] {
        let index = position(index).ok_or_else(|| missing(&indexes))?;
        let child = message
            .child_messages()
            .nth(index)
            .ok_or_else(|| missing(&indexes))?;
        message = child;
    }
    let message = prost_reflect::DynamicMessage::decode(message, &body[at..]).map_err(mismatch)?;
    let options = prost_reflect::SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
        .stringify_64_bit_integers(false);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::InputFormat;

    const AVRO: &str = r#"{"type":"record","name":"Log","namespace":"app","fields":[
        {"name":"level","type":{"type":"enum","name":"Level","symbols":["DEBUG","INFO","WARN","ERROR"]}},
        {"name":"service","type":["null","string"],"default":null},
        {"name":"message","type":"string"},
        {"name":"code","type":"int"},
        {"name":"trace","type":["null","bytes"],"default":null}]}"#;

    const PROTO: &str = r#"
        syntax = "proto3";
        package app;
        import "google/protobuf/timestamp.proto";
        message Other { string x = 1; }
        message Log {
          enum Severity { INFO = 0; WARN = 1; ERROR = 2; }
          message Origin { string service = 1; int64 pid = 2; }
          Severity level = 1;
          string message = 2;
          Origin origin = 3;
          google.protobuf.Timestamp at = 4;
          int32 code = 5;
        }"#;

    fn wire(id: u32, rest: &[u8]) -> Vec<u8> {
        let mut payload = vec![0];
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(rest);
        payload
    }

    fn pending(payload: &[u8]) -> Record {
        let mut record = crate::record::test_record(0, 1, None, Some(payload));
        record.decoded = None;
        record
    }

    fn lookup_of(entries: Vec<(u32, Schema)>) -> Lookup {
        let mut lookup = Lookup::default();
        for (id, schema) in entries {
            lookup.insert(id, Arc::new(schema));
        }
        lookup
    }

    fn avro_datum(level: &str, service: Option<&str>, message: &str) -> Vec<u8> {
        use apache_avro::types::Value;
        let schema = apache_avro::Schema::parse_str(AVRO).expect("schema");
        let value = Value::Record(vec![
            (
                "level".into(),
                Value::Enum(
                    ["DEBUG", "INFO", "WARN", "ERROR"]
                        .iter()
                        .position(|symbol| *symbol == level)
                        .expect("a symbol") as u32,
                    level.into(),
                ),
            ),
            (
                "service".into(),
                match service {
                    Some(service) => Value::Union(1, Box::new(Value::String(service.into()))),
                    None => Value::Union(0, Box::new(Value::Null)),
                },
            ),
            ("message".into(), Value::String(message.into())),
            ("code".into(), Value::Int(503)),
            (
                "trace".into(),
                Value::Union(1, Box::new(Value::Bytes(vec![1, 2, 3]))),
            ),
        ]);
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .expect("writer")
            .write_value_to_vec(value)
            .expect("datum")
    }

    fn avro_schema() -> Schema {
        Schema::Avro {
            schema: apache_avro::Schema::parse_str(AVRO).expect("schema"),
            named: Vec::new(),
        }
    }

    #[test]
    fn an_avro_record_reads_as_the_json_it_stands_for_and_routes_by_its_level() {
        let lookup = lookup_of(vec![(7, avro_schema())]);
        let payload = wire(7, &avro_datum("ERROR", Some("checkout"), "card declined"));
        let mut batch = vec![pending(&payload)];
        let gauge = prometheus::IntGauge::new("in_flight_bytes", "test").expect("gauge");
        let budget = crate::record::ByteBudget::new(1 << 20, gauge);
        batch[0].charge = budget.charge(payload.len());
        let decoder = Decoder::from(InputFormat::Auto);
        SchemaRegistry::decode(&lookup, &mut batch, &decoder);
        let record = &batch[0];
        // The decoded JSON is charged beside the payload.
        let json_len = record.event_json().expect("json").len();
        assert_eq!(budget.used(), payload.len() + json_len);
        let level = record.decoded.clone().expect("decoded").expect("an event");
        assert_eq!(level.as_str(), "error");
        assert_eq!(record.service.as_deref(), Some("checkout"));
        assert_eq!(
            record.event().expect("event"),
            serde_json::json!({"level": "ERROR", "service": "checkout",
                "message": "card declined", "code": 503, "trace": "AQID"})
        );
        // JSON sinks write the decoded object; the Kafka sink forwards the original bytes.
        assert_eq!(
            &*record.event_json().expect("json"),
            br#"{"level":"ERROR","service":"checkout","message":"card declined","code":503,"trace":"AQID"}"#
        );
        assert_eq!(record.payload(), Some(&payload[..]));
    }

    #[test]
    fn an_avro_payload_that_does_not_match_its_schema_is_marked_with_why() {
        let lookup = lookup_of(vec![
            (7, avro_schema()),
            (
                8,
                Schema::Missing {
                    why: "40403 Schema not found".into(),
                    since: Instant::now(),
                },
            ),
            (9, Schema::Unreadable("not an Avro schema".into())),
        ]);
        let datum = avro_datum("INFO", None, "hello");
        let mut in_a_string = avro_datum("INFO", None, "hello");
        // Without the optional `trace` (its union index 0) and two bytes of the message.
        in_a_string.truncate(in_a_string.len() - 4 - 1);
        let mut longer = datum.clone();
        longer.push(0);
        let cut = &datum[..datum.len() - 2];
        let payloads = [
            wire(7, cut),
            wire(7, &longer),
            wire(7, &[0x7f]),
            wire(8, &datum),
            wire(9, &datum),
        ];
        let mut batch: Vec<Record> = payloads.iter().map(|p| pending(p)).collect();
        SchemaRegistry::decode(&lookup, &mut batch, &Decoder::from(InputFormat::Auto));
        let reasons: Vec<(&str, u32)> = batch
            .iter()
            .map(|record| match record.decoded.as_ref().expect("decoded") {
                Err(
                    err @ (DecodeError::SchemaMismatch { id, .. }
                    | DecodeError::UnknownSchema { id, .. }
                    | DecodeError::UnreadableSchema { id, .. }),
                ) => (err.reason(), *id),
                other => panic!("not a schema failure: {other:?}"),
            })
            .collect();
        assert_eq!(
            reasons,
            [
                ("schema_mismatch", 7),
                ("schema_mismatch", 7),
                ("schema_mismatch", 7),
                ("unknown_schema", 8),
                ("unreadable_schema", 9)
            ]
        );
        let left_over = batch[1]
            .decoded
            .clone()
            .expect("decoded")
            .expect_err("mismatch");
        assert!(
            left_over.to_string().contains("1 bytes left over"),
            "{left_over}"
        );

        // Cut inside a string that ends the record (the crate reads it as a null).
        let text = r#"{"type":"record","name":"M","fields":[
            {"name":"level","type":"string"},{"name":"message","type":"string"}]}"#;
        let schema = apache_avro::Schema::parse_str(text).expect("schema");
        let mut datum = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .expect("writer")
            .write_value_to_vec(apache_avro::types::Value::Record(vec![
                (
                    "level".into(),
                    apache_avro::types::Value::String("INFO".into()),
                ),
                (
                    "message".into(),
                    apache_avro::types::Value::String("hello".into()),
                ),
            ]))
            .expect("datum");
        datum.truncate(datum.len() - 2);
        let cut = Schema::parse("AVRO", text, Vec::new())
            .expect("schema")
            .json(4, &datum)
            .expect("not JSON")
            .expect_err("a mismatch");
        assert_eq!(cut.reason(), "schema_mismatch");
        assert!(cut.to_string().contains("ends before its schema"), "{cut}");
    }

    #[test]
    fn json_schema_records_and_records_without_a_known_schema_are_left_to_the_decoder() {
        let lookup = lookup_of(vec![(3, Schema::Json)]);
        let json = wire(3, br#"{"level":"warn","message":"x"}"#);
        let unknown = wire(4, b"");
        let mut batch = vec![pending(&json), pending(&unknown)];
        SchemaRegistry::decode(&lookup, &mut batch, &Decoder::from(InputFormat::Auto));
        assert!(batch.iter().all(|record| record.decoded.is_none()));
        // The decoder reads the JSON past the prefix.
        let level = batch[0]
            .decode(&Decoder::from(InputFormat::Auto), false)
            .clone()
            .expect("an event");
        assert_eq!(level.as_str(), "warning");
    }

    fn proto_message(file: &prost_reflect::FileDescriptor) -> Vec<u8> {
        use prost::Message as _;
        use prost_reflect::{DynamicMessage, Value};
        let log = file.messages().nth(1).expect("Log");
        let origin = log.child_messages().next().expect("Origin");
        let mut origin_message = DynamicMessage::new(origin);
        origin_message.set_field_by_name("service", Value::String("payments".into()));
        origin_message.set_field_by_name("pid", Value::I64(42));
        let mut message = DynamicMessage::new(log);
        message.set_field_by_name("level", Value::EnumNumber(2));
        message.set_field_by_name("message", Value::String("refused".into()));
        message.set_field_by_name("origin", Value::Message(origin_message));
        message.encode_to_vec()
    }

    #[test]
    fn a_protobuf_record_is_read_at_its_message_indexes_with_default_values() {
        let file = compile_proto("t.proto", PROTO, Vec::new()).expect("compiles");
        let body = proto_message(&file);
        let lookup = lookup_of(vec![(11, Schema::Protobuf { file: file.clone() })]);
        // Indexes [1] (the file's second message): count 1, index 1, as zigzag varints. Scalars
        // at their default are written (`code`), an unset message field is not (`at`).
        let mut second = vec![0x02, 0x02];
        second.extend_from_slice(&body);
        let mut batch = vec![pending(&wire(11, &second))];
        let decoder = Decoder::from(InputFormat::Auto);
        SchemaRegistry::decode(&lookup, &mut batch, &decoder);
        let record = &batch[0];
        let level = record.decoded.clone().expect("decoded").expect("an event");
        assert_eq!(level.as_str(), "error");
        assert_eq!(
            record.event().expect("event"),
            serde_json::json!({"level": "ERROR", "message": "refused",
                "origin": {"service": "payments", "pid": 42}, "code": 0})
        );
        // The first message ([0], written as a count of 0) has other fields: field 1 of `Other`
        // is a string, so the enum's varint does not read as one.
        let mut first = vec![0x00];
        first.extend_from_slice(&body);
        // Indexes past the file's messages.
        let mut nowhere = vec![0x02, 0x0a];
        nowhere.extend_from_slice(&body);
        let mut batch = vec![pending(&wire(11, &first)), pending(&wire(11, &nowhere))];
        SchemaRegistry::decode(&lookup, &mut batch, &decoder);
        for record in &batch {
            let err = record
                .decoded
                .clone()
                .expect("decoded")
                .expect_err("mismatch");
            assert_eq!(err.reason(), "schema_mismatch", "{err}");
        }
    }

    #[test]
    fn a_protobuf_schema_imports_its_references_by_name() {
        let common = "syntax = \"proto3\"; package common; message Origin { string service = 1; }";
        let main = "syntax = \"proto3\"; package app; import \"common/origin.proto\"; \
                    message Log { string level = 1; common.Origin origin = 2; }";
        let file = compile_proto(
            "main.proto",
            main,
            vec![("common/origin.proto".into(), common.into())],
        )
        .expect("compiles with its reference");
        assert_eq!(file.messages().next().expect("Log").name(), "Log");
        let missing = compile_proto("main.proto", main, Vec::new()).expect_err("no reference");
        assert!(missing.contains("common/origin.proto"), "{missing}");
    }

    /// A schema registered as Confluent's serializers register it, a base64
    /// `FileDescriptorProto` (here the compiled file's own), reads as the source does.
    #[test]
    fn a_protobuf_schema_in_base64_descriptor_form_reads_as_its_source() {
        use base64::Engine as _;
        use prost::Message as _;
        let from_source = compile_proto("t.proto", PROTO, Vec::new()).expect("compiles");
        let mut proto = from_source.file_descriptor_proto().clone();
        proto.name = Some("app/log.proto".into());
        let text = base64::engine::general_purpose::STANDARD.encode(proto.encode_to_vec());
        let Ok(Schema::Protobuf { file }) = Schema::parse("PROTOBUF", &text, Vec::new()) else {
            panic!("the descriptor does not compile");
        };
        assert_eq!(file.name(), "app/log.proto");
        let mut body = vec![0x02, 0x02];
        body.extend_from_slice(&proto_message(&from_source));
        let read = Schema::Protobuf { file }
            .json(5, &body)
            .expect("not JSON")
            .expect("reads");
        let read: serde_json::Value = serde_json::from_slice(&read).expect("JSON");
        assert_eq!(read["level"], "ERROR");
        assert_eq!(read["origin"]["service"], "payments");
        // Neither source nor a descriptor.
        let Err(why) = Schema::parse("PROTOBUF", "bm90IGEgZGVzY3JpcHRvcg==", Vec::new()) else {
            panic!("garbage compiled");
        };
        assert!(why.starts_with("not a Protobuf schema"), "{why}");
    }

    #[test]
    fn wire_ids_are_read_big_endian_behind_a_zero_byte() {
        assert_eq!(wire_id(&[0, 0, 0, 1, 2, 9]), Some(258));
        assert_eq!(wire_id(&[0, 0, 0, 1]), None);
        assert_eq!(wire_id(b"{\"level\":1}"), None);
    }

    #[test]
    fn decimals_are_written_as_their_integer() {
        assert_eq!(signed_decimal_text(&[0x01, 0x00]), "256");
        assert_eq!(signed_decimal_text(&[0xff]), "-1");
        assert_eq!(signed_decimal_text(&[0xff, 0x00]), "-256");
        assert_eq!(signed_decimal_text(&[]), "0");
        assert_eq!(
            signed_decimal_text(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            "2361183241434822606847"
        );
    }

    #[test]
    fn zigzag_varints_as_confluent_writes_them() {
        let mut at = 0;
        assert_eq!(zigzag(&[0x00], &mut at), Some(0));
        at = 0;
        assert_eq!(zigzag(&[0x02], &mut at), Some(1));
        at = 0;
        assert_eq!(zigzag(&[0x01], &mut at), Some(-1));
        at = 0;
        assert_eq!(zigzag(&[0xac, 0x02], &mut at), Some(150));
        assert_eq!(at, 2);
        at = 0;
        assert_eq!(zigzag(&[0x80], &mut at), None);
    }
}

//! The object-store destination's section of a route: `sink = { type = "object_store", ... }`
//! (`type = "s3"` is the same): NDJSON objects, compressed, in S3 or an S3-compatible store
//! (MinIO, R2, Ceph), Google Cloud Storage or Azure Blob Storage.
//!
//! An object's boundaries depend only on its records (a record count, a byte size, a change of
//! the directory its records' timestamps give, an age measured in record time); its name
//! carries its topic, partition, first and last offset. See `object_sink` for how that makes
//! every record land in exactly one object.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{check_range, invalid, ConfigError, OptionValue, REDACTED};

/// Where and how a route's records are archived as objects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreSinkConfig {
    /// The bucket and an optional prefix: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`; or a local directory, `file:///var/lib/archive`.
    pub url: String,
    /// The directory of each object under the url's prefix, a template of `{@topic}`,
    /// `{@partition}`, strftime specifiers of the record's Kafka timestamp (UTC) and literal
    /// text. Records whose directories differ never share an object.
    #[serde(default = "default_path")]
    pub path: String,
    /// `gzip` (default), `zstd` or `none`.
    #[serde(default)]
    pub compression: ObjectCompression,
    /// Most records in one object.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// Most bytes of NDJSON (before compression) in one object; a single larger record makes
    /// an object of its own.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// An object is closed before a record whose Kafka timestamp is this much later than the
    /// object's first record's (record time, not the clock).
    #[serde(default = "default_max_age_ms")]
    pub max_age_ms: u64,
    /// An open object that has taken no record for this long (the clock) is closed, so that a
    /// partition that went quiet is committed (see the object sink for what that changes).
    #[serde(default = "default_idle_flush_ms")]
    pub idle_flush_ms: u64,
    /// Objects larger than this (compressed) are uploaded in parts of this size (multipart
    /// upload); smaller ones with one request.
    #[serde(default = "default_part_bytes")]
    pub part_bytes: usize,
    /// The store's own settings, as the `object_store` crate names them for the url's scheme
    /// (`region`, `endpoint`, `allow_http`, `access_key_id`, `secret_access_key`,
    /// `virtual_hosted_style_request`, ...; values may be `${env:NAME}` or `${file:/path}`).
    /// What is not set comes from the standard environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`)
    /// and, for S3, the instance's or container's role.
    #[serde(
        default,
        deserialize_with = "super::references::flat_options",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub options: BTreeMap<String, OptionValue>,
}

/// How objects are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectCompression {
    /// NDJSON as it is (`.ndjson`).
    None,
    /// gzip (`.ndjson.gz`): `zcat` reads it.
    #[default]
    Gzip,
    /// zstd (`.ndjson.zst`): `zstdcat` reads it.
    Zstd,
}

impl ObjectCompression {
    /// The objects' name ending.
    pub fn extension(self) -> &'static str {
        match self {
            ObjectCompression::None => "ndjson",
            ObjectCompression::Gzip => "ndjson.gz",
            ObjectCompression::Zstd => "ndjson.zst",
        }
    }
}

/// Default `path`: Hive-style date and hour directories under the topic.
pub const DEFAULT_OBJECT_PATH: &str = "{@topic}/dt=%Y-%m-%d/hour=%H";

fn default_path() -> String {
    DEFAULT_OBJECT_PATH.to_string()
}

fn default_max_records() -> usize {
    10_000
}

fn default_max_bytes() -> usize {
    16 << 20
}

fn default_max_age_ms() -> u64 {
    10 * 60 * 1000
}

fn default_idle_flush_ms() -> u64 {
    30_000
}

fn default_part_bytes() -> usize {
    8 << 20
}

/// Smallest part S3 takes in a multipart upload (all but the last).
pub const MIN_PART_BYTES: usize = 5 << 20;

/// The url's scheme, which says which store and which option names apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// `s3://` (and S3-compatible stores through `endpoint`).
    S3,
    /// `gs://`
    Gcs,
    /// `az://`, `azure://`, `abfs://`
    Azure,
    /// `file:///absolute/directory`: a local (or mounted) directory, each object written to a
    /// temporary file and renamed into place.
    Local,
}

impl ObjectStoreSinkConfig {
    /// The store, bucket and prefix of `url`.
    pub fn location(&self) -> Result<(StoreKind, String, String), String> {
        let (scheme, rest) = self
            .url
            .split_once("://")
            .ok_or("is not a url: write `s3://bucket/prefix`")?;
        let kind = match scheme {
            "s3" | "s3a" => StoreKind::S3,
            "gs" => StoreKind::Gcs,
            "az" | "azure" | "abfs" | "abfss" => StoreKind::Azure,
            "file" => {
                if !rest.starts_with('/') || rest.len() < 2 {
                    return Err("a `file://` url names an absolute directory: `file:///var/lib/archive`".into());
                }
                return Ok((StoreKind::Local, rest.trim_end_matches('/').to_string(), String::new()));
            }
            other => {
                return Err(format!(
                    "scheme `{other}://` is not an object store: use `s3://`, `gs://`, `az://` or `file://`"
                ))
            }
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err("names no bucket: write `s3://bucket/prefix`".into());
        }
        if rest.contains(['?', '#']) {
            return Err("has a query or fragment: put settings in `options`".into());
        }
        Ok((
            kind,
            bucket.to_string(),
            prefix.trim_matches('/').to_string(),
        ))
    }

    /// Checks the section, `key` naming it in errors (`routes[2].sink`).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let (kind, _, _) = self
            .location()
            .map_err(|message| invalid(format!("{key}.url"), message))?;
        let path = self.path_template(key)?;
        if let Some(part) = path.reads_more_than_the_record() {
            return Err(invalid(
                format!("{key}.path"),
                format!(
                    "reads {part}: a directory may use only `{{@topic}}`, `{{@partition}}`, \
                     dates of the record's timestamp (`%Y`, `%H`, ...) and literal text, so \
                     that the records of one partition fall into few directories"
                ),
            ));
        }
        check_range(
            &format!("{key}.max_records"),
            self.max_records,
            1,
            10_000_000,
        )?;
        check_range(&format!("{key}.max_bytes"), self.max_bytes, 1024, 5 << 30)?;
        check_range(
            &format!("{key}.max_age_ms"),
            self.max_age_ms,
            1000,
            7 * 86_400_000,
        )?;
        check_range(
            &format!("{key}.idle_flush_ms"),
            self.idle_flush_ms,
            100,
            86_400_000,
        )?;
        check_range(
            &format!("{key}.part_bytes"),
            self.part_bytes,
            MIN_PART_BYTES,
            5 << 30,
        )?;
        for (name, value) in &self.options {
            let known = match kind {
                StoreKind::S3 => name.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(),
                StoreKind::Gcs => name.parse::<object_store::gcp::GoogleConfigKey>().is_ok(),
                StoreKind::Azure => name.parse::<object_store::azure::AzureConfigKey>().is_ok(),
                StoreKind::Local => false,
            } || name.parse::<object_store::ClientConfigKey>().is_ok();
            if !known {
                return Err(invalid(
                    format!("{key}.options.{name}"),
                    format!(
                        "is not a setting of this store (for s3: region, endpoint, allow_http, \
                         access_key_id, secret_access_key, session_token, \
                         virtual_hosted_style_request, ...); value {}",
                        if is_secret_option(name) {
                            REDACTED.to_string()
                        } else {
                            format!("{value:?}")
                        }
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The compiled `path`.
    pub fn path_template(&self, key: &str) -> Result<crate::shape::Template, ConfigError> {
        crate::shape::Template::parse(
            &self.path,
            crate::shape::Sanitize::PathSegment,
            &format!("{key}.path"),
        )
        .map_err(|err| invalid(err.key, err.message))
    }

    /// A copy with the secret options replaced by a marker.
    pub fn redacted(&self) -> ObjectStoreSinkConfig {
        let mut copy = self.clone();
        for (name, value) in copy.options.iter_mut() {
            if is_secret_option(name) {
                *value = OptionValue::Text(REDACTED.to_string());
            }
        }
        copy
    }
}

/// Whether an option of the store holds a secret (keys, tokens, SAS, passwords).
pub fn is_secret_option(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["secret", "token", "key", "password", "sas", "credential"]
        .iter()
        .any(|word| name.contains(word))
        && !name.ends_with("access_key_id")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<ObjectStoreSinkConfig, String> {
        let text = format!("url = \"s3://archive/logs\"\n{extra}");
        let config: ObjectStoreSinkConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        config
            .validate("routes[0].sink")
            .map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn defaults_are_hive_style_gzip_objects() {
        let config = config("").expect("valid");
        assert_eq!(config.path, "{@topic}/dt=%Y-%m-%d/hour=%H");
        assert_eq!(config.compression.extension(), "ndjson.gz");
        assert_eq!(
            config.location().expect("location"),
            (StoreKind::S3, "archive".into(), "logs".into())
        );
    }

    #[test]
    fn a_path_reading_the_event_or_key_is_refused_naming_it() {
        for path in ["{service}/%Y", "{user.id}", "{@key}/x", "{level}"] {
            let err = config(&format!("path = {path:?}")).expect_err(path);
            assert!(err.contains("routes[0].sink.path"), "{err}");
            assert!(err.contains("reads"), "{err}");
        }
        config("path = \"raw/{@topic}/{@partition}/%Y/%m/%d\"").expect("record-only parts");
    }

    #[test]
    fn bad_urls_options_and_sizes_name_their_key() {
        for (extra, key) in [
            (
                "options = { regoin = \"x\" }",
                "routes[0].sink.options.regoin",
            ),
            ("part_bytes = 1024", "routes[0].sink.part_bytes"),
            ("max_records = 0", "routes[0].sink.max_records"),
        ] {
            let err = config(extra).expect_err(extra);
            assert!(err.contains(key), "{extra}: {err}");
        }
        for url in ["http://x/y", "s3://", "archive", "s3://b/p?x=1"] {
            let text = format!("url = {url:?}");
            let config: ObjectStoreSinkConfig = toml::from_str(&text).expect("parses");
            let err = config
                .validate("routes[0].sink")
                .expect_err(url)
                .to_string();
            assert!(err.contains("routes[0].sink.url"), "{url}: {err}");
        }
        config("options = { region = \"eu-west-1\", endpoint = \"http://127.0.0.1:9000\", allow_http = true }")
            .expect("known options");
    }

    #[test]
    fn secrets_are_redacted_and_unknown_secret_values_not_echoed() {
        let config = config(
            "options = { access_key_id = \"AKIA\", secret_access_key = \"hunter2\", region = \"x\" }",
        )
        .expect("valid");
        let shown = format!("{:?}", config.redacted());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("AKIA") && shown.contains("\"x\""), "{shown}");
        let err = self::config("options = { secret_acess_key = \"hunter2\" }").expect_err("typo");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

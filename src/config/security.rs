//! How logbridge reaches a secured cluster: the typed `[kafka.security]` section (also allowed on
//! a Kafka sink and on the dead-letter topic), its checks, and the librdkafka properties it
//! becomes. Raw `options` are applied after these properties, so they still win.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// Transport and authentication of one cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl` (librdkafka's `security.protocol`).
    pub protocol: SecurityProtocol,
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, or `GSSAPI` (a build with the
    /// `gssapi` feature). Required with the `sasl_*` protocols.
    #[serde(default)]
    pub mechanism: Option<SaslMechanism>,
    /// SASL user name (PLAIN and SCRAM).
    #[serde(default)]
    pub username: Option<String>,
    /// SASL password (PLAIN and SCRAM): write `${env:NAME}` or `${file:/path}`, not the secret.
    #[serde(default)]
    pub password: Option<String>,
    /// PEM file of the CA certificates that signed the brokers' certificates. Without it the
    /// system's CA store is used (librdkafka probes the usual locations).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `key_file`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Password of an encrypted `key_file`.
    #[serde(default)]
    pub key_password: Option<String>,
    /// Check that the broker's certificate names the host connected to (default true). Turn
    /// off only for test clusters whose certificates do not name their hosts.
    #[serde(default = "yes")]
    pub verify_hostname: bool,
}

fn yes() -> bool {
    true
}

/// librdkafka's `security.protocol`, read in any case (`SASL_SSL`, as Java and librdkafka
/// property files spell it, or `sasl_ssl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    Plaintext,
    /// TLS, no SASL (mutual TLS may authenticate).
    Ssl,
    /// SASL without TLS: the password crosses the network in the clear with PLAIN.
    SaslPlaintext,
    /// SASL over TLS: what managed clusters use.
    SaslSsl,
}

impl SecurityProtocol {
    fn property(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether the protocol runs over TLS.
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    /// Whether the protocol authenticates with SASL.
    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// librdkafka's `sasl.mechanisms`, read in any case and with `_` for `-` (`scram-sha-512`,
/// `SCRAM_SHA_512`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub enum SaslMechanism {
    /// User name and password sent as they are (use it over TLS only).
    #[serde(rename = "PLAIN")]
    Plain,
    /// Salted challenge-response with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// Salted challenge-response with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    /// Kerberos (needs a build with the `gssapi` feature and a keytab in `options`).
    #[serde(rename = "GSSAPI")]
    Gssapi,
}

impl SaslMechanism {
    fn property(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::Gssapi => "GSSAPI",
        }
    }

    fn takes_password(self) -> bool {
        !matches!(self, SaslMechanism::Gssapi)
    }
}

impl TryFrom<String> for SecurityProtocol {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        let all = [
            SecurityProtocol::Plaintext,
            SecurityProtocol::Ssl,
            SecurityProtocol::SaslPlaintext,
            SecurityProtocol::SaslSsl,
        ];
        all.into_iter()
            .find(|protocol| protocol.property().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown security protocol `{name}`: use plaintext, ssl, sasl_plaintext or sasl_ssl (any case)"
                )
            })
    }
}

impl TryFrom<String> for SaslMechanism {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        let all = [
            SaslMechanism::Plain,
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
            SaslMechanism::Gssapi,
        ];
        let spelled = name.trim().replace('_', "-");
        all.into_iter()
            .find(|mechanism| mechanism.property().eq_ignore_ascii_case(&spelled))
            .ok_or_else(|| {
                format!(
                    "unknown SASL mechanism `{name}`: use PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or GSSAPI (any case)"
                )
            })
    }
}

impl SecurityConfig {
    /// Checks the section found at `key` (`kafka.security`, `routes[0].sink.security`, ...):
    /// what the protocol needs is given, what it cannot use is not, and named files exist.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let field = |name: &str| format!("{key}.{name}");
        let protocol = self.protocol.property();
        match (self.protocol.sasl(), self.mechanism) {
            (true, None) => {
                return Err(invalid(
                    field("mechanism"),
                    format!("protocol `{protocol}` needs a SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
                ))
            }
            (false, Some(_)) => {
                return Err(invalid(
                    field("mechanism"),
                    format!("protocol `{protocol}` does not use SASL: use `sasl_ssl` (or `sasl_plaintext`) or remove the mechanism"),
                ))
            }
            _ => {}
        }
        if let Some(mechanism) = self.mechanism {
            if mechanism == SaslMechanism::Gssapi && !cfg!(feature = "gssapi") {
                return Err(invalid(
                    field("mechanism"),
                    "this build has no GSSAPI support: build with `--features gssapi` (needs libsasl2-dev)",
                ));
            }
            for (name, value) in [("username", &self.username), ("password", &self.password)] {
                let given = value.as_deref().is_some_and(|v| !v.is_empty());
                if mechanism.takes_password() && !given {
                    return Err(invalid(
                        field(name),
                        format!("SASL {} needs a {name}", mechanism.property()),
                    ));
                }
            }
        } else {
            for (name, value) in [("username", &self.username), ("password", &self.password)] {
                if value.is_some() {
                    return Err(invalid(
                        field(name),
                        format!("protocol `{protocol}` does not use SASL credentials"),
                    ));
                }
            }
        }
        let files = [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ];
        for (name, file) in files {
            let Some(path) = file else { continue };
            if !self.protocol.tls() {
                return Err(invalid(
                    field(name),
                    format!("protocol `{protocol}` does not use TLS: use `ssl` or `sasl_ssl`"),
                ));
            }
            check_readable(&field(name), path)?;
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let missing = if self.cert_file.is_some() {
                "key_file"
            } else {
                "cert_file"
            };
            return Err(invalid(
                field(missing),
                "a client certificate needs both `cert_file` and `key_file`",
            ));
        }
        if self.key_password.is_some() && self.key_file.is_none() {
            return Err(invalid(field("key_password"), "there is no `key_file`"));
        }
        if !self.verify_hostname && !self.protocol.tls() {
            return Err(invalid(
                field("verify_hostname"),
                format!("protocol `{protocol}` does not use TLS"),
            ));
        }
        Ok(())
    }

    /// The librdkafka properties of this section (set before the user's options, which win).
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let mut properties = vec![("security.protocol", self.protocol.property().to_string())];
        if let Some(mechanism) = self.mechanism {
            properties.push(("sasl.mechanisms", mechanism.property().to_string()));
        }
        let text = [
            ("sasl.username", &self.username),
            ("sasl.password", &self.password),
            ("ssl.key.password", &self.key_password),
        ];
        for (property, value) in text {
            if let Some(value) = value {
                properties.push((property, value.clone()));
            }
        }
        let files = [
            ("ssl.certificate.location", &self.cert_file),
            ("ssl.key.location", &self.key_file),
        ];
        for (property, value) in files {
            if let Some(path) = value {
                properties.push((property, path.display().to_string()));
            }
        }
        if self.protocol.tls() {
            // Without a CA file, the system's store: `probe` finds it where the distribution
            // keeps it (the OpenSSL built into logbridge does not know that place by itself).
            let ca = self
                .ca_file
                .as_ref()
                .map_or_else(|| "probe".to_string(), |path| path.display().to_string());
            properties.push(("ssl.ca.location", ca));
            if !self.verify_hostname {
                properties.push(("ssl.endpoint.identification.algorithm", "none".to_string()));
            }
        }
        properties
    }

    /// The same section with its secrets replaced, for showing.
    pub fn redacted(&self) -> SecurityConfig {
        let hide = |value: &Option<String>| value.as_ref().map(|_| super::REDACTED.to_string());
        SecurityConfig {
            password: hide(&self.password),
            key_password: hide(&self.key_password),
            ..self.clone()
        }
    }

    /// The secret values of this section, to scrub from error messages.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        [&self.password, &self.key_password]
            .into_iter()
            .filter_map(|value| value.as_deref())
    }
}

fn check_readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|err| invalid(key, format!("cannot read {}: {err}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;

    fn section(text: &str) -> Result<SecurityConfig, String> {
        toml::from_str::<SecurityConfig>(text).map_err(|err| err.to_string())
    }

    /// A client configuration holding only the section's properties.
    fn client_of(security: &SecurityConfig) -> ClientConfig {
        let mut client = ClientConfig::new();
        for (property, value) in security.properties() {
            client.set(property, value);
        }
        client
    }

    fn problem(text: &str) -> String {
        let security = section(text).expect("parses");
        match security.validate("kafka.security") {
            Ok(()) => panic!("unexpectedly valid: {text}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn sasl_over_tls_becomes_librdkafka_properties() {
        let security = section(
            "protocol = \"sasl_ssl\"\nmechanism = \"SCRAM-SHA-512\"\nusername = \"alice\"\npassword = \"pw\"",
        )
        .expect("parses");
        security.validate("kafka.security").expect("valid");
        let client = client_of(&security);
        assert_eq!(client.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(client.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(client.get("sasl.username"), Some("alice"));
        assert_eq!(client.get("sasl.password"), Some("pw"));
        assert_eq!(client.get("ssl.ca.location"), Some("probe"));
        assert_eq!(client.get("ssl.endpoint.identification.algorithm"), None);
        assert_eq!(security.secrets().collect::<Vec<_>>(), ["pw"]);
        let shown = security.redacted();
        assert_eq!(shown.password.as_deref(), Some("<redacted>"));
        assert_eq!(shown.username.as_deref(), Some("alice"));
    }

    #[test]
    fn protocol_and_mechanism_names_are_read_in_any_case_and_spelling() {
        for (protocol, mechanism) in [
            ("SASL_SSL", "scram-sha-512"),
            ("Sasl_Ssl", "SCRAM_SHA_512"),
            ("sasl_ssl", "Scram-Sha-512"),
        ] {
            let security = section(&format!(
                "protocol = \"{protocol}\"\nmechanism = \"{mechanism}\"\nusername = \"a\"\npassword = \"p\""
            ))
            .unwrap_or_else(|err| panic!("{protocol} {mechanism}: {err}"));
            assert_eq!(security.protocol, SecurityProtocol::SaslSsl);
            assert_eq!(security.mechanism, Some(SaslMechanism::ScramSha512));
            let client = client_of(&security);
            assert_eq!(client.get("security.protocol"), Some("sasl_ssl"));
            assert_eq!(client.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        }
        let err = section("protocol = \"tls\"").expect_err("unknown");
        assert!(
            err.contains("unknown security protocol `tls`") && err.contains("sasl_ssl"),
            "{err}"
        );
        let err =
            section("protocol = \"sasl_ssl\"\nmechanism = \"SCRAM-SHA-1\"").expect_err("unknown");
        assert!(
            err.contains("unknown SASL mechanism `SCRAM-SHA-1`") && err.contains("SCRAM-SHA-512"),
            "{err}"
        );
    }

    #[test]
    fn tls_files_and_hostname_check_map_to_their_properties() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let path = file.path().display().to_string();
        let security = section(&format!(
            "protocol = \"ssl\"\nca_file = \"{path}\"\ncert_file = \"{path}\"\nkey_file = \"{path}\"\nkey_password = \"kp\"\nverify_hostname = false"
        ))
        .expect("parses");
        security.validate("kafka.security").expect("valid");
        let client = client_of(&security);
        assert_eq!(client.get("security.protocol"), Some("ssl"));
        assert_eq!(client.get("ssl.ca.location"), Some(path.as_str()));
        assert_eq!(client.get("ssl.certificate.location"), Some(path.as_str()));
        assert_eq!(client.get("ssl.key.location"), Some(path.as_str()));
        assert_eq!(client.get("ssl.key.password"), Some("kp"));
        assert_eq!(
            client.get("ssl.endpoint.identification.algorithm"),
            Some("none")
        );
        assert_eq!(client.get("sasl.mechanisms"), None);
        let plain = client_of(&section("protocol = \"plaintext\"").expect("parses"));
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("ssl.ca.location"), None);
    }

    #[test]
    fn what_a_protocol_needs_or_cannot_use_is_named() {
        let cases = [
            ("protocol = \"sasl_ssl\"", "`kafka.security.mechanism`: protocol `sasl_ssl` needs a SASL mechanism"),
            ("protocol = \"ssl\"\nmechanism = \"PLAIN\"", "`kafka.security.mechanism`: protocol `ssl` does not use SASL"),
            ("protocol = \"sasl_ssl\"\nmechanism = \"PLAIN\"\nusername = \"u\"", "`kafka.security.password`: SASL PLAIN needs a password"),
            ("protocol = \"sasl_ssl\"\nmechanism = \"SCRAM-SHA-256\"\npassword = \"p\"", "`kafka.security.username`: SASL SCRAM-SHA-256 needs a username"),
            ("protocol = \"ssl\"\nusername = \"u\"", "`kafka.security.username`: protocol `ssl` does not use SASL credentials"),
            ("protocol = \"sasl_plaintext\"\nmechanism = \"PLAIN\"\nusername = \"u\"\npassword = \"p\"\nca_file = \"/etc/hostname\"", "`kafka.security.ca_file`: protocol `sasl_plaintext` does not use TLS"),
            ("protocol = \"ssl\"\nca_file = \"/nonexistent/ca.pem\"", "`kafka.security.ca_file`: cannot read /nonexistent/ca.pem"),
            ("protocol = \"ssl\"\ncert_file = \"/etc/hostname\"", "`kafka.security.key_file`: a client certificate needs both"),
            ("protocol = \"ssl\"\nkey_password = \"x\"", "`kafka.security.key_password`: there is no `key_file`"),
            ("protocol = \"plaintext\"\nverify_hostname = false", "`kafka.security.verify_hostname`: protocol `plaintext` does not use TLS"),
        ];
        for (text, expected) in cases {
            let err = problem(text);
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
        if !cfg!(feature = "gssapi") {
            let err = problem("protocol = \"sasl_ssl\"\nmechanism = \"GSSAPI\"");
            assert!(err.contains("no GSSAPI support"), "{err}");
        }
        let unknown = section("protocol = \"tls\"").expect_err("unknown protocol");
        assert!(unknown.contains("sasl_ssl"), "{unknown}");
        let mechanism =
            section("protocol = \"sasl_ssl\"\nmechanism = \"SCRAM\"").expect_err("unknown");
        assert!(mechanism.contains("SCRAM-SHA-512"), "{mechanism}");
    }
}

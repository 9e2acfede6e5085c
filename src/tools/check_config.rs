//! The `check-config` command: validates a configuration file and prints it with defaults
//! filled in and secrets redacted; with `--connect`, also connects to every cluster it names
//! (with its security) and checks that each topic exists (and lists the topics each source
//! pattern matches), and asks each HTTP and Elasticsearch
//! destination whether it is there (as `vector validate` runs its sinks' health checks).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::cluster::{ClusterProblem, Probe};
use crate::config::{Cluster, Config, HttpDestination, HttpSinkConfig};
use crate::http_sink::HttpEndpoint;

/// How `check-config` ends; the exit codes are documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    /// Valid (and, with `--connect`, every cluster reached and every topic found): 0.
    Valid,
    /// The file is missing or invalid: 2.
    Invalid,
    /// A cluster could not be reached or refused the credentials: 3.
    CannotConnect,
    /// Every cluster answered, and a topic does not exist: 4.
    MissingTopics,
}

impl From<CheckOutcome> for ExitCode {
    fn from(outcome: CheckOutcome) -> ExitCode {
        match outcome {
            CheckOutcome::Valid => ExitCode::SUCCESS,
            CheckOutcome::Invalid => ExitCode::from(2),
            CheckOutcome::CannotConnect => ExitCode::from(3),
            CheckOutcome::MissingTopics => ExitCode::from(4),
        }
    }
}

/// Prints the configuration on stdout and `FILE: ok` (or the error naming the key) on stderr;
/// with `connect`, then one line per topic and cluster on stderr.
pub fn check_config(file: &Path, connect: Option<Duration>) -> CheckOutcome {
    let mut config = match Config::load(file) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{}: {err}", file.display());
            return CheckOutcome::Invalid;
        }
    };
    println!("{}", config.to_toml());
    // Each route as understood: what it takes, whether it hands events on, its transforms
    // and its destination.
    for route in &config.routes {
        eprintln!("route `{}`:", route.name);
        for line in route.describe() {
            eprintln!("  {line}");
        }
    }
    eprintln!("{}: ok", file.display());
    let Some(timeout) = connect else {
        return CheckOutcome::Valid;
    };
    config.resolve_outputs();
    let source_topics: Vec<(String, &str)> = config
        .kafka
        .topics
        .iter()
        .enumerate()
        .map(|(index, topic)| (format!("kafka.topics[{index}]"), topic.as_str()))
        .collect();
    let mut checks = vec![(config.source(), source_topics)];
    for (key, topic, cluster) in config.outputs() {
        // Outputs on a cluster already listed (same brokers and security) share its check.
        match checks
            .iter_mut()
            .find(|(seen, _)| same_cluster(seen, &cluster))
        {
            Some((_, topics)) => topics.push((key, topic)),
            None => checks.push((cluster, vec![(key, topic)])),
        }
    }
    let secrets = config.secrets();
    let matching = config.kafka.topic_matching();
    let mut outcome = CheckOutcome::Valid;
    for (cluster, topics) in checks {
        let found = Probe::new(cluster, secrets.clone())
            .map_err(|err| ClusterProblem::Unreachable {
                brokers: cluster.brokers.to_string(),
                reason: config.scrub(&format!("{err:#}")),
            })
            .and_then(|probe| probe.topics(timeout));
        let found = match found {
            Ok(found) => found,
            Err(problem) => {
                eprintln!("{problem}");
                outcome = CheckOutcome::CannotConnect;
                continue;
            }
        };
        eprintln!("{}: connected", cluster.brokers);
        for (key, topic) in topics {
            if crate::subscription::is_pattern(topic) {
                // Only source entries are patterns (outputs name topics).
                let resolved = crate::subscription::resolve(&[topic.to_string()], &found, matching);
                let matched = resolved
                    .first()
                    .map(|entry| &entry.topics)
                    .filter(|topics| !topics.is_empty());
                match matched {
                    Some(matched) => {
                        let list: Vec<String> = matched
                            .iter()
                            .map(|(name, count)| format!("`{name}` ({count})"))
                            .collect();
                        eprintln!(
                            "`{key}`: pattern `{topic}` matches {} topic{} (partitions): {}",
                            matched.len(),
                            if matched.len() == 1 { "" } else { "s" },
                            list.join(", ")
                        );
                    }
                    None => {
                        eprintln!(
                            "`{key}`: pattern `{topic}` matches no topic at {} yet (or these \
                             credentials may not describe the topics that do)",
                            cluster.brokers
                        );
                        if outcome == CheckOutcome::Valid {
                            outcome = CheckOutcome::MissingTopics;
                        }
                    }
                }
                continue;
            }
            match found.get(topic).copied() {
                Some(count) => eprintln!(
                    "`{key}`: topic `{topic}`: {count} partition{}",
                    if count == 1 { "" } else { "s" }
                ),
                None => {
                    eprintln!(
                        "`{key}`: topic `{topic}` does not exist at {} (or these credentials \
                         may not describe it)",
                        cluster.brokers
                    );
                    if outcome == CheckOutcome::Valid {
                        outcome = CheckOutcome::MissingTopics;
                    }
                }
            }
        }
    }
    if !probe_http_destinations(&config, timeout) {
        outcome = CheckOutcome::CannotConnect;
    }
    if !probe_object_stores(&config, timeout) {
        outcome = CheckOutcome::CannotConnect;
    }
    if !probe_schema_registry(&config, timeout) {
        outcome = CheckOutcome::CannotConnect;
    }
    outcome
}

/// Asks the schema registry for its subjects, one line on stderr; whether it answered (true
/// without one).
fn probe_schema_registry(config: &Config, timeout: Duration) -> bool {
    let Some(registry) = &config.input.schema_registry else {
        return true;
    };
    let Some(runtime) = probe_runtime("schema registry") else {
        return false;
    };
    let shown = crate::config::redact_url(&registry.url);
    let answer = match crate::schema_registry::SchemaRegistry::new(registry) {
        Ok(client) => runtime.block_on(async {
            tokio::time::timeout(timeout, client.probe())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
        }),
        Err(err) => Err(format!("{err:#}")),
    };
    match answer {
        Ok(answer) => {
            eprintln!("`input.schema_registry.url`: {shown}: {answer}");
            true
        }
        Err(why) => {
            eprintln!(
                "`input.schema_registry.url`: {shown}: {}",
                config.scrub(&why)
            );
            false
        }
    }
}

/// The runtime the destination probes run on; `None` (said on stderr) if it cannot be made.
fn probe_runtime(what: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(err) => {
            eprintln!("cannot check the {what}: {err}");
            None
        }
    }
}

/// Lists the prefix of each object-store destination with its credentials, one line each on
/// stderr; whether every one answered.
fn probe_object_stores(config: &Config, timeout: Duration) -> bool {
    let stores: Vec<(String, &crate::config::ObjectStoreSinkConfig, &str)> = config
        .routes
        .iter()
        .enumerate()
        .filter_map(|(index, route)| match &route.sink {
            crate::config::SinkConfig::ObjectStore(store) => Some((
                format!("routes[{index}].sink.url"),
                store,
                route.name.as_str(),
            )),
            _ => None,
        })
        .collect();
    if stores.is_empty() {
        return true;
    }
    let Some(runtime) = probe_runtime("object stores") else {
        return false;
    };
    let mut all = true;
    for (key, store, route) in stores {
        let answer = runtime.block_on(async {
            let destination = crate::object_sink::ObjectDestination::new(
                store,
                route,
                crate::record::Fences::default(),
                None,
            )
            .map_err(|err| format!("{err:#}"))?;
            tokio::time::timeout(timeout, destination.probe())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
        });
        match answer {
            Ok(answer) => eprintln!("`{key}`: {}: {answer}", store.url),
            Err(why) => {
                all = false;
                eprintln!("`{key}`: {}: {}", store.url, config.scrub(&why));
            }
        }
    }
    all
}

/// Asks each HTTP and Elasticsearch destination whether it is there (see
/// [`HttpEndpoint::probe`]), one line each on stderr; whether every one answered.
fn probe_http_destinations(config: &Config, timeout: Duration) -> bool {
    let destinations: Vec<(String, &HttpSinkConfig, HttpDestination)> = config
        .routes
        .iter()
        .enumerate()
        .filter_map(|(index, route)| {
            let (http, destination) = route.sink.http()?;
            Some((format!("routes[{index}].sink.url"), http, destination))
        })
        .collect();
    if destinations.is_empty() {
        return true;
    }
    let Some(runtime) = probe_runtime("HTTP destinations") else {
        return false;
    };
    let mut all = true;
    for (key, http, destination) in destinations {
        let shown = crate::config::redact_url(&http.url);
        let answer = match HttpEndpoint::new(http, destination) {
            Ok(endpoint) => runtime.block_on(async {
                tokio::time::timeout(timeout, endpoint.probe())
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
            }),
            Err(err) => Err(format!("{err:#}")),
        };
        match answer {
            Ok(answer) => eprintln!("`{key}`: {shown}: {answer}"),
            Err(why) => {
                all = false;
                eprintln!("`{key}`: {shown}: {}", config.scrub(&why));
            }
        }
    }
    all
}

fn same_cluster(a: &Cluster<'_>, b: &Cluster<'_>) -> bool {
    a.brokers == b.brokers && a.security == b.security
}

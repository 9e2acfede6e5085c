//! The librdkafka consumer's configuration: the properties logbridge owns, the defaults it
//! chooses (each with the measurement behind it), then the user's `[kafka.options]`.

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

use crate::config::Config;

/// librdkafka prefetch bound unless the config sets it: with the pipeline's own channels this
/// caps memory whatever the backlog (the librdkafka default is 64 MiB and grows with lag
/// otherwise: vector #20939). 8 MiB fed the benchmark's pipeline as fast as 16 MiB did, with
/// about 20 MiB less peak RSS.
const DEFAULT_QUEUED_MAX_KBYTES: &str = "8192";

/// Largest fetch response unless the config sets it. librdkafka may overshoot the prefetch
/// bound by a whole response, and its default (50 MiB, i.e. 1 MiB for each of up to 50
/// partitions) made peak RSS depend on how many partitions had data: 4 MiB took the benchmark's
/// 64-partition backlog from 112 to 88 MiB at the same throughput.
const DEFAULT_FETCH_MAX_BYTES: &str = "4194304";

/// librdkafka keeps one fetch per broker in flight; a long poll for caught-up partitions (the
/// default waits 500 ms) delays the restart of every partition resumed meanwhile. 100 ms keeps
/// resumed partitions flowing at the cost of more idle fetches.
const DEFAULT_FETCH_WAIT_MAX_MS: &str = "100";

/// How long librdkafka postpones a partition's next fetch once its prefetch queue is full. Its
/// default (1 s) idles a pipeline that drains the queue faster than that: the measured pipeline
/// sat empty for most of every second. 20 ms keeps it fed; the cost is a few more wakeups of the
/// fetcher while the queue stays full.
const DEFAULT_FETCH_QUEUE_BACKOFF_MS: &str = "20";

/// Only committed transactions' records are read unless the config says otherwise.
const DEFAULT_ISOLATION_LEVEL: &str = "read_committed";

/// How often librdkafka reports statistics (lag, round trips) unless the config says otherwise.
const DEFAULT_STATISTICS_INTERVAL_MS: &str = "5000";
const DEFAULT_AUTO_OFFSET_RESET: &str = "earliest";

/// Builds the librdkafka consumer configuration: logbridge's fixed properties, its defaults,
/// the `[kafka.security]` section, then the user's `[kafka.options]` (which win over defaults
/// and security but cannot set fixed ones: config validation refuses them). The benchmark's bare client uses it too, so both sides of
/// its comparison run the same client settings.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("queued.max.messages.kbytes", DEFAULT_QUEUED_MAX_KBYTES)
        .set("fetch.max.bytes", DEFAULT_FETCH_MAX_BYTES)
        .set("fetch.wait.max.ms", DEFAULT_FETCH_WAIT_MAX_MS)
        .set("fetch.queue.backoff.ms", DEFAULT_FETCH_QUEUE_BACKOFF_MS)
        .set("statistics.interval.ms", DEFAULT_STATISTICS_INTERVAL_MS)
        // Records of aborted transactions, and of transactions still open, are never
        // delivered: a producer that aborted meant them not to exist. (librdkafka's default too;
        // said here so that it is a decision, not an accident. `read_uncommitted` in
        // [kafka.options] delivers them, and an open transaction no longer holds reading back.)
        .set("isolation.level", DEFAULT_ISOLATION_LEVEL)
        // A group with no commit yet, or a position the log no longer holds (retention went
        // past it, the topic was recreated), starts at the oldest record kept: a new
        // deployment ships the backlog, and a reset skips only what the broker deleted.
        // (librdkafka's own default, `latest`, would skip everything written before.)
        .set("auto.offset.reset", DEFAULT_AUTO_OFFSET_RESET)
        .set_log_level(RDKafkaLogLevel::Warning);
    if config
        .kafka
        .topics
        .iter()
        .any(|topic| crate::subscription::is_pattern(topic))
    {
        // New topics that a pattern matches are found at the next metadata refresh (classic
        // protocol; see [`crate::subscription`]).
        client.set(
            "topic.metadata.refresh.interval.ms",
            crate::subscription::DEFAULT_METADATA_REFRESH_MS,
        );
    }
    config.source().apply(&mut client);
    if config.kafka.options.contains_key("debug") {
        // librdkafka's debug contexts log at debug level; let them through.
        client.set_log_level(RDKafkaLogLevel::Debug);
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(options: &str) -> Config {
        Config::from_toml_str(&format!(
            r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"
topics = ["logs"]
[kafka.options]
{options}

[[routes]]
name = "all"
levels = ["info"]
sink = {{ type = "null" }}
"#
        ))
        .expect("valid config")
    }

    #[test]
    fn logbridge_owns_commits_and_bounds_the_prefetch() {
        let client = client_config(&config(""));
        assert_eq!(client.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(client.get("group.id"), Some("g"));
        assert_eq!(client.get("enable.auto.commit"), Some("false"));
        assert_eq!(client.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("8192"));
        assert_eq!(client.get("fetch.max.bytes"), Some("4194304"));
        assert_eq!(client.get("fetch.queue.backoff.ms"), Some("20"));
        assert_eq!(client.get("isolation.level"), Some("read_committed"));
        assert_eq!(client.get("auto.offset.reset"), Some("earliest"));
        assert!(matches!(client.log_level, RDKafkaLogLevel::Warning));
    }

    #[test]
    fn user_options_win_over_defaults() {
        let client = client_config(&config(
            "\"fetch.max.bytes\" = 1048576\n\"fetch.wait.max.ms\" = \"10\"\n\"debug\" = \"cgrp\"",
        ));
        assert_eq!(client.get("fetch.max.bytes"), Some("1048576"));
        assert_eq!(client.get("fetch.wait.max.ms"), Some("10"));
        assert_eq!(
            client_config(&config("\"auto.offset.reset\" = \"latest\"")).get("auto.offset.reset"),
            Some("latest")
        );
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("8192"));
        assert!(matches!(client.log_level, RDKafkaLogLevel::Debug));
    }

    #[test]
    fn a_pattern_refreshes_metadata_sooner_unless_told() {
        assert_eq!(
            client_config(&config("")).get("topic.metadata.refresh.interval.ms"),
            None,
            "names only: librdkafka's default"
        );
        let patterned = |options: &str| {
            let mut text = config(options);
            text.kafka.topics = vec!["logs".to_string(), "^app-.*".to_string()];
            client_config(&text)
        };
        assert_eq!(
            patterned("").get("topic.metadata.refresh.interval.ms"),
            Some("30000")
        );
        assert_eq!(
            patterned("\"topic.metadata.refresh.interval.ms\" = 1000")
                .get("topic.metadata.refresh.interval.ms"),
            Some("1000")
        );
    }
}

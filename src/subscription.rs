//! What `kafka.topics` subscribes to. An entry is a topic's name or, when it starts with `^`
//! (librdkafka's convention), a pattern: every topic of the cluster whose name it matches is
//! consumed, including topics created while logbridge runs, which the group takes on at its
//! next metadata refresh.
//!
//! Who matches a pattern depends on the group protocol, and the two differ:
//!
//! * the classic protocol (the default): librdkafka, against the metadata it refreshes every
//!   `topic.metadata.refresh.interval.ms` (logbridge sets [`DEFAULT_METADATA_REFRESH_MS`] when
//!   `kafka.topics` has a pattern and `[kafka.options]` does not say), with libc's POSIX
//!   extended regular expressions, searching (`^logs-` takes `logs-a`);
//! * KIP-848's `consumer` protocol: the broker, with RE2/J, matching whole names (`^logs-`
//!   takes nothing; `^logs-.*` takes `logs-a`).
//!
//! So a pattern is accepted only in the syntax both read alike (checked at start-up, naming
//! `kafka.topics[i]`): no backslash but before punctuation (`\.`), none inside brackets, no
//! `(?` groups or flags; and it must compile in both. Neither leaves Kafka's internal topics
//! out, so a pattern that matches one of them (`^.*`) is refused too. logbridge's own matching
//! ([`resolve`], for `/status`, readiness and `check-config --connect`) follows the protocol in
//! use, and finds the topics the group consumes.

use std::collections::BTreeMap;

/// `topic.metadata.refresh.interval.ms` when `kafka.topics` has a pattern and `[kafka.options]`
/// does not set it: how soon a new topic that matches is consumed under the classic protocol.
/// librdkafka's default, 5 minutes, would leave a new service's logs unread that long; each
/// refresh asks for the metadata of every topic, a small request for clusters of thousands.
pub const DEFAULT_METADATA_REFRESH_MS: &str = "30000";

/// Kafka's own topics, which a pattern must not match (neither protocol leaves them out).
const INTERNAL_TOPICS: &[&str] = &[
    "__consumer_offsets",
    "__transaction_state",
    "__share_group_state",
];

/// Whether an entry of `kafka.topics` is a pattern.
pub fn is_pattern(entry: &str) -> bool {
    entry.starts_with('^')
}

/// A pattern of `kafka.topics`, checked.
#[derive(Debug, Clone)]
pub struct TopicPattern {
    /// Searching, as librdkafka matches (the pattern starts with `^`, so it is anchored there).
    search: regex::Regex,
    /// Matching whole names, as the broker does under the consumer protocol.
    whole: regex::Regex,
}

/// How a group's patterns are matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// The classic protocol: librdkafka searches each name.
    Search,
    /// The consumer protocol (KIP-848): the broker matches whole names.
    WholeName,
}

impl Matching {
    /// How patterns are matched under the `group.protocol` option's value (`None`: not set,
    /// the classic protocol).
    pub fn of_protocol(protocol: Option<&str>) -> Matching {
        match protocol {
            Some(protocol) if protocol.trim().eq_ignore_ascii_case("consumer") => {
                Matching::WholeName
            }
            _ => Matching::Search,
        }
    }
}

impl TopicPattern {
    /// Checks `entry` (which starts with `^`): the syntax both matchers read alike, compiling in
    /// both, and matching none of Kafka's internal topics. `Err` says what is wrong and how to
    /// write it.
    pub fn new(entry: &str) -> Result<TopicPattern, String> {
        check_shared_syntax(entry)?;
        let search = regex::Regex::new(entry)
            .map_err(|err| format!("`{entry}` is not a valid regular expression: {err}"))?;
        let whole = regex::Regex::new(&format!("^(?:{entry})$"))
            .map_err(|err| format!("`{entry}` is not a valid regular expression: {err}"))?;
        posix::compiles(entry).map_err(|err| {
            format!("`{entry}` is not a POSIX extended regular expression (librdkafka's): {err}")
        })?;
        let pattern = TopicPattern { search, whole };
        if let Some(internal) = INTERNAL_TOPICS
            .iter()
            .find(|topic| pattern.matches_either(topic))
        {
            return Err(format!(
                "`{entry}` also matches Kafka's internal topic `{internal}`, which holds no \
                 log events: leave it out (e.g. start with `^[^_]`)"
            ));
        }
        Ok(pattern)
    }

    /// Whether the group consumes `topic` for this pattern.
    pub fn matches(&self, topic: &str, matching: Matching) -> bool {
        match matching {
            Matching::Search => self.search.is_match(topic),
            Matching::WholeName => self.whole.is_match(topic),
        }
    }

    /// Whether `topic` matches under either protocol (what an output topic must not do).
    pub fn matches_either(&self, topic: &str) -> bool {
        self.search.is_match(topic)
    }
}

/// Refuses what POSIX extended regular expressions and RE2 read differently: a backslash
/// anywhere but before ASCII punctuation outside brackets (POSIX has no `\d`, and reads `[\.]`
/// as a backslash or a dot), and `(?` (groups and flags POSIX has not).
fn check_shared_syntax(entry: &str) -> Result<(), String> {
    let mut in_brackets = false;
    let mut chars = entry.chars().peekable();
    let mut previous = None;
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_brackets => {
                return Err(format!(
                    "`{entry}`: a backslash inside brackets means a backslash to librdkafka and \
                     an escape to the broker: write the character itself (`[.-]`)"
                ))
            }
            '\\' => match chars.next() {
                Some(next) if next.is_ascii_punctuation() => {}
                Some(next) => {
                    let instead = match next {
                        'd' => "`[0-9]`",
                        'w' => "`[A-Za-z0-9_]`",
                        's' => "nothing (topic names have no spaces)",
                        _ => "the characters themselves, or a bracket expression",
                    };
                    return Err(format!(
                        "`{entry}`: `\\{next}` is read differently by librdkafka (POSIX) and \
                         the broker (RE2): write {instead}"
                    ));
                }
                None => return Err(format!("`{entry}` ends with a lone backslash")),
            },
            '[' if !in_brackets => {
                in_brackets = true;
                // A `]` first in the brackets (or after `^`) is a literal, not their end.
                if chars.peek() == Some(&'^') {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
            }
            // A class such as `[:alpha:]` inside brackets: its `]` does not end them.
            '[' if in_brackets && chars.peek() == Some(&':') => {
                for inner in chars.by_ref() {
                    if inner == ']' {
                        break;
                    }
                }
            }
            ']' if in_brackets => in_brackets = false,
            '?' if previous == Some('(') && !in_brackets => {
                return Err(format!(
                    "`{entry}`: `(?` groups and flags are not POSIX: write plain groups"
                ))
            }
            _ => {}
        }
        previous = Some(c);
    }
    Ok(())
}

/// What one entry of `kafka.topics` stands for in a cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Resolved {
    /// The entry as configured.
    pub entry: String,
    /// Whether it is a pattern.
    pub pattern: bool,
    /// The topics it stands for, sorted, with their partition counts: a name itself if the
    /// cluster has it, a pattern every topic it matches.
    pub topics: BTreeMap<String, usize>,
}

/// What each of `entries` stands for among `cluster`'s topics (name → partition count), matched
/// as `matching` says. An entry that is neither a name the cluster has nor a valid pattern
/// (which configuration checks refuse) stands for nothing.
pub fn resolve(
    entries: &[String],
    cluster: &BTreeMap<String, usize>,
    matching: Matching,
) -> Vec<Resolved> {
    entries
        .iter()
        .map(|entry| {
            let topics = if is_pattern(entry) {
                match TopicPattern::new(entry) {
                    Ok(pattern) => cluster
                        .iter()
                        .filter(|(topic, _)| pattern.matches(topic, matching))
                        .map(|(topic, count)| (topic.clone(), *count))
                        .collect(),
                    Err(_) => BTreeMap::new(),
                }
            } else {
                cluster
                    .get_key_value(entry)
                    .map(|(topic, count)| (topic.clone(), *count))
                    .into_iter()
                    .collect()
            };
            Resolved {
                entry: entry.clone(),
                pattern: is_pattern(entry),
                topics,
            }
        })
        .collect()
}

/// libc's POSIX regular expressions, which librdkafka matches patterns with (its build finds
/// `regcomp`, `HAVE_REGEX`).
#[cfg(target_os = "linux")]
mod posix {
    use std::ffi::CString;

    /// Whether `pattern` compiles as librdkafka compiles it (`REG_EXTENDED | REG_NOSUB`).
    pub(super) fn compiles(pattern: &str) -> Result<(), String> {
        let text = CString::new(pattern).map_err(|_| "it holds a NUL byte".to_string())?;
        let mut compiled = std::mem::MaybeUninit::<libc::regex_t>::zeroed();
        // SAFETY: `compiled` is writable memory for one regex_t and `text` a NUL-terminated
        // string that outlives the call.
        let code = unsafe {
            libc::regcomp(
                compiled.as_mut_ptr(),
                text.as_ptr(),
                libc::REG_EXTENDED | libc::REG_NOSUB,
            )
        };
        if code == 0 {
            // SAFETY: regcomp returned 0, so `compiled` holds a compiled expression, freed once.
            unsafe { libc::regfree(compiled.as_mut_ptr()) };
            return Ok(());
        }
        let mut message = [0u8; 256];
        // SAFETY: regerror writes at most `message.len()` bytes, NUL included; it reads only
        // the error code (the zeroed `compiled` is never dereferenced by glibc or musl).
        let length = unsafe {
            libc::regerror(
                code,
                compiled.as_ptr(),
                message.as_mut_ptr().cast(),
                message.len(),
            )
        };
        let end = length.min(message.len()).saturating_sub(1);
        Err(String::from_utf8_lossy(&message[..end]).into_owned())
    }
}

/// Elsewhere the syntax check and RE2's compile stand alone.
#[cfg(not(target_os = "linux"))]
mod posix {
    pub(super) fn compiles(_pattern: &str) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(topics: &[(&str, usize)]) -> BTreeMap<String, usize> {
        topics
            .iter()
            .map(|(name, count)| (name.to_string(), *count))
            .collect()
    }

    #[test]
    fn patterns_match_as_each_protocol_does() {
        let pattern = TopicPattern::new("^logs-.*").expect("valid");
        for matching in [Matching::Search, Matching::WholeName] {
            assert!(pattern.matches("logs-a", matching));
            assert!(!pattern.matches("app-logs-a", matching));
        }
        // Searching: a prefix is enough; whole names: it is not.
        let prefix = TopicPattern::new("^logs-").expect("valid");
        assert!(prefix.matches("logs-a", Matching::Search));
        assert!(!prefix.matches("logs-a", Matching::WholeName));
        assert!(prefix.matches_either("logs-a"));
        let alternatives = TopicPattern::new("^(audit|logs)-[0-9]+$").expect("valid");
        assert!(alternatives.matches("audit-7", Matching::WholeName));
        assert!(alternatives.matches("logs-12", Matching::Search));
        assert!(!alternatives.matches("logs-x", Matching::Search));
        assert_eq!(Matching::of_protocol(Some("consumer")), Matching::WholeName);
        assert_eq!(Matching::of_protocol(Some("classic")), Matching::Search);
        assert_eq!(Matching::of_protocol(None), Matching::Search);
    }

    #[test]
    fn what_the_two_matchers_read_differently_is_refused_with_the_fix() {
        for (entry, says) in [
            (r"^logs-\d+", "`[0-9]`"),
            (r"^logs-\w+", "`[A-Za-z0-9_]`"),
            (r"^logs[\.-]x", "inside brackets"),
            (r"^[[:alpha:]\.]", "inside brackets"),
            ("^(?i)logs", "`(?` groups"),
            ("^(?:a|b)", "`(?` groups"),
            ("^(?P<n>a)", "`(?` groups"),
            (r"^logs\", "lone backslash"),
            ("^(logs", "not a valid regular expression"),
            ("^logs[", "not a valid regular expression"),
            ("^.*", "internal topic `__consumer_offsets`"),
            ("^__.*", "internal topic"),
            ("^_{2}transaction.*", "`__transaction_state`"),
        ] {
            let err = TopicPattern::new(entry).expect_err(entry);
            assert!(err.contains(says), "{entry}: {err}");
        }
        // What both read alike is taken.
        for entry in [
            r"^logs\.app-.*",
            "^[a-z]+-[0-9]{1,3}$",
            "^[^_].*",
            "^[]a]x",
            "^(a|b)+c?",
            "^[[:alpha:]]+$",
            "^[[:digit:].]+$",
        ] {
            assert!(TopicPattern::new(entry).is_ok(), "{entry}");
        }
    }

    /// glibc itself refuses what it cannot compile, whatever RE2 thinks of it.
    #[cfg(target_os = "linux")]
    #[test]
    fn libc_compiles_what_librdkafka_will() {
        assert_eq!(posix::compiles("^logs-.*"), Ok(()));
        assert_eq!(posix::compiles("^[a-z]{1,3}$"), Ok(()));
        let err = posix::compiles("^a{2,1}").expect_err("an inverted interval");
        assert!(!err.is_empty());
        assert!(posix::compiles("^(a").is_err());
    }

    #[test]
    fn entries_resolve_to_the_topics_the_group_consumes() {
        let topics = cluster(&[
            ("logs-a", 3),
            ("logs-b", 1),
            ("audit", 2),
            ("xlogs-c", 1),
            ("__consumer_offsets", 50),
        ]);
        let entries = vec![
            "audit".to_string(),
            "^logs-.*".to_string(),
            "gone".to_string(),
            "^metrics-.*".to_string(),
        ];
        let resolved = resolve(&entries, &topics, Matching::Search);
        assert_eq!(resolved[0].topics, cluster(&[("audit", 2)]));
        assert!(!resolved[0].pattern);
        assert_eq!(resolved[1].topics, cluster(&[("logs-a", 3), ("logs-b", 1)]));
        assert!(resolved[1].pattern);
        assert!(resolved[2].topics.is_empty());
        assert!(resolved[3].topics.is_empty());
        let prefix = resolve(&["^logs-".to_string()], &topics, Matching::WholeName);
        assert!(prefix[0].topics.is_empty(), "whole names only");
    }
}

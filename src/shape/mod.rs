//! Shaping of events on a route: the condition that picks a route's events ([`Condition`]), the
//! transforms that change them on the way to its sink ([`Transforms`]), and the templates that
//! name their destination per event ([`Template`]: a Kafka topic, an index, a file path).
//!
//! Everything is compiled once at start-up from [`crate::config::shape`], where every mistake is
//! reported naming the key as the user wrote it ([`ShapeError`]); after that, applying them to
//! an event cannot fail on configuration, only on the event itself (a missing field, a string
//! that is not JSON), and those failures are values the caller counts and dead-letters.
//! Compiled shapes are immutable and shared between workers; the only mutable state, the
//! throttle buckets, is a [`TransformState`] each worker owns.
//!
//! Events are `serde_json::Value` objects; fields are addressed with [`FieldPath`].

mod condition;
mod path;
pub mod route;
mod template;
mod transform;

pub use condition::Condition;
pub use path::{describe_type, FieldPath};
pub use template::{scalar_text, MissingField, Sanitize, Template};
pub use transform::{Outcome, TransformError, TransformState, Transforms};

/// What a transform or template may read besides the event itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// The record's topic.
    pub topic: &'a str,
    /// The record's partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// The Kafka record timestamp in milliseconds since the epoch, if the record has one.
    pub timestamp_ms: Option<i64>,
    /// The record key, if any.
    pub key: Option<&'a [u8]>,
    /// The normalised level logbridge decoded (`"error"`, `"warning"`, ...).
    pub level: Option<&'a str>,
    /// The service logbridge decoded.
    pub service: Option<&'a str>,
}

/// A condition, transform or template that does not compile, naming the key as the user wrote
/// it (`routes[2].when.all[1].regex`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct ShapeError {
    /// The configuration key at fault.
    pub key: String,
    /// What is wrong, and the fix where there is one.
    pub message: String,
}

impl ShapeError {
    /// An error about `key`.
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> ShapeError {
        ShapeError {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_error_names_its_key() {
        let error = ShapeError::new("routes[2].when.regex", "unclosed group");
        assert_eq!(error.to_string(), "`routes[2].when.regex`: unclosed group");
    }

    #[test]
    fn compiled_shapes_can_be_shared_between_workers() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Condition>();
        shareable::<Transforms>();
        shareable::<Template>();
        shareable::<FieldPath>();
        fn sendable<T: Send>() {}
        sendable::<TransformState>();
    }
}

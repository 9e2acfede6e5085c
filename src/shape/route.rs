//! A route's shaping as its workers apply it, between taking a record from their channel and
//! handing it to the sink: the transforms (with the worker's own throttle state), then the
//! destination template. Compiled once per route ([`RouteShape::for_route`]) and shared by the
//! route's workers; each worker owns a [`Shaper`].
//!
//! The event ([`Record::event`]: the payload's JSON object past a Schema Registry prefix and a
//! BOM, the serde form's inner object, or the object a line of text makes) is read only when a
//! transform or the template reads it. A record its transforms changed is forwarded as the new
//! JSON (its Schema Registry prefix, serde form or text line is not kept: the new bytes are a
//! plain JSON object); a record they left as it was keeps its original bytes.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rustc_hash::FxHashSet;
use serde_json::Value;

use super::{Context, Outcome, ShapeError, Template, TransformState, Transforms};
use crate::config::RouteConfig;
use crate::metrics::Metrics;
use crate::record::{KeyValue, Record};

/// The dead-letter reason of a record whose destination template names a field it lacks.
pub const TEMPLATE_FIELD_MISSING: &str = "template_field_missing";

/// The dead-letter reason of a record whose rendered destination would be one more than the
/// route's `max_destinations`.
pub const TOO_MANY_DESTINATIONS: &str = "too_many_destinations";

/// The dead-letter reason of a record a `throttle` with `excess = "dead-letter"` found over
/// its rate.
pub const THROTTLED: &str = "throttled";

/// What one route does to its records before its sink.
pub struct RouteShape {
    transforms: Transforms,
    destination: Option<Template>,
    /// Destinations rendered so far, at most `max_destinations` (each is a file kept open, or a
    /// topic the producer keeps metadata for, for the life of the process).
    destinations: Mutex<FxHashSet<Box<str>>>,
    max_destinations: usize,
    /// Whether the event must be parsed (a transform or the template reads it).
    needs_event: bool,
    counters: Counters,
}

/// The route's `logbridge_route_events_total` series, looked up once.
struct Counters {
    transformed: prometheus::IntCounter,
    sampled_out: prometheus::IntCounter,
    throttled: prometheus::IntCounter,
    transform_failed: prometheus::IntCounter,
}

/// What became of a record.
pub enum Shaped {
    /// On to the sink (changed or not, its destination rendered if the route has a template).
    Deliver,
    /// Left out on purpose (sampled out, or throttled with `excess = "drop"`): finished as
    /// ignored.
    Drop,
    /// Cannot go on: dead-letter it with this reason and message.
    Fail {
        /// Dead-letter reason.
        reason: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl RouteShape {
    /// The shaping of `route`, or `None` if it has no transforms and no templated destination
    /// (its workers then forward every record as it came).
    pub fn for_route(
        route: &RouteConfig,
        index: usize,
        metrics: &Metrics,
    ) -> Result<Option<Arc<RouteShape>>, ShapeError> {
        let key = |field: &str| format!("routes[{index}].{field}");
        let transforms = Transforms::compile(&route.transforms, &key("transforms"))?;
        let destination = route
            .sink
            .destination_template()
            .map(|(text, sanitize)| Template::parse(text, sanitize, &key("sink")))
            .transpose()?;
        if transforms.is_empty() && destination.is_none() {
            return Ok(None);
        }
        let needs_event = transforms.needs_event()
            || destination.as_ref().is_some_and(Template::references_event);
        let counter = |outcome: &str| {
            metrics
                .route_events
                .with_label_values(&[&route.name, outcome])
        };
        Ok(Some(Arc::new(RouteShape {
            transforms,
            destination,
            destinations: Mutex::default(),
            max_destinations: route.max_destinations,
            needs_event,
            counters: Counters {
                transformed: counter("transformed"),
                sampled_out: counter("sampled_out"),
                throttled: counter("throttled"),
                transform_failed: counter("transform_failed"),
            },
        })))
    }

    /// A worker's own shaper (its throttle buckets are its own: a key always reaches the same
    /// worker, so a per-key rate holds per route).
    pub fn shaper(self: &Arc<Self>) -> Shaper {
        Shaper {
            state: self.transforms.state(),
            shape: self.clone(),
        }
    }

    /// Whether `name` may be used as one more destination.
    fn admit(&self, name: &str) -> bool {
        let mut known = self
            .destinations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if known.contains(name) {
            return true;
        }
        if known.len() >= self.max_destinations {
            return false;
        }
        known.insert(Box::from(name));
        true
    }
}

/// One worker's application of its route's shaping.
pub struct Shaper {
    shape: Arc<RouteShape>,
    state: TransformState,
}

impl Shaper {
    /// Applies the route's transforms and renders its destination for `record` (changing it in
    /// place); says what becomes of it.
    pub fn shape(&mut self, record: &mut Record, now: Instant) -> Shaped {
        let shape = &*self.shape;
        let mut event = if shape.needs_event {
            match record.event() {
                Ok(event) => Some(event),
                // The router decoded it, so it is JSON; a failure here is a limit of the
                // parser (nesting past serde_json's 128 levels), which the decoder allows.
                Err(err) => {
                    shape.counters.transform_failed.inc();
                    return Shaped::Fail {
                        reason: "transform_failed",
                        message: format!("the event cannot be read for its transforms: {err}"),
                    };
                }
            }
        } else {
            None
        };
        let ctx = context(record);
        let changed = if shape.transforms.is_empty() {
            false
        } else {
            // Transforms that read no event (a sample or throttle by key) run on an empty
            // object, which they leave alone.
            let mut nothing = Value::Object(Default::default());
            let target = event.as_mut().unwrap_or(&mut nothing);
            match shape.transforms.apply(&mut self.state, target, &ctx, now) {
                Ok(Outcome::Keep { changed }) => changed,
                Ok(Outcome::SampledOut) => {
                    shape.counters.sampled_out.inc();
                    return Shaped::Drop;
                }
                Ok(Outcome::Throttled { dead_letter }) => {
                    shape.counters.throttled.inc();
                    return match dead_letter {
                        false => Shaped::Drop,
                        true => Shaped::Fail {
                            reason: THROTTLED,
                            message: "over the route's throttle rate".to_string(),
                        },
                    };
                }
                Err(err) => {
                    shape.counters.transform_failed.inc();
                    return Shaped::Fail {
                        reason: err.reason,
                        message: err.message,
                    };
                }
            }
        };
        let destination = match &shape.destination {
            Some(template) => match template.render(event.as_ref(), &ctx) {
                Ok(name) => Some(name),
                Err(err) => {
                    return Shaped::Fail {
                        reason: err.reason(),
                        message: format!("the destination `{template}`: {err}"),
                    };
                }
            },
            None => None,
        };
        if let Some(name) = &destination {
            if !shape.admit(name) {
                return Shaped::Fail {
                    reason: TOO_MANY_DESTINATIONS,
                    message: format!(
                        "`{name}` would be destination number {} of the route, over its \
                         max_destinations",
                        shape.max_destinations + 1
                    ),
                };
            }
        }
        record.destination = destination.map(String::into_boxed_str);
        if changed {
            if let Some(event) = &event {
                // Serialising a Value into a Vec cannot fail (its map keys are strings).
                let json = serde_json::to_vec(event).unwrap_or_default();
                record.data = KeyValue::new(record.key(), Some(&json));
                record.form = crate::event::Form::Object;
                // What the record holds now is what counts against the byte bound.
                let bytes = json.len() + record.key().map_or(0, <[u8]>::len);
                record.charge = record.charge.resized(bytes);
                shape.counters.transformed.inc();
            }
        }
        Shaped::Deliver
    }
}

/// What the record offers a transform or template besides its event.
pub fn context(record: &Record) -> Context<'_> {
    Context {
        topic: &record.source.topic,
        partition: record.source.partition,
        offset: record.offset,
        timestamp_ms: record.timestamp,
        key: record.key(),
        level: match &record.decoded {
            Some(Ok(level)) => Some(level.as_str()),
            _ => None,
        },
        service: record.service.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{test_record, ByteBudget};

    fn shaper(route: &str) -> (Shaper, Arc<Metrics>) {
        let text = format!(
            "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"logs\"]\n[[routes]]\nname = \"r\"\nlevels = [\"info\"]\n{route}\n"
        );
        let config = crate::Config::from_toml_str(&text).expect("valid");
        let metrics = Arc::new(Metrics::new());
        let shape = RouteShape::for_route(&config.routes[0], 0, &metrics)
            .expect("compiles")
            .expect("something to do");
        (shape.shaper(), metrics)
    }

    fn record(payload: &[u8]) -> Record {
        test_record(0, 7, Some(b"k"), Some(payload))
    }

    #[test]
    fn a_changed_record_is_the_new_json_charged_at_its_new_size() {
        let (mut shaper, metrics) = shaper(
            "transforms = [ { set = \"cluster\", value = \"eu-1\" } ]\nsink = { type = \"null\" }",
        );
        let gauge = prometheus::IntGauge::new("bytes", "bytes").expect("gauge");
        let budget = ByteBudget::new(1_000, gauge);
        let mut changed = record(br#"{"level": "info", "message": "m"}"#);
        changed.charge = budget.charge(35);
        assert!(matches!(
            shaper.shape(&mut changed, Instant::now()),
            Shaped::Deliver
        ));
        let json = br#"{"level":"info","message":"m","cluster":"eu-1"}"#;
        assert_eq!(changed.payload(), Some(&json[..]));
        assert_eq!(changed.key(), Some(&b"k"[..]));
        assert_eq!(budget.used(), json.len() + 1);
        assert_eq!(
            metrics
                .route_events
                .with_label_values(&["r", "transformed"])
                .get(),
            1
        );
    }

    #[test]
    fn an_untouched_record_keeps_its_bytes_and_a_template_names_its_destination() {
        let (mut shaper, _) = shaper(
            "transforms = [ { remove = \"absent\" } ]\nsink = { type = \"kafka\", topic = \"logs-{team}\" }",
        );
        let original: &[u8] = br#"{"level": "info", "team": "A/B"}"#;
        let mut untouched = record(original);
        assert!(matches!(
            shaper.shape(&mut untouched, Instant::now()),
            Shaped::Deliver
        ));
        assert_eq!(untouched.payload(), Some(original));
        assert_eq!(untouched.destination.as_deref(), Some("logs-A_B"));
        let mut missing = record(br#"{"level": "info"}"#);
        assert!(matches!(
            shaper.shape(&mut missing, Instant::now()),
            Shaped::Fail {
                reason: TEMPLATE_FIELD_MISSING,
                ..
            }
        ));
    }

    #[test]
    fn sampled_out_records_drop_and_failed_transforms_fail() {
        let (mut sampler, metrics) =
            shaper("transforms = [ { sample = 1000000 } ]\nsink = { type = \"null\" }");
        let dropped = (0..100)
            .filter(|_| {
                matches!(
                    sampler.shape(&mut record(br#"{"level":"info"}"#), Instant::now()),
                    Shaped::Drop
                )
            })
            .count();
        // One key, one decision, the same every time.
        assert!(dropped == 0 || dropped == 100, "{dropped}");
        assert_eq!(
            metrics
                .route_events
                .with_label_values(&["r", "sampled_out"])
                .get(),
            dropped as u64
        );
        let (mut parser, metrics) =
            shaper("transforms = [ { parse_json = \"payload\" } ]\nsink = { type = \"null\" }");
        let mut bad = record(br#"{"level":"info","payload":"not json"}"#);
        assert!(matches!(
            parser.shape(&mut bad, Instant::now()),
            Shaped::Fail {
                reason: "transform_failed",
                ..
            }
        ));
        assert_eq!(
            metrics
                .route_events
                .with_label_values(&["r", "transform_failed"])
                .get(),
            1
        );
    }
}

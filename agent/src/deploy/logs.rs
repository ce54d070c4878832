//! JSON log lines (`--log-format json`): one object per event with `timestamp`, `level`,
//! `target`, `message` and the event's fields. Fields that carry structure — the decision's
//! `inputs`, `decided`, `applied` and `limited`, recorded as JSON text — are embedded as JSON
//! values, not as strings, so that log pipelines can query them (`.applied["vm0.backend"].tx`).

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Fields whose value is JSON text, embedded as JSON.
pub const STRUCTURED_FIELDS: [&str; 4] = ["inputs", "decided", "applied", "limited"];

/// The JSON event format. See the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn text(&mut self, field: &Field, text: String) {
        let value = if STRUCTURED_FIELDS.contains(&field.name()) {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        } else {
            Value::String(text)
        };
        self.0.insert(field.name().to_string(), value);
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.text(field, format!("{value:?}"));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // NaN and infinities are not JSON numbers.
        let v = serde_json::Number::from_f64(value)
            .map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.0.insert(field.name().to_string(), v);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().to_string(), Value::String(value.to_string()));
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut map = Map::new();
        map.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        map.insert("level".into(), Value::String(meta.level().as_str().to_string()));
        event.record(&mut Fields(&mut map));
        map.insert("target".into(), Value::String(meta.target().to_string()));
        writeln!(writer, "{}", Value::Object(map))
    }
}

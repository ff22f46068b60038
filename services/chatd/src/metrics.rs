//! Metrics: one set of OpenTelemetry instruments, read two ways.
//!
//! `GET /metrics` renders them in the Prometheus text format at each scrape (a manual reader of
//! the process's meter provider). When `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`) is set and `OTEL_METRICS_EXPORTER` is not `none`, the
//! same instruments are also sent over OTLP/HTTP every `OTEL_METRIC_EXPORT_INTERVAL`
//! milliseconds (default 60 s), by a thread of their own.
//!
//! The counters and gauges the services keep as atomics are observed when a reader collects,
//! so they cost nothing on the paths that count; the histograms (append, HTTP request and
//! projector commit durations) are recorded where they happen.

use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock, Weak};
use std::time::Duration;

use opentelemetry::metrics::{Histogram, Meter};
use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};

use crate::http::AppState;

/// The reader `/metrics` collects from, once a provider is installed.
static SCRAPE: OnceLock<Arc<ManualReader>> = OnceLock::new();

/// The manual reader, shared by the provider (which registers with it) and `/metrics`.
#[derive(Debug)]
struct Scrape(Arc<ManualReader>);

impl MetricReader for Scrape {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Makes the process's meter provider (global, so the libraries' instruments report to it)
/// with the `/metrics` reader, and `otlp` as a periodic exporter if given. Once per process:
/// a second call returns `None` and changes nothing.
pub fn install(
    otlp: Option<opentelemetry_otlp::MetricExporter>,
    resource: opentelemetry_sdk::Resource,
) -> Option<SdkMeterProvider> {
    let reader = Arc::new(ManualReader::builder().build());
    if SCRAPE.set(reader.clone()).is_err() {
        tracing::warn!(
            "metrics were set up already; this second setup (and its exporter) is ignored"
        );
        return None;
    }
    let mut builder = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(Scrape(reader));
    if let Some(exporter) = otlp {
        builder = builder.with_periodic_exporter(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_meter_provider(provider.clone());
    Some(provider)
}

/// Installs a provider with only the `/metrics` reader if none is yet (a process that did not
/// go through [`crate::telemetry::Telemetry::init`]).
pub fn ensure_installed() {
    if SCRAPE.get().is_none() {
        install(None, opentelemetry_sdk::Resource::builder().build());
    }
}

fn meter() -> Meter {
    opentelemetry::global::meter("chatd")
}

/// `http.server.request.duration` (seconds), by method, route and status, for every routed
/// request.
static HTTP_DURATION: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    meter()
        .f64_histogram("http.server.request.duration")
        .with_unit("s")
        .with_description("Duration of HTTP requests, by method, route and status.")
        .with_boundaries(vec![
            0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .build()
});

/// Records one routed request.
pub fn record_request(method: &axum::http::Method, route: &str, status: u16, elapsed: Duration) {
    let method = match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        // The semantic conventions' bucket for anything else (no unbounded label values).
        _ => "_OTHER",
    };
    HTTP_DURATION.record(
        elapsed.as_secs_f64(),
        &[
            KeyValue::new("http.request.method", method),
            KeyValue::new("http.route", route.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ],
    );
}

/// A counter or gauge a service keeps as an atomic: name, description, unit, and the field.
type Observed<S> = (
    &'static str,
    &'static str,
    &'static str,
    fn(&S) -> &AtomicU64,
);

/// Observes `stats`' fields at each collection, as counters or as gauges.
fn observe_all<S: Send + Sync + 'static>(
    meter: &Meter,
    stats: &Arc<S>,
    counters: &[Observed<S>],
    gauges: &[Observed<S>],
) {
    for &(name, description, unit, field) in counters {
        let stats = stats.clone();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_unit(unit)
            .with_callback(move |o| o.observe(field(&stats).load(Ordering::Relaxed), &[]))
            .build();
    }
    for &(name, description, unit, field) in gauges {
        let stats = stats.clone();
        meter
            .u64_observable_gauge(name)
            .with_description(description)
            .with_unit(unit)
            .with_callback(move |o| o.observe(field(&stats).load(Ordering::Relaxed), &[]))
            .build();
    }
}

/// Observes the process's counters and gauges at each collection. Call once, after the
/// provider is installed.
pub fn observe(state: &AppState) {
    let meter = meter();
    meter
        .u64_observable_counter("chat.http.accept_waits")
        .with_description(
            "Times CHAT_MAX_HTTP_CONNECTIONS were open and new connections waited in the listen \
             queue for one to end.",
        )
        .with_unit("{wait}")
        .with_callback(|o| o.observe(crate::server::ACCEPT_WAITS.load(Ordering::Relaxed), &[]))
        .build();
    if let Some(projector) = &state.projector {
        observe_all(
            &meter,
            projector,
            &[
                (
                    "chat.projector.events",
                    "Log entries written to the store.",
                    "{event}",
                    |s| &s.projected,
                ),
                (
                    "chat.projector.dead_letters",
                    "Entries that could not be decoded.",
                    "{event}",
                    |s| &s.dead_letters,
                ),
                (
                    "chat.projector.fills",
                    "Ranges read from streams (gaps, catch-up).",
                    "{read}",
                    |s| &s.fills,
                ),
                (
                    "chat.projector.store_errors",
                    "Failed (and retried) store writes.",
                    "{error}",
                    |s| &s.store_errors,
                ),
                (
                    "chat.projector.restarts",
                    "Times the projector stopped on an error and was started again.",
                    "{restart}",
                    |s| &s.restarts,
                ),
            ],
            &[(
                "chat.projector.lag_ms",
                "Age of the oldest known event not yet stored.",
                "ms",
                |s| &s.lag_ms,
            )],
        );
    }
    if let Some(limits) = &state.limits {
        observe_all(
            &meter,
            limits,
            &[
                (
                    "chat.edge.rate_charged",
                    "Tokens drawn from this process's per-user rate limits for work done in others.",
                    "{token}",
                    |s| &s.charged,
                ),
                (
                    "chat.http.rate_limited",
                    "HTTP requests refused by a per-user rate limit (429).",
                    "{request}",
                    |s| &s.http_limited,
                ),
            ],
            &[],
        );
    }
    if let Some(edge) = &state.edge {
        let stats = edge.clone();
        meter
            .u64_observable_counter("chat.edge.refused")
            .with_description(
                "Connections refused by a connection cap, by cap: `connections` \
                 (CHAT_MAX_CONNECTIONS), `unauthenticated` (sockets waiting for their auth \
                 frame), `per_user` (CHAT_MAX_CONNECTIONS_PER_USER).",
            )
            .with_unit("{connection}")
            .with_callback(move |o| {
                for (cap, count) in [
                    ("connections", &stats.refused_full),
                    ("unauthenticated", &stats.refused_unauthenticated),
                    ("per_user", &stats.refused_per_user),
                ] {
                    o.observe(count.load(Ordering::Relaxed), &[KeyValue::new("cap", cap)]);
                }
            })
            .build();
        observe_all(
            &meter,
            edge,
            &[
                (
                    "chat.edge.frames_in",
                    "Frames received from clients.",
                    "{frame}",
                    |s| &s.frames_in,
                ),
                (
                    "chat.edge.appends",
                    "Events appended for clients.",
                    "{event}",
                    |s| &s.appends,
                ),
                ("chat.edge.errors", "Error frames sent.", "{frame}", |s| {
                    &s.errors
                }),
                (
                    "chat.edge.slow_closes",
                    "Sessions closed with 4008 (too slow to keep up).",
                    "{session}",
                    |s| &s.slow_closes,
                ),
                (
                    "chat.edge.ephemeral_dropped",
                    "Typing and presence frames dropped for slow readers.",
                    "{frame}",
                    |s| &s.ephemeral_dropped,
                ),
                (
                    "chat.edge.rate_limited",
                    "Frames refused by a rate limit (typing frames: dropped).",
                    "{frame}",
                    |s| &s.rate_limited,
                ),
                (
                    "chat.edge.flood_closes",
                    "Sessions closed with 4029 (kept flooding).",
                    "{session}",
                    |s| &s.flood_closes,
                ),
                (
                    "chat.edge.idle_closes",
                    "Sessions closed after the idle timeout.",
                    "{session}",
                    |s| &s.idle_closes,
                ),
                (
                    "chat.edge.append_retries",
                    "Appends retried (same id) after an unknown outcome.",
                    "{append}",
                    |s| &s.append_retries,
                ),
                (
                    "chat.edge.presence_frames",
                    "Presence frames handed to sessions (coalesced).",
                    "{frame}",
                    |s| &s.presence_frames,
                ),
            ],
            &[
                (
                    "chat.edge.sockets",
                    "Open WebSocket connections, authenticated or not.",
                    "{connection}",
                    |s| &s.sockets,
                ),
                (
                    "chat.edge.sessions",
                    "Open authenticated WebSocket sessions.",
                    "{session}",
                    |s| &s.sessions,
                ),
                (
                    "chat.edge.queued_bytes",
                    "Bytes queued for client sockets.",
                    "By",
                    |s| &s.queued_bytes,
                ),
                (
                    "chat.edge.queued_bytes_peak",
                    "The most bytes ever queued for client sockets at once.",
                    "By",
                    |s| &s.queued_bytes_peak,
                ),
            ],
        );
    }
    let nats = state.nats.clone();
    meter
        .u64_observable_gauge("chat.nats.connected")
        .with_description(
            "1 while the process's NATS connection is up (a server that stops answering is \
             found within about 15 s by pings).",
        )
        .with_callback(move |o| {
            let up = nats.connection_state() == async_nats::connection::State::Connected;
            o.observe(u64::from(up), &[]);
        })
        .build();
    let nats = state.nats.clone();
    meter
        .u64_observable_counter("chat.nats.reconnects")
        .with_description("Times the process's NATS connection was made again after it was lost.")
        .with_callback(move |o| {
            o.observe(
                nats.statistics()
                    .connects
                    .load(Ordering::Relaxed)
                    .saturating_sub(1),
                &[],
            )
        })
        .build();
    let draining = state.draining.clone();
    meter
        .u64_observable_gauge("chat.draining")
        .with_description("1 while the process drains.")
        .with_callback(move |o| o.observe(u64::from(draining.load(Ordering::SeqCst)), &[]))
        .build();
}

/// Every instrument of the process in the Prometheus text format (0.0.4).
pub fn render() -> String {
    let mut out = String::new();
    let Some(reader) = SCRAPE.get() else {
        return out;
    };
    let mut collected = ResourceMetrics::default();
    if let Err(e) = reader.collect(&mut collected) {
        tracing::warn!(error = %e, "collecting metrics failed");
        return out;
    }
    for scope in collected.scope_metrics() {
        for metric in scope.metrics() {
            write_metric(&mut out, metric);
        }
    }
    out
}

/// The Prometheus name of an instrument: dots and other characters become `_`, seconds get
/// their suffix, counters `_total`.
fn prometheus_name(metric: &Metric, counter: bool) -> String {
    let mut name = sanitized(metric.name());
    if metric.unit() == "s" && !name.ends_with("_seconds") {
        name.push_str("_seconds");
    }
    if counter && !name.ends_with("_total") {
        name.push_str("_total");
    }
    name
}

fn write_metric(out: &mut String, metric: &Metric) {
    match metric.data() {
        AggregatedMetrics::F64(data) => write_data(out, metric, data),
        AggregatedMetrics::U64(data) => write_data(out, metric, data),
        AggregatedMetrics::I64(data) => write_data(out, metric, data),
    }
}

fn write_data<T: Display + Copy>(out: &mut String, metric: &Metric, data: &MetricData<T>) {
    let (kind, counter) = match data {
        MetricData::Sum(sum) if sum.is_monotonic() => ("counter", true),
        MetricData::Sum(_) | MetricData::Gauge(_) => ("gauge", false),
        MetricData::Histogram(_) => ("histogram", false),
        // Not made by this process (it would need a conversion of its own).
        MetricData::ExponentialHistogram(_) => return,
    };
    let name = prometheus_name(metric, counter);
    let help = metric
        .description()
        .replace('\\', "\\\\")
        .replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    match data {
        MetricData::Sum(sum) => {
            for point in sum.data_points() {
                sample(out, &name, point.attributes(), None, point.value());
            }
        }
        MetricData::Gauge(gauge) => {
            for point in gauge.data_points() {
                sample(out, &name, point.attributes(), None, point.value());
            }
        }
        MetricData::Histogram(histogram) => {
            let bucket = format!("{name}_bucket");
            for point in histogram.data_points() {
                // Prometheus buckets count everything at or below their bound.
                let mut cumulative = 0u64;
                for (bound, count) in point.bounds().zip(point.bucket_counts()) {
                    cumulative += count;
                    let le = bound.to_string();
                    sample(out, &bucket, point.attributes(), Some(&le), cumulative);
                }
                sample(
                    out,
                    &bucket,
                    point.attributes(),
                    Some("+Inf"),
                    point.count(),
                );
                sample(
                    out,
                    &format!("{name}_sum"),
                    point.attributes(),
                    None,
                    point.sum(),
                );
                sample(
                    out,
                    &format!("{name}_count"),
                    point.attributes(),
                    None,
                    point.count(),
                );
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// One sample line: `name{labels,le="…"} value`.
fn sample<'a>(
    out: &mut String,
    name: &str,
    attributes: impl Iterator<Item = &'a KeyValue>,
    le: Option<&str>,
    value: impl Display,
) {
    let mut labels = Vec::new();
    for kv in attributes {
        let key = sanitized(kv.key.as_str());
        labels.push(format!("{key}=\"{}\"", escape(&kv.value.to_string())));
    }
    if let Some(le) = le {
        labels.push(format!("le=\"{le}\""));
    }
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// A metric or label name as the text format allows it: anything but ASCII letters, digits and
/// `_` becomes `_` (OpenTelemetry's dots among them).
fn sanitized(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

//! Logs, traces and metrics.
//!
//! Logs go to stderr as before (`CHAT_LOG` filters them, `CHAT_LOG_FORMAT=json` for JSON lines);
//! they carry events only, so the spans below cost nothing while no trace exporter is set up.
//!
//! Traces go to an OpenTelemetry collector over OTLP/HTTP (protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with the
//! standard variables of the OpenTelemetry SDK: `OTEL_SERVICE_NAME` (default `chatd`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*` for the batching. `CHAT_TRACE` filters which spans
//! are exported, as `CHAT_LOG` does logs (default `info`). Spans: `http.request` for every HTTP
//! request but probes and scrapes (continuing the caller's trace from a W3C `traceparent`
//! header; named `METHOD /route`), `chat.append` for
//! every WebSocket append with `chat.append.decide` (the checks) and `chat.append.ack` (the log's
//! answer) inside it, and `chat.projector.commit` for every store transaction of the projector.
//! Exporting is off the request path: spans are queued and sent in batches by a thread of their
//! own; a collector that is away costs dropped spans, never a slower request.
//!
//! Metrics are OpenTelemetry instruments too, served at `/metrics` and, with the same endpoint
//! variables, exported over OTLP (see [`crate::metrics`]). `OTEL_TRACES_EXPORTER=none` or
//! `OTEL_METRICS_EXPORTER=none` turns either export off alone.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The exporters: flushed and stopped by [`Telemetry::shutdown`].
pub struct Telemetry {
    /// Traces, if exported.
    provider: Option<SdkTracerProvider>,
    /// Metrics (`/metrics`, and OTLP if exported).
    meters: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Sets up logging, and trace export when the environment asks for it. An endpoint that
    /// cannot be used (not `http://`, not a URL) is a configuration error, as any other
    /// setting is: the text names the variable. Must run outside any async runtime (the
    /// exporter's HTTP client has one of its own).
    pub fn init() -> Result<Telemetry, String> {
        let provider = trace_provider()?;
        let metrics_exporter = metric_exporter()?;
        let exporting_metrics = metrics_exporter.is_some();
        let meters = crate::metrics::install(metrics_exporter, resource());
        let log_filter = filter_from_env("CHAT_LOG", "info,async_nats=warn");
        // Events only: no span is made for the log's sake. (The hint keeps the log filter's
        // own level as the process's most verbose: without it, every `debug!` and `trace!` in
        // the process and its libraries would be looked at, and dropped, at run time.)
        let events_only = filter_fn(|meta| !meta.is_span()).with_max_level_hint(LevelFilter::TRACE);
        let log_filter = log_filter.and(events_only);
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        let fmt = if std::env::var("CHAT_LOG_FORMAT").as_deref() == Ok("json") {
            fmt.json().with_filter(log_filter).boxed()
        } else {
            fmt.with_filter(log_filter).boxed()
        };
        let traces = provider.as_ref().map(|provider| {
            let filter = filter_from_env("CHAT_TRACE", "info");
            // No thread, code location or busy/idle times on every span.
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("chatd"))
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_filter(filter)
        });
        // Not `.with(Option<Layer>)`: an absent layer declares interest in every call site,
        // which would make every span for nothing.
        let registry = tracing_subscriber::registry().with(fmt);
        match traces {
            Some(traces) => registry.with(traces).init(),
            None => registry.init(),
        }
        if provider.is_some() {
            tracing::info!("exporting traces over OTLP/HTTP");
        }
        if exporting_metrics && meters.is_some() {
            tracing::info!("exporting metrics over OTLP/HTTP");
        }
        Ok(Telemetry { provider, meters })
    }

    /// Sends the spans still queued and stops the exporter (bounded by the SDK's export
    /// timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("chatd: flushing traces failed: {e}");
            }
        }
        if let Some(meters) = self.meters {
            // Sends the last figures if exporting; nothing to do otherwise.
            if let Err(e) = meters.shutdown() {
                eprintln!("chatd: flushing metrics failed: {e}");
            }
        }
    }
}

/// The variable naming the OTLP endpoint for a signal (`TRACES`, `METRICS`) and its value, if
/// that signal is exported: the signal's own variable wins, as in the SDK; `OTEL_SDK_DISABLED`
/// or `OTEL_<SIGNAL>_EXPORTER=none` turn it off.
fn endpoint(signal: &str) -> Option<(String, String)> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim() == "true")
        || set(&format!("OTEL_{signal}_EXPORTER")).is_some_and(|v| v.trim() == "none")
    {
        return None;
    }
    [
        format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"),
        "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
    ]
    .into_iter()
    .find_map(|name| set(&name).map(|value| (name, value)))
}

/// Refuses what the exporter could only fail on (or silently do otherwise), long after start:
/// an endpoint that is not `http://host…` (no TLS stack here), and a protocol other than
/// HTTP with protobuf (no gRPC, no JSON) for `signal`.
fn check_endpoint(signal: &str, name: &str, value: &str) -> Result<(), String> {
    let host = value
        .trim()
        .strip_prefix("http://")
        .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""))
        .ok_or_else(|| {
            format!(
                "{name}={value}: only http:// is supported (run a collector beside chatd for TLS)"
            )
        })?;
    if host.is_empty() || host.starts_with(':') {
        return Err(format!("{name}={value}: names no host"));
    }
    for protocol in [
        format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"),
        "OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(),
    ] {
        if let Some(value) = std::env::var(&protocol)
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            if value.trim() != "http/protobuf" {
                return Err(format!(
                    "{protocol}={value}: only http/protobuf is supported (run a collector beside chatd for gRPC)"
                ));
            }
        }
    }
    Ok(())
}

/// Refuses the SDK's own settings for `signal` that it would otherwise drop in silence for a
/// default: an exporter other than `otlp` or `none` (nothing else is built in), a sampler it
/// does not know or a ratio that is not a number from 0 to 1 (the SDK samples everything
/// then), durations and sizes that are not whole numbers, headers that are not `key=value`.
fn check_sdk_settings(signal: &str) -> Result<(), String> {
    let set = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (name.to_owned(), v))
    };
    if let Some((name, value)) = set(&format!("OTEL_{signal}_EXPORTER")) {
        if value != "otlp" && value != "none" {
            return Err(format!("{name}={value}: only otlp or none"));
        }
    }
    if endpoint(signal).is_none() {
        return Ok(());
    }
    let whole = |name: &str| -> Result<(), String> {
        match set(name) {
            Some((name, value)) if value.parse::<u64>().is_err() => Err(format!(
                "{name}={value}: a whole number (milliseconds or a count)"
            )),
            _ => Ok(()),
        }
    };
    let mut numbers = vec![
        "OTEL_EXPORTER_OTLP_TIMEOUT".to_owned(),
        format!("OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"),
    ];
    if signal == "TRACES" {
        if let Some((name, value)) = set("OTEL_TRACES_SAMPLER") {
            const SAMPLERS: [&str; 6] = [
                "always_on",
                "always_off",
                "traceidratio",
                "parentbased_always_on",
                "parentbased_always_off",
                "parentbased_traceidratio",
            ];
            if !SAMPLERS.contains(&value.as_str()) {
                return Err(format!("{name}={value}: one of {}", SAMPLERS.join(", ")));
            }
        }
        if let Some((name, value)) = set("OTEL_TRACES_SAMPLER_ARG") {
            if !value
                .parse::<f64>()
                .is_ok_and(|ratio| (0.0..=1.0).contains(&ratio))
            {
                return Err(format!("{name}={value}: a ratio from 0 to 1 (0.25, say)"));
            }
        }
        numbers.extend(
            [
                "SCHEDULE_DELAY",
                "EXPORT_TIMEOUT",
                "MAX_QUEUE_SIZE",
                "MAX_EXPORT_BATCH_SIZE",
                "MAX_CONCURRENT_EXPORTS",
            ]
            .map(|setting| format!("OTEL_BSP_{setting}")),
        );
    } else {
        numbers.extend([
            "OTEL_METRIC_EXPORT_INTERVAL".to_owned(),
            "OTEL_METRIC_EXPORT_TIMEOUT".to_owned(),
        ]);
    }
    for name in &numbers {
        whole(name)?;
    }
    for name in [
        "OTEL_EXPORTER_OTLP_HEADERS".to_owned(),
        format!("OTEL_EXPORTER_OTLP_{signal}_HEADERS"),
    ] {
        if let Some((name, value)) = set(&name) {
            let bad = value.split(',').position(|pair| {
                pair.split_once('=')
                    .is_none_or(|(key, _)| key.trim().is_empty())
            });
            // Said by position: a header's value may be a credential, not for the log.
            if let Some(bad) = bad {
                return Err(format!(
                    "{name}: entry {} (counting from 1) is not key=value",
                    bad + 1
                ));
            }
        }
    }
    Ok(())
}

/// The process as traces and metrics name it: `OTEL_SERVICE_NAME`, else a `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`, else `chatd`; and the rest of `OTEL_RESOURCE_ATTRIBUTES`.
fn resource() -> Resource {
    let mut resource = Resource::builder();
    let attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() && !names_service(&attributes) {
        resource = resource.with_service_name("chatd");
    }
    resource.build()
}

/// Whether `OTEL_RESOURCE_ATTRIBUTES` (`key=value,…`) sets `service.name`.
fn names_service(attributes: &str) -> bool {
    attributes.split(',').any(|pair| {
        pair.split_once('=')
            .is_some_and(|(key, value)| key.trim() == "service.name" && !value.trim().is_empty())
    })
}

fn trace_provider() -> Result<Option<SdkTracerProvider>, String> {
    check_sdk_settings("TRACES")?;
    let Some((name, value)) = endpoint("TRACES") else {
        return Ok(None);
    };
    check_endpoint("TRACES", &name, &value)?;
    // The endpoint, headers and timeout come from the standard variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|e| format!("{name}={value}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Some(provider))
}

fn metric_exporter() -> Result<Option<opentelemetry_otlp::MetricExporter>, String> {
    check_sdk_settings("METRICS")?;
    let Some((name, value)) = endpoint("METRICS") else {
        return Ok(None);
    };
    check_endpoint("METRICS", &name, &value)?;
    opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map(Some)
        .map_err(|e| format!("{name}={value}: {e}"))
}

/// The span of one HTTP request (none for health probes and metrics scrapes), continuing the
/// caller's trace if the request carries a W3C `traceparent` header. Its status is recorded by
/// [`record_status`].
pub fn request_span(request: &axum::extract::Request) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    // Probes and scrapes come every few seconds and tell a trace nothing.
    if matches!(route, "/healthz" | "/readyz" | "/metrics") {
        return tracing::Span::none();
    }
    let method = request.method().as_str();
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&opentelemetry_http::HeaderExtractor(request.headers()))
        });
        // A request without a valid `traceparent` starts a trace of its own.
        let _ = span.set_parent(parent);
    }
    span
}

/// Records a response's status on its request's span (5xx marks the span as an error).
pub fn record_status(span: &tracing::Span, status: axum::http::StatusCode) {
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

/// The filter `var` names, or `default` when it is unset, empty or not a filter (an empty one
/// would be a filter with no directives: nothing logged, errors included).
fn filter_from_env(var: &str, default: &str) -> EnvFilter {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v.trim()).unwrap_or_else(|e| {
            eprintln!("{var}={v:?} is not a log filter ({e}); using {default:?}");
            EnvFilter::new(default)
        }),
        _ => EnvFilter::new(default),
    }
}

//! Traces and metrics end to end: chatd sends its spans and metrics over OTLP/HTTP to a
//! collector (here a real HTTP server in the test that decodes what it receives), continues a
//! caller's W3C trace, flushes on SIGTERM, and serves on when the collector is away; `/metrics`
//! renders the same instruments for Prometheus.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::client::Client;
use common::*;
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as NumberValue;
use opentelemetry_proto::tonic::metrics::v1::Metric;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use tokio::sync::watch;

/// What the collector has received: every span and every metric, with its service's name.
#[derive(Default)]
struct Received {
    spans: Vec<(String, Span)>,
    metrics: Vec<(String, Metric)>,
}

/// A collector: `POST /v1/traces` and `POST /v1/metrics` decoded as OTLP protobuf.
struct Collector {
    url: String,
    received: Arc<Mutex<Received>>,
    /// Bumped with every export request.
    exports: watch::Receiver<usize>,
}

impl Collector {
    async fn start() -> Collector {
        let received = Arc::new(Mutex::new(Received::default()));
        let (tx, exports) = watch::channel(0usize);
        let state = (received.clone(), Arc::new(tx));
        let app = axum::Router::new()
            .route("/v1/traces", post(export))
            .route("/v1/metrics", post(export_metrics))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector {
            url,
            received,
            exports,
        }
    }

    /// Waits until `found` holds of the spans received (checked at every export), at most 20 s.
    async fn until<T>(&mut self, found: impl Fn(&[(String, Span)]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = found(&self.received.lock().unwrap().spans) {
                return t;
            }
            let names: Vec<String> = self
                .received
                .lock()
                .unwrap()
                .spans
                .iter()
                .map(|(_, s)| s.name.clone())
                .collect();
            tokio::time::timeout_at(deadline, self.exports.changed())
                .await
                .unwrap_or_else(|_| panic!("spans not received in time; received: {names:?}"))
                .unwrap();
        }
    }

    /// Waits until `found` holds of the metrics received (every export of each, oldest first),
    /// at most 20 s.
    async fn until_metrics<T>(&mut self, found: impl Fn(&[(String, Metric)]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = found(&self.received.lock().unwrap().metrics) {
                return t;
            }
            tokio::time::timeout_at(deadline, self.exports.changed())
                .await
                .expect("metrics not received in time")
                .unwrap();
        }
    }

    /// Waits until `n` exports of any kind have arrived, at most 20 s.
    async fn wait_exports(&mut self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while *self.exports.borrow() < n {
            tokio::time::timeout_at(deadline, self.exports.changed())
                .await
                .expect("exports not received in time")
                .unwrap();
        }
    }
}

type CollectorState = (Arc<Mutex<Received>>, Arc<watch::Sender<usize>>);

async fn export(State((received, tx)): State<CollectorState>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
    {
        let mut received = received.lock().unwrap();
        for resource in request.resource_spans {
            let service = service_name(resource.resource.as_ref());
            for scope in resource.scope_spans {
                for span in scope.spans {
                    received.spans.push((service.clone(), span));
                }
            }
        }
    }
    tx.send_modify(|n| *n += 1);
    // An empty ExportTraceServiceResponse.
    Vec::new()
}

async fn export_metrics(State((received, tx)): State<CollectorState>, body: Bytes) -> Vec<u8> {
    let request = ExportMetricsServiceRequest::decode(body).expect("an OTLP protobuf export");
    {
        let mut received = received.lock().unwrap();
        for resource in request.resource_metrics {
            let service = service_name(resource.resource.as_ref());
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    received.metrics.push((service.clone(), metric));
                }
            }
        }
    }
    tx.send_modify(|n| *n += 1);
    // An empty ExportMetricsServiceResponse.
    Vec::new()
}

fn service_name(resource: Option<&Resource>) -> String {
    resource
        .iter()
        .flat_map(|r| &r.attributes)
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Any::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Any> {
    find_attr(&span.attributes, key)
}

fn find_attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Any> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn string_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attr(span, key)? {
        Any::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int_attr(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Any::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn traced_env(
    data: &std::path::Path,
    endpoint: &str,
    delay_ms: &str,
) -> Vec<(&'static str, String)> {
    let mut env = standalone_env(data);
    env.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", delay_ms.to_owned()),
        ("OTEL_SERVICE_NAME", "chat-under-test".to_owned()),
        // Valid settings chatd checks (the sampler is the SDK's default).
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
        ("OTEL_TRACES_SAMPLER_ARG", "1.0".to_owned()),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=chat".to_owned()),
    ]);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_appends_and_commits_are_exported_as_spans_of_the_callers_trace() {
    let mut collector = Collector::start().await;
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&traced_env(data.path(), &collector.url, "100"));
    let token = dev_token(data.path(), "alice", 3600);

    // An HTTP request carrying the caller's trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let auth = format!("Bearer {token}");
    let body =
        json!({"room": "traced", "kind": "group", "name": "traced", "members": []}).to_string();
    let (status, _) = chat_harness::http_request(
        chatd.http_addr(),
        "POST",
        "/v1/rooms",
        &[
            ("Authorization", auth.as_str()),
            ("traceparent", traceparent.as_str()),
        ],
        Some(&body),
    )
    .expect("http answer");
    assert_eq!(status, 201);

    // An append over the WebSocket.
    let mut alice = Client::connect(&chatd.ws_url(), &token).await;
    alice.subscribe("traced", None).await;
    let ack = alice.say("traced", "hello, traces").await;
    let seq = ack["seq"].as_u64().expect("acked");

    let request = collector
        .until(|spans| {
            spans
                .iter()
                .find(|(_, s)| s.name == "POST /v1/rooms" && hex(&s.trace_id) == trace_id)
                .cloned()
        })
        .await;
    let (service, request) = request;
    assert_eq!(service, "chat-under-test");
    assert_eq!(
        hex(&request.parent_span_id),
        caller_span,
        "continues the caller's span"
    );
    assert_eq!(string_attr(&request, "http.route"), Some("/v1/rooms"));
    assert_eq!(string_attr(&request, "http.request.method"), Some("POST"));
    assert_eq!(int_attr(&request, "http.response.status_code"), Some(201));

    let append = collector
        .until(|spans| {
            spans
                .iter()
                .find(|(_, s)| {
                    s.name == "chat.append"
                        && string_attr(s, "chat.room") == Some("traced")
                        && int_attr(s, "chat.seq") == Some(seq as i64)
                })
                .map(|(_, s)| s.clone())
        })
        .await;
    assert_eq!(string_attr(&append, "chat.kind"), Some("send"));
    assert_eq!(string_attr(&append, "chat.user"), Some("alice"));
    assert_eq!(
        attr(&append, "chat.duplicate"),
        Some(&Any::BoolValue(false))
    );
    assert!(
        append.parent_span_id.is_empty(),
        "an append starts a trace of its own"
    );
    // Its two stages, inside it.
    for stage in ["chat.append.decide", "chat.append.ack"] {
        let child = collector
            .until(|spans| {
                spans
                    .iter()
                    .find(|(_, s)| s.name == stage && s.parent_span_id == append.span_id)
                    .map(|(_, s)| s.clone())
            })
            .await;
        assert_eq!(child.trace_id, append.trace_id);
        assert!(child.start_time_unix_nano >= append.start_time_unix_nano);
        assert!(child.end_time_unix_nano <= append.end_time_unix_nano);
    }

    // The event carried the append's trace into the log: the commit that stored it links to it.
    collector
        .until(|spans| {
            spans
                .iter()
                .find(|(_, s)| {
                    s.name == "chat.projector.commit"
                        && s.links
                            .iter()
                            .any(|l| l.trace_id == append.trace_id && l.span_id == append.span_id)
                })
                .map(|_| ())
        })
        .await;

    // The projector's commits (the room's creation and the message, in one or more).
    let committed = collector
        .until(|spans| {
            let events: i64 = spans
                .iter()
                .filter(|(_, s)| s.name == "chat.projector.commit")
                .filter_map(|(_, s)| int_attr(s, "chat.events"))
                .sum();
            (events >= 2).then_some(events)
        })
        .await;
    assert!(committed >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_are_sent_at_sigterm() {
    let mut collector = Collector::start().await;
    let data = tempfile::tempdir().unwrap();
    // Batches go out every 10 minutes: only the flush at exit can send this one. The service
    // is named by the resource attributes here (no OTEL_SERVICE_NAME): that name is kept.
    let mut env = traced_env(data.path(), &collector.url, "600000");
    env.retain(|(name, _)| *name != "OTEL_SERVICE_NAME");
    env.push((
        "OTEL_RESOURCE_ATTRIBUTES",
        "deployment.environment=test,service.name=chat-by-attributes".to_owned(),
    ));
    let mut chatd = start(&env);
    let token = dev_token(data.path(), "bob", 3600);
    create_room(&chatd, &token, "flushed");
    let mut bob = Client::connect(&chatd.ws_url(), &token).await;
    let ack = bob.say("flushed", "before the end").await;
    let seq = ack["seq"].as_u64().expect("acked") as i64;
    assert!(
        collector.received.lock().unwrap().spans.is_empty(),
        "nothing is exported before the batch is due"
    );
    bob.close().await;
    chatd.signal(Signal::SIGTERM);
    assert!(
        chatd.wait_exit(Duration::from_secs(20)).is_some(),
        "chatd exits"
    );
    collector
        .until(|spans| {
            spans
                .iter()
                .find(|(_, s)| s.name == "chat.append" && int_attr(s, "chat.seq") == Some(seq))
                .map(|(service, _)| assert_eq!(service, "chat-by-attributes"))
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_away_costs_spans_not_service() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&traced_env(
        data.path(),
        &format!("http://127.0.0.1:{port}"),
        "50",
    ));
    let token = dev_token(data.path(), "carol", 3600);
    create_room(&chatd, &token, "untraced");
    let mut carol = Client::connect(&chatd.ws_url(), &token).await;
    for n in 0..20 {
        let ack = carol.say("untraced", &format!("message {n}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    assert_eq!(chatd.get("/readyz").map(|(status, _)| status), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_scrapes_make_no_spans() {
    let mut collector = Collector::start().await;
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&traced_env(data.path(), &collector.url, "50"));
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            chatd.get(path).map(|(status, _)| status),
            Some(200),
            "{path}"
        );
    }
    // A request after them: once its span is in, theirs would be too.
    let token = dev_token(data.path(), "dave", 3600);
    let (status, _) = api(&chatd, &token, "GET", "/v1/me", None);
    assert_eq!(status, 200);
    let names = collector
        .until(|spans| {
            spans.iter().any(|(_, s)| s.name == "GET /v1/me").then(|| {
                spans
                    .iter()
                    .map(|(_, s)| s.name.clone())
                    .collect::<Vec<_>>()
            })
        })
        .await;
    assert_eq!(names, ["GET /v1/me"]);
}

/// Labels in a canonical order (the text format leaves their order to the writer).
fn sorted_labels(labels: &str) -> String {
    let mut labels: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    labels.sort_unstable();
    labels.join(",")
}

/// The `/metrics` samples whose name is `name` exactly: (labels in canonical order, value).
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            (series_name == name).then(|| (sorted_labels(labels), value.parse().unwrap()))
        })
        .collect()
}

/// The value of the sample `name{labels}` (labels in any order).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let labels = sorted_labels(labels);
    samples(text, name)
        .into_iter()
        .find(|(l, _)| *l == labels)
        .map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_latency_histograms_beside_the_counters() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let token = dev_token(data.path(), "erin", 3600);
    create_room(&chatd, &token, "measured");
    let mut erin = Client::connect(&chatd.ws_url(), &token).await;
    let id = uuid::Uuid::new_v4();
    let first = erin.say_with_id("measured", "counted", id).await;
    let again = erin.say_with_id("measured", "counted", id).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["seq"], first["seq"]);
    // Not a member of a room that does not exist: an error answer, timed too.
    let refused = erin.say("nowhere", "lost").await;
    assert_eq!(refused["type"], "error", "{refused}");
    let code = refused["code"].as_str().unwrap().to_owned();

    // The projector's commits are timed once it has stored the message.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let (status, text) = chatd.get("/metrics").expect("metrics answer");
        assert_eq!(status, 200);
        if samples(&text, "chat_projector_commit_duration_seconds_count")
            .iter()
            .any(|(_, v)| *v >= 1.0)
            && sample(&text, "chat_projector_events_total", "").is_some_and(|v| v >= 2.0)
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no commit timed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let append = "chat_edge_append_duration_seconds";
    assert!(
        text.contains(&format!("# TYPE {append} histogram")),
        "{text}"
    );
    for (outcome, count) in [("ok", 1.0), ("duplicate", 1.0), (code.as_str(), 1.0)] {
        let labels = format!("kind=\"send\",outcome=\"{outcome}\"");
        assert_eq!(
            sample(&text, &format!("{append}_count"), &labels),
            Some(count),
            "{outcome}:\n{text}"
        );
        let sum = sample(&text, &format!("{append}_sum"), &labels).unwrap();
        assert!(sum > 0.0 && sum < 60.0, "{outcome}: sum {sum}");
        // Cumulative buckets: never decreasing, ending at the count.
        let buckets: Vec<f64> = samples(&text, &format!("{append}_bucket"))
            .into_iter()
            .filter(|(l, _)| {
                let series: Vec<&str> = l.split(',').filter(|p| !p.starts_with("le=")).collect();
                series.join(",") == sorted_labels(&labels)
            })
            .map(|(_, v)| v)
            .collect();
        assert!(buckets.len() > 5, "{outcome}: {buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
        assert_eq!(buckets.last(), Some(&count));
        assert_eq!(
            sample(
                &text,
                &format!("{append}_bucket"),
                &format!("{labels},le=\"+Inf\"")
            ),
            Some(count)
        );
    }
    assert_eq!(
        sample(
            &text,
            "http_server_request_duration_seconds_count",
            "http_request_method=\"POST\",http_route=\"/v1/rooms\",http_response_status_code=\"201\""
        ),
        Some(1.0),
        "{text}"
    );
    // The counters and gauges keep their names.
    assert!(
        text.contains("# TYPE chat_edge_appends_total counter"),
        "{text}"
    );
    assert_eq!(sample(&text, "chat_edge_appends_total", ""), Some(2.0));
    assert_eq!(sample(&text, "chat_edge_sessions", ""), Some(1.0));
    assert!(
        text.contains("# TYPE chat_projector_lag_ms gauge"),
        "{text}"
    );
    assert_eq!(sample(&text, "chat_draining", ""), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exported_over_otlp_and_traces_can_be_turned_off_alone() {
    let mut collector = Collector::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut env = traced_env(data.path(), &collector.url, "50");
    env.extend([
        ("OTEL_METRIC_EXPORT_INTERVAL", "100".to_owned()),
        ("OTEL_TRACES_EXPORTER", "none".to_owned()),
    ]);
    let chatd = start(&env);
    let token = dev_token(data.path(), "frank", 3600);
    create_room(&chatd, &token, "exported");
    let mut frank = Client::connect(&chatd.ws_url(), &token).await;
    let ack = frank.say("exported", "measured").await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let (count, appends) = collector
        .until_metrics(|metrics| {
            let count = metrics.iter().rev().find_map(|(_, m)| {
                let Some(Data::Histogram(h)) = (m.name == "chat.edge.append.duration")
                    .then_some(m.data.as_ref())
                    .flatten()
                else {
                    return None;
                };
                h.data_points
                    .iter()
                    .find(|p| {
                        find_attr(&p.attributes, "outcome") == Some(&Any::StringValue("ok".into()))
                    })
                    .map(|p| p.count)
            })?;
            let appends = metrics.iter().rev().find_map(|(_, m)| {
                let Some(Data::Sum(s)) = (m.name == "chat.edge.appends")
                    .then_some(m.data.as_ref())
                    .flatten()
                else {
                    return None;
                };
                assert!(s.is_monotonic);
                s.data_points.first().map(|p| match p.value {
                    Some(NumberValue::AsInt(i)) => i,
                    other => panic!("{other:?}"),
                })
            })?;
            (count >= 1 && appends >= 1).then_some((count, appends))
        })
        .await;
    assert_eq!((count, appends), (1, 1));
    let services: Vec<String> = collector
        .received
        .lock()
        .unwrap()
        .metrics
        .iter()
        .map(|(service, _)| service.clone())
        .collect();
    assert!(
        services.iter().all(|s| s == "chat-under-test"),
        "{services:?}"
    );
    // Spans of the append would have been sent within 50 ms; two more metric exports later,
    // none came.
    let seen = *collector.exports.borrow();
    collector.wait_exports(seen + 2).await;
    assert!(
        collector.received.lock().unwrap().spans.is_empty(),
        "OTEL_TRACES_EXPORTER=none: no spans"
    );
}

/// Creates a group room of the token's user alone.
fn create_room(chatd: &chat_harness::Chatd, token: &str, room: &str) {
    let body = json!({"room": room, "kind": "group", "name": room, "members": []});
    let (status, _) = api(chatd, token, "POST", "/v1/rooms", Some(body));
    assert_eq!(status, 201);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

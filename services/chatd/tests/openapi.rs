//! `docs/openapi.yaml` against the real binary: every documented (method, path) is a route the
//! server has with that method, and every route the server has is documented.
//!
//! The YAML is read without a YAML library: only the `paths:` section's keys matter, path keys
//! at two spaces of indent and method keys at four. `CHAT_OPENAPI_PATH` names another file to
//! check (relative to the package's directory); the default is the repository's
//! `docs/openapi.yaml`.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::*;

/// The files whose routers make the server's HTTP surface: `http::router` (health, readiness,
/// identity, metrics), `api::router` (rooms, members, history, receipts, threads, blocks) and
/// `chat_edge::router` (the WebSocket upgrade, presence).
const ROUTER_SOURCES: &[&str] = &["src/http.rs", "src/api.rs", "../edge/src/lib.rs"];

/// The (METHOD, path) pairs the routers declare, read from their source: every
/// `.route("PATH", get(..).post(..))` line. A `.route(` whose methods cannot be read there
/// (written over several lines, say) fails the test rather than going unseen. `HEAD`, which
/// axum adds to every `GET`, is left out.
fn routes_in_code() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for file in ROUTER_SOURCES {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file);
        let source =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for line in source
            .lines()
            .filter(|l| l.trim_start().starts_with(".route("))
        {
            let mut parts = line.splitn(3, '"');
            let (_, route, handlers) = (parts.next(), parts.next(), parts.next());
            let (Some(route), Some(handlers)) = (route, handlers) else {
                panic!("{file}: cannot read the route of {line:?}");
            };
            let before = |i: usize| handlers[..i].chars().last().unwrap_or(' ');
            let methods: Vec<&str> = ["get", "post", "put", "patch", "delete"]
                .into_iter()
                .filter(|m| {
                    handlers
                        .match_indices(&format!("{m}("))
                        .any(|(i, _)| matches!(before(i), ' ' | '.' | ','))
                })
                .collect();
            assert!(
                !methods.is_empty(),
                "{file}: no method handler read on {line:?}"
            );
            for method in methods {
                routes.insert((method.to_ascii_uppercase(), route.to_owned()));
            }
        }
    }
    routes
}

/// The methods an OpenAPI path item may hold.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn openapi_path() -> PathBuf {
    match std::env::var_os("CHAT_OPENAPI_PATH") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.yaml"
        )),
    }
}

/// The (METHOD, path) pairs of an OpenAPI document's `paths:` section, in document order.
fn documented_operations(yaml: &str) -> Vec<(String, String)> {
    let mut operations = Vec::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    for line in yaml.lines() {
        let content = line.trim_end();
        if content.trim_start().is_empty() || content.trim_start().starts_with('#') {
            continue;
        }
        let indent = content.len() - content.trim_start().len();
        if indent == 0 {
            in_paths = content == "paths:";
            path = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        let Some(key) = content.trim_start().strip_suffix(':') else {
            continue;
        };
        let key = key.trim_matches(|c| c == '"' || c == '\'');
        match indent {
            2 => path = key.starts_with('/').then(|| key.to_owned()),
            4 if METHODS.contains(&key) => {
                if let Some(path) = &path {
                    operations.push((key.to_ascii_uppercase(), path.clone()));
                }
            }
            _ => {}
        }
    }
    operations
}

/// `path` with each `{parameter}` replaced by a value the server can work with.
fn concrete(path: &str, room: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .unwrap_or_else(|| panic!("unclosed parameter in {path}"));
        out.push_str(&rest[..open]);
        let value = match &rest[open + 1..close] {
            "room" => room,
            "user" => "bob",
            // The room's `room_created` event.
            "seq" | "root" => "1",
            other => panic!("{path}: no example value for the parameter {{{other}}}; add one"),
        };
        out.push_str(value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn every_documented_route_exists_and_every_route_is_documented() {
    let file = openapi_path();
    let yaml = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let documented = documented_operations(&yaml);
    assert!(
        !documented.is_empty(),
        "{}: no operations found under paths:",
        file.display()
    );
    let set: BTreeSet<(&str, &str)> = documented
        .iter()
        .map(|(m, p)| (m.as_str(), p.as_str()))
        .collect();
    assert_eq!(set.len(), documented.len(), "an operation is listed twice");

    // Every route of the code is documented (judged with the server's answers below, so that
    // a renamed path shows both ways).
    let routes = routes_in_code();
    assert!(
        routes.len() >= 17,
        "routes read from the routers: {routes:?}"
    );
    let undocumented: Vec<String> = routes
        .iter()
        .filter(|(m, p)| !set.contains(&(m.as_str(), p.as_str())))
        .map(|(m, p)| format!("{m} {p}"))
        .collect();

    // Every documented operation is a route the server has with that method.
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let token = dev_token(data.path(), "alice", 600);
    let (status, created) = api(
        &chatd,
        &token,
        "POST",
        "/v1/rooms",
        Some(serde_json::json!({"room": "spec", "kind": "group", "members": ["bob"]})),
    );
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap().to_owned();
    let auth = format!("Bearer {token}");

    let mut missing = Vec::new();
    for (method, path) in &documented {
        let target = concrete(path, &room);
        // A body where the method takes one: what it holds does not matter here (a refusal
        // of it is still the route answering).
        let body = matches!(method.as_str(), "POST" | "PUT" | "PATCH").then_some("{}");
        let (status, head, answer) = chat_harness::http_exchange(
            chatd.http_addr(),
            method,
            &target,
            &[("Authorization", &auth)],
            body,
        )
        .unwrap_or_else(|| panic!("{method} {target}: no answer"));
        let served = if path == "/v1/ws" {
            // The upgrade itself is the WebSocket tests' business: a plain request is refused
            // as no upgrade (400), which is enough to know the route is there.
            status != 404 && status != 405
        } else {
            let no_route = status == 404
                && serde_json::from_str::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|b| b["error"]["message"].as_str().map(str::to_owned))
                    .is_some_and(|m| m.starts_with("no route"));
            !no_route && status != 405
        };
        if !served {
            let status_line = head.lines().next().unwrap_or_default();
            missing.push(format!(
                "{method} {path} ({target}): {status_line} {answer}"
            ));
        }
    }
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "{}:\nroutes of the code it does not document: {undocumented:?}\n\
         documented but not served:\n{}",
        file.display(),
        missing.join("\n")
    );
}

#[test]
fn the_paths_reader_finds_paths_and_methods_only() {
    let yaml = "\
openapi: 3.1.0
paths:
  /a:
    get:
      responses:
        \"200\":
          description: ok
    parameters: []
  \"/b/{x}\":
    # a comment
    put:
      summary: put
    delete:
      summary: delete
components:
  schemas:
    post:
      type: object
";
    assert_eq!(
        documented_operations(yaml),
        [
            ("GET".to_owned(), "/a".to_owned()),
            ("PUT".to_owned(), "/b/{x}".to_owned()),
            ("DELETE".to_owned(), "/b/{x}".to_owned()),
        ]
    );
    assert_eq!(
        concrete("/v1/rooms/{room}/messages/{seq}/receipts", "r"),
        "/v1/rooms/r/messages/1/receipts"
    );
}

/// Every `$ref` within `value` (`#/…` pointers into `root`) that does not resolve.
fn dangling_refs(root: &serde_json::Value, value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item.as_str()) {
                    ("$ref", Some(target)) => {
                        let resolves = target
                            .strip_prefix('#')
                            .is_some_and(|pointer| root.pointer(pointer).is_some());
                        if !resolves {
                            out.push(target.to_owned());
                        }
                    }
                    _ => dangling_refs(root, item, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dangling_refs(root, item, out);
            }
        }
        _ => {}
    }
}

#[test]
fn both_api_descriptions_are_valid_yaml_whose_references_resolve() {
    let docs = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs"));
    for (file, version_key) in [("openapi.yaml", "openapi"), ("asyncapi.yaml", "asyncapi")] {
        let path = docs.join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        let doc: serde_json::Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
        assert!(
            doc[version_key].is_string(),
            "{file}: no `{version_key}` version"
        );
        let mut dangling = Vec::new();
        dangling_refs(&doc, &doc, &mut dangling);
        assert!(dangling.is_empty(), "{file}: unresolved $ref {dangling:?}");
    }
}

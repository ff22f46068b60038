//! The WebSocket Origin check of the contract.

use axum::http::{header, HeaderMap};

/// Accepts a request with no Origin (not a browser), an Origin in the allow-list when there is
/// one, or else an Origin whose host (and port) equals the Host header.
pub fn check(headers: &HeaderMap, allowed: Option<&[String]>) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .map_err(|_| "unreadable Origin header".to_owned())?;
    let refused = || format!("origin {origin} is not allowed");
    match allowed {
        Some(list) => {
            if list
                .iter()
                .any(|a| a.eq_ignore_ascii_case(origin.trim_end_matches('/')))
            {
                Ok(())
            } else {
                Err(refused())
            }
        }
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let origin_host = origin
                .split_once("://")
                .map(|(_, rest)| rest.trim_end_matches('/'));
            match origin_host {
                Some(h) if !host.is_empty() && h.eq_ignore_ascii_case(host) => Ok(()),
                _ => Err(refused()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn without_an_allow_list_only_same_host_origins_pass() {
        assert!(check(&headers(None, "chat.example:8080"), None).is_ok());
        assert!(check(
            &headers(Some("https://chat.example:8080"), "chat.example:8080"),
            None
        )
        .is_ok());
        assert!(check(
            &headers(Some("https://evil.example"), "chat.example:8080"),
            None
        )
        .is_err());
        assert!(check(
            &headers(Some("https://chat.example:9999"), "chat.example:8080"),
            None
        )
        .is_err());
        assert!(check(&headers(Some("null"), "chat.example"), None).is_err());
    }

    #[test]
    fn an_allow_list_is_exact() {
        let list = vec!["https://app.example".to_owned()];
        assert!(check(
            &headers(Some("https://app.example"), "api.example"),
            Some(&list)
        )
        .is_ok());
        assert!(check(
            &headers(Some("https://APP.example/"), "api.example"),
            Some(&list)
        )
        .is_ok());
        assert!(check(
            &headers(Some("https://app.example.evil"), "api.example"),
            Some(&list)
        )
        .is_err());
        assert!(check(
            &headers(Some("http://app.example"), "api.example"),
            Some(&list)
        )
        .is_err());
        assert!(
            check(&headers(None, "api.example"), Some(&list)).is_ok(),
            "non-browser clients"
        );
    }
}

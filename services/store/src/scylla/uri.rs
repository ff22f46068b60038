//! The store's address: `scylla://host:port[,host:port…]/keyspace[?rf=N][&dc=NAME]`.

use crate::{Result, StoreError};

/// The port ScyllaDB serves CQL on unless the address says otherwise.
const DEFAULT_PORT: u16 = 9042;
/// The longest keyspace name ScyllaDB accepts.
const MAX_KEYSPACE_LEN: usize = 48;

/// The parts of a store address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Address {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// The keyspace, if the address names one.
    pub keyspace: Option<String>,
    /// Replication factor for a keyspace the store creates.
    pub rf: u32,
    /// The local datacenter: requests go to its nodes (`LOCAL_QUORUM` is a quorum there).
    pub dc: Option<String>,
}

/// Splits `scylla://host:port[,host:port…]/keyspace[?rf=N]` into its contact points,
/// keyspace and replication factor (default 1). The keyspace is required.
pub fn parse_uri(uri: &str) -> Result<(Vec<String>, String, u32)> {
    let address = parse_address(uri)?;
    let keyspace = address
        .keyspace
        .ok_or_else(|| bad(uri, "names no keyspace (scylla://host:port/keyspace)"))?;
    Ok((address.nodes, keyspace, address.rf))
}

/// Like [`parse_uri`], the keyspace optional.
pub(crate) fn parse_address(uri: &str) -> Result<Address> {
    let rest = uri
        .strip_prefix("scylla://")
        .ok_or_else(|| bad(uri, "does not start with scylla://"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let (hosts, keyspace) = match rest.split_once('/') {
        Some((hosts, keyspace)) => (hosts, keyspace),
        None => (rest, ""),
    };
    let nodes = hosts
        .split(',')
        .map(|node| parse_node(uri, node))
        .collect::<Result<Vec<_>>>()?;
    let keyspace = if keyspace.is_empty() {
        None
    } else {
        Some(
            check_keyspace(keyspace)
                .map_err(|why| bad(uri, &why))?
                .to_owned(),
        )
    };
    let mut rf = 1;
    let mut dc = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some(("dc", value)) => {
                let valid = !value.is_empty()
                    && value.len() <= 64
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !valid {
                    return Err(bad(
                        uri,
                        "dc must be a datacenter name (letters, digits, - _ .)",
                    ));
                }
                dc = Some(value.to_owned());
            }
            Some(("rf", value)) => {
                rf = value
                    .parse::<u32>()
                    .ok()
                    .filter(|rf| *rf >= 1)
                    .ok_or_else(|| bad(uri, "rf must be a positive integer"))?;
            }
            _ => {
                return Err(bad(
                    uri,
                    &format!("unknown parameter {pair:?} (known: rf, dc)"),
                ))
            }
        }
    }
    Ok(Address {
        nodes,
        keyspace,
        rf,
        dc,
    })
}

/// One contact point, `host[:port]`; hosts may be names, IPv4 or bracketed IPv6 addresses.
fn parse_node(uri: &str, node: &str) -> Result<String> {
    if node.is_empty() {
        return Err(bad(uri, "has an empty host"));
    }
    let (host, port) = if let Some(v6) = node.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad(uri, "has an unclosed [ in a host"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(bad(uri, "has junk after an IPv6 host")),
            },
        }
    } else {
        match node.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (node, None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(bad(uri, &format!("has a bad host {host:?}")));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(uri, &format!("has a bad port {port:?}")))?,
    };
    Ok(if node.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// A keyspace name CQL accepts unquoted: a letter, then letters, digits and `_`, at most 48.
pub(crate) fn check_keyspace(keyspace: &str) -> std::result::Result<&str, String> {
    let mut chars = keyspace.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && keyspace.len() <= MAX_KEYSPACE_LEN;
    if ok {
        Ok(keyspace)
    } else {
        Err(format!(
            "keyspace {keyspace:?} must be a letter then up to {} letters, digits or _",
            MAX_KEYSPACE_LEN - 1
        ))
    }
}

fn bad(uri: &str, why: &str) -> StoreError {
    StoreError::BadAddress(format!("{uri}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_nodes_keyspace_and_replication() {
        assert_eq!(
            parse_uri("scylla://10.0.0.1:9042,db2:19042,[::1]:9043/chat?rf=3").unwrap(),
            (
                vec![
                    "10.0.0.1:9042".to_owned(),
                    "db2:19042".to_owned(),
                    "[::1]:9043".to_owned()
                ],
                "chat".to_owned(),
                3
            )
        );
        assert_eq!(
            parse_uri("scylla://localhost/chat_1").unwrap(),
            (vec!["localhost:9042".to_owned()], "chat_1".to_owned(), 1)
        );
        let base = parse_address("scylla://127.0.0.1:9042").unwrap();
        assert_eq!((base.keyspace, base.rf, base.dc), (None, 1, None));
        let dc = parse_address("scylla://h/chat?dc=eu-west.1&rf=3").unwrap();
        assert_eq!((dc.dc.as_deref(), dc.rf), (Some("eu-west.1"), 3));
        assert_eq!(
            parse_address("scylla://127.0.0.1:9042/").unwrap().keyspace,
            None
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        for uri in [
            "postgres://h:1/ks",
            "scylla://h:1",
            "scylla:///ks",
            "scylla://h:1,,h:2/ks",
            "scylla://h:port/ks",
            "scylla://h:0/ks",
            "scylla://h:1/1ks",
            "scylla://h:1/k-s",
            "scylla://h:1/ks?rf=0",
            "scylla://h:1/ks?rf=x",
            "scylla://h:1/ks?replicas=3",
            "scylla://h:1/ks?dc=",
            "scylla://h:1/ks?dc=eu%20west",
            "scylla://[::1/ks",
        ] {
            assert!(
                matches!(parse_uri(uri), Err(StoreError::BadAddress(_))),
                "{uri}"
            );
        }
        let long = format!("scylla://h:1/k{}", "s".repeat(48));
        assert!(parse_uri(&long).is_err());
    }
}

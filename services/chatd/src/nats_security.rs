//! How chatd authenticates to an external NATS and secures the connection: credentials in
//! `NATS_URL` or the variables the `nats` CLI reads (`NATS_USER`/`NATS_PASSWORD`, `NATS_TOKEN`,
//! `NATS_CREDS`, `NATS_NKEY`), and TLS (`tls://` URLs, `NATS_CA`, `NATS_CERT`/`NATS_KEY`).
//!
//! Credentials never appear in logs or errors: the URL chatd keeps and prints is stripped of
//! them, and [`NatsAuth`]'s `Debug` shows only the method.

use std::fmt;
use std::path::{Path, PathBuf};

use async_nats::ConnectOptions;

use crate::config::ConfigError;

/// How chatd proves who it is to NATS.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (a server without authorization).
    #[default]
    None,
    /// `nats://user:password@host` or `NATS_USER` and `NATS_PASSWORD`.
    UserPassword { user: String, password: String },
    /// `nats://token@host` or `NATS_TOKEN`.
    Token(String),
    /// A credentials file: a user JWT and its nkey seed (`NATS_CREDS`).
    Creds(PathBuf),
    /// A file holding an nkey seed (`NATS_NKEY`).
    Nkey(PathBuf),
}

impl NatsAuth {
    /// The method, for messages (never the secret).
    pub fn method(&self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::UserPassword { .. } => "user and password",
            NatsAuth::Token(_) => "token",
            NatsAuth::Creds(_) => "credentials file",
            NatsAuth::Nkey(_) => "nkey",
        }
    }
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::Creds(path) => write!(f, "Creds({})", path.display()),
            NatsAuth::Nkey(path) => write!(f, "Nkey({})", path.display()),
            NatsAuth::None => f.write_str("None"),
        }
    }
}

/// Authentication and TLS of the connection to an external NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsSecurity {
    pub auth: NatsAuth,
    /// PEM certificates to verify the server by (`NATS_CA`) instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (`NATS_CERT`, `NATS_KEY`), for servers that verify
    /// their clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// TLS required: a `tls://` URL, or any of the TLS settings above.
    pub tls: bool,
}

impl NatsSecurity {
    /// Reads the settings for `nats_url` (`None`: chatd starts its own nats-server, which takes
    /// none of them) through `get`. Returns the URL without its credentials, the one to keep
    /// and print.
    pub fn from_lookup(
        nats_url: Option<&str>,
        get: &impl Fn(&str) -> Option<String>,
    ) -> Result<(Option<String>, NatsSecurity), ConfigError> {
        const VARS: [&str; 8] = [
            "NATS_USER",
            "NATS_PASSWORD",
            "NATS_TOKEN",
            "NATS_CREDS",
            "NATS_NKEY",
            "NATS_CA",
            "NATS_CERT",
            "NATS_KEY",
        ];
        let Some(url) = nats_url else {
            if let Some(var) = VARS.into_iter().find(|v| get(v).is_some()) {
                return Err(err(
                    var,
                    "applies to an external NATS only: set NATS_URL (the nats-server chatd \
                     starts itself listens on loopback and takes no credentials)",
                ));
            }
            return Ok((None, NatsSecurity::default()));
        };
        let mut servers = Vec::new();
        let mut from_url: Option<NatsAuth> = None;
        let mut tls = false;
        for server in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let addr = server
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| err("NATS_URL", format!("{:?}: {e}", strip_userinfo(server))))?;
            if addr.is_websocket() {
                return Err(err(
                    "NATS_URL",
                    format!(
                        "{}: WebSocket URLs are not supported; use the server's client port",
                        strip_userinfo(server)
                    ),
                ));
            }
            tls |= addr.tls_required();
            let auth = match (addr.username(), addr.password()) {
                (None, None) => None,
                (Some(user), Some(password)) => Some(NatsAuth::UserPassword {
                    user: percent_decode(user),
                    password: percent_decode(password),
                }),
                (Some(token), None) => Some(NatsAuth::Token(percent_decode(token))),
                (None, Some(_)) => {
                    return Err(err(
                        "NATS_URL",
                        format!("{}: a password without a user", strip_userinfo(server)),
                    ))
                }
            };
            if let Some(auth) = auth {
                match &from_url {
                    Some(seen) if *seen != auth => {
                        return Err(err(
                            "NATS_URL",
                            "the servers carry different credentials; give them once",
                        ))
                    }
                    _ => from_url = Some(auth),
                }
            }
            servers.push(strip_userinfo(server));
        }
        let mut auths: Vec<(&'static str, NatsAuth)> = Vec::new();
        if let Some(auth) = from_url {
            auths.push(("NATS_URL", auth));
        }
        match (get("NATS_USER"), get("NATS_PASSWORD")) {
            (Some(user), Some(password)) => {
                auths.push(("NATS_USER", NatsAuth::UserPassword { user, password }))
            }
            (None, None) => {}
            (Some(_), None) => return Err(err("NATS_PASSWORD", "required with NATS_USER")),
            (None, Some(_)) => return Err(err("NATS_USER", "required with NATS_PASSWORD")),
        }
        if let Some(token) = get("NATS_TOKEN") {
            auths.push(("NATS_TOKEN", NatsAuth::Token(token)));
        }
        // Read now, so that a file that does not read or holds no credentials is a
        // configuration error (exit 2, not restarted), not a failure at every connect.
        if let Some(path) = get("NATS_CREDS") {
            let (path, file) = read_file("NATS_CREDS", &path)?;
            if creds_parts(&file).is_none() {
                return Err(err(
                    "NATS_CREDS",
                    format!(
                        "{} holds no user JWT and nkey seed (a .creds file as nsc writes it)",
                        path.display()
                    ),
                ));
            }
            auths.push(("NATS_CREDS", NatsAuth::Creds(path)));
        }
        if let Some(path) = get("NATS_NKEY") {
            let (path, file) = read_file("NATS_NKEY", &path)?;
            if nkey_seed(&file).is_none() {
                return Err(err(
                    "NATS_NKEY",
                    format!("{} holds no nkey seed (a line starting SU)", path.display()),
                ));
            }
            auths.push(("NATS_NKEY", NatsAuth::Nkey(path)));
        }
        if auths.len() > 1 {
            let names: Vec<&str> = auths.iter().map(|(var, _)| *var).collect();
            return Err(err(
                auths[1].0,
                format!("one way to authenticate to NATS, got {}", names.join(", ")),
            ));
        }
        let auth = auths.pop().map(|(_, auth)| auth).unwrap_or_default();
        let ca = get("NATS_CA")
            .map(|p| existing_file("NATS_CA", &p))
            .transpose()?;
        let client_cert = match (get("NATS_CERT"), get("NATS_KEY")) {
            (Some(cert), Some(key)) => Some((
                existing_file("NATS_CERT", &cert)?,
                existing_file("NATS_KEY", &key)?,
            )),
            (None, None) => None,
            (Some(_), None) => return Err(err("NATS_KEY", "required with NATS_CERT")),
            (None, Some(_)) => return Err(err("NATS_CERT", "required with NATS_KEY")),
        };
        tls |= ca.is_some() || client_cert.is_some();
        Ok((
            Some(servers.join(",")),
            NatsSecurity {
                auth,
                ca,
                client_cert,
                tls,
            },
        ))
    }

    /// What the room log's bulk reads present on connections of their own, or `None` when they
    /// must go through the client library (over TLS, or a file that cannot be read: see
    /// `chat_log::WireAuth`).
    pub fn bulk_read_auth(&self) -> Option<chat_log::WireAuth> {
        if self.tls {
            return None;
        }
        Some(match &self.auth {
            NatsAuth::None => chat_log::WireAuth::None,
            NatsAuth::UserPassword { user, password } => chat_log::WireAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            NatsAuth::Token(token) => chat_log::WireAuth::Token(token.clone()),
            NatsAuth::Nkey(path) => {
                chat_log::WireAuth::Nkey(nkey_seed(&std::fs::read_to_string(path).ok()?)?)
            }
            NatsAuth::Creds(path) => {
                let (jwt, seed) = creds_parts(&std::fs::read_to_string(path).ok()?)?;
                chat_log::WireAuth::Jwt { jwt, seed }
            }
        })
    }

    /// `options` with these settings. Reads the credentials file, if any.
    pub async fn apply(&self, options: ConnectOptions) -> anyhow::Result<ConnectOptions> {
        use anyhow::Context as _;
        let mut options = match &self.auth {
            NatsAuth::None => options,
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token(token) => options.token(token.clone()),
            NatsAuth::Creds(path) => options
                .credentials_file(path)
                .await
                .with_context(|| format!("NATS_CREDS: read {}", path.display()))?,
            NatsAuth::Nkey(path) => {
                let seed = std::fs::read_to_string(path)
                    .with_context(|| format!("NATS_NKEY: read {}", path.display()))?;
                let seed = nkey_seed(&seed)
                    .with_context(|| format!("NATS_NKEY: {} holds no nkey seed", path.display()))?;
                options.nkey(seed)
            }
        };
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

fn err(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

fn existing_file(var: &'static str, path: &str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(path);
    if Path::is_file(&path) && std::fs::File::open(&path).is_ok() {
        Ok(path)
    } else {
        Err(err(
            var,
            format!("{} is not a readable file", path.display()),
        ))
    }
}

/// The file at `path` and what it holds (text).
fn read_file(var: &'static str, path: &str) -> Result<(PathBuf, String), ConfigError> {
    let path = existing_file(var, path)?;
    match std::fs::read_to_string(&path) {
        Ok(file) => Ok((path, file)),
        Err(e) => Err(err(var, format!("{}: {e}", path.display()))),
    }
}

/// The seed in an nkey file: the one line starting `SU` (a user seed), as `nk` and `nsc` write
/// it, alone or between `-----BEGIN …-----` lines.
fn nkey_seed(file: &str) -> Option<String> {
    file.lines()
        .map(str::trim)
        .find(|line| line.starts_with("SU") && line.len() > 2)
        .map(str::to_owned)
}

/// The user JWT and the nkey seed of a credentials file: the first line inside its
/// `BEGIN NATS USER JWT` block, and its `SU…` line.
fn creds_parts(file: &str) -> Option<(String, String)> {
    let mut lines = file.lines().map(str::trim);
    lines.by_ref().find(|l| l.contains("BEGIN NATS USER JWT"))?;
    let jwt = lines.find(|l| !l.is_empty())?.to_owned();
    (!jwt.starts_with('-')).then_some(())?;
    Some((jwt, nkey_seed(file)?))
}

/// `server` without the `user:password@` or `token@` part, as printed and logged.
pub fn strip_userinfo(server: &str) -> String {
    let (scheme, rest) = match server.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, server),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest.to_owned(),
    }
}

/// `%XX` escapes decoded, as a URL's user information is written (`p%40ss` for `p@ss`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(
        url: Option<&str>,
        vars: &[(&str, &str)],
    ) -> Result<(Option<String>, NatsSecurity), ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NatsSecurity::from_lookup(url, &|k| map.get(k).cloned())
    }

    #[test]
    fn credentials_in_the_url_are_taken_out_of_it() {
        let (url, s) = read(
            Some("nats://chat:p%40ss@n1:4222, nats://chat:p%40ss@n2:4222"),
            &[],
        )
        .unwrap();
        assert_eq!(url.as_deref(), Some("nats://n1:4222,nats://n2:4222"));
        assert_eq!(
            s.auth,
            NatsAuth::UserPassword {
                user: "chat".into(),
                password: "p@ss".into()
            }
        );
        assert!(!s.tls);
        let (url, s) = read(Some("tls://s3cr3t@n1:4222"), &[]).unwrap();
        assert_eq!(url.as_deref(), Some("tls://n1:4222"));
        assert_eq!(s.auth, NatsAuth::Token("s3cr3t".into()));
        assert!(s.tls, "a tls:// URL requires TLS");
        assert!(!format!("{s:?}").contains("s3cr3t"), "{s:?}");
        let (_, s) = read(
            Some("nats://n1:4222"),
            &[("NATS_USER", "u"), ("NATS_PASSWORD", "pw")],
        )
        .unwrap();
        assert_eq!(format!("{:?}", s.auth), "UserPassword(\"u\", ***)");
    }

    #[test]
    fn conflicting_or_incomplete_settings_name_their_variable() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_str().unwrap();
        for (url, vars, var) in [
            (Some("nats://a:b@n1,nats://a:c@n2"), vec![], "NATS_URL"),
            (Some("nats://:pw@n1"), vec![], "NATS_URL"),
            (Some("ws://n1:8080"), vec![], "NATS_URL"),
            (Some("nats://n1"), vec![("NATS_USER", "u")], "NATS_PASSWORD"),
            (Some("nats://n1"), vec![("NATS_PASSWORD", "p")], "NATS_USER"),
            (
                Some("nats://t@n1"),
                vec![("NATS_TOKEN", "t2")],
                "NATS_TOKEN",
            ),
            (
                Some("nats://n1"),
                vec![("NATS_TOKEN", "t"), ("NATS_NKEY", path)],
                "NATS_NKEY",
            ),
            (
                Some("nats://n1"),
                vec![("NATS_CREDS", "/no/such/file")],
                "NATS_CREDS",
            ),
            (
                Some("nats://n1"),
                vec![("NATS_CA", "/no/such/ca.pem")],
                "NATS_CA",
            ),
            (Some("nats://n1"), vec![("NATS_CERT", path)], "NATS_KEY"),
            (None, vec![("NATS_TOKEN", "t")], "NATS_TOKEN"),
        ] {
            let e = read(url, &vars).unwrap_err();
            assert_eq!(e.var, var, "{url:?} {vars:?}: {e}");
            assert!(!e.message.contains("pw"), "{e}");
        }
    }

    #[test]
    fn tls_files_require_tls() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_str().unwrap();
        let (_, s) = read(Some("nats://n1:4222"), &[("NATS_CA", path)]).unwrap();
        assert!(s.tls);
        assert_eq!(s.ca.as_deref(), Some(file.path()));
    }

    #[test]
    fn userinfo_is_stripped_and_nothing_else() {
        assert_eq!(strip_userinfo("nats://u:p@h:1"), "nats://h:1");
        assert_eq!(strip_userinfo("u:p@h:1"), "h:1");
        assert_eq!(strip_userinfo("nats://h:1"), "nats://h:1");
        assert_eq!(strip_userinfo("nats://a@b:c@h:1"), "nats://h:1");
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }

    #[test]
    fn an_nkey_file_gives_its_seed() {
        assert_eq!(
            nkey_seed("-----BEGIN USER NKEY SEED-----\nSUAM5\n------END-----\n").as_deref(),
            Some("SUAM5")
        );
        assert_eq!(nkey_seed("UABC\n"), None);
        let creds =
            "-----BEGIN NATS USER JWT-----\neyJ0.eyJ1.sig\n------END NATS USER JWT------\n\n\
                     ***\n-----BEGIN USER NKEY SEED-----\nSUAB\n------END USER NKEY SEED------\n";
        assert_eq!(
            creds_parts(creds),
            Some(("eyJ0.eyJ1.sig".to_owned(), "SUAB".to_owned()))
        );
        assert_eq!(creds_parts("SUAB\n"), None);
    }

    #[test]
    fn credential_files_are_read_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        };
        let seed = write("chat.nk", "SUAM5\n");
        let public = write("public.nk", "UABC\n");
        let creds = write(
            "chat.creds",
            "-----BEGIN NATS USER JWT-----\neyJ0.eyJ1.sig\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\nSUAB\n------END USER NKEY SEED------\n",
        );
        assert!(read(Some("nats://n1"), &[("NATS_NKEY", &seed)]).is_ok());
        assert!(read(Some("nats://n1"), &[("NATS_CREDS", &creds)]).is_ok());
        for (var, path, says) in [
            ("NATS_NKEY", &public, "holds no nkey seed"),
            ("NATS_CREDS", &seed, "holds no user JWT"),
            (
                "NATS_NKEY",
                &dir.path().to_str().unwrap().to_owned(),
                "not a readable file",
            ),
        ] {
            let e = read(Some("nats://n1"), &[(var, path)]).unwrap_err();
            assert_eq!(e.var, var, "{e}");
            assert!(e.message.contains(says), "{e}");
            assert!(
                !e.message.contains("SUA"),
                "the seed stays out of messages: {e}"
            );
        }
    }
}

//! One chatd with its own nats-server and development tokens, for end-to-end tests.

use serde_json::{json, Value};

use super::client::Client;
use super::{api, dev_token, standalone_env, start};
use chat_harness::Chatd;

pub struct Server {
    pub chatd: Chatd,
    _data: tempfile::TempDir,
    pub data_path: std::path::PathBuf,
}

impl Server {
    pub fn start() -> Server {
        let data = tempfile::tempdir().unwrap();
        let chatd = start(&standalone_env(data.path()));
        Server {
            chatd,
            data_path: data.path().to_owned(),
            _data: data,
        }
    }

    pub fn token(&self, user: &str) -> String {
        dev_token(&self.data_path, user, 3600)
    }

    pub async fn client(&self, user: &str) -> Client {
        Client::connect(&self.chatd.ws_url(), &self.token(user)).await
    }

    pub fn api(&self, user: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        api(&self.chatd, &self.token(user), method, path, body)
    }

    /// Creates a group room owned by `owner` with `members`.
    pub fn group(&self, owner: &str, room: &str, members: &[&str]) {
        let (status, body) = self.api(
            owner,
            "POST",
            "/v1/rooms",
            Some(json!({"room": room, "kind": "group", "name": room, "members": members})),
        );
        assert_eq!((status, &body), (201, &json!({"room": room, "seq": 1})));
    }
}

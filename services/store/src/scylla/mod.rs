//! The scale-out backend: ScyllaDB through the `scylla` driver.
//!
//! The schema, with why each table is keyed as it is, is `schema/scylla.cql`. ScyllaDB has no
//! transaction spanning partitions, so the store converges instead of committing: a batch's
//! rows are written first and the room's checkpoint last, every write carries a timestamp
//! derived from the log ([`clock`]), and re-applying events after a crash (rows written,
//! checkpoint not) lands the same cells whatever the order. The observable behaviour is the
//! SQLite backend's, checked by the same conformance suite (`tests/conformance.rs`, run with
//! `SCYLLA_URI` set).
//!
//! Reads see what the checkpoint covers: history and thread pages stop at the room's checkpoint,
//! so a half-applied batch's new events are not shown before the batch is done.

mod admin;
mod apply;
mod clock;
mod query;
mod rows;
mod statements;
mod uri;
pub use uri::parse_uri;

use std::collections::HashSet;
use std::fmt::Display;
use std::sync::Arc;

use ::scylla::client::execution_profile::ExecutionProfile;
use ::scylla::client::session::Session;
use ::scylla::client::session_builder::SessionBuilder;
use ::scylla::deserialize::row::DeserializeRow;
use ::scylla::policies::load_balancing::DefaultPolicy;
use ::scylla::serialize::row::SerializeRow;
use ::scylla::statement::prepared::PreparedStatement;
use ::scylla::statement::Consistency;
use async_trait::async_trait;
use chat_model::{RoomId, RoomState, UserId};
use futures::TryStreamExt;
use uuid::Uuid;

use crate::{
    DeadLetter, IdHit, MemberCursors, Page, PageQuery, ProjectorStatus, Result, RoomBatch,
    RoomSummary, Store, StoreError, ThreadPage,
};
use statements::Statements;

/// The tables, also shipped as `schema/scylla.cql`.
pub const SCHEMA: &str = include_str!("../../../../schema/scylla.cql");

/// The ScyllaDB store. Cloning is cheap: clones share one session.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The driver's session: connection pools to every node, token-aware routing.
    session: Session,
    /// The keyspace every statement runs in.
    keyspace: String,
    /// Every statement the store runs, prepared.
    statements: Statements,
}

/// Maps a driver error (or anything displayable) to the store's error for `op`.
pub(crate) fn fail<E: Display>(op: &'static str) -> impl Fn(E) -> StoreError {
    move |e| StoreError::Backend {
        op,
        message: e.to_string(),
    }
}

/// The statements of a CQL file: comments (`--` to the end of a line) dropped, split at `;`.
fn cql_statements(text: &str) -> Vec<String> {
    let uncommented: String = text
        .lines()
        .map(|line| line.split_once("--").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    uncommented
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The user and password ScyllaDB's `PasswordAuthenticator` asks for.
#[derive(Clone, PartialEq, Eq)]
pub struct ScyllaLogin {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for ScyllaLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScyllaLogin({:?}, ***)", self.user)
    }
}

impl ScyllaStore {
    /// Connects to `scylla://host:port[,host:port…]/keyspace[?rf=N][&dc=NAME]`, creating the
    /// keyspace (replication factor N in every datacenter, default 1) and the tables if they are
    /// absent; with `dc`, requests go to that datacenter's nodes. `login`: for a cluster with
    /// `PasswordAuthenticator`.
    pub async fn connect(uri: &str, login: Option<&ScyllaLogin>) -> Result<ScyllaStore> {
        let address = uri::parse_address(uri)?;
        let keyspace = parse_uri(uri)?.1;
        Self::open(&address, &keyspace, login, false).await
    }

    /// Connects to `scylla://host:port[,host:port…][?rf=N]` and creates `keyspace`, which must
    /// not exist yet, with the tables: a store of its own, for a test.
    pub async fn connect_fresh(
        uri: &str,
        keyspace: &str,
        login: Option<&ScyllaLogin>,
    ) -> Result<ScyllaStore> {
        let address = uri::parse_address(uri)?;
        if address.keyspace.is_some() {
            return Err(StoreError::BadAddress(format!(
                "{uri}: names a keyspace; connect_fresh takes the keyspace apart"
            )));
        }
        uri::check_keyspace(keyspace).map_err(StoreError::BadAddress)?;
        Self::open(&address, keyspace, login, true).await
    }

    async fn open(
        address: &uri::Address,
        keyspace: &str,
        login: Option<&ScyllaLogin>,
        fresh: bool,
    ) -> Result<ScyllaStore> {
        let (nodes, rf) = (&address.nodes, address.rf);
        let mut profile = ExecutionProfile::builder().consistency(Consistency::LocalQuorum);
        if let Some(dc) = &address.dc {
            profile = profile.load_balancing_policy(
                DefaultPolicy::builder()
                    .prefer_datacenter(dc.clone())
                    .token_aware(true)
                    .build(),
            );
        }
        let mut builder = SessionBuilder::new()
            .known_nodes(nodes)
            .default_execution_profile_handle(profile.build().into_handle());
        if let Some(login) = login {
            builder = builder.user(login.user.clone(), login.password.clone());
        }
        let session = builder
            .build()
            .await
            .map_err(|e| fail("connect")(format!("{}: {e}", nodes.join(","))))?;
        // NetworkTopologyStrategy with a bare replication_factor puts rf replicas in every
        // datacenter (and is what keyspaces with tablets require).
        let create = format!(
            "CREATE KEYSPACE {}{keyspace} WITH replication = \
             {{'class': 'NetworkTopologyStrategy', 'replication_factor': {rf}}}",
            if fresh { "" } else { "IF NOT EXISTS " }
        );
        session
            .query_unpaged(create, ())
            .await
            .map_err(|e| fail("create keyspace")(format!("{keyspace}: {e}")))?;
        session
            .use_keyspace(keyspace, false)
            .await
            .map_err(|e| fail("use keyspace")(format!("{keyspace}: {e}")))?;
        // Each schema change waits for the cluster to agree on it (the driver's default).
        for statement in cql_statements(SCHEMA) {
            session
                .query_unpaged(statement, ())
                .await
                .map_err(fail("create schema"))?;
        }
        let statements = Statements::prepare(&session).await?;
        tracing::info!(keyspace, rf, "scylla store connected");
        Ok(ScyllaStore {
            inner: Arc::new(Inner {
                session,
                keyspace: keyspace.to_owned(),
                statements,
            }),
        })
    }

    /// Splits a store address, `scylla://host:port[,host:port…]/keyspace[?rf=N][&dc=NAME]`, into its
    /// contact points, keyspace and replication factor (default 1).
    pub fn parse_uri(uri: &str) -> Result<(Vec<String>, String, u32)> {
        parse_uri(uri)
    }

    /// The keyspace this store lives in.
    pub fn keyspace(&self) -> &str {
        &self.inner.keyspace
    }

    fn st(&self) -> &Statements {
        &self.inner.statements
    }

    /// Runs a write (or any statement whose rows are not wanted).
    async fn exec<V: SerializeRow>(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: V,
    ) -> Result<()> {
        self.inner
            .session
            .execute_unpaged(statement, values)
            .await
            .map(drop)
            .map_err(fail(op))
    }

    /// The rows of a bounded read (a single row or a `LIMIT`), in one response.
    async fn rows<R, V: SerializeRow>(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: V,
    ) -> Result<Vec<R>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let result = self
            .inner
            .session
            .execute_unpaged(statement, values)
            .await
            .map_err(fail(op))?
            .into_rows_result()
            .map_err(fail(op))?;
        let rows = result
            .rows::<R>()
            .map_err(fail(op))?
            .collect::<std::result::Result<Vec<R>, _>>()
            .map_err(fail(op))?;
        Ok(rows)
    }

    /// The first row of a bounded read.
    async fn first<R, V: SerializeRow>(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: V,
    ) -> Result<Option<R>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        Ok(self.rows(op, statement, values).await?.into_iter().next())
    }

    /// Every row of a read whose size the store does not bound (a partition, a table), fetched
    /// page by page.
    async fn all<R, V: SerializeRow>(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: V,
    ) -> Result<Vec<R>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        self.inner
            .session
            .execute_iter(statement.clone(), values)
            .await
            .map_err(fail(op))?
            .rows_stream::<R>()
            .map_err(fail(op))?
            .try_collect()
            .await
            .map_err(fail(op))
    }
}

#[async_trait]
impl Store for ScyllaStore {
    fn backend(&self) -> &'static str {
        "scylla"
    }

    async fn apply(&self, batches: &[RoomBatch]) -> Result<()> {
        self.apply_batches(batches).await
    }

    async fn checkpoint(&self, room: &RoomId) -> Result<u64> {
        Ok(self.checkpoint_row(room.as_str()).await?.seq())
    }

    async fn checkpoints(&self) -> Result<Vec<(RoomId, u64)>> {
        self.all_checkpoints().await
    }

    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>> {
        self.state_of(room).await
    }

    async fn rooms_of(&self, user: &UserId, blocked: &HashSet<UserId>) -> Result<Vec<RoomSummary>> {
        self.summaries(user, blocked).await
    }

    async fn is_deleted(&self, room: &RoomId, seq: u64) -> Result<bool> {
        let message = self.message_at(room.as_str(), seq).await?;
        Ok(message.is_some_and(|m| m.deleted == Some(true)))
    }

    async fn read_cursor(&self, room: &RoomId, user: &UserId) -> Result<u64> {
        let seq: Option<(Option<i64>,)> = self
            .first(
                "read cursor",
                &self.st().cursor_get,
                (room.as_str(), user.as_str()),
            )
            .await?;
        Ok(seq.and_then(|(seq,)| seq).unwrap_or(0).max(0) as u64)
    }

    async fn member_cursors(&self, room: &RoomId) -> Result<Vec<MemberCursors>> {
        self.cursors_of(room.as_str()).await
    }

    async fn last_message_in(&self, room: &RoomId, after: u64, up_to: u64) -> Result<Option<u64>> {
        self.last_message(room.as_str(), after, up_to).await
    }

    async fn history(&self, room: &RoomId, query: PageQuery) -> Result<Page> {
        self.history_page(room.as_str(), query).await
    }

    async fn thread(&self, room: &RoomId, root: u64, query: PageQuery) -> Result<ThreadPage> {
        self.thread_page(room.as_str(), root, query).await
    }

    async fn find_id(&self, room: &RoomId, id: Uuid) -> Result<Option<IdHit>> {
        let hit: Option<(i64, Option<i64>)> = self
            .first("find id", &self.st().id_get, (room.as_str(), id))
            .await?;
        Ok(hit.map(|(seq, ts)| IdHit {
            seq: seq.max(0) as u64,
            ts: ts.unwrap_or(0),
        }))
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.all_dead_letters().await
    }

    async fn clear_room(&self, room: &RoomId) -> Result<()> {
        self.clear(room.as_str()).await
    }

    async fn digest(&self, room: Option<&RoomId>) -> Result<String> {
        self.digest_of(room).await
    }

    async fn report_projector(&self, status: &ProjectorStatus) -> Result<()> {
        self.put_projector(status).await
    }

    async fn projectors(&self) -> Result<Vec<ProjectorStatus>> {
        self.all_projectors().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_file_splits_into_its_tables() {
        let statements = cql_statements(SCHEMA);
        assert_eq!(statements.len(), 18, "{statements:#?}");
        for s in &statements {
            assert!(s.starts_with("CREATE TABLE IF NOT EXISTS "), "{s}");
            assert!(!s.contains("--"), "{s}");
        }
    }
}

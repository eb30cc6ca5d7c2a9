//! The PostgreSQL backend: a registry on a database server, which several
//! modrun nodes can share.
//!
//! # What is durable when
//!
//! Writes go through the same writer thread as the SQLite store's (group
//! commit: everything queued is applied in one transaction), on a
//! connection of its own. When a [`RunStore`] method returns, its change
//! is committed on the server. Reads use a pool of other connections
//! (deadpool) and see committed data only.
//!
//! # When the server cannot be reached
//!
//! A server that is down, restarting, refusing connections, out of disk,
//! or silent for longer than [`STATEMENT_WAIT`]: the store reports itself
//! unavailable ([`RunStore::health`]), refuses the writes someone waits on
//! with [`Error::RegistryUnavailable`], and holds a run's own updates,
//! reconnecting with backoff until they commit. Nothing is dropped silently.
//!
//! # Where the tables live
//!
//! In a schema of their own (`modrun` unless [`PostgresOptions::schema`]
//! says otherwise), created with its tables on first use. Migrations are
//! plain SQL files applied in order and recorded in the schema's
//! `schema_version` table, under an advisory lock so that nodes starting
//! together do not race. Text cannot hold NUL characters in PostgreSQL:
//! a NUL in a name, a message or an error is stored as U+FFFD.

mod sql;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::retention::nanos_clamped;
use super::writer::{Backend, Direct, NotCommitted, Outcome, Queue, Shared, Write};
use super::{
    Cleanup, EventFeed, Existing, NextDue, OnUnavailable, RunEvent, RunFilter, RunStore,
    RunSummary, StoreHealth, Wanted,
};
use crate::error::{Error, Result};
use crate::run::{LogEntry, Progress, Run, StatusChange, Transition};
use crate::sync::LockUnpoisoned;
use sql::{CancelSink, Node, Prepared, ReadError};

/// The migrations, in order: version `n` is the `n`-th file.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_nodes.sql"),
    include_str!("migrations/0003_events.sql"),
    include_str!("migrations/0004_queue.sql"),
    include_str!("migrations/0005_retention.sql"),
    include_str!("migrations/0006_idempotency.sql"),
    include_str!("migrations/0007_module_versions.sql"),
    include_str!("migrations/0008_module_heads.sql"),
    include_str!("migrations/0009_statement_notify.sql"),
    include_str!("migrations/0010_priority.sql"),
    include_str!("migrations/0011_grouped_notify.sql"),
    include_str!("migrations/0012_history_unchecked.sql"),
    include_str!("migrations/0013_node_listener.sql"),
    include_str!("migrations/0014_notify_by_index.sql"),
    include_str!("migrations/0015_notify_due.sql"),
];

/// How long a node's lease lasts unless [`PostgresOptions::lease`] says
/// otherwise; it is renewed every sixth of that.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The longest the writer waits for the server to answer a batch (or a
/// connection attempt) before it counts the server unavailable.
pub const STATEMENT_WAIT: Duration = Duration::from_secs(10);

/// How a [`PostgresStore`] is opened.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The schema that holds modrun's tables: 1 to 48 lowercase letters,
    /// digits and underscores, not starting with a digit.
    pub schema: String,
    /// The most writes committed in one transaction.
    pub max_batch: usize,
    /// The most connections kept open for reads.
    pub readers: usize,
    /// This node's name among the nodes sharing the database; unique to
    /// this process (the default, [`default_node_name`], is).
    pub node: String,
    /// How long this node's lease lasts: renewed every sixth of it, and
    /// once it has run out any other node settles this node's active runs
    /// as `Failed` ("node lost").
    pub lease: Duration,
}

impl Default for PostgresOptions {
    fn default() -> PostgresOptions {
        PostgresOptions {
            schema: "modrun".into(),
            max_batch: 4096,
            readers: 8,
            node: default_node_name(),
            lease: DEFAULT_LEASE,
        }
    }
}

/// The host name and the process id (`host:pid`): unique among the nodes
/// of one database, as a node name must be.
#[must_use]
pub fn default_node_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let named = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let host = if named {
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "localhost".to_owned()
    };
    format!("{host}:{}", std::process::id())
}

/// Runs in a PostgreSQL database that several nodes may share: the store
/// is the queue, each node holds a lease, and every write by the node
/// executing a run is fenced by that node and attempt.
pub struct PostgresStore {
    writes: Queue,
    /// This node's name.
    node: String,
    /// The module versions this node can run, for its heartbeats.
    versions: Arc<std::sync::Mutex<Option<Vec<String>>>>,
    /// Told when another node queues a run.
    queued: Arc<tokio::sync::Notify>,
    /// Offered when another node queues runs for later.
    due: Arc<NextDue>,
    /// When this node's last committed renewal began, and its lease.
    renewed: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    lease: Duration,
    pool: Pool,
    stop_heartbeats: Option<std::sync::mpsc::Sender<()>>,
    heartbeats: Option<std::thread::JoinHandle<()>>,
    /// Where the listener publishes other nodes' events, once connected.
    events: Arc<OnceLock<EventFeed>>,
    cancels: Arc<CancelSink>,
    /// Log lines of this node's runs, waiting to be announced.
    logs: Arc<Outbox>,
    stop_listening: CancellationToken,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The heartbeat thread can wake the writer: it ends first, then the
        // writer (as `writes` is dropped) once it has committed what it holds.
        self.stop_listening.cancel();
        drop(self.stop_heartbeats.take());
        if let Some(thread) = self.heartbeats.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.writes.shared.path)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL, or
    /// `key=value` settings), creates or migrates modrun's tables, and
    /// starts the writer.
    ///
    /// Fails with [`Error::Database`] saying why if the URL is malformed,
    /// the server cannot be reached, or its tables were written by a newer
    /// modrun.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<PostgresStore> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| Error::Database {
            path: PathBuf::from("(database URL)"),
            message: format!("the database URL is not valid: {e}"),
        })?;
        let place = describe_place(&config);
        let fail = |message: String| Error::Database {
            path: place.clone(),
            message,
        };
        check_schema_name(&options.schema).map_err(fail)?;
        let node_name = options.node.clone();
        if options.node.is_empty() || options.node.len() > 200 || options.node.contains('\0') {
            return Err(fail(format!(
                "{:?} is not a node name: use 1 to 200 characters, unique among the nodes",
                options.node
            )));
        }
        if options.lease < Duration::from_secs(1) {
            return Err(fail("a node's lease must last at least a second".into()));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(STATEMENT_WAIT);
        }
        config.keepalives_idle(Duration::from_secs(10));
        // A node frozen (or cut off) in the middle of a transaction would
        // hold its row locks for as long as it stays so: the server ends
        // such a session once it has idled in its transaction longer than
        // this node would wait for any answer.
        config.options(format!(
            "-c search_path={} -c idle_in_transaction_session_timeout={}",
            options.schema,
            STATEMENT_WAIT.as_millis()
        ));
        config.application_name("modrun");

        let (mut client, connection) = tokio::time::timeout(STATEMENT_WAIT, config.connect(NoTls))
            .await
            .map_err(|_| {
                fail(format!(
                    "the server did not answer within {STATEMENT_WAIT:?}"
                ))
            })?
            .map_err(|e| fail(format!("cannot connect: {}", describe(&e))))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut migrated = migrate(&mut client, &options.schema).await;
        if migrated.is_ok() {
            migrated = settle_previous_process(&client, &options.node).await;
        }
        drop(client);
        let _ = driver.await;
        migrated.map_err(fail)?;

        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.readers.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(STATEMENT_WAIT))
            .create_timeout(Some(STATEMENT_WAIT))
            .recycle_timeout(Some(STATEMENT_WAIT))
            .build()
            .map_err(|e| fail(format!("cannot set up its connection pool: {e}")))?;

        // Named apart from every other listener, so that the node that
        // settles this one's runs, should it be lost, can end its session.
        let listener = format!("{}{}", sql::LISTENER_PREFIX, uuid::Uuid::now_v7().simple());
        let mut config_for_listener = config.clone();
        config_for_listener.application_name(&listener);
        let shared = Arc::new(Shared::new(place.clone()));
        let cancels = Arc::new(CancelSink::default());
        let versions = Arc::new(std::sync::Mutex::new(None));
        let renewed = Arc::new(std::sync::Mutex::new(None));
        let node = Node {
            id: options.node.clone(),
            listener,
            lease: options.lease,
            cancels: cancels.clone(),
            versions: versions.clone(),
            renewed: renewed.clone(),
        };
        let backend = PgBackend::new(config, node).map_err(|e| fail(e.to_string()))?;
        let writes = Queue::start(
            backend,
            shared,
            options.max_batch,
            "modrun-postgres",
            Direct::Never,
        )
        .map_err(|e| fail(format!("cannot start its writer thread: {e}")))?;
        let (stop_heartbeats, stopped) = std::sync::mpsc::channel();
        let writer = writes.sender().ok_or(Error::RegistryClosed)?;
        let every = options.lease / 6;
        // The first heartbeat goes at once: the node is known before it
        // records any run.
        writer
            .send(Write::Heartbeat)
            .map_err(|_| Error::RegistryClosed)?;
        let heartbeats = std::thread::Builder::new()
            .name("modrun-heartbeat".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    if writer.send(Write::Heartbeat).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| fail(format!("cannot start its heartbeat thread: {e}")))?;
        let events = Arc::new(OnceLock::new());
        let queued = Arc::new(tokio::sync::Notify::new());
        let due = Arc::new(NextDue::default());
        let stop_listening = CancellationToken::new();
        let logs = Arc::new(Outbox::default());
        tokio::spawn(listen(
            config_for_listener,
            Listener {
                node: node_name,
                schema: options.schema.clone(),
                events: events.clone(),
                cancels: cancels.clone(),
                queued: queued.clone(),
                due: due.clone(),
                logs: logs.clone(),
            },
            stop_listening.clone(),
        ));
        let store = PostgresStore {
            writes,
            node: options.node.clone(),
            versions,
            queued,
            due,
            renewed,
            lease: options.lease,
            pool,
            stop_heartbeats: Some(stop_heartbeats),
            heartbeats: Some(heartbeats),
            events,
            cancels,
            logs,
            stop_listening,
        };
        // Claims go through the pooled connections, not the writer: the
        // node's row must be committed before anything is claimed, or
        // another node could take this one's first claims for a lost
        // node's and settle them. The flush follows the first heartbeat.
        store.writes.flush().await?;
        Ok(store)
    }

    /// Runs a read on a pooled connection.
    async fn read<T>(
        &self,
        query: impl AsyncFnOnce(&deadpool_postgres::ClientWrapper) -> Result<T, ReadError>,
    ) -> Result<T> {
        let client = self.pool.get().await.map_err(|e| self.pool_error(&e))?;
        match tokio::time::timeout(STATEMENT_WAIT, query(&client)).await {
            Err(_) => Err(Error::RegistryUnavailable {
                reason: format!(
                    "the database server did not answer within {STATEMENT_WAIT:?}: check that \
                     it is up and reachable"
                ),
            }),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(ReadError::Corrupt(e))) => Err(e),
            Ok(Err(ReadError::Database(e))) => Err(match unavailable_reason(&e) {
                Some(reason) => Error::RegistryUnavailable { reason },
                None => Error::Database {
                    path: self.writes.shared.path.clone(),
                    message: describe(&e),
                },
            }),
        }
    }

    fn pool_error(&self, e: &deadpool_postgres::PoolError) -> Error {
        use deadpool_postgres::PoolError;
        let reason = match e {
            PoolError::Backend(e) => match unavailable_reason(e) {
                Some(reason) => reason,
                None => {
                    return Error::Database {
                        path: self.writes.shared.path.clone(),
                        message: describe(e),
                    };
                }
            },
            PoolError::Timeout(_) => format!(
                "no connection to the database server within {STATEMENT_WAIT:?}: check that it \
                 is up and reachable"
            ),
            other => other.to_string(),
        };
        Error::RegistryUnavailable { reason }
    }
}

#[async_trait]
impl RunStore for PostgresStore {
    async fn insert(&self, run: &Run, existing: Existing, key: Option<&str>) -> Result<()> {
        self.writes.insert(run, existing, key).await
    }

    async fn store_module(&self, module_id: &str, hash: &str, bytes: &[u8]) -> Result<()> {
        let stored_at = nanos_clamped(Utc::now());
        self.read(async |client| {
            client
                .execute(sql::STORE_MODULE, &[&hash, &module_id, &bytes, &stored_at])
                .await?;
            Ok(())
        })
        .await
    }

    async fn has_module(&self, hash: &str) -> Result<bool> {
        self.read(async |client| Ok(client.query_opt(sql::HAS_MODULE, &[&hash]).await?.is_some()))
            .await
    }

    async fn module_bytes(&self, hash: &str, max_bytes: u64) -> Result<Option<(String, Vec<u8>)>> {
        let max = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        self.read(async |client| {
            let Some(row) = client.query_opt(sql::MODULE_BYTES, &[&hash, &max]).await? else {
                return Ok(None);
            };
            match row.get::<_, Option<Vec<u8>>>(1) {
                Some(bytes) => Ok(Some((row.get(0), bytes))),
                None => Err(ReadError::Corrupt(Error::Corrupt(format!(
                    "the component stored for module version {hash} is {} bytes, more than \
                     the {max_bytes} a module may have: it was not read",
                    row.get::<_, i32>(2)
                )))),
            }
        })
        .await
    }

    async fn publish_head(
        &self,
        module_id: &str,
        hash: &str,
        modified: DateTime<Utc>,
    ) -> Result<()> {
        let (modified, now) = (nanos_clamped(modified), nanos_clamped(Utc::now()));
        self.read(async |client| {
            let statement = client.prepare_cached(sql::PUBLISH_HEAD).await?;
            client
                .execute(
                    &statement,
                    &[&module_id, &hash, &modified, &self.node.as_str(), &now],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn heads(&self) -> Result<Vec<super::ModuleHead>> {
        let rows = self
            .read(async |client| {
                let statement = client.prepare_cached(sql::HEADS).await?;
                Ok(client.query(&statement, &[]).await?)
            })
            .await?;
        // Written by any node: a row that does not read as a head is
        // skipped. A node looks a head up by the id of a module it loaded,
        // and checks the bytes it fetches against the hash.
        Ok(rows
            .iter()
            .filter_map(|row| {
                let module_id: String = row.try_get(0).ok()?;
                let hash: String = row.try_get(1).ok()?;
                let modified: i64 = row.try_get(2).ok()?;
                let node: String = row.try_get(3).ok()?;
                Some(super::ModuleHead {
                    module_id,
                    hash,
                    modified: DateTime::from_timestamp_nanos(modified),
                    node,
                })
            })
            .collect())
    }

    async fn run_by_key(&self, key: &str) -> Result<Option<Run>> {
        self.read(async |client| sql::select_run_by_key(client, key).await)
            .await
    }

    async fn replace(&self, run: &Run, change: Option<&StatusChange>) -> Result<()> {
        self.writes.replace(run, change).await
    }

    async fn transition(
        &self,
        change: &Transition,
        unavailable: OnUnavailable,
    ) -> Result<Option<String>> {
        self.writes.transition(change, unavailable).await
    }

    async fn set_progress(&self, run_id: &str, progress: &Progress) -> Result<Option<String>> {
        self.writes.set_progress(run_id, progress).await
    }

    fn record_progress(&self, run_id: &str, progress: &Progress) -> Result<()> {
        self.writes.record_progress(run_id, progress)
    }

    async fn set_log(&self, run_id: &str, log: &[LogEntry]) -> Result<bool> {
        self.writes.set_log(run_id, log).await
    }

    fn record_log(&self, run_id: &str, log: Vec<LogEntry>) -> Result<()> {
        self.writes.record_log(run_id, log)
    }

    async fn get(&self, run_id: &str) -> Result<Option<Run>> {
        self.read(async |client| sql::select_run(client, run_id).await)
            .await
    }

    async fn list(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        self.read(async |client| sql::select_runs(client, filter).await)
            .await
    }

    async fn list_summaries(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        self.read(async |client| sql::select_summaries(client, filter).await)
            .await
    }

    async fn history(&self, run_id: &str) -> Result<Vec<StatusChange>> {
        self.read(async |client| sql::select_history(client, run_id).await)
            .await
    }

    async fn remove_finished(&self, cleanup: &Cleanup, limit: usize) -> Result<usize> {
        self.writes.remove_finished(cleanup, limit).await
    }

    async fn count_finished(&self, cleanup: &Cleanup) -> Result<usize> {
        self.read(async |client| sql::count_finished(client, cleanup).await)
            .await
    }

    async fn nodes(&self) -> Result<Vec<super::NodeStatus>> {
        self.read(async |client| sql::nodes(client).await).await
    }

    async fn tally(&self, since: DateTime<Utc>, limit: usize) -> Result<super::Tally> {
        self.read(async |client| sql::tally(client, since, limit).await)
            .await
    }

    async fn disk_bytes(&self) -> Result<Option<u64>> {
        self.read(async |client| {
            let row = client
                .query_one(
                    "SELECT (pg_total_relation_size('runs') \
                     + pg_total_relation_size('run_history'))::bigint",
                    &[],
                )
                .await?;
            Ok(u64::try_from(row.get::<_, i64>(0)).ok())
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.writes.flush().await
    }

    fn health(&self) -> StoreHealth {
        self.writes.shared.health()
    }

    fn announce_log(&self, run_id: &str, module_id: &str, entry: &LogEntry) {
        self.logs.push(run_id, module_id, entry);
    }

    fn connect_events(&self, events: EventFeed, cancels: mpsc::Sender<String>) {
        let _ = self.events.set(events);
        self.cancels.connect(cancels);
    }

    async fn request_cancel(&self, run_id: &str) -> Result<Option<String>> {
        self.writes.request_cancel(run_id).await
    }

    fn is_shared_queue(&self) -> bool {
        true
    }

    fn queued_elsewhere(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.queued.clone())
    }

    fn due_elsewhere(&self) -> Option<Arc<NextDue>> {
        Some(self.due.clone())
    }

    async fn next_due(&self, after: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        self.read(async |client| Ok(sql::next_due(client, after).await?))
            .await
    }

    async fn enqueue(&self, run: &Run, max_attempts: u32, key: Option<&str>) -> Result<()> {
        self.writes.enqueue_run(run, max_attempts, key).await
    }

    async fn claim(&self, wanted: &[Wanted], limit: usize) -> Result<Vec<Run>> {
        if wanted.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        self.read(async |client| sql::claim(client, &self.node, wanted, limit).await)
            .await
    }

    async fn release(&self, run_ids: &[String], reason: &str) -> Result<Vec<(String, String)>> {
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.read(async |client| sql::release(client, &self.node, run_ids, reason).await)
            .await
    }

    async fn claimed(&self) -> Result<Vec<String>> {
        self.read(async |client| {
            let statement = client.prepare_cached(sql::CLAIMED).await?;
            let rows = client.query(&statement, &[&self.node]).await?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
        .await
    }

    async fn queued_versions(&self) -> Result<Vec<String>> {
        self.read(async |client| {
            let statement = client.prepare_cached(sql::QUEUED_VERSIONS).await?;
            let rows = client.query(&statement, &[]).await?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
        .await
    }

    fn lease_left(&self) -> Option<Duration> {
        // A quarter of the lease is kept in hand: the node stops its runs
        // before any other node may settle them.
        let renewed = (*self.renewed.lock_unpoisoned())?;
        Some((self.lease * 3 / 4).saturating_sub(renewed.elapsed()))
    }

    fn publish_versions(&self, versions: Vec<String>) {
        let changed = {
            let mut known = self.versions.lock_unpoisoned();
            let changed = known.as_ref() != Some(&versions);
            *known = Some(versions);
            changed
        };
        // The other nodes hear of it now rather than at the next heartbeat.
        if changed && let Some(writer) = self.writes.sender() {
            let _ = writer.send(Write::Heartbeat);
        }
    }
}

/// The writer's connection, made (and remade after a loss) on a runtime of
/// the writer thread's own.
struct PgBackend {
    runtime: tokio::runtime::Runtime,
    config: tokio_postgres::Config,
    node: Node,
    session: Option<Session>,
}

struct Session {
    client: tokio_postgres::Client,
    prepared: Prepared,
    /// Runs this session has added, and how many it adds before the
    /// server plans its statements again ([`Session::replan_as_it_grows`]).
    added: u64,
    replan_at: u64,
}

/// How many runs a session adds before the server plans its statements
/// again the first time; each time after, twice as many.
const FIRST_REPLAN: u64 = 1_000;

impl Session {
    /// Has the server plan this session's statements again each time the
    /// runs it has added double. A prepared statement keeps the plan made
    /// after its first few executions until the table is next analyzed
    /// (autovacuum: a minute or more later): planned while the table was
    /// small, it reads the whole table (a hash join on a sequential scan)
    /// where an index finds the few rows, and a run's end costs more the
    /// more runs the table holds. Planned again, the server sizes the
    /// table as it now is.
    async fn replan_as_it_grows(&mut self, batch: &[Write]) -> Result<(), tokio_postgres::Error> {
        self.added += batch
            .iter()
            .filter(|write| matches!(write, Write::Insert(..) | Write::Enqueue(..)))
            .count() as u64;
        if self.added >= self.replan_at {
            self.replan_at = self.added.saturating_mul(2);
            self.client.batch_execute("DISCARD PLANS").await?;
        }
        Ok(())
    }
}

impl PgBackend {
    fn new(config: tokio_postgres::Config, node: Node) -> std::io::Result<PgBackend> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(PgBackend {
            runtime,
            config,
            node,
            session: None,
        })
    }

    async fn connect(
        config: &tokio_postgres::Config,
        node: &Node,
    ) -> Result<Session, NotCommitted> {
        let (client, connection) = config.connect(NoTls).await.map_err(|e| not_committed(&e))?;
        // Driven by this thread's runtime, during each `block_on`.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        // Names this node in the status changes it announces, so that its
        // own listener skips them.
        client
            .execute(sql::SESSION_NODE, &[&node.id])
            .await
            .map_err(|e| not_committed(&e))?;
        // The writer's statements are planned once per session (and again
        // as the table grows, above), never per execution. Left to choose,
        // the server planned a batch of one run's progress or end afresh
        // every other time (its plan for one run looked cheaper than the
        // plan kept for any number): 0.2-0.3 ms each, on the path of every
        // one-at-a-time run. (A plan kept while the table holds a few
        // thousand runs or fewer may read all of them rather than use an
        // index; the plans made as the table doubles use the indexes.)
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .await
            .map_err(|e| not_committed(&e))?;
        Ok(Session {
            client,
            prepared: Prepared::default(),
            added: 0,
            replan_at: FIRST_REPLAN,
        })
    }

    async fn try_commit(
        config: &tokio_postgres::Config,
        node: &Node,
        session: &mut Option<Session>,
        batch: &[Write],
    ) -> Result<Vec<Outcome>, NotCommitted> {
        if session.as_ref().is_none_or(|s| s.client.is_closed()) {
            *session = Some(PgBackend::connect(config, node).await?);
        }
        let session = session.as_mut().expect("connected above");
        session
            .replan_as_it_grows(batch)
            .await
            .map_err(|e| not_committed(&e))?;
        let Session {
            client, prepared, ..
        } = session;
        if let Some(outcomes) = sql::apply_in_one_trip(client, prepared, node, batch)
            .await
            .map_err(|e| not_committed(&e))?
        {
            return Ok(outcomes);
        }
        let tx = client.transaction().await.map_err(|e| not_committed(&e))?;
        let pipelined = sql::apply_pipelined(&tx, prepared, node, batch)
            .await
            .map_err(|e| not_committed(&e))?;
        if let Some(outcomes) = pipelined {
            tx.commit().await.map_err(|e| not_committed(&e))?;
            return Ok(outcomes);
        }
        // A write needs answers before it knows what to write: again, one
        // write at a time.
        tx.rollback().await.map_err(|e| not_committed(&e))?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let tx = client.transaction().await.map_err(|e| not_committed(&e))?;
        for write in batch {
            match sql::apply(&tx, prepared, node, write).await {
                Ok(outcome) => outcomes.push(outcome),
                Err(e) => return Err(not_committed(&e)),
            }
        }
        tx.commit().await.map_err(|e| not_committed(&e))?;
        Ok(outcomes)
    }
}

impl Backend for PgBackend {
    fn commit(&mut self, batch: &[Write]) -> Result<Vec<Outcome>, NotCommitted> {
        let PgBackend {
            runtime,
            config,
            node,
            session,
        } = self;
        let began = std::time::Instant::now();
        let committed = runtime.block_on(async {
            tokio::time::timeout(
                STATEMENT_WAIT,
                PgBackend::try_commit(config, node, session, batch),
            )
            .await
        });
        let result = committed.unwrap_or_else(|_| {
            Err(NotCommitted::Unavailable(format!(
                "the database server did not answer within {STATEMENT_WAIT:?}: check that it \
                 is up and reachable"
            )))
        });
        if matches!(result, Err(NotCommitted::Unavailable(_))) {
            // The connection may be half-open or mid-transaction: start afresh.
            *session = None;
        }
        if result.is_ok() && batch.iter().any(|write| matches!(write, Write::Heartbeat)) {
            *node.renewed.lock_unpoisoned() = Some(began);
        }
        result
    }
}

/// Creates the schema and applies the migrations it lacks, under an
/// advisory lock that other nodes starting meanwhile wait for.
async fn migrate(client: &mut tokio_postgres::Client, schema: &str) -> Result<(), String> {
    let failed = |e: tokio_postgres::Error| format!("cannot set up its tables: {}", describe(&e));
    let tx = client.transaction().await.map_err(failed)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('modrun schema ' || $1))",
        &[&schema],
    )
    .await
    .map_err(failed)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}; \
         CREATE TABLE IF NOT EXISTS {schema}.schema_version (version INTEGER NOT NULL); \
         INSERT INTO {schema}.schema_version SELECT 0 \
         WHERE NOT EXISTS (SELECT 1 FROM {schema}.schema_version);"
    ))
    .await
    .map_err(failed)?;
    let version: i32 = tx
        .query_one(&format!("SELECT version FROM {schema}.schema_version"), &[])
        .await
        .map_err(failed)?
        .get(0);
    let known = i32::try_from(MIGRATIONS.len()).expect("a handful of migrations");
    if version > known {
        return Err(format!(
            "its tables (schema {schema}) were written by a newer modrun (schema version \
             {version}, this modrun knows up to {known}); upgrade modrun"
        ));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(migration).await.map_err(failed)?;
        tx.execute(
            &format!("UPDATE {schema}.schema_version SET version = $1"),
            &[&(index as i32 + 1)],
        )
        .await
        .map_err(failed)?;
    }
    tx.commit().await.map_err(failed)
}

/// Settles the runs a previous process with this node's name left active:
/// it is gone, and they can no longer end.
async fn settle_previous_process(
    client: &tokio_postgres::Client,
    node: &str,
) -> Result<(), String> {
    let settled: i64 = client
        .query_one(
            sql::RESTARTED,
            &[
                &sql::nanos(Utc::now()),
                &crate::run::EXIT_FAILURE,
                &super::INTERRUPTED,
                &node,
            ],
        )
        .await
        .map_err(|e| {
            format!(
                "cannot settle the runs of node {node}'s last process: {}",
                describe(&e)
            )
        })?
        .get(0);
    if settled > 0 {
        tracing::warn!(
            node,
            runs = settled,
            "marked interrupted the runs this node's previous process left unfinished"
        );
    }
    Ok(())
}

fn check_schema_name(schema: &str) -> Result<(), String> {
    let mut chars = schema.chars();
    // Its notification channels ("<schema>_control") must fit in 63 bytes.
    let valid = (1..=48).contains(&schema.len())
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{schema:?} is not a schema name modrun uses: 1 to 48 lowercase letters, digits \
             and '_', not starting with a digit"
        ))
    }
}

/// How messages name the database: its address, never its password.
fn describe_place(config: &tokio_postgres::Config) -> PathBuf {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    PathBuf::from(format!("postgres://{host}:{port}/{database}"))
}

/// The error as the batch's caller hears it.
fn not_committed(e: &tokio_postgres::Error) -> NotCommitted {
    match unavailable_reason(e) {
        Some(reason) => NotCommitted::Unavailable(reason),
        None => NotCommitted::Rejected(describe(e)),
    }
}

/// Why the database cannot be written for now, if `e` says so: the server
/// is unreachable, restarting, out of space, or read-only. Anything else
/// is an answer about the statement itself.
fn unavailable_reason(e: &tokio_postgres::Error) -> Option<String> {
    let Some(db) = e.as_db_error() else {
        // The client's own errors: a lost or refused connection is the
        // server out of reach; anything else (a value it cannot send) is not.
        let mut source = std::error::Error::source(e);
        let mut io = false;
        while let Some(cause) = source {
            io |= cause.is::<std::io::Error>();
            source = cause.source();
        }
        return (e.is_closed() || io).then(|| {
            format!(
                "cannot reach the database server: {}; check that it is up and reachable",
                describe(e)
            )
        });
    };
    let code = db.code().code();
    Some(match code {
        // Connection exceptions, a server shutting down or starting up,
        // lost serialization races and deadlocks: try again.
        _ if code.starts_with("08") || code.starts_with("57P") => {
            format!("the database server is not taking work: {}", db.message())
        }
        "40001" | "40P01" => format!("the database server aborted a commit: {}", db.message()),
        // Insufficient resources: a full disk, too many connections.
        _ if code.starts_with("53") => {
            format!("the database server is out of resources: {}", db.message())
        }
        "25006" => {
            "the database server is read-only (a standby?): point modrun at the primary".to_owned()
        }
        _ => return None,
    })
}

/// The server's words for an error, with its SQLSTATE, or the client's.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

/// What a node's listener hears about and where it tells it.
struct Listener {
    node: String,
    schema: String,
    events: Arc<OnceLock<EventFeed>>,
    cancels: Arc<CancelSink>,
    /// Told when another node queues a run (or gives one back).
    queued: Arc<tokio::sync::Notify>,
    /// Offered the earliest not-before time another node announces of
    /// the runs it queued for later.
    due: Arc<NextDue>,
    /// Log lines of this node's runs, announced every [`LOG_EVERY`].
    logs: Arc<Outbox>,
}

/// How often a node announces the log lines its runs wrote: one
/// notification per flush, never one per line.
const LOG_EVERY: Duration = Duration::from_millis(100);

/// The most log lines waiting to be announced; past it, lines are not
/// announced (they are still saved with their run).
const OUTBOX_LINES: usize = 1000;

/// The longest log message announced; longer ones are cut (the saved log
/// keeps them whole).
const ANNOUNCED_CHARS: usize = 1000;

/// The most bytes of one notification's payload (PostgreSQL refuses 8000).
const NOTIFY_BYTES: usize = 7000;

/// Log lines waiting to be announced to the other nodes.
#[derive(Default)]
struct Outbox {
    lines: std::sync::Mutex<Vec<(String, String, LogEntry)>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl Outbox {
    fn push(&self, run_id: &str, module_id: &str, entry: &LogEntry) {
        let mut lines = self.lines.lock_unpoisoned();
        if lines.len() >= OUTBOX_LINES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut entry = entry.clone();
        if let Some((cut, _)) = entry.message.char_indices().nth(ANNOUNCED_CHARS) {
            entry.message.truncate(cut);
            entry.message.push('…');
        }
        lines.push((run_id.to_owned(), module_id.to_owned(), entry));
    }

    /// The waiting lines as notification payloads, each small enough.
    fn take_payloads(&self, node: &str) -> Vec<String> {
        let lines = std::mem::take(&mut *self.lines.lock_unpoisoned());
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "log lines came faster than they could be announced to the other nodes; some were not"
            );
        }
        let node = serde_json::to_string(node).unwrap_or_default();
        let payload = |lines: &str| format!("{{\"node\":{node},\"log\":[{lines}]}}");
        let mut payloads = Vec::new();
        let mut current = String::new();
        for line in lines {
            let Ok(line) = serde_json::to_string(&line) else {
                continue;
            };
            if !current.is_empty() && current.len() + line.len() + 2 > NOTIFY_BYTES {
                payloads.push(payload(&current));
                current.clear();
            }
            if !current.is_empty() {
                current.push(',');
            }
            current.push_str(&line);
        }
        if !current.is_empty() {
            payloads.push(payload(&current));
        }
        payloads
    }
}

/// The longest a listener waits before it connects again, after a loss.
const LISTEN_RETRY: Duration = Duration::from_secs(2);

/// How far before a loss of notifications a listener reads the changes
/// again: nodes stamp changes with their own clocks, which may differ.
const CATCH_UP_MARGIN: Duration = Duration::from_secs(10);

/// The most status changes a listener reads again after a loss.
const CATCH_UP_LIMIT: i64 = 10_000;

/// Listens, on a connection of its own, to the status changes other nodes
/// announce and to the cancels asked of this node; reconnects with backoff
/// after a loss. Notifications sent meanwhile are lost, so a listener that
/// connects again reads the status changes recorded since then from the
/// database (publishing those its feed does not have), and the cancels
/// asked of this node (read at every heartbeat too).
async fn listen(config: tokio_postgres::Config, listener: Listener, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let missed_since = Arc::new(AtomicI64::new(0));
    while !stop.is_cancelled() {
        match listen_once(&config, &listener, &stop, &missed_since).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %describe(&e), "lost the database listener; reconnecting");
            }
        }
        mark_missed(&missed_since);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(LISTEN_RETRY);
    }
}

/// Notes that notifications are being missed from now, unless they were
/// already: the changes recorded since the first loss are read again.
fn mark_missed(missed_since: &AtomicI64) {
    let now = nanos_clamped(Utc::now());
    let _ = missed_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
}

async fn listen_once(
    config: &tokio_postgres::Config,
    listener: &Listener,
    stop: &CancellationToken,
    missed_since: &Arc<AtomicI64>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (notes, mut heard) = mpsc::channel(1024);
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let missed = missed_since.clone();
    let driver = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    // A listener that falls behind drops notifications
                    // rather than grow without bound, and reads the
                    // changes again once it has caught up.
                    if notes.try_send(note).is_err() {
                        mark_missed(&missed);
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let schema = &listener.schema;
    client
        .batch_execute(&format!("LISTEN {schema}_events; LISTEN {schema}_control"))
        .await?;
    // Cancels asked while this node was not listening.
    let pending = client
        .query(sql::PENDING_CANCELS, &[&listener.node])
        .await?;
    for row in pending {
        listener.cancels.send(row.get(0));
    }
    let mut flush = tokio::time::interval(LOG_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if heard.is_empty() {
            let since = missed_since.swap(0, Ordering::Relaxed);
            if since != 0 {
                listener.catch_up(&client, since).await?;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = flush.tick() => {
                let payloads = listener.logs.take_payloads(&listener.node);
                if !payloads.is_empty() {
                    client.execute(sql::ANNOUNCE, &[&payloads]).await?;
                }
            }
            note = heard.recv() => match note {
                Some(note) => listener.hear(note.channel(), note.payload()),
                None => break,
            },
        }
    }
    drop(client);
    match driver.await {
        Ok(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

/// What a node announces, one kind per notification: its status changes
/// (one notification per statement that records them,
/// `0011_grouped_notify.sql`), or the progress or log lines of its runs
/// (one per batch the writer commits). Read in one pass.
#[derive(serde::Deserialize)]
struct Notice {
    /// In the order they were recorded.
    statuses: Option<Vec<Announced>>,
    /// (run id, module id, fraction, message)
    progress: Option<Vec<(String, String, f64, String)>>,
    /// (run id, module id, entry)
    log: Option<Vec<(String, String, LogEntry)>>,
    /// The earliest not-before time (nanoseconds) of the runs these
    /// changes queued for later, if any.
    due: Option<i64>,
}

/// The node that announced a notification, read without the rest of it
/// (nothing else is kept): a node skips its own announcements, which are
/// most of what it hears.
#[derive(serde::Deserialize)]
struct Announcer<'a> {
    #[serde(borrow)]
    node: Option<std::borrow::Cow<'a, str>>,
}

/// A status change as a node announces it: a JSON array of these fields,
/// in this order.
#[derive(serde::Deserialize)]
struct Announced {
    run_id: String,
    module_id: String,
    status: String,
    at: i64,
    message: Option<String>,
    /// The run waits, queued, for any node to claim it.
    claimable: bool,
}

/// A cancel asked of a node.
#[derive(serde::Deserialize)]
struct CancelAsked {
    run_id: String,
    node: Option<String>,
}

impl Listener {
    /// Publishes another node's status change, or hands over a cancel asked
    /// of this one. A payload that does not parse is another program's (or
    /// a hostile row's): it is logged and ignored.
    fn hear(&self, channel: &str, payload: &str) {
        if channel.ends_with("_control") {
            match serde_json::from_str::<CancelAsked>(payload) {
                Ok(asked) if asked.node.as_deref() == Some(self.node.as_str()) => {
                    self.cancels.send(asked.run_id);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "ignored a cancel notification that does not parse")
                }
            }
            return;
        }
        let announcer = match serde_json::from_str::<Announcer>(payload) {
            Ok(announcer) => announcer,
            Err(e) => {
                tracing::warn!(error = %e, "ignored a status notification that does not parse");
                return;
            }
        };
        if announcer.node.as_deref() == Some(self.node.as_str()) {
            return; // This node published it already.
        }
        let notice = match serde_json::from_str::<Notice>(payload) {
            Ok(Notice {
                statuses: None,
                progress: None,
                log: None,
                ..
            }) => {
                tracing::warn!("ignored a status notification that announces nothing");
                return;
            }
            Ok(notice) => notice,
            Err(e) => {
                tracing::warn!(error = %e, "ignored a status notification that does not parse");
                return;
            }
        };
        if let Some(due) = notice.due {
            self.due.offer(DateTime::from_timestamp_nanos(due));
        }
        for announced in notice.statuses.into_iter().flatten() {
            let Ok(status) = announced.status.parse() else {
                tracing::warn!(status = %announced.status, "ignored a status notification with an unknown status");
                continue;
            };
            if announced.claimable {
                self.queued.notify_one();
            }
            self.publish(RunEvent::Status {
                run_id: announced.run_id,
                module_id: announced.module_id,
                change: crate::run::StatusChange {
                    status,
                    at: DateTime::from_timestamp_nanos(announced.at),
                    message: announced.message,
                },
            });
        }
        for (run_id, module_id, entry) in notice.log.into_iter().flatten() {
            self.publish(RunEvent::Log {
                run_id,
                module_id,
                entry,
            });
        }
        for (run_id, module_id, fraction, message) in notice.progress.into_iter().flatten() {
            self.publish(RunEvent::Progress {
                run_id,
                module_id,
                progress: crate::run::Progress { fraction, message },
            });
        }
    }

    /// Publishes the status changes recorded since `since` (nanoseconds,
    /// less a margin) that this node's feed does not have: those announced
    /// while it was not listening. Runs may have been queued meanwhile too.
    async fn catch_up(
        &self,
        client: &tokio_postgres::Client,
        since: i64,
    ) -> Result<(), tokio_postgres::Error> {
        let Some(feed) = self.events.get() else {
            return Ok(());
        };
        let margin = i64::try_from(CATCH_UP_MARGIN.as_nanos()).unwrap_or(i64::MAX);
        let rows = client
            .query(
                sql::CHANGED_SINCE,
                &[&since.saturating_sub(margin), &CATCH_UP_LIMIT],
            )
            .await?;
        let has = feed.has_status();
        let mut published = 0;
        for row in rows {
            let (run_id, module_id): (String, String) = (row.get(0), row.get(1));
            let Ok(status) = row.get::<_, String>(2).parse() else {
                continue;
            };
            let at: i64 = row.get(3);
            if has(&run_id, status, at) {
                continue;
            }
            published += 1;
            let message = row.get(4);
            feed.publish(|| RunEvent::Status {
                run_id,
                module_id,
                change: crate::run::StatusChange {
                    status,
                    at: DateTime::from_timestamp_nanos(at),
                    message,
                },
            });
        }
        tracing::info!(
            published,
            "read again the status changes announced while not listening"
        );
        self.queued.notify_one();
        // Runs queued for later meanwhile were announced with their time:
        // the claimer is told the next one, as it would have been.
        if let Some(at) = sql::next_due(client, Utc::now()).await? {
            self.due.offer(at);
        }
        Ok(())
    }

    fn publish(&self, event: RunEvent) {
        if let Some(events) = self.events.get() {
            events.publish(|| event);
        }
    }
}

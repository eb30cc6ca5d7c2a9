//! Opening a registry file: the lock beside it, the connection settings,
//! the versioned migrations, recovery of runs a previous process left
//! unfinished, and SQLite's errors put in words.

use crate::registry::INTERRUPTED;
use std::fs::File;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::Synchronous;
use super::sql::apply_transition;
use crate::error::Error;
use crate::run::{EXIT_FAILURE, Transition};

/// The schema, one migration per schema version, applied in order.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_run_log.sql"),
    include_str!("migrations/0003_retention.sql"),
    include_str!("migrations/0004_idempotency.sql"),
    include_str!("migrations/0005_queue.sql"),
    include_str!("migrations/0006_priority.sql"),
    include_str!("migrations/0007_finished_condition.sql"),
];

/// How long the writer waits for a lock another process holds before it
/// calls the registry unavailable. No other modrun writes the file (the lock
/// file sees to that), so only a foreign process (a `sqlite3` shell, a
/// backup tool) can hold one: a start should hear about it quickly.
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_millis(250);

/// Takes the exclusive lock beside the registry file (`<file>.lock`).
pub(super) fn take_lock(path: &Path) -> Result<File, Error> {
    let fail = |message: String| Error::Database {
        path: path.to_path_buf(),
        message,
    };
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| fail(format!("cannot create its lock file: {e}")))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::RegistryInUse {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(fail(format!("cannot lock it: {e}"))),
    }
}

/// Opens the writer's connection: checks the file, migrates it, marks runs a
/// previous process left unfinished as interrupted.
pub(super) fn open_writer(path: &Path, synchronous: Synchronous) -> Result<Connection, String> {
    let mut conn =
        Connection::open(path).map_err(|e| format!("cannot open the file: {}", describe(&e)))?;
    prepare_writer(&mut conn, synchronous)?;
    migrate(&mut conn)?;
    mark_interrupted(&mut conn).map_err(|e| {
        format!(
            "cannot mark unfinished runs as interrupted: {}",
            describe(&e)
        )
    })?;
    if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
        return Err(
            "the file can only be opened read-only; modrun must be able to write it".into(),
        );
    }
    Ok(conn)
}

fn prepare_writer(conn: &mut Connection, synchronous: Synchronous) -> Result<(), String> {
    conn.busy_timeout(WRITER_BUSY_TIMEOUT)
        .map_err(|e| describe(&e))?;
    // Reading the schema is the first thing that fails on a file that is
    // not a database, before anything is written to it.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(|e| describe(&e))?;
    incremental_vacuum(conn)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(|e| describe(&e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "cannot switch it to WAL journaling (it stays in {mode} mode)"
        ));
    }
    conn.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        },
    )
    .map_err(|e| describe(&e))?;
    // An 8 MiB page cache: what the writer touches is the tails of the
    // tables and indexes it appends to. Not more: SQLite walks its whole
    // cache at the end of every transaction in which a b-tree page split
    // (it numbers a page past the end of the file for a moment, then drops
    // cached pages past the end). With 64 MiB, once the file filled it,
    // that walk took 9 % of all CPU at 150,000 runs from 64 callers; now
    // 1.5 %, with no more reads of the file.
    // Checkpoints (copying the log into the database file) are mostly the
    // checkpoint thread's job: the store replaces SQLite's own automatic
    // checkpoints with its watch on the log (see `watch_log`). When the log
    // starts over, its file is cut back to 16 MiB.
    conn.pragma_update(None, "cache_size", -8192)
        .and_then(|()| conn.pragma_update(None, "journal_size_limit", 16 << 20))
        .map_err(|e| describe(&e))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Puts the file in incremental auto-vacuum mode, so that the space of
/// removed runs goes back to the filesystem as cleanups go: a new file
/// before anything is written to it, a file an older modrun made by
/// rewriting it once (`VACUUM`, which takes a while on a large file).
fn incremental_vacuum(conn: &Connection) -> Result<(), String> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
        .map_err(|e| describe(&e))?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |row| row.get(0))
        .map_err(|e| describe(&e))?;
    conn.pragma_update(None, "auto_vacuum", INCREMENTAL)
        .map_err(|e| describe(&e))?;
    if pages > 0 {
        tracing::info!("rewriting the registry file once, so that cleanups give space back");
        conn.execute_batch("VACUUM")
            .map_err(|e| format!("cannot rewrite it for incremental vacuum: {}", describe(&e)))?;
    }
    Ok(())
}

/// A connection that only reads, for use off the writer thread.
pub(super) fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The file's schema version (0 for a file modrun never wrote); refused if
/// a newer modrun wrote it.
pub(super) fn schema_version(conn: &Connection) -> Result<i64, String> {
    let known = MIGRATIONS.len() as i64;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| describe(&e))?;
    if version > known {
        return Err(format!(
            "its schema version is {version}, newer than this modrun knows ({known}); \
             use a newer modrun or another file"
        ));
    }
    Ok(version)
}

fn migrate(conn: &mut Connection) -> Result<(), String> {
    let version = schema_version(conn)?;
    for (version, migration) in (1..).zip(MIGRATIONS).skip(version as usize) {
        let mut step = || -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()
        };
        step().map_err(|e| {
            format!(
                "cannot bring its schema to version {version}: {}",
                describe(&e)
            )
        })?;
    }
    Ok(())
}

/// Marks the runs a previous process left unfinished as failed: those it
/// was executing, and the queued plain tasks (their work was a future in
/// that process). Queued module runs stay queued, for a runner to resume
/// ([`ModuleRunner::resume_queued`](crate::ModuleRunner::resume_queued)).
fn mark_interrupted(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let unfinished: Vec<String> = tx
        .prepare(
            "SELECT run_id FROM runs WHERE status = 'running' \
             OR (status = 'queued' AND module_version IS NULL)",
        )?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for run_id in unfinished {
        let change = Transition::failed(run_id, EXIT_FAILURE, INTERRUPTED);
        apply_transition(&tx, &change)?;
    }
    tx.commit()
}

/// Why the file cannot be written for now, in words, if `e` is that kind of
/// failure (the disk, a lock, the file itself) rather than a bad value.
pub(super) fn unavailable_reason(e: &rusqlite::Error) -> Option<String> {
    use rusqlite::ErrorCode::{
        CannotOpen, DatabaseBusy, DatabaseCorrupt, DatabaseLocked, DiskFull,
        FileLockingProtocolFailed, NotADatabase, OutOfMemory, ReadOnly, SystemIoFailure,
    };
    Some(match e.sqlite_error_code()? {
        DiskFull => "the disk is full: free space where the registry file lives".into(),
        DatabaseBusy | DatabaseLocked | FileLockingProtocolFailed => {
            "another process holds a lock on the registry file: end that process's \
             transaction (a sqlite3 shell, a backup tool)"
                .into()
        }
        ReadOnly => "the registry file cannot be written: check its permissions".into(),
        CannotOpen => "the registry file cannot be opened: check that it and its directory \
                       still exist"
            .into(),
        SystemIoFailure => format!("the disk failed to read or write the registry file: {e}"),
        DatabaseCorrupt | NotADatabase => {
            "the registry file is damaged: restore it from a backup".into()
        }
        OutOfMemory => "SQLite ran out of memory".into(),
        _ => return None,
    })
}

/// A read's error as the library reports it.
pub(super) fn storage_error(path: &Path, e: &rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..) => Error::Corrupt(describe(e)),
        _ => match unavailable_reason(e) {
            Some(reason) => Error::RegistryUnavailable { reason },
            None => Error::Database {
                path: path.to_path_buf(),
                message: describe(e),
            },
        },
    }
}

/// SQLite's words for an error, with what to do where SQLite does not say.
pub(super) fn describe(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            "the file is not a SQLite database (or is damaged); move it away or choose another \
             file"
                .into()
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => {
            "the database is damaged; restore it from a backup or choose another file".into()
        }
        Some(rusqlite::ErrorCode::ReadOnly) => {
            "the file cannot be written; check its permissions".into()
        }
        Some(rusqlite::ErrorCode::CannotOpen) => {
            format!("{e}; check that the path is a file in a directory you can write")
        }
        _ => e.to_string(),
    }
}

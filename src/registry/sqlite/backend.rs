//! The SQLite side of the writer thread: a batch in one `IMMEDIATE`
//! transaction, and a check, before each commit, that the path still names
//! the file the store opened.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::schema::{describe, unavailable_reason};
use super::sql;
use crate::registry::writer::{Backend, NotCommitted, Outcome, Write};
use crate::run::Progress;

/// The writer's connection to the registry file.
pub(super) struct SqliteBackend {
    conn: Connection,
    file: FileCheck,
}

impl SqliteBackend {
    pub(super) fn new(conn: Connection, path: PathBuf) -> SqliteBackend {
        SqliteBackend {
            conn,
            file: FileCheck::new(&path),
        }
    }
}

impl Backend for SqliteBackend {
    fn commit(&mut self, batch: &[Write]) -> Result<Vec<Outcome>, NotCommitted> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let committed = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if batch.is_empty() {
                // Nothing to write, but the file was unavailable: a real
                // write (the header page) tells whether it is writable again.
                let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
                tx.pragma_update(None, "user_version", version)?;
            }
            let mut fold = Fold::of(batch);
            for (index, write) in batch.iter().enumerate() {
                outcomes.push(apply(&tx, index, write, &mut fold)?);
            }
            tx.commit()
        })();
        if committed.is_ok() && batch.iter().any(|write| matches!(write, Write::Checkpoint)) {
            // Busy while the checkpoint thread is at it: the watch on the
            // log asks again later.
            checkpoint(&self.conn);
        }
        match committed {
            Ok(()) => Ok(outcomes),
            Err(e) => Err(match unavailable_reason(&e) {
                Some(reason) => NotCommitted::Unavailable(reason),
                None => NotCommitted::Rejected(describe(&e)),
            }),
        }
    }

    fn check(&self) -> Result<(), String> {
        self.file.check()
    }
}

/// A run's progress and its end in one batch: the end writes both, in one
/// statement.
struct Fold<'b> {
    /// Where each run that ends in the batch ends.
    ends: HashMap<&'b str, usize>,
    /// The progress of runs whose end, later in the batch, writes it.
    folded: HashMap<&'b str, &'b Progress>,
}

impl<'b> Fold<'b> {
    fn of(batch: &'b [Write]) -> Fold<'b> {
        let ends = batch
            .iter()
            .enumerate()
            .filter_map(|(index, write)| match write {
                Write::Transition(change, ..) if change.to.is_terminal() => {
                    Some((change.run_id.as_str(), index))
                }
                _ => None,
            })
            .collect();
        Fold {
            ends,
            folded: HashMap::new(),
        }
    }

    /// Keeps `progress`, reported at `index`, for the run's end if it
    /// comes later in the batch; `false` if it must be written now.
    fn defer(&mut self, index: usize, run_id: &'b str, progress: &'b Progress) -> bool {
        let later = self.ends.get(run_id).is_some_and(|&end| end > index);
        if later {
            self.folded.insert(run_id, progress);
        }
        later
    }
}

/// Applies the write at `index` of the batch inside its transaction. `Err`
/// is a database failure (it aborts the batch); a refusal by the status
/// rules is `Ok(Outcome::Failed)` and writes nothing.
fn apply<'b>(
    tx: &rusqlite::Transaction<'_>,
    index: usize,
    write: &'b Write,
    fold: &mut Fold<'b>,
) -> rusqlite::Result<Outcome> {
    Ok(match write {
        Write::Insert(run, existing, key, _) => sql::insert_keyed(tx, run, key.as_deref(), |tx| {
            sql::insert(tx, run, *existing)
        })?,
        // One process holds the file: a queued run is this process's.
        Write::Enqueue(run, _, key, _) => {
            sql::insert_keyed(tx, run, key.as_deref(), |tx| sql::enqueue(tx, run))?
        }
        Write::Claim(wanted, limit, _) => Outcome::Claimed(sql::claim(tx, wanted, *limit)?),
        Write::Release(run_ids, reason, _) => Outcome::Released(sql::release(tx, run_ids, reason)?),
        Write::Replace(run, change, _) => sql::replace(tx, run, change.as_ref())?,
        Write::Transition(change, ..) => {
            let progress = fold.folded.get(change.run_id.as_str()).copied();
            Outcome::Applied(sql::apply_transition_with(tx, change, progress)?)
        }
        Write::Progress(run_id, progress, _) => {
            Outcome::Applied(apply_progress(tx, run_id, progress)?)
        }
        Write::ReportedProgress => Outcome::Done,
        Write::TakenProgress(reports) => {
            for (run_id, progress) in reports {
                if !fold.defer(index, run_id, progress) {
                    apply_progress(tx, run_id, progress)?;
                }
            }
            Outcome::Done
        }
        Write::Log(run_id, log, _) => Outcome::Count(
            tx.prepare_cached("UPDATE runs SET log = ?2 WHERE run_id = ?1")?
                .execute(params![run_id, sql::log_text(log)?])?,
        ),
        Write::Cleanup(cleanup, limit, _) => {
            Outcome::Count(sql::remove_finished(tx, cleanup, *limit)?)
        }
        // Done once the batch is committed (see `commit`).
        Write::Flush(_) | Write::Check | Write::Heartbeat | Write::Checkpoint => Outcome::Done,
        // One process holds the file: no other executes its runs.
        Write::RequestCancel(..) => Outcome::Applied(None),
    })
}

/// Copies what it can of the log into the database file, blocking
/// neither the writer nor readers (a passive checkpoint): what it cannot
/// copy now, a later one does.
pub(super) fn checkpoint(conn: &Connection) {
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::debug!(error = %e, "run registry checkpoint failed; retrying later");
    }
}

/// Records progress of an active run; returns its module id, `None` if the
/// run is unknown or finished.
fn apply_progress(
    tx: &rusqlite::Transaction<'_>,
    run_id: &str,
    progress: &Progress,
) -> rusqlite::Result<Option<String>> {
    match sql::current(tx, run_id)? {
        Some(stored) if stored.status.is_active() => {
            tx.prepare_cached(
                "UPDATE runs SET progress_fraction = ?2, progress_message = ?3 WHERE id = ?1",
            )?
            .execute(params![stored.id, progress.fraction, progress.message])?;
            Ok(Some(stored.module_id))
        }
        _ => Ok(None),
    }
}

/// The registry file as the store opened it, to notice it deleted or
/// replaced: after a deletion the store would write into a file nobody can
/// open again, and everything committed there would be lost at the next start.
pub(super) struct FileCheck {
    path: PathBuf,
    identity: Option<FileIdentity>,
}

impl FileCheck {
    /// The file at `path` now (it must be open already).
    pub(super) fn new(path: &Path) -> FileCheck {
        FileCheck {
            path: path.to_path_buf(),
            identity: std::fs::metadata(path)
                .ok()
                .map(|metadata| identity_of(&metadata)),
        }
    }

    /// Whether the path still names that file; `Err` says what happened.
    pub(super) fn check(&self) -> Result<(), String> {
        let path = self.path.display();
        match std::fs::metadata(&self.path) {
            Ok(metadata) if Some(identity_of(&metadata)) == self.identity => Ok(()),
            Ok(_) => Err(format!(
                "the registry file {path} was replaced by another file while modrun had it \
                 open: put the original back, or restart modrun"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "the registry file {path} was deleted while modrun had it open: put it back, \
                 or restart modrun to start a new registry"
            )),
            Err(e) => Err(format!("cannot check the registry file {path}: {e}")),
        }
    }
}

/// Which file a path names (device and inode), to notice it replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity(u64, u64);

#[cfg(unix)]
fn identity_of(metadata: &std::fs::Metadata) -> FileIdentity {
    use std::os::unix::fs::MetadataExt;
    FileIdentity(metadata.dev(), metadata.ino())
}

/// Elsewhere only a deleted file is noticed.
#[cfg(not(unix))]
fn identity_of(_: &std::fs::Metadata) -> FileIdentity {
    FileIdentity(0, 0)
}

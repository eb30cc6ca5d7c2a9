//! Reading a registry file that another process owns.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::schema::{describe, open_read_only, schema_version, storage_error};
use super::sql::{select_history, select_run, select_runs, select_summaries};
use crate::error::{Error, Result};
use crate::registry::{RunFilter, RunSummary};
use crate::run::{Run, StatusChange};

/// A read-only view of a registry file that another process (a running
/// `modrun serve`) owns: what `modrun runs` and `modrun show` use while a
/// server holds the file. It takes no lock and changes nothing, not even
/// runs a crashed process left unfinished; WAL mode lets it read beside the
/// owner's writes, and it sees what was committed.
pub struct SqliteReader {
    path: PathBuf,
    conn: Connection,
}

impl std::fmt::Debug for SqliteReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteReader {
    /// Opens the registry at `path` for reading. Fails with a clear
    /// [`Error::Database`] if it is missing, not a registry, or written by
    /// a newer modrun.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteReader> {
        let path = path.as_ref().to_path_buf();
        let fail = |message: String| Error::Database {
            path: path.clone(),
            message,
        };
        if !path.is_file() {
            return Err(fail("no such file".into()));
        }
        let conn = open_read_only(&path)
            .map_err(|e| fail(format!("cannot open the file: {}", describe(&e))))?;
        if schema_version(&conn).map_err(fail)? == 0 {
            return Err(fail("it is not a modrun run registry (no schema)".into()));
        }
        Ok(SqliteReader { path, conn })
    }

    /// One run.
    pub fn get(&self, run_id: &str) -> Result<Option<Run>> {
        select_run(&self.conn, run_id).map_err(|e| storage_error(&self.path, &e))
    }

    /// Runs matching `filter`, newest first.
    pub fn list(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        select_runs(&self.conn, filter).map_err(|e| storage_error(&self.path, &e))
    }

    /// Summaries of the runs matching `filter`, newest first.
    pub fn list_summaries(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        select_summaries(&self.conn, filter).map_err(|e| storage_error(&self.path, &e))
    }

    /// The status changes of a run, oldest first (empty if unknown).
    pub fn history(&self, run_id: &str) -> Result<Vec<StatusChange>> {
        select_history(&self.conn, run_id).map_err(|e| storage_error(&self.path, &e))
    }
}

//! The in-memory backend: a hash map under one lock, for tests, embedding,
//! and hosts that do not need runs to outlive the process.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Cleanup, Ended, Tally, Wanted};
use super::{
    Existing, OnUnavailable, RunFilter, RunStore, RunSummary, Taken, check_replace, on_taken,
};
use crate::error::{Error, Result};
use crate::run::{LogEntry, Progress, Run, RunStatus, StatusChange, Transition};
use crate::sync::LockUnpoisoned;

/// Runs kept in this process's memory. Status changes cost O(1) whatever the
/// number of runs; listings scan every run.
#[derive(Debug, Default)]
pub struct MemoryStore {
    runs: Mutex<Runs>,
    /// The runs started with an idempotency key, by key. Locked after
    /// `runs` when both are.
    keys: Mutex<HashMap<String, String>>,
    /// Runs queued for whichever claims them ([`RunStore::enqueue`]), in
    /// the order they were queued; locked after `runs`.
    claimable: Mutex<VecDeque<String>>,
}

#[derive(Debug)]
struct Entry {
    run: Run,
    history: Vec<StatusChange>,
}

/// The runs by id. Each entry is found by its own run's id, which never
/// changes once it is in: a map would keep a second copy of every id as
/// its key. Boxed entries keep the table's slots to a pointer each: a
/// table sized for growth has a third or more of its slots empty, and
/// each costs its full size.
#[derive(Debug, Default)]
struct Runs {
    table: hashbrown::HashTable<Box<Entry>>,
    hasher: std::hash::RandomState,
}

impl Runs {
    fn hash(&self, run_id: &str) -> u64 {
        self.hasher.hash_one(run_id)
    }

    fn get(&self, run_id: &str) -> Option<&Entry> {
        self.table
            .find(self.hash(run_id), |entry| entry.run.run_id == run_id)
            .map(|entry| &**entry)
    }

    fn get_mut(&mut self, run_id: &str) -> Option<&mut Entry> {
        let hash = self.hash(run_id);
        self.table
            .find_mut(hash, |entry| entry.run.run_id == run_id)
            .map(|entry| &mut **entry)
    }

    fn contains_key(&self, run_id: &str) -> bool {
        self.get(run_id).is_some()
    }

    /// Adds the entry of a run id not in the table yet.
    fn insert(&mut self, entry: Entry) {
        let hash = self.hash(&entry.run.run_id);
        let hasher = &self.hasher;
        self.table.insert_unique(hash, Box::new(entry), |entry| {
            hasher.hash_one(entry.run.run_id.as_str())
        });
    }

    fn remove(&mut self, run_id: &str) {
        let hash = self.hash(run_id);
        if let Ok(found) = self
            .table
            .find_entry(hash, |entry| entry.run.run_id == run_id)
        {
            found.remove();
        }
    }

    fn values(&self) -> impl Iterator<Item = &Entry> {
        self.table.iter().map(|entry| &**entry)
    }
}

impl MemoryStore {
    /// Records progress of an active run; returns its module id, or `None`
    /// if the run is unknown or finished.
    fn apply_progress(&self, run_id: &str, progress: &Progress) -> Option<String> {
        let mut runs = self.lock();
        let entry = runs.get_mut(run_id).filter(|e| e.run.status.is_active())?;
        entry.run.progress = Some(progress.clone());
        Some(entry.run.module_id.clone())
    }

    fn save_log(&self, run_id: &str, log: Vec<LogEntry>) -> bool {
        match self.lock().get_mut(run_id) {
            Some(entry) => {
                entry.run.log = log;
                true
            }
            None => false,
        }
    }

    /// The runs matching `filter`, newest first, each made into a `T`.
    fn select<T>(&self, filter: &RunFilter, make: impl Fn(&Run) -> T) -> Vec<T> {
        let runs = self.lock();
        let mut matching: Vec<&Run> = runs
            .values()
            .map(|entry| &entry.run)
            .filter(|run| filter.matches(run))
            .collect();
        // Newest first; the id breaks ties so the order is stable.
        matching.sort_unstable_by(|a, b| (b.created_at, &b.run_id).cmp(&(a.created_at, &a.run_id)));
        matching.truncate(filter.limit.unwrap_or(usize::MAX));
        matching.into_iter().map(make).collect()
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<String>> {
        self.claimable.lock_unpoisoned()
    }

    /// Records `run` as [`RunStore::insert`] does; with `running_at`, as
    /// a run claimed as it is queued: queued at its creation, then running
    /// (a run taken over keeps its history and gains the second entry).
    fn record(
        &self,
        run: &Run,
        existing: Existing,
        key: Option<&str>,
        running_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let mut runs = self.lock();
        let mut keys = self.keys.lock_unpoisoned();
        if let Some(key) = key
            && let Some(holder) = keys.get(key).filter(|holder| runs.contains_key(holder))
        {
            return Err(Error::IdempotencyKeyReused {
                key: key.to_owned(),
                run_id: holder.clone(),
            });
        }
        let running = running_at.map(|at| StatusChange {
            status: RunStatus::Running,
            at,
            message: None,
        });
        // Room for the usual life of a run (queued, running, an end) and no
        // more: growing a Vec by doubling would reserve four.
        let mut first = Vec::with_capacity(3);
        first.push(StatusChange {
            status: if running.is_some() {
                RunStatus::Queued
            } else {
                run.status
            },
            at: run.created_at,
            message: None,
        });
        first.extend(running.clone());
        match runs.get_mut(&run.run_id) {
            None => runs.insert(Entry {
                run: run.clone(),
                history: first,
            }),
            Some(entry) => match on_taken(&run.run_id, entry.run.status, existing)? {
                Taken::Replace => {
                    *entry = Entry {
                        run: run.clone(),
                        history: first,
                    };
                }
                Taken::Adopt => {
                    entry.run = run.clone();
                    entry.history.extend(running);
                }
            },
        }
        if let Some(key) = key {
            keys.insert(key.to_owned(), run.run_id.clone());
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Runs> {
        // A panic while holding the lock cannot leave an entry half-written
        // (every mutation is a single assignment or push), so poisoning is ignored.
        self.runs.lock_unpoisoned()
    }
}

#[async_trait]
impl RunStore for MemoryStore {
    async fn insert(&self, run: &Run, existing: Existing, key: Option<&str>) -> Result<()> {
        self.record(run, existing, key, None)
    }

    async fn enqueue(&self, run: &Run, max_attempts: u32, key: Option<&str>) -> Result<()> {
        let _ = max_attempts;
        let existing = Existing::on_enqueue(run);
        match (run.status, run.started_at) {
            // Claimed as it is queued: two history entries, as on a shared store.
            (RunStatus::Running, Some(at)) => self.record(run, existing, key, Some(at))?,
            _ => {
                self.record(run, existing, key, None)?;
                let _runs = self.lock();
                self.queue().push_back(run.run_id.clone());
            }
        }
        Ok(())
    }

    async fn claim(&self, wanted: &[Wanted], limit: usize) -> Result<Vec<Run>> {
        let mut runs = self.lock();
        let mut queue = self.queue();
        let now = Utc::now();
        queue.retain(|run_id| {
            runs.get(run_id)
                .is_some_and(|entry| entry.run.status == RunStatus::Queued)
        });
        // The due runs of the wanted versions, in claim order: higher
        // priority first, then the one due first, then the one queued first.
        let mut due: Vec<(usize, usize, &Run)> = queue
            .iter()
            .enumerate()
            .filter_map(|(place, run_id)| {
                let run = &runs.get(run_id)?.run;
                let version = run.module_version.as_deref().unwrap_or_default();
                let index = wanted
                    .iter()
                    .position(|w| w.module_id == run.module_id && w.version == version)?;
                run.is_due(now).then_some((place, index, run))
            })
            .collect();
        due.sort_by_key(|&(place, _, run)| (run.queue_order(), place));
        let mut left: Vec<usize> = wanted.iter().map(|w| w.count).collect();
        let mut taken = HashSet::new();
        for (place, index, _) in due {
            if taken.len() >= limit {
                break;
            }
            if left[index] > 0 {
                left[index] -= 1;
                taken.insert(place);
            }
        }
        let mut claimed = Vec::with_capacity(taken.len());
        let mut place = 0;
        queue.retain(|run_id| {
            place += 1;
            if !taken.contains(&(place - 1)) {
                return true;
            }
            if let Some(entry) = runs.get_mut(run_id) {
                entry.run.status = RunStatus::Running;
                entry.run.started_at = Some(now);
                entry.run.attempt = Some(entry.run.attempt.unwrap_or(0) + 1);
                entry.history.push(StatusChange {
                    status: RunStatus::Running,
                    at: now,
                    message: None,
                });
                claimed.push(entry.run.clone());
            }
            false
        });
        claimed.sort_by_key(Run::queue_order);
        Ok(claimed)
    }

    async fn release(&self, run_ids: &[String], reason: &str) -> Result<Vec<(String, String)>> {
        let mut runs = self.lock();
        let mut queue = self.queue();
        let now = Utc::now();
        let mut released = Vec::new();
        // Given back first in line, in the order they were claimed.
        for run_id in run_ids.iter().rev() {
            let Some(entry) = runs
                .get_mut(run_id)
                .filter(|e| e.run.status == RunStatus::Running)
            else {
                continue;
            };
            entry.run.status = RunStatus::Queued;
            entry.run.started_at = None;
            entry.history.push(StatusChange {
                status: RunStatus::Queued,
                at: now,
                message: Some(reason.to_owned()),
            });
            queue.push_front(run_id.clone());
            released.push((run_id.clone(), entry.run.module_id.clone()));
        }
        released.reverse();
        Ok(released)
    }

    async fn claimed(&self) -> Result<Vec<String>> {
        let runs = self.lock();
        let queue = self.queue();
        let queued: HashSet<&str> = queue.iter().map(String::as_str).collect();
        Ok(runs
            .values()
            .filter(|e| {
                // Running here, or queued for this process alone; a run
                // taken over as it ran may still be in the queue's list.
                e.run.status == RunStatus::Running
                    || (e.run.status.is_active() && !queued.contains(e.run.run_id.as_str()))
            })
            .map(|e| e.run.run_id.clone())
            .collect())
    }

    async fn next_due(&self, after: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        let runs = self.lock();
        let queue = self.queue();
        Ok(queue
            .iter()
            .filter_map(|run_id| runs.get(run_id))
            .filter(|e| e.run.status == RunStatus::Queued)
            .filter_map(|e| e.run.not_before.filter(|&at| at > after))
            .min())
    }

    async fn queued_versions(&self) -> Result<Vec<String>> {
        let runs = self.lock();
        let queue = self.queue();
        let versions: HashSet<String> = queue
            .iter()
            .filter_map(|run_id| runs.get(run_id))
            .filter(|e| e.run.status == RunStatus::Queued)
            .filter_map(|e| {
                let version = e.run.module_version.as_deref()?;
                Some(format!("{}@{version}", e.run.module_id))
            })
            .collect();
        Ok(versions.into_iter().collect())
    }

    async fn run_by_key(&self, key: &str) -> Result<Option<Run>> {
        let runs = self.lock();
        let keys = self.keys.lock_unpoisoned();
        Ok(keys
            .get(key)
            .and_then(|run_id| runs.get(run_id))
            .map(|entry| entry.run.clone()))
    }

    async fn replace(&self, run: &Run, change: Option<&StatusChange>) -> Result<()> {
        let mut runs = self.lock();
        let entry = runs
            .get_mut(&run.run_id)
            .ok_or_else(|| Error::RunNotFound(run.run_id.clone()))?;
        check_replace(&run.run_id, entry.run.status, change.map(|c| c.status))?;
        if let Some(change) = change {
            entry.history.push(change.clone());
        }
        entry.run = run.clone();
        Ok(())
    }

    async fn transition(&self, change: &Transition, _: OnUnavailable) -> Result<Option<String>> {
        let mut runs = self.lock();
        let Some(entry) = runs.get_mut(&change.run_id) else {
            return Ok(None);
        };
        if !entry.run.status.can_become(change.to) {
            return Ok(None);
        }
        entry.run.apply(change);
        entry.history.push(change.status_change());
        Ok(Some(entry.run.module_id.clone()))
    }

    async fn set_progress(&self, run_id: &str, progress: &Progress) -> Result<Option<String>> {
        Ok(self.apply_progress(run_id, progress))
    }

    fn record_progress(&self, run_id: &str, progress: &Progress) -> Result<()> {
        self.apply_progress(run_id, progress);
        Ok(())
    }

    async fn set_log(&self, run_id: &str, log: &[LogEntry]) -> Result<bool> {
        Ok(self.save_log(run_id, log.to_vec()))
    }

    fn record_log(&self, run_id: &str, log: Vec<LogEntry>) -> Result<()> {
        self.save_log(run_id, log);
        Ok(())
    }

    async fn get(&self, run_id: &str) -> Result<Option<Run>> {
        Ok(self.lock().get(run_id).map(|entry| entry.run.clone()))
    }

    async fn list(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        Ok(self.select(filter, Run::clone))
    }

    async fn list_summaries(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        Ok(self.select(filter, |run| RunSummary::from(run)))
    }

    async fn history(&self, run_id: &str) -> Result<Vec<StatusChange>> {
        Ok(self
            .lock()
            .get(run_id)
            .map(|entry| entry.history.clone())
            .unwrap_or_default())
    }

    async fn remove_finished(&self, cleanup: &Cleanup, limit: usize) -> Result<usize> {
        let mut runs = self.lock();
        let mut doomed: Vec<(DateTime<Utc>, String)> = runs
            .values()
            .filter(|entry| cleanup.matches(&entry.run))
            .map(|entry| (entry.run.created_at, entry.run.run_id.clone()))
            .collect();
        doomed.sort();
        doomed.truncate(limit);
        for (_, run_id) in &doomed {
            runs.remove(run_id);
        }
        if !doomed.is_empty() {
            let mut keys = self.keys.lock_unpoisoned();
            keys.retain(|_, run_id| runs.contains_key(run_id));
        }
        Ok(doomed.len())
    }

    async fn count_finished(&self, cleanup: &Cleanup) -> Result<usize> {
        Ok(self
            .lock()
            .values()
            .filter(|entry| cleanup.matches(&entry.run))
            .count())
    }

    async fn tally(&self, since: DateTime<Utc>, limit: usize) -> Result<Tally> {
        let runs = self.lock();
        let counts = runs.values().map(|entry| (entry.run.status, 1));
        let mut ended: Vec<Ended> = runs
            .values()
            .filter_map(|entry| {
                let run = &entry.run;
                let completed_at = run.completed_at.filter(|at| *at >= since)?;
                Some(Ended {
                    module_id: run.module_id.clone(),
                    status: run.status,
                    started_at: run.started_at,
                    completed_at,
                })
            })
            .collect();
        ended.sort_by_key(|ended| std::cmp::Reverse(ended.completed_at));
        ended.truncate(limit);
        Ok(Tally::new(counts, ended))
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

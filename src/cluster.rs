//! Several nodes on one database: the store is the queue.
//!
//! A node that [claims from the queue](crate::ModuleRunner::claim_from_queue)
//! records each module run it starts `Queued` for no node in particular,
//! pinned to the module version it resolved to. Its [`Claimer`] then takes
//! the queued runs it has room for, whichever node started them: one
//! statement claims a batch (`FOR UPDATE SKIP LOCKED`, oldest first), marks
//! it `Running` for this node, and writes its history. Room means a free
//! slot of the task manager, a permit of the engine's instance pool, and,
//! for a module with its own `max_concurrent`, one of that module's
//! permits: limits are applied when a run is claimed, so a run that waits
//! for its module never holds a slot another module could use.
//!
//! A node with room for a run as it is started claims it at once: it is
//! recorded `Running` for that node in the write that records it, and
//! starts without waiting for a claim. It does so only while no earlier
//! run of its module may be waiting in the queue (none was queued here or
//! announced since a claim last found nothing more of it to take), so that
//! a start never overtakes the runs queued before it. Otherwise the claimer wakes when a
//! run is queued (on any node: the database announces it), when one of
//! its runs ends, when a module reloads, when a run queued for later (on
//! any node) is due, and once a second in case a notification was lost.
//!
//! Every module version a node loads is stored in the database by its
//! content hash. A node asked to run a version it did not load (the run
//! was started on a node with a newer or older component) fetches the
//! bytes, checks them against the hash, compiles them (the compiled cache
//! is keyed by hash too) and runs them under its own manifest for the
//! module: what a module may reach stays each node's decision. A node that
//! does not load the module at all never runs it.
//!
//! A reload on one node reaches them all. Each module has a head in the
//! database: the version whose component file was modified last, on any
//! node. A node that loads a file newer than the head publishes its
//! version as the head; a node whose own file is older fetches the head
//! and runs it in its place (within [`CLAIM_POLL`]), so that a start on
//! any node runs the newest version. A node restarted with an older file
//! follows the head rather than turning the cluster back; writing the
//! older file again (a newer modification time) makes it the head.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::ModuleRunner;
use crate::line::Permit;
use crate::module::LoadedModule;
use crate::registry::{NextDue, Wanted};
use crate::run::Run;
use crate::sync::LockUnpoisoned;

/// The most runs one claim takes.
pub const CLAIM_BATCH: usize = 128;

/// How often the claimer looks for queued runs when nothing woke it: the
/// fallback for a lost notification.
pub const CLAIM_POLL: Duration = Duration::from_secs(1);

/// How often the claimer forgets the module versions no queued run needs
/// any more.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// How often the claimer asks the store when the next run queued for
/// later is due, besides after each such time: for what it was not told
/// (an announcement lost). Such a run is claimed at a poll regardless, so
/// this only makes it prompt, and costs an idle node no query a second.
const DUE_CHECK_EVERY: Duration = Duration::from_secs(10);

/// How long a node waits before it tries again to fetch a module version
/// it could not fetch or compile, or to store one it could not store.
const VERSION_RETRY: Duration = Duration::from_secs(60);

/// Takes queued runs from the shared queue and starts them on this node;
/// see the [module documentation](self). Stop it with
/// [`stop`](Self::stop) before shutting the task manager down, so that no
/// run is claimed that cannot start.
#[derive(Debug)]
pub struct Claimer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Claimer {
    pub(crate) fn start(runner: ModuleRunner, versions: Arc<Versions>) -> Claimer {
        let stop = CancellationToken::new();
        let shipping = tokio::spawn(ship_loop(runner.clone(), stop.clone()));
        let claiming = tokio::spawn(claim_loop(runner, versions, stop.clone()));
        let task = tokio::spawn(async move {
            let _ = claiming.await;
            let _ = shipping.await;
        });
        Claimer { stop, task }
    }

    /// Stops claiming: returns once a claim under way has finished, and
    /// what it took has started (or gone back to the queue).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Stores the bytes of every module version this node loads (at start and
/// at each reload), for the other nodes to fetch, and keeps this node's
/// versions and the cluster's heads in step: a version loaded from a file
/// newer than the head's is published as the head; a head newer than this
/// node's file is fetched and run here in its place. Looks at each reload,
/// and every [`CLAIM_POLL`] for another node's.
async fn ship_loop(runner: ModuleRunner, stop: CancellationToken) {
    let mut reloads = runner.host().subscribe();
    let mut heads = Heads::default();
    loop {
        for id in runner.host().module_ids() {
            let Some(module) = runner.host().get(&id) else {
                continue;
            };
            let hash = module.summary.content_hash.clone();
            let due = heads.unshipped.due(&hash);
            if heads.shipped.contains(&hash) || !due || module.summary.published_by.is_some() {
                continue;
            }
            match ship(&runner, &module).await {
                Ok(()) => {
                    heads.unshipped.passed(&hash);
                    heads.shipped.insert(hash);
                }
                Err(e) => {
                    // A file that changed since it loaded is reloaded (and
                    // that version stored); the database is tried again.
                    heads.unshipped.failed(&hash);
                    tracing::warn!(module_id = %id, error = %e, "cannot store a module version for the other nodes");
                }
            }
        }
        if let Err(e) = heads.follow(&runner).await {
            tracing::debug!(error = %e, "cannot read or publish the modules' heads for now");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            reload = reloads.recv() => {
                if matches!(reload, Err(broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
            () = tokio::time::sleep(CLAIM_POLL) => {}
        }
    }
}

/// What a node knows of the versions it shares with the cluster.
#[derive(Default)]
struct Heads {
    /// Versions whose bytes are in the database.
    shipped: HashSet<String>,
    /// Versions of this node's that could not be stored.
    unshipped: Retries,
    /// Heads that could not be fetched or compiled here.
    unfetched: Retries,
}

/// Versions something failed for, and when to try each again: after
/// [`FIRST_RETRY`], doubling up to [`VERSION_RETRY`]. A failure that
/// passes (a busy database, a describe timed out under load) costs seconds;
/// one that stays (an import this node lacks) is tried once a minute.
#[derive(Default)]
struct Retries(HashMap<String, (Instant, Duration)>);

/// The first wait before a version that failed is tried again.
const FIRST_RETRY: Duration = Duration::from_secs(2);

impl Retries {
    fn due(&self, hash: &str) -> bool {
        self.0
            .get(hash)
            .is_none_or(|(at, wait)| at.elapsed() >= *wait)
    }

    fn failed(&mut self, hash: &str) {
        let wait = self
            .0
            .get(hash)
            .map_or(FIRST_RETRY, |(_, wait)| (*wait * 2).min(VERSION_RETRY));
        self.0.insert(hash.to_owned(), (Instant::now(), wait));
    }

    fn passed(&mut self, hash: &str) {
        self.0.remove(hash);
    }
}

impl Heads {
    /// Publishes the versions this node loaded from files newer than the
    /// heads, and runs the heads newer than its files.
    async fn follow(&mut self, runner: &ModuleRunner) -> crate::Result<()> {
        let heads: HashMap<String, crate::registry::ModuleHead> = runner
            .registry()
            .heads()
            .await?
            .into_iter()
            .map(|head| (head.module_id.clone(), head))
            .collect();
        for id in runner.host().module_ids() {
            let Some(module) = runner.host().get(&id) else {
                continue;
            };
            let summary = &module.summary;
            let head = heads.get(&id);
            if head.is_some_and(|head| head.hash == summary.content_hash) {
                continue;
            }
            // The file's time as the version was read: the file may have
            // been written again since (and is reloaded then).
            let newer_here = module.modified.filter(|modified| {
                summary.published_by.is_none() && head.is_none_or(|head| *modified > head.modified)
            });
            if let Some(modified) = newer_here {
                // Published once its bytes are stored (a version loaded
                // since the last shipping waits for the next turn), and
                // never given up for the older head meanwhile.
                if self.shipped.contains(&summary.content_hash) {
                    // Another node publishing meanwhile wins only with a
                    // newer file; either way the next turn follows.
                    runner
                        .registry()
                        .publish_head(&id, &summary.content_hash, modified)
                        .await?;
                    tracing::info!(module_id = %id, version = %summary.content_hash, "published this node's module version for every node");
                }
                continue;
            }
            let Some(head) = head else { continue };
            if !self.unfetched.due(&head.hash) {
                continue;
            }
            match fetch(runner, &id, &head.hash).await {
                Ok(version) => {
                    self.unfetched.passed(&head.hash);
                    runner
                        .host()
                        .adopt(&summary.content_hash, version, &head.node);
                }
                Err(e) => {
                    tracing::warn!(module_id = %id, version = %head.hash, node = %head.node, error = %e, "cannot run the module version another node published");
                    runner.host().version_failed(&id, &e);
                    self.unfetched.failed(&head.hash);
                }
            }
        }
        Ok(())
    }
}

async fn ship(runner: &ModuleRunner, module: &LoadedModule) -> crate::Result<()> {
    let (id, hash) = (&module.summary.info.id, &module.summary.content_hash);
    if runner.registry().has_module(hash).await? {
        return Ok(());
    }
    let bytes = runner.host().version_bytes(module).await?;
    runner.registry().store_module(id, hash, &bytes).await
}

/// Fetches, checks and compiles the module versions queued runs are
/// pinned to that this node lacks but could run (it loads their module),
/// and keeps them for the claimer. A version that cannot be had is tried
/// again after [`VERSION_RETRY`].
async fn fetch_missing(
    runner: ModuleRunner,
    versions: Arc<Versions>,
    failed: Arc<Mutex<HashMap<String, Instant>>>,
) {
    let queued = match runner.registry().queued_versions().await {
        Ok(queued) => queued,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the versions queued runs need");
            return;
        }
    };
    let have = versions.all(&runner);
    for key in queued {
        let Some((module_id, hash)) = key.split_once('@') else {
            continue;
        };
        if have.contains_key(&key) || runner.host().get(module_id).is_none() {
            continue;
        }
        let recently_failed = failed
            .lock_unpoisoned()
            .get(&key)
            .is_some_and(|at| at.elapsed() < VERSION_RETRY);
        if recently_failed {
            continue;
        }
        match fetch(&runner, module_id, hash).await {
            Ok(module) => {
                tracing::info!(
                    module_id,
                    version = hash,
                    "fetched a module version another node loaded"
                );
                versions.retain(&Arc::new(module));
                versions.queued_here(module_id);
            }
            Err(e) => {
                tracing::warn!(module_id, version = hash, error = %e, "cannot run a module version another node loaded");
                failed.lock_unpoisoned().insert(key, Instant::now());
            }
        }
    }
}

async fn fetch(runner: &ModuleRunner, module_id: &str, hash: &str) -> crate::Result<LoadedModule> {
    let unfetched = |reason: &str| crate::Error::ModuleLoad {
        path: std::path::PathBuf::from(format!("(database) {module_id}")),
        cause: crate::error::LoadError::Version {
            version: hash.to_owned(),
            reason: reason.to_owned(),
        },
    };
    let (stored_as, bytes) = runner
        .registry()
        .module_bytes(hash, runner.host().config().max_module_bytes)
        .await?
        .ok_or_else(|| unfetched("no node stored its bytes"))?;
    if stored_as != module_id {
        return Err(unfetched(&format!(
            "the bytes stored for it are module {stored_as:?}'s"
        )));
    }
    runner.host().load_version(module_id, hash, bytes).await
}

/// The module versions a node can run from the queue: every module's
/// current version, and the earlier versions that runs it queued were
/// pinned to (kept while such runs wait), by `<module>@<content hash>`.
#[derive(Default)]
pub(crate) struct Versions {
    kept: Mutex<HashMap<String, Arc<LoadedModule>>>,
    /// A version was added since the node last published its versions.
    changed: AtomicBool,
    /// Told when this node queues a run for any node.
    queued_here: tokio::sync::Notify,
    /// Offered when this node queues a run for later.
    due_here: NextDue,
    /// Which modules' runs may wait in the queue.
    order: Mutex<Order>,
}

/// Counts the moments a run this node could claim may have been queued,
/// and what they were when a claim last found a module drained. A module
/// is drained while its counts are as its last drained claim found them.
/// Before any claim, every module counts as drained: starts made while
/// the first claim is under way may overtake the runs queued before this
/// node started, which that claim takes.
#[derive(Debug, Default)]
struct Order {
    counts: Counts,
    /// Per module, its counts as of its last drained claim.
    drained: HashMap<String, (u64, u64)>,
}

/// How many times runs may have been queued, as a claim begins.
#[derive(Debug, Clone, Default)]
struct Counts {
    /// Runs of any module: announced by another node, or a reload here.
    anywhere: u64,
    /// Runs of one module: queued by this node, or of a version it gained.
    here: HashMap<String, u64>,
}

impl Counts {
    /// `(anywhere, here)` for `module_id`.
    fn of(&self, module_id: &str) -> (u64, u64) {
        (
            self.anywhere,
            self.here.get(module_id).copied().unwrap_or_default(),
        )
    }
}

impl std::fmt::Debug for Versions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Versions").finish_non_exhaustive()
    }
}

impl Versions {
    /// Whether no run of `module_id` this node could claim has been
    /// queued since a claim last found none left: only then may a run of
    /// it started here start at once, for it overtakes none queued before
    /// it.
    pub(crate) fn drained(&self, module_id: &str) -> bool {
        let order = self.order.lock_unpoisoned();
        order.drained.get(module_id).copied().unwrap_or_default() == order.counts.of(module_id)
    }

    /// Notes that runs of any module may have been queued (announced by
    /// another node, or claimable after a reload): runs started here from
    /// now on queue behind them until a claim that begins after this
    /// finds their module drained. A start under way meanwhile is not
    /// ordered after them, and may start at once.
    fn may_be_queued(&self) {
        self.order.lock_unpoisoned().counts.anywhere += 1;
    }

    /// Notes that this node queued a run of `module_id` (its write
    /// committed), or gained a version queued runs of it need, and wakes
    /// the claimer.
    pub(crate) fn queued_here(&self, module_id: &str) {
        {
            let mut order = self.order.lock_unpoisoned();
            let here = &mut order.counts.here;
            if let Some(count) = here.get_mut(module_id) {
                *count += 1;
            } else {
                here.insert(module_id.to_owned(), 1);
            }
        }
        self.queued_here.notify_one();
    }

    /// Notes that this node queued a run not due before `at` (its write
    /// committed): the claimer wakes then, not at its next poll.
    pub(crate) fn due_here(&self, at: DateTime<Utc>) {
        self.due_here.offer(at);
    }

    /// The counts as a claim begins, for [`found_drained`](Self::found_drained).
    fn claiming(&self) -> Counts {
        self.order.lock_unpoisoned().counts.clone()
    }

    /// Notes that the claim that began at `as_of` found nothing more of
    /// `modules` to take.
    fn found_drained(&self, as_of: &Counts, modules: &HashSet<String>) {
        let mut order = self.order.lock_unpoisoned();
        for module_id in modules {
            order.drained.insert(module_id.clone(), as_of.of(module_id));
        }
    }

    /// Keeps `module`'s version for the runs queued on it.
    pub(crate) fn retain(&self, module: &Arc<LoadedModule>) {
        let key = key_of(module);
        let mut kept = self.kept.lock_unpoisoned();
        if let std::collections::hash_map::Entry::Vacant(entry) = kept.entry(key) {
            entry.insert(module.clone());
            self.changed.store(true, Ordering::Release);
        }
    }

    /// Every version this node can run: the kept ones and `runner`'s
    /// current ones.
    fn all(&self, runner: &ModuleRunner) -> HashMap<String, Arc<LoadedModule>> {
        let mut all = self.kept.lock_unpoisoned().clone();
        for id in runner.host().module_ids() {
            if let Some(module) = runner.host().get(&id) {
                all.insert(key_of(&module), module);
            }
        }
        all
    }

    /// Forgets the kept versions that are not current and that no queued
    /// run needs.
    fn prune(&self, runner: &ModuleRunner, needed: &HashSet<String>) {
        let current: HashSet<String> = runner
            .host()
            .module_ids()
            .iter()
            .filter_map(|id| runner.host().get(id))
            .map(|module| key_of(&module))
            .collect();
        let mut kept = self.kept.lock_unpoisoned();
        let before = kept.len();
        kept.retain(|key, _| current.contains(key) || needed.contains(key));
        if kept.len() != before {
            self.changed.store(true, Ordering::Release);
        }
    }
}

fn key_of(module: &LoadedModule) -> String {
    format!("{}@{}", module.summary.info.id, module.summary.content_hash)
}

async fn claim_loop(runner: ModuleRunner, versions: Arc<Versions>, stop: CancellationToken) {
    let registry = runner.registry().clone();
    let elsewhere = registry.queued_elsewhere();
    let due_elsewhere = registry.due_elsewhere();
    // When the earliest run known to be queued for later is due: the
    // claimer wakes then. Learnt from this node's starts, other nodes'
    // announcements, and the store (as the claimer starts, after each
    // such wake, and every [`DUE_CHECK_EVERY`]).
    let mut next_due: Option<DateTime<Utc>> = None;
    let mut last_due_check: Option<Instant> = None;
    let mut reloads = runner.host().subscribe();
    let mut last_prune = Instant::now();
    let mut last_fetch = Instant::now();
    // Aborted when the claimer stops: a fetch (a compile, maybe) must not
    // outlive it, holding the registry open.
    let mut fetching: Option<AbortOnDropHandle<()>> = None;
    let failed_versions = Arc::new(Mutex::new(HashMap::new()));
    // Whether a claim may have been recorded without this node hearing of
    // it (its answer was lost): what the store holds for this node is then
    // compared with what runs here.
    let mut unsure = false;
    let mut warned: Option<Instant> = None;
    let mut last_check = Instant::now();
    let mut fenced = false;
    let mut suspects = HashSet::new();
    // Whether the queue may hold runs this node can claim. A run ending
    // here frees room but queues nothing: with nothing new queued since the
    // last claim came back short, there is no statement to send.
    let mut maybe_queued = true;
    publish_versions(&runner, &versions);
    while !stop.is_cancelled() {
        if versions.changed.swap(false, Ordering::AcqRel) {
            publish_versions(&runner, &versions);
        }
        // A node about to lose its lease stops its runs before any other
        // node may settle them, and claims nothing until it renews.
        let expiring = registry.lease_left().is_some_and(|left| left.is_zero());
        if expiring && !fenced {
            let stopped = runner.manager().abandon_started(
                "stopped: this node could not renew its lease in time (the database is out of \
                 its reach), so it stopped the run before another node could settle it",
            );
            tracing::error!(
                runs = stopped,
                "cannot renew this node's lease: stopped its runs"
            );
        }
        fenced = expiring;
        if fenced {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(CLAIM_POLL / 10) => continue,
            }
        }
        next_due = [
            next_due,
            versions.due_here.take(),
            due_elsewhere.as_deref().and_then(NextDue::take),
        ]
        .into_iter()
        .flatten()
        .min();
        let now = Utc::now();
        let due_now = next_due.is_some_and(|at| at <= now);
        if due_now {
            // Runs became claimable: starts here queue behind them until a
            // claim finds their module drained, as for runs just queued.
            next_due = None;
            versions.may_be_queued();
            maybe_queued = true;
        }
        let mut failed = None;
        if last_check.elapsed() >= CLAIM_POLL {
            last_check = Instant::now();
            if let Err(e) = stop_lost_runs(&runner, &mut suspects).await {
                failed = Some(e);
            }
        }
        if unsure {
            match reconcile(&runner).await {
                Ok(()) => unsure = false,
                Err(e) => failed = Some(e),
            }
        }
        if !unsure && maybe_queued {
            let as_of = versions.claiming();
            match claim_all(&runner, &versions).await {
                Ok((drained, modules)) => {
                    maybe_queued = !drained;
                    versions.found_drained(&as_of, &modules);
                }
                Err(e) => {
                    // Any claim that failed may have been recorded all the same.
                    unsure = true;
                    failed = Some(e);
                }
            }
        }
        if let Some(e) = failed
            && warned.is_none_or(|at| at.elapsed() > Duration::from_secs(30))
        {
            tracing::warn!(error = %e, "cannot claim queued runs for now; trying again");
            warned = Some(Instant::now());
        }
        if last_fetch.elapsed() >= CLAIM_POLL
            && fetching.as_ref().is_none_or(AbortOnDropHandle::is_finished)
        {
            last_fetch = Instant::now();
            fetching = Some(AbortOnDropHandle::new(tokio::spawn(fetch_missing(
                runner.clone(),
                versions.clone(),
                failed_versions.clone(),
            ))));
        }
        if due_now || last_due_check.is_none_or(|at| at.elapsed() >= DUE_CHECK_EVERY) {
            last_due_check = Some(Instant::now());
            match registry.next_due(now).await {
                Ok(at) => next_due = next_due.into_iter().chain(at).min(),
                Err(e) => tracing::debug!(error = %e, "cannot read when queued runs are due"),
            }
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            match registry.queued_versions().await {
                Ok(needed) => versions.prune(&runner, &needed.into_iter().collect()),
                Err(e) => tracing::debug!(error = %e, "cannot read the versions queued runs need"),
            }
        }
        // A notice that comes while a claim is under way is kept (a
        // `Notify` permit) and wakes the next turn at once.
        let wait = next_due.map_or(CLAIM_POLL, |at| {
            (at - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(CLAIM_POLL)
        });
        tokio::select! {
            () = stop.cancelled() => return,
            () = runner.manager().task_ended() => {}
            () = versions.queued_here.notified() => maybe_queued = true,
            () = notified(elsewhere.as_deref()) => {
                versions.may_be_queued();
                maybe_queued = true;
            }
            reload = reloads.recv() => {
                if !matches!(reload, Err(broadcast::error::RecvError::Closed)) {
                    versions.changed.store(true, Ordering::Release);
                    versions.may_be_queued();
                    maybe_queued = true;
                }
            }
            // A time offered: the next turn takes it into account.
            () = versions.due_here.notice().notified() => {}
            () = notified(due_elsewhere.as_deref().map(NextDue::notice)) => {}
            () = tokio::time::sleep(wait) => maybe_queued = true,
        }
    }
}

/// Resolves when `notify` is told; never without one.
async fn notified(notify: Option<&tokio::sync::Notify>) {
    match notify {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

fn publish_versions(runner: &ModuleRunner, versions: &Versions) {
    let mut all: Vec<String> = versions.all(runner).into_keys().collect();
    all.sort();
    runner.registry().publish_versions(all);
}

/// Claims and starts queued runs until this node has no room left or the
/// queue has nothing more it can run; whether the queue was found drained
/// of what this node can run (`false`: it may hold more, for when room
/// frees), and the modules the last claim found drained.
async fn claim_all(
    runner: &ModuleRunner,
    versions: &Versions,
) -> crate::Result<(bool, HashSet<String>)> {
    loop {
        let (claim, drained) = claim_once(runner, versions).await?;
        match claim {
            Claim::More => {}
            Claim::Drained => return Ok((true, drained)),
            Claim::NoRoom => return Ok((false, drained)),
        }
    }
}

/// What one claim found.
enum Claim {
    /// It filled the room it had: there may be more to claim.
    More,
    /// It took fewer than every version could have: nothing more it can
    /// run is queued.
    Drained,
    /// Room ran out (for some module, maybe) before the queue did.
    NoRoom,
}

/// One claim, as large as this node has room for; with the modules it
/// found drained (it took fewer of their runs than it asked for).
async fn claim_once(
    runner: &ModuleRunner,
    versions: &Versions,
) -> crate::Result<(Claim, HashSet<String>)> {
    let mut rooms = runner.manager().reserve(CLAIM_BATCH);
    let mut instances = free_permits(&runner.host().instance_pool(), rooms.len());
    rooms.truncate(instances.len());
    let room = rooms.len();
    if room == 0 {
        return Ok((Claim::NoRoom, HashSet::new()));
    }
    let modules = versions.all(runner);
    // A module's own limit: the permits free now, shared by its versions.
    let mut limited: HashMap<&str, Vec<Permit>> = HashMap::new();
    let mut wanted = Vec::new();
    // A module at its own limit is not asked for: its runs may still wait.
    let mut left_out = false;
    for (key, module) in &modules {
        let id = module.summary.info.id.as_str();
        let count = match module.summary.manifest.limits.max_concurrent {
            None => room,
            Some(max) => {
                if !limited.contains_key(id) {
                    let gate = runner.gate(id, Some(max));
                    let permits = gate
                        .first
                        .as_ref()
                        .map(|first| (0..room).map_while(|_| first.try_acquire()).collect())
                        .unwrap_or_default();
                    limited.insert(id, permits);
                }
                limited[id].len()
            }
        };
        if count > 0 {
            let version = key[id.len() + 1..].to_owned();
            wanted.push(Wanted {
                module_id: id.to_owned(),
                version,
                count,
            });
        } else {
            left_out = true;
        }
    }
    if wanted.is_empty() {
        let outcome = if left_out {
            Claim::NoRoom
        } else {
            Claim::Drained
        };
        return Ok((outcome, HashSet::new()));
    }
    let claimed = runner.registry().claim(&wanted, room).await?;
    // The modules of which the claim took all it asked for, of some
    // version: they may have more waiting.
    let filled: HashSet<&str> = wanted
        .iter()
        .filter(|w| took_all(&claimed, w))
        .map(|w| w.module_id.as_str())
        .collect();
    let outcome = if claimed.len() == room {
        Claim::More
    } else if left_out || !filled.is_empty() {
        Claim::NoRoom
    } else {
        Claim::Drained
    };
    // A module is drained when the claim took fewer of its runs than it
    // asked for, of every version (a full claim leaves that unknown).
    let drained: HashSet<String> = if claimed.len() < room {
        wanted
            .iter()
            .map(|w| w.module_id.as_str())
            .filter(|id| !filled.contains(id))
            .map(str::to_owned)
            .collect()
    } else {
        HashSet::new()
    };
    let mut unstarted = Vec::new();
    for run in claimed {
        let started = start(
            runner,
            &modules,
            &mut limited,
            &mut rooms,
            &mut instances,
            &run,
        );
        if let Err(e) = started {
            tracing::warn!(run_id = %run.run_id, error = %e, "cannot start a claimed run; giving it back");
            unstarted.push(run.run_id);
        }
    }
    if !unstarted.is_empty() {
        runner
            .registry()
            .release(
                &unstarted,
                "given back: the node that claimed it could not start it",
            )
            .await?;
        // Queued again, but not worth claiming again at once: the next
        // turn (a run ending, a notice, the poll) looks.
        return Ok((Claim::NoRoom, HashSet::new()));
    }
    Ok((outcome, drained))
}

/// Whether a claim took as many runs of `wanted`'s version as it asked for.
fn took_all(claimed: &[Run], wanted: &Wanted) -> bool {
    let taken = claimed
        .iter()
        .filter(|run| {
            run.module_id == wanted.module_id
                && run.module_version.as_deref() == Some(wanted.version.as_str())
        })
        .count();
    taken >= wanted.count
}

/// Up to `wanted` permits of `semaphore`, as many as are free now.
fn free_permits(semaphore: &Arc<Semaphore>, wanted: usize) -> Vec<OwnedSemaphorePermit> {
    (0..wanted)
        .map_while(|_| semaphore.clone().try_acquire_owned().ok())
        .collect()
}

/// Starts one claimed run with a room, an instance permit and, for a
/// limited module, one of its permits.
fn start(
    runner: &ModuleRunner,
    modules: &HashMap<String, Arc<LoadedModule>>,
    limited: &mut HashMap<&str, Vec<Permit>>,
    rooms: &mut Vec<crate::manager::Room>,
    instances: &mut Vec<OwnedSemaphorePermit>,
    run: &Run,
) -> crate::Result<()> {
    let key = format!(
        "{}@{}",
        run.module_id,
        run.module_version.as_deref().unwrap_or_default()
    );
    let module = modules
        .get(&key)
        .ok_or_else(|| crate::Error::UnknownModule(key.clone()))?;
    let first = match limited.get_mut(run.module_id.as_str()) {
        Some(permits) => Some(permits.pop().ok_or_else(|| {
            crate::Error::Engine(format!(
                "claimed more runs of {} than it has room for",
                run.module_id
            ))
        })?),
        None => None,
    };
    let (Some(room), Some(instance)) = (rooms.pop(), instances.pop()) else {
        return Err(crate::Error::Engine(
            "claimed more runs than there is room for".into(),
        ));
    };
    runner.start_claimed(module, run, room, (first, Some(instance)))
}

/// Stops the work of the runs this node executes that the store no longer
/// holds for it: another node settled or re-queued them (this node was
/// frozen, or cut off, past its lease). A run is stopped when two checks
/// in a row find it so (`suspects` holds those of the last check), so
/// that a run that had just ended is not taken for lost.
async fn stop_lost_runs(
    runner: &ModuleRunner,
    suspects: &mut HashSet<String>,
) -> crate::Result<()> {
    let started = runner.manager().started_task_ids();
    if started.is_empty() {
        suspects.clear();
        return Ok(());
    }
    let held: HashSet<String> = runner.registry().claimed().await?.into_iter().collect();
    let mut now_suspect = HashSet::new();
    for run_id in started {
        if held.contains(&run_id) {
            continue;
        }
        if suspects.contains(&run_id) {
            runner.manager().stop_lost(&run_id);
        } else {
            now_suspect.insert(run_id);
        }
    }
    *suspects = now_suspect;
    Ok(())
}

/// Gives back the runs the store holds `Running` for this node that do
/// not run here: a claim recorded whose answer never arrived.
async fn reconcile(runner: &ModuleRunner) -> crate::Result<()> {
    let stray: Vec<String> = runner
        .registry()
        .claimed()
        .await?
        .into_iter()
        .filter(|run_id| !runner.manager().is_task_active(run_id))
        .collect();
    if !stray.is_empty() {
        let released = runner
            .registry()
            .release(
                &stray,
                "given back: the database recorded the claim, but its answer was lost",
            )
            .await?;
        tracing::warn!(
            runs = released,
            "gave back runs claimed while the database was out of reach"
        );
    }
    Ok(())
}

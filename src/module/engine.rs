//! The WebAssembly engine: one per host, configured for sandboxed runs, with
//! the epoch ticker that lets every running module yield and time out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::manifest::ModuleLimits;
use crate::error::{Error, Result};

/// How a module host is set up. The defaults suit a server on a small machine.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Limits of modules that have no manifest saying otherwise.
    pub default_limits: ModuleLimits,
    /// The most memory any manifest may grant one run, in bytes.
    pub memory_ceiling: usize,
    /// The most runs executing at once across all modules (the pooling
    /// allocator reserves this many instance slots up front, and a few more
    /// for loading modules); runs past it wait, queued.
    pub max_instances: u32,
    /// Component files larger than this are refused unread.
    pub max_module_bytes: u64,
    /// Bytes of standard output, and of standard error, kept per run.
    pub output_cap: usize,
    /// Log entries kept per run; later ones are counted, not kept.
    pub log_cap: usize,
    /// How often running modules yield and check their deadline.
    pub epoch_tick: Duration,
    /// Native stack a module's WebAssembly may use (deeper recursion traps).
    pub max_wasm_stack: usize,
    /// Where compiled components are kept, by content hash, so a restart or
    /// a revert to an earlier version does not compile again. `None`: no
    /// cache. It must be modrun's own directory, never the plugins
    /// directory: what is in it is loaded as machine code.
    pub cache_dir: Option<std::path::PathBuf>,
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            default_limits: ModuleLimits::default(),
            memory_ceiling: 1 << 30,
            max_instances: 1000,
            max_module_bytes: 64 << 20,
            output_cap: 64 << 10,
            log_cap: 1000,
            epoch_tick: Duration::from_millis(1),
            max_wasm_stack: 1 << 20,
            cache_dir: None,
        }
    }
}

impl HostConfig {
    /// The default configuration with the compiled-module cache every
    /// command shares for the registry at `db` ([`shared_cache_dir`]): what
    /// `serve`, `dev`, `run` and `modules` use, so that none of them
    /// compiles a component another has compiled.
    #[must_use]
    pub fn with_shared_cache(db: &std::path::Path) -> HostConfig {
        HostConfig {
            cache_dir: Some(shared_cache_dir(db)),
            ..HostConfig::default()
        }
    }

    /// The wasmtime configuration modrun's engine uses: for embedders and
    /// benchmarks that compare modrun with bare wasmtime on equal terms.
    #[must_use]
    pub fn wasmtime_config(&self) -> Config {
        let config = self;
        let mut wasm = Config::new();
        // Cancellation and timeouts: every tick, a running module's epoch
        // deadline passes and it yields to tokio (see the runner's callback).
        wasm.epoch_interruption(true);
        // We call modules one at a time per Store and need none of the
        // component-model async machinery (measured here: it made a trivial
        // run several times slower). It is not even compiled in: wasmtime's
        // `component-model-async` feature stays off.
        wasm.concurrency_support(false);
        wasm.max_wasm_stack(config.max_wasm_stack);
        // The fiber stack an async call runs on must hold the wasm stack plus
        // the host functions it calls.
        wasm.async_stack_size(config.max_wasm_stack + (1 << 20));

        // Runs take at most `max_instances` slots (the module host gates
        // them); loading a module calls its `describe` in a slot of its own.
        let slots = config.max_instances.saturating_add(LOADING_SLOTS);
        let mut pooling = PoolingAllocationConfig::default();
        pooling
            .total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(4))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(4))
            .total_stacks(slots)
            .max_memory_size(config.memory_ceiling)
            // A finished run's slot is wiped for the next. Zeroing the first
            // pages in place, and returning the rest to the kernel in
            // batches, avoids a system call and a cross-core TLB flush per
            // run (measured: the largest single cost of a short run).
            // Not more: a Rust guest's 1 MiB stack sits at the bottom of its
            // memory, so the pages a short run writes (its stack's top, its
            // data) lie past 1 MiB and are faulted in again by each run.
            // Wiping 1 MiB + 64 KiB in place instead made hello runs on all
            // cores 1.2 to 1.9 times as fast, but cost every instantiation
            // that memset (Rust +30 us, JavaScript +130, Python +200 to 450,
            // measured) and kept 1 MiB resident per warm slot.
            .linear_memory_keep_resident(128 << 10)
            .table_keep_resident(16 << 10)
            .async_stack_keep_resident(64 << 10)
            .decommit_batch_size(16)
            // A free slot stays "warm" for the module that last ran in it:
            // its memory image mapped (a file descriptor of the image
            // held) and its first pages resident. Wasmtime keeps up to 100
            // such slots by default, even for versions a reload replaced;
            // fewer bound what a long-lived server holds for modules it no
            // longer runs, and a module that runs again finds its own.
            .max_unused_warm_slots(WARM_SLOTS)
            // Not `PAGEMAP_SCAN`, though it resets only the pages a run
            // wrote and keeps them resident (measured here: hello runs 1.5
            // to 2.7 times as fast, without the costs above). Wasmtime 48
            // resets only the written pages that are in memory: a page the
            // kernel swapped out meanwhile keeps the last run's data for the
            // next run in the slot (seen: a fresh instance read what the
            // last one wrote; the swap test in `tests/all/abuse.rs` checks
            // it). Said explicitly, so that a change of wasmtime's default
            // does not turn it on.
            .pagemap_scan(wasmtime::Enabled::No);
        // Reserve address space for the largest memory a run may have, not the
        // default 4 GiB per slot: thousands of slots then fit comfortably.
        wasm.memory_reservation(config.memory_ceiling as u64);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        wasm
    }
}

/// Free instance slots kept warm for the module that last used them.
pub const WARM_SLOTS: u32 = 16;

/// Instance slots kept beside the runs' for modules being loaded.
const LOADING_SLOTS: u32 = 16;

/// Builds the engine and starts its epoch ticker.
pub(crate) fn new_engine(config: &HostConfig) -> Result<(Engine, Ticker)> {
    let wasm = config.wasmtime_config();
    let engine = Engine::new(&wasm)
        .map_err(|e| Error::Engine(format!("cannot create the engine: {e:#}")))?;
    let ticker = Ticker::start(&engine, config.epoch_tick)?;
    Ok((engine, ticker))
}

/// How many ticks in a row the ticker makes with no guest in a store
/// before it stops ticking until one is.
const IDLE_TICKS: u32 = 100;

/// The engine's epoch ticker: a thread that increments the epoch every
/// tick while any guest code may run (a [`Ticking`] is held), so that every
/// running module yields, and is timed out and cancelled, even while it
/// spins. With none for [`IDLE_TICKS`] ticks, it sleeps until one is: an
/// idle host takes no wake-ups (it took a thousand a second). It ends
/// when this handle is dropped, or when the engine is.
pub(crate) struct Ticker {
    shared: Arc<TickerShared>,
    thread: std::thread::Thread,
}

#[derive(Default)]
struct TickerShared {
    /// Stores whose guest code may run now.
    active: AtomicUsize,
    /// The thread is asleep until a store is made, or the ticker ends.
    parked: AtomicBool,
    stopped: AtomicBool,
}

impl Ticker {
    fn start(engine: &Engine, tick: Duration) -> Result<Ticker> {
        let weak = engine.weak();
        let shared = Arc::new(TickerShared::default());
        let ticking = shared.clone();
        let handle = std::thread::Builder::new()
            .name("modrun-epoch".into())
            .spawn(move || {
                let mut idle = 0;
                while !ticking.stopped.load(Ordering::SeqCst) {
                    let Some(engine) = weak.upgrade() else { return };
                    engine.increment_epoch();
                    drop(engine);
                    idle = if ticking.active.load(Ordering::SeqCst) == 0 {
                        idle + 1
                    } else {
                        0
                    };
                    if idle >= IDLE_TICKS {
                        // Parked is said before active is read again, and
                        // a store is counted before parked is read: one
                        // of the two sees the other (all sequentially
                        // consistent), so no store waits on a sleeping
                        // ticker.
                        ticking.parked.store(true, Ordering::SeqCst);
                        if ticking.active.load(Ordering::SeqCst) == 0
                            && !ticking.stopped.load(Ordering::SeqCst)
                        {
                            std::thread::park();
                        }
                        ticking.parked.store(false, Ordering::SeqCst);
                        idle = 0;
                        continue;
                    }
                    std::thread::sleep(tick);
                }
            })
            .map_err(|e| Error::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Ticker {
            shared,
            thread: handle.thread().clone(),
        })
    }

    /// Keeps the epoch ticking while the returned guard lives: held by
    /// every store in which guest code runs.
    pub(crate) fn ticking(&self) -> Ticking {
        self.shared.active.fetch_add(1, Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
        Ticking {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// A store in which guest code may run: the epoch ticks while one lives.
pub(crate) struct Ticking {
    shared: Arc<TickerShared>,
}

impl Drop for Ticking {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where the commands keep compiled components for the registry at `db`:
/// `cache/` beside a SQLite file, `.modrun/cache` for a database server.
#[must_use]
pub fn shared_cache_dir(db: &std::path::Path) -> std::path::PathBuf {
    if crate::registry::is_database_url(&db.to_string_lossy()) {
        std::path::PathBuf::from(".modrun/cache")
    } else {
        db.parent()
            .unwrap_or(std::path::Path::new("."))
            .join("cache")
    }
}

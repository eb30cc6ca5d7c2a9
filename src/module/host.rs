//! What a running module's Store holds, and the host functions it imports:
//! WASI (deny-by-default), `log` and `progress`, and the memory limiter.

use std::sync::{Arc, Mutex};

use chrono::Utc;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{Host, Level};
use super::engine::Ticking;
use super::output::CappedOutput;
use crate::registry::RunRegistry;
use crate::run::{LogEntry, LogLevel, LogSource, Progress, cut_to};
use crate::sync::LockUnpoisoned;

/// The longest log or progress message kept; longer ones are cut.
const MAX_MESSAGE: usize = 4096;

/// The state of one plugin instance's store: one run, or one `describe`
/// call as the module loads. An application's own
/// [host functions](super::HostFunctions) receive it with every call, to
/// learn which run is calling.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    /// Whether the module may create symbolic links in its directories.
    pub(crate) symlinks_allowed: bool,
    /// Present during a run; `describe` at load time has no run to report to.
    pub(crate) run: Option<RunContext>,
    /// Keeps the engine's epoch ticking for as long as the store lives
    /// (set by [`ModuleHost::store`](super::loader::ModuleHost::store)).
    pub(crate) ticking: Option<Ticking>,
}

impl HostState {
    pub(crate) fn new(wasi: WasiCtx, memory_limit: usize, run: Option<RunContext>) -> HostState {
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: memory_limit,
                exceeded: false,
            },
            symlinks_allowed: false,
            run,
            ticking: None,
        }
    }
}

impl HostState {
    /// The id of the run calling, or `None` while the module is being
    /// loaded (its `describe` call belongs to no run).
    #[must_use]
    pub fn run_id(&self) -> Option<&str> {
        self.run.as_ref().map(|run| run.run_id.as_str())
    }

    /// The module whose run is calling; `None` while it is being loaded.
    #[must_use]
    pub fn module_id(&self) -> Option<&str> {
        self.run.as_ref().map(|run| run.module_id.as_str())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Refuses memory growth past the module's limit, and remembers that it did,
/// so a run that dies of it is told why.
pub(crate) struct MemoryLimiter {
    limit: usize,
    pub(crate) exceeded: bool,
}

impl MemoryLimiter {
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Where a run's `log` and `progress` calls go.
pub(crate) struct RunContext {
    pub(crate) run_id: String,
    pub(crate) module_id: String,
    pub(crate) registry: RunRegistry,
    pub(crate) log: Arc<Mutex<RunLog>>,
    pub(crate) span: tracing::Span,
    pub(crate) echo: EchoBudget,
}

/// How many of a run's log lines are echoed to the server's own log: a
/// burst, then a steady rate. A module that logs millions of lines fills
/// its own (capped) log, not the server's output; the lines not echoed are
/// counted and reported when the run ends.
#[derive(Debug)]
pub(crate) struct EchoBudget {
    tokens: f64,
    refilled: std::time::Instant,
    pub(crate) suppressed: u64,
}

/// Lines a run may echo at once, and per second after that.
const ECHO_BURST: f64 = 100.0;
const ECHO_PER_SECOND: f64 = 20.0;

impl EchoBudget {
    pub(crate) fn new() -> EchoBudget {
        EchoBudget {
            tokens: ECHO_BURST,
            refilled: std::time::Instant::now(),
            suppressed: 0,
        }
    }

    /// Whether one more line may be echoed now.
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * ECHO_PER_SECOND;
        self.tokens = (self.tokens + earned).min(ECHO_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// A progress fraction as it is stored: within 0 to 1 (+inf is 1; -inf and
/// NaN, which say nothing, are 0), and never -0.
#[must_use]
pub(crate) fn progress_fraction(reported: f64) -> f64 {
    if reported.is_nan() {
        0.0
    } else {
        // Adding 0.0 turns -0.0 into 0.0 and leaves every other value as it is.
        reported.clamp(0.0, 1.0) + 0.0
    }
}

/// A run's log, capped: entries past the cap are counted, not kept.
#[derive(Debug)]
pub(crate) struct RunLog {
    entries: Vec<LogEntry>,
    cap: usize,
    dropped: usize,
    /// The host's own entries, never dropped.
    notes: Vec<LogEntry>,
}

impl RunLog {
    pub(crate) fn new(cap: usize) -> RunLog {
        RunLog {
            entries: Vec::new(),
            cap,
            dropped: 0,
            notes: Vec::new(),
        }
    }

    /// Adds an entry; returns whether it was kept.
    pub(crate) fn push(&mut self, entry: LogEntry) -> bool {
        if self.entries.len() < self.cap {
            self.entries.push(entry);
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// Everything kept, a marker for what was dropped, the host's notes,
    /// then the captured output streams line by line (which are not counted
    /// against the cap).
    pub(crate) fn finish(&self, stdout: &CappedOutput, stderr: &CappedOutput) -> Vec<LogEntry> {
        let mut entries = self.entries.clone();
        if self.dropped > 0 {
            entries.push(LogEntry {
                at: Utc::now(),
                level: LogLevel::Warn,
                source: LogSource::Log,
                message: format!("[log truncated: {} more entries dropped]", self.dropped),
            });
        }
        entries.extend(self.notes.iter().cloned());
        for (source, output) in [(LogSource::Stdout, stdout), (LogSource::Stderr, stderr)] {
            entries.extend(output.lines().into_iter().map(|(at, message)| LogEntry {
                at,
                level: LogLevel::Info,
                source,
                message,
            }));
        }
        entries
    }

    /// Adds what the host has to say about the run (how it ended, a trap's
    /// backtrace): always kept, whatever the module logged.
    pub(crate) fn note(&mut self, level: LogLevel, message: String) {
        self.notes.push(LogEntry {
            at: Utc::now(),
            level,
            source: LogSource::Log,
            message,
        });
    }
}

fn capped(message: String) -> String {
    cut_to(message, MAX_MESSAGE)
}

impl Host for HostState {
    async fn log(&mut self, level: Level, message: String) {
        // A line's ending is not part of it: viewers would show blank lines.
        let message = capped(message.trim_end_matches(['\n', '\r']).to_owned());
        let Some(run) = &mut self.run else {
            tracing::debug!(%message, "module logged while being described");
            return;
        };
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let echo = run.echo.take();
        run.span.in_scope(|| match level {
            _ if !echo => {}
            LogLevel::Trace => tracing::trace!(target: "modrun::module", "{message}"),
            LogLevel::Debug => tracing::debug!(target: "modrun::module", "{message}"),
            LogLevel::Info => tracing::info!(target: "modrun::module", "{message}"),
            LogLevel::Warn => tracing::warn!(target: "modrun::module", "{message}"),
            LogLevel::Error => tracing::error!(target: "modrun::module", "{message}"),
        });
        let entry = LogEntry {
            at: Utc::now(),
            level,
            source: LogSource::Log,
            message,
        };
        let kept = run.log.lock_unpoisoned().push(entry.clone());
        if kept {
            run.registry
                .publish_log(&run.run_id, &run.module_id, &entry);
        }
    }

    async fn progress(&mut self, fraction: f64, message: String) {
        let Some(run) = &self.run else {
            return;
        };
        let progress = Progress {
            fraction: progress_fraction(fraction),
            message: capped(message),
        };
        if let Err(e) = run
            .registry
            .report_progress(&run.run_id, &run.module_id, progress)
        {
            run.span
                .in_scope(|| tracing::warn!(error = %e, "cannot record the run's progress"));
        }
    }
}

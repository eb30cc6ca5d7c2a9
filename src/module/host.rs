//! What a running module's Store holds, and the host functions it imports:
//! WASI (deny-by-default), `log` and `progress`, and the memory limiter.

use std::sync::{Arc, Mutex};

use chrono::Utc;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{Host, Level};
use crate::registry::RunRegistry;
use crate::run::{LogEntry, LogLevel, LogSource, Progress};

/// The longest log or progress message kept; longer ones are cut.
const MAX_MESSAGE: usize = 4096;

/// The state of one Store: one run, or one `describe` call at load time.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    /// Present during a run; `describe` at load time has no run to report to.
    pub(crate) run: Option<RunContext>,
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
            run,
        }
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
}

/// A run's log, capped: entries past the cap are counted, not kept.
#[derive(Debug)]
pub(crate) struct RunLog {
    entries: Vec<LogEntry>,
    cap: usize,
    dropped: usize,
}

impl RunLog {
    pub(crate) fn new(cap: usize) -> RunLog {
        RunLog {
            entries: Vec::new(),
            cap,
            dropped: 0,
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

    /// Everything kept, a marker for what was dropped, then the captured
    /// output streams (which are not counted against the cap).
    pub(crate) fn finish(&self, stdout: &str, stderr: &str) -> Vec<LogEntry> {
        let mut entries = self.entries.clone();
        let at = Utc::now();
        if self.dropped > 0 {
            entries.push(LogEntry {
                at,
                level: LogLevel::Warn,
                source: LogSource::Log,
                message: format!("[log truncated: {} more entries dropped]", self.dropped),
            });
        }
        for (source, text) in [(LogSource::Stdout, stdout), (LogSource::Stderr, stderr)] {
            if !text.is_empty() {
                entries.push(LogEntry {
                    at,
                    level: LogLevel::Info,
                    source,
                    message: text.to_owned(),
                });
            }
        }
        entries
    }
}

fn capped(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(" [cut]");
    }
    message
}

impl Host for HostState {
    async fn log(&mut self, level: Level, message: String) {
        let message = capped(message);
        let Some(run) = &self.run else {
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
        run.span.in_scope(|| match level {
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
        let kept = run
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry.clone());
        if kept {
            run.registry
                .publish_log(&run.run_id, &run.module_id, &entry);
        }
    }

    async fn progress(&mut self, fraction: f64, message: String) {
        let Some(run) = &self.run else {
            return;
        };
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let progress = Progress {
            fraction,
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

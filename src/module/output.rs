//! Captured standard output and error of a run: kept up to a cap, the rest
//! counted and dropped, so a flooding module neither fails nor fills memory.
//! What is kept is read back as lines, each with the time it began.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::sync::LockUnpoisoned;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// One captured stream. Clones share the same buffer.
#[derive(Debug, Clone)]
pub struct CappedOutput {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Debug)]
struct Captured {
    kept: Vec<u8>,
    cap: usize,
    dropped: u64,
    /// Where each line of `kept` begins, and when its first byte came.
    line_starts: Vec<(usize, DateTime<Utc>)>,
}

/// The most lines a stream is read back as; what follows is one last entry.
const MAX_LINES: usize = 1000;

impl CappedOutput {
    /// A stream that keeps at most `cap` bytes.
    pub fn new(cap: usize) -> CappedOutput {
        CappedOutput {
            inner: Arc::new(Mutex::new(Captured {
                kept: Vec::new(),
                cap,
                dropped: 0,
                line_starts: Vec::new(),
            })),
        }
    }

    fn accept(&self, bytes: &[u8]) {
        let mut captured = self.inner.lock_unpoisoned();
        let room = captured.cap - captured.kept.len();
        let kept = &bytes[..bytes.len().min(room)];
        captured.dropped += (bytes.len() - kept.len()) as u64;
        if kept.is_empty() {
            return;
        }
        let now = Utc::now();
        let at = captured.kept.len();
        if captured.kept.last().is_none_or(|&last| last == b'\n') {
            captured.line_starts.push((at, now));
        }
        captured.kept.extend_from_slice(kept);
        let end = captured.kept.len();
        for (i, _) in kept.iter().enumerate().filter(|(_, byte)| **byte == b'\n') {
            if at + i + 1 < end {
                captured.line_starts.push((at + i + 1, now));
            }
        }
    }

    /// What was captured, line by line (line endings stripped), each with
    /// the time it began: at most [`MAX_LINES`] entries, the last holding
    /// all the rest; then a marker saying how much was dropped.
    pub fn lines(&self) -> Vec<(DateTime<Utc>, String)> {
        let captured = self.inner.lock_unpoisoned();
        let starts = &captured.line_starts;
        let mut lines: Vec<(DateTime<Utc>, String)> = starts
            .iter()
            .enumerate()
            .take(MAX_LINES)
            .map(|(index, &(start, at))| {
                // The last entry kept runs to the end, holding the rest.
                let end = starts
                    .get(index + 1)
                    .filter(|_| index + 1 < MAX_LINES)
                    .map_or(captured.kept.len(), |&(next, _)| next);
                let text = String::from_utf8_lossy(&captured.kept[start..end]);
                (at, text.trim_end_matches(['\n', '\r']).to_owned())
            })
            .collect();
        if captured.dropped > 0 {
            lines.push((
                Utc::now(),
                format!(
                    "[output truncated: {} more bytes dropped after the first {}]",
                    captured.dropped,
                    captured.kept.len()
                ),
            ));
        }
        lines
    }

    /// What was captured, as text, with a marker saying how much was dropped.
    pub fn text(&self) -> String {
        let captured = self.inner.lock_unpoisoned();
        let mut text = String::from_utf8_lossy(&captured.kept).into_owned();
        if captured.dropped > 0 {
            text.push_str(&format!(
                "\n[output truncated: {} more bytes dropped after the first {}]",
                captured.dropped,
                captured.kept.len()
            ));
        }
        text
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.accept(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always writable: what is over the cap is counted, not refused.
        Ok(64 * 1024)
    }
}

impl AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.accept(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

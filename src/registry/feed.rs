//! The registry's event feed: every event this process publishes or hears
//! from other nodes, numbered in the order it was published, the latest of
//! them kept so that a listener that lost its connection resumes where it
//! left off.
//!
//! Events are kept from the first time a listener asks for positions
//! ([`EventFeed::resume`]): before that nobody can resume, and a registry
//! nobody listens to pays nothing for its events.
//!
//! A position in the feed is written `<feed>-<sequence number>`: the feed's
//! name (random, one per process) tells a resume against this process from
//! one against another process or an earlier run of this one, whose numbers
//! mean nothing here. Such a resume, or one from a position older than what
//! is kept, is told so ([`Resumed::Reset`]): the listener reads the runs
//! again instead of silently missing events.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use super::RunEvent;
use crate::sync::LockUnpoisoned;

/// How many events a slow subscriber may fall behind before it misses some
/// (it is then told how many it missed, see
/// [`broadcast::error::RecvError::Lagged`]; a numbered listener resumes
/// from what is kept).
const EVENT_BUFFER: usize = 4096;

/// How many of the latest events are kept for resuming listeners, and how
/// many bytes of them at most (log lines make some events large).
const KEPT_EVENTS: usize = 4096;
const KEPT_BYTES: usize = 2 << 20;

/// A place in a feed: after which event a listener resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedPosition {
    feed: u32,
    seq: u64,
}

impl fmt::Display for FeedPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}-{}", self.feed, self.seq)
    }
}

impl FromStr for FeedPosition {
    type Err = String;

    fn from_str(text: &str) -> Result<FeedPosition, String> {
        let bad = || format!("{text:?} is not an event id (expected <feed>-<number>)");
        let (feed, seq) = text.split_once('-').ok_or_else(bad)?;
        if feed.len() != 8 {
            return Err(bad());
        }
        Ok(FeedPosition {
            feed: u32::from_str_radix(feed, 16).map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// An event and its place in the feed.
#[derive(Debug, Clone)]
pub struct Numbered {
    /// Its place: a listener that saw it resumes after it.
    pub position: FeedPosition,
    /// The event.
    pub event: Arc<RunEvent>,
}

/// Where a listener resumes ([`EventFeed::resume`]).
#[derive(Debug)]
pub enum Resumed {
    /// Every event after the position asked for, still kept: nothing was
    /// missed.
    Replay(Vec<Numbered>),
    /// The position is not this feed's (another process, or an earlier run
    /// of this one) or is older than what is kept: events were missed, and
    /// the listener must read the runs again.
    Reset,
}

/// The numbered, resumable stream of a registry's events. Cheap to clone.
#[derive(Clone)]
pub struct EventFeed {
    inner: Arc<Inner>,
}

struct Inner {
    feed: u32,
    /// Every event, for [`RunRegistry::subscribe`](super::RunRegistry::subscribe).
    events: broadcast::Sender<RunEvent>,
    /// Every event with its place, for listeners that resume.
    numbered: broadcast::Sender<Numbered>,
    /// Whether events are numbered and kept: from the first resume on.
    keeping: std::sync::atomic::AtomicBool,
    kept: Mutex<Kept>,
}

struct Kept {
    next: u64,
    events: VecDeque<Numbered>,
    bytes: usize,
}

impl fmt::Debug for EventFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventFeed")
            .field("feed", &format_args!("{:08x}", self.inner.feed))
            .field("subscribers", &self.inner.events.receiver_count())
            .finish_non_exhaustive()
    }
}

impl Default for EventFeed {
    fn default() -> EventFeed {
        EventFeed::new()
    }
}

impl EventFeed {
    /// An empty feed with a name of its own.
    #[must_use]
    pub fn new() -> EventFeed {
        EventFeed {
            inner: Arc::new(Inner {
                // The low bits of a v7 uuid are random.
                feed: uuid::Uuid::now_v7().as_u128() as u32,
                events: broadcast::channel(EVENT_BUFFER).0,
                numbered: broadcast::channel(EVENT_BUFFER).0,
                keeping: std::sync::atomic::AtomicBool::new(false),
                kept: Mutex::new(Kept {
                    next: 1,
                    events: VecDeque::new(),
                    bytes: 0,
                }),
            }),
        }
    }

    /// Numbers `event`, keeps it, and tells every listener. `event` is
    /// made only if anyone listens or may resume.
    pub fn publish(&self, event: impl FnOnce() -> RunEvent) {
        if !self
            .inner
            .keeping
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            if self.inner.events.receiver_count() > 0 {
                let _ = self.inner.events.send(event());
            }
            return;
        }
        let event = Arc::new(event());
        let size = weight(&event);
        {
            let mut kept = self.kept();
            let numbered = Numbered {
                position: FeedPosition {
                    feed: self.inner.feed,
                    seq: kept.next,
                },
                event: event.clone(),
            };
            kept.next += 1;
            kept.bytes += size;
            kept.events.push_back(numbered.clone());
            while kept.events.len() > KEPT_EVENTS || kept.bytes > KEPT_BYTES {
                match kept.events.pop_front() {
                    Some(old) => kept.bytes -= weight(&old.event),
                    None => break,
                }
            }
            // Sent while the feed is locked, so that a listener resuming
            // meanwhile gets each event once: kept, or sent, not both.
            if self.inner.numbered.receiver_count() > 0 {
                let _ = self.inner.numbered.send(numbered);
            }
        }
        if self.inner.events.receiver_count() > 0 {
            let _ = self.inner.events.send(Arc::unwrap_or_clone(event));
        }
    }

    /// Every event from now on, without positions.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.inner.events.subscribe()
    }

    /// Resumes a listener: the events kept after `after` (or none when
    /// `after` is `None`), and the events published from then on, each
    /// once. Also returns the feed's position now (the last event
    /// published), for a listener that starts from a fresh read.
    pub fn resume(
        &self,
        after: Option<FeedPosition>,
    ) -> (Resumed, FeedPosition, broadcast::Receiver<Numbered>) {
        let kept = self.kept();
        self.inner
            .keeping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let live = self.inner.numbered.subscribe();
        let now = FeedPosition {
            feed: self.inner.feed,
            seq: kept.next - 1,
        };
        let resumed = match after {
            None => Resumed::Replay(Vec::new()),
            Some(after) if after.feed != self.inner.feed || after.seq > now.seq => Resumed::Reset,
            Some(after) => {
                let oldest = kept.events.front().map_or(kept.next, |e| e.position.seq);
                if after.seq + 1 < oldest {
                    Resumed::Reset
                } else {
                    let skip = usize::try_from(after.seq + 1 - oldest).unwrap_or(usize::MAX);
                    Resumed::Replay(kept.events.iter().skip(skip).cloned().collect())
                }
            }
        };
        (resumed, now, live)
    }

    /// Whether a kept event says that `run_id` entered `status` at `at`
    /// (nanoseconds): an event another node announced that this feed has.
    #[cfg(feature = "postgres")]
    pub(crate) fn has_status(&self) -> impl Fn(&str, crate::run::RunStatus, i64) -> bool + use<> {
        let statuses: std::collections::HashSet<(String, crate::run::RunStatus, i64)> = self
            .kept()
            .events
            .iter()
            .filter_map(|numbered| match &*numbered.event {
                RunEvent::Status { run_id, change, .. } => Some((
                    run_id.clone(),
                    change.status,
                    super::retention::nanos_clamped(change.at),
                )),
                _ => None,
            })
            .collect();
        move |run_id, status, at| statuses.contains(&(run_id.to_owned(), status, at))
    }

    /// How many listen without positions (for the registry's debug output).
    pub(crate) fn receiver_count(&self) -> usize {
        self.inner.events.receiver_count() + self.inner.numbered.receiver_count()
    }

    fn kept(&self) -> MutexGuard<'_, Kept> {
        // Every critical section pushes, pops or copies: none can panic
        // halfway through.
        self.inner.kept.lock_unpoisoned()
    }
}

/// Roughly what keeping an event costs, in bytes.
fn weight(event: &RunEvent) -> usize {
    let text = match event {
        RunEvent::Status { change, .. } => change.message.as_ref().map_or(0, String::len),
        RunEvent::Log { entry, .. } => entry.message.len(),
        RunEvent::Progress { progress, .. } => progress.message.len(),
    };
    let (run_id, module_id) = match event {
        RunEvent::Status {
            run_id, module_id, ..
        }
        | RunEvent::Log {
            run_id, module_id, ..
        }
        | RunEvent::Progress {
            run_id, module_id, ..
        } => (run_id, module_id),
    };
    std::mem::size_of::<RunEvent>() + 64 + run_id.len() + module_id.len() + text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(n: u64) -> RunEvent {
        RunEvent::Progress {
            run_id: format!("r{n}"),
            module_id: "m".into(),
            progress: crate::run::Progress {
                fraction: 0.5,
                message: String::new(),
            },
        }
    }

    #[test]
    fn resumes_after_a_position_and_resets_for_a_foreign_or_lost_one() {
        let feed = EventFeed::new();
        // Nothing is kept before anyone asks for positions.
        feed.publish(|| progress(0));
        assert!(matches!(feed.resume(None), (Resumed::Replay(_), now, _) if now.seq == 0));
        for n in 1..=3 {
            feed.publish(|| progress(n));
        }
        let (Resumed::Replay(none), now, _) = feed.resume(None) else {
            panic!("a fresh listener resumes from now");
        };
        assert!(none.is_empty());
        assert_eq!(now.seq, 3);
        let after_first = FeedPosition { seq: 1, ..now };
        let (Resumed::Replay(missed), ..) = feed.resume(Some(after_first)) else {
            panic!("a kept position replays");
        };
        let ids: Vec<&str> = missed.iter().map(|n| n.event.run_id()).collect();
        assert_eq!(ids, ["r2", "r3"]);
        let parsed: FeedPosition = after_first.to_string().parse().unwrap();
        assert_eq!(parsed, after_first);

        let other = EventFeed::new();
        assert!(matches!(other.resume(Some(now)).0, Resumed::Reset));
        for n in 0..KEPT_EVENTS as u64 {
            feed.publish(|| progress(n));
        }
        assert!(matches!(feed.resume(Some(after_first)).0, Resumed::Reset));
        assert!("12-3".parse::<FeedPosition>().is_err());
        assert!("0000000g-3".parse::<FeedPosition>().is_err());
    }
}

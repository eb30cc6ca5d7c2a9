//! A waiting line served by priority: a counted set of permits, like a
//! semaphore, whose waiters are served higher priority first and, within
//! one priority, in the order they joined. What the task manager's slots
//! and a module's own limit on concurrent runs are kept with, so that an
//! urgent run goes before the runs queued earlier at a lower priority.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::sync::LockUnpoisoned;

/// Where a waiter stands: higher priority first, then first come.
type Place = (Reverse<i16>, u64);

/// A counted set of permits served by priority; see the [module
/// documentation](self).
#[derive(Debug)]
pub(crate) struct Line {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Permits no one holds. Never more than zero while anyone waits: a
    /// permit given back goes to the first waiter.
    free: usize,
    waiting: BTreeMap<Place, oneshot::Sender<Permit>>,
    joined: u64,
}

/// One of a [`Line`]'s permits; given back (to the first waiter, if any)
/// when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    line: Option<Arc<Line>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            line.give_back();
        }
    }
}

impl Line {
    /// A line of `permits` permits.
    pub(crate) fn new(permits: usize) -> Line {
        Line {
            state: Mutex::new(State {
                free: permits,
                waiting: BTreeMap::new(),
                joined: 0,
            }),
        }
    }

    /// A permit, if one is free now.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut state = self.state.lock_unpoisoned();
        if state.free == 0 {
            return None;
        }
        state.free -= 1;
        Some(Permit {
            line: Some(self.clone()),
        })
    }

    /// A place in line at `priority`, taken now: a permit at once if one
    /// is free, or a turn among the waiters.
    pub(crate) fn join(self: &Arc<Self>, priority: i16) -> InLine {
        let mut state = self.state.lock_unpoisoned();
        if state.free > 0 {
            state.free -= 1;
            return InLine::Ready(Permit {
                line: Some(self.clone()),
            });
        }
        state.joined += 1;
        let place = (Reverse(priority), state.joined);
        let (grant, granted) = oneshot::channel();
        state.waiting.insert(place, grant);
        InLine::Waiting(Box::new(Waiting {
            line: self.clone(),
            place,
            granted,
        }))
    }

    /// A permit given back: to the first waiter still waiting, or freed.
    fn give_back(self: &Arc<Self>) {
        loop {
            let grant = {
                let mut state = self.state.lock_unpoisoned();
                match state.waiting.pop_first() {
                    Some((_, grant)) => grant,
                    None => {
                        state.free += 1;
                        return;
                    }
                }
            };
            // A waiter that stopped waiting hands the permit back: try
            // the next, without giving it back through its drop.
            match grant.send(Permit {
                line: Some(self.clone()),
            }) {
                Ok(()) => return,
                Err(mut permit) => permit.line = None,
            }
        }
    }
}

/// A place in a [`Line`], taken when it was joined.
#[derive(Debug)]
pub(crate) enum InLine {
    /// The permit was free.
    Ready(Permit),
    /// Waiting its turn (boxed: a place in line is small in the state of
    /// every task that may wait).
    Waiting(Box<Waiting>),
}

impl InLine {
    /// The permit once it is this place's turn; `None` if `token` is
    /// cancelled first (the place is then left).
    pub(crate) async fn turn(self, token: &CancellationToken) -> Option<Permit> {
        match self {
            InLine::Ready(permit) => Some(permit),
            InLine::Waiting(mut waiting) => tokio::select! {
                biased;
                () = token.cancelled() => None,
                permit = &mut waiting.granted => permit.ok(),
            },
        }
    }
}

/// A waiter's turn in a [`Line`]: it leaves the line when dropped
/// unserved.
#[derive(Debug)]
pub(crate) struct Waiting {
    line: Arc<Line>,
    place: Place,
    granted: oneshot::Receiver<Permit>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Served meanwhile: the permit in the channel is given back as
        // the channel drops.
        self.line
            .state
            .lock_unpoisoned()
            .waiting
            .remove(&self.place);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_are_served_by_priority_then_in_the_order_they_joined() {
        let line = Arc::new(Line::new(1));
        let held = line.try_acquire().expect("one permit is free");
        assert!(line.try_acquire().is_none());
        let token = CancellationToken::new();
        let low = line.join(0);
        let high = line.join(5);
        let later_high = line.join(5);
        let gone = line.join(9);
        drop(gone);
        drop(held);
        let first = high.turn(&token).await.expect("served first");
        drop(first);
        let second = later_high.turn(&token).await.expect("served second");
        drop(second);
        let third = low.turn(&token).await.expect("served last");
        drop(third);
        assert!(line.try_acquire().is_some(), "the permit is free again");
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_its_place_and_passes_no_permit_on() {
        let line = Arc::new(Line::new(1));
        let held = line.try_acquire().expect("free");
        let token = CancellationToken::new();
        token.cancel();
        assert!(line.join(1).turn(&token).await.is_none());
        drop(held);
        let permit = line.try_acquire().expect("given back to no one");
        assert!(line.try_acquire().is_none(), "one permit only");
        drop(permit);
    }
}

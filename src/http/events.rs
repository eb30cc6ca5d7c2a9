//! `GET /events`: a live Server-Sent Events stream of status, progress and
//! log events, for every run or (`?run_id=`) one.
//!
//! Every event carries its place in the registry's feed as its SSE id. A
//! client that connects fresh first gets the current state (a `snapshot`
//! event per run it watches); one that reconnects with `Last-Event-ID` (as
//! `EventSource` does by itself) gets every event it missed, in order, and
//! none twice. When those are no longer kept (the client was away too long,
//! or the id is another server's), it gets a `reset` event and the snapshot
//! again instead of a silent gap. A client too slow to keep up is resumed
//! the same way.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::extract::ApiQuery;
use super::{ApiError, AppState};
use crate::error::Error;
use crate::registry::{FeedPosition, Numbered, Resumed, RunEvent, RunRegistry};

#[derive(Deserialize)]
pub(super) struct EventsQuery {
    run_id: Option<String>,
}

pub(super) async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| "the Last-Event-ID header is not text".to_owned())
                .and_then(|text| text.trim().parse::<FeedPosition>())
                .map_err(|message| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_last_event_id", message)
                })?,
        ),
    };
    let watch = Watch {
        registry: state.runner.registry().clone(),
        run_id: query.run_id,
    };
    let (resumed, now, live) = watch.registry.feed().resume(after);
    let (first, last) = match (resumed, after) {
        (Resumed::Replay(missed), Some(after)) => {
            let last = missed.last().map_or(after, |newest| newest.position);
            (watch.replayed(missed), last)
        }
        (Resumed::Replay(_), None) => (watch.snapshot(now, false).await?, now),
        (Resumed::Reset, _) => (watch.snapshot(now, true).await?, now),
    };
    let live = stream::unfold(
        (watch, live, last),
        |(watch, mut live, mut last)| async move {
            let events = match live.recv().await {
                Ok(numbered) => {
                    last = numbered.position;
                    watch.replayed(vec![numbered])
                }
                // A slow client missed some: it gets them from what the
                // feed keeps, or starts again from the runs' state.
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "an event stream client fell behind");
                    let (resumed, now, resubscribed) = watch.registry.feed().resume(Some(last));
                    live = resubscribed;
                    match resumed {
                        Resumed::Replay(missed) => {
                            if let Some(newest) = missed.last() {
                                last = newest.position;
                            }
                            watch.replayed(missed)
                        }
                        Resumed::Reset => {
                            last = now;
                            watch.snapshot(now, true).await.unwrap_or_else(|e| {
                                tracing::warn!(error = %e, "cannot read the runs for a client that fell behind");
                                Vec::new()
                            })
                        }
                    }
                }
                Err(RecvError::Closed) => return None,
            };
            Some((stream::iter(events), (watch, live, last)))
        },
    )
    .flatten();
    Ok(Sse::new(stream::iter(first).chain(live))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// What one client watches.
struct Watch {
    registry: RunRegistry,
    run_id: Option<String>,
}

type Sent = Result<Event, Infallible>;

impl Watch {
    /// The current state of the runs watched, as of `now` in the feed:
    /// after a `reset` event when events were missed.
    async fn snapshot(&self, now: FeedPosition, reset: bool) -> crate::Result<Vec<Sent>> {
        let runs = match &self.run_id {
            Some(run_id) => vec![
                self.registry
                    .get_run(run_id)
                    .await?
                    .ok_or_else(|| Error::RunNotFound(run_id.clone()))?,
            ],
            None => self.registry.active_runs().await?,
        };
        let id = now.to_string();
        let reset = reset.then(|| {
            Ok(Event::default()
                .event("reset")
                .id(id.clone())
                .data("events were missed; the snapshot that follows is the runs' state now"))
        });
        Ok(reset
            .into_iter()
            .chain(runs.into_iter().map(|run| {
                Ok(Event::default()
                    .event("snapshot")
                    .id(id.clone())
                    .json_data(&run)
                    .unwrap_or_default())
            }))
            .collect())
    }

    /// The events among `numbered` about the runs watched.
    fn replayed(&self, numbered: Vec<Numbered>) -> Vec<Sent> {
        numbered
            .into_iter()
            .filter(|n| {
                self.run_id
                    .as_deref()
                    .is_none_or(|id| id == n.event.run_id())
            })
            .map(|n| Ok(to_sse(&n)))
            .collect()
    }
}

fn to_sse(numbered: &Numbered) -> Event {
    let name = match &*numbered.event {
        RunEvent::Status { .. } => "status",
        RunEvent::Progress { .. } => "progress",
        RunEvent::Log { .. } => "log",
    };
    Event::default()
        .event(name)
        .id(numbered.position.to_string())
        .json_data(&*numbered.event)
        .unwrap_or_default()
}

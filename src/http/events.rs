//! `GET /events`: a live Server-Sent Events stream of status, progress and
//! log events, for every run or (`?run_id=`) one. A client that connects late
//! first gets the current state: a `snapshot` event per run it watches.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::extract::ApiQuery;
use super::{ApiError, AppState};
use crate::error::Error;
use crate::registry::RunEvent;

#[derive(Deserialize)]
pub(super) struct EventsQuery {
    run_id: Option<String>,
}

pub(super) async fn stream(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let registry = state.runner.registry().clone();
    // Subscribe before reading the snapshot, so nothing falls between them.
    let events = registry.subscribe();
    let snapshot = match &query.run_id {
        Some(run_id) => vec![
            registry
                .get_run(run_id)
                .await?
                .ok_or_else(|| Error::RunNotFound(run_id.clone()))?,
        ],
        None => registry.active_runs().await?,
    };
    let snapshot = stream::iter(snapshot.into_iter().map(|run| {
        Ok(Event::default()
            .event("snapshot")
            .json_data(&run)
            .unwrap_or_default())
    }));
    let filter = query.run_id;
    let live = stream::unfold(events, |mut events| async move {
        match events.recv().await {
            Ok(event) => Some((Some(event), events)),
            // A slow client missed some: it is told, and goes on.
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "an event stream client fell behind");
                Some((None, events))
            }
            Err(RecvError::Closed) => None,
        }
    })
    .filter_map(move |event| {
        let keep = match &event {
            Some(event) => filter.as_deref().is_none_or(|id| id == event.run_id()),
            None => true,
        };
        std::future::ready(keep.then(|| Ok(to_sse(event))))
    });
    Ok(Sse::new(snapshot.chain(live))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn to_sse(event: Option<RunEvent>) -> Event {
    let Some(event) = event else {
        return Event::default()
            .event("lagged")
            .data("events were missed; fetch the runs again");
    };
    let name = match &event {
        RunEvent::Status { .. } => "status",
        RunEvent::Progress { .. } => "progress",
        RunEvent::Log { .. } => "log",
    };
    Event::default()
        .event(name)
        .json_data(&event)
        .unwrap_or_default()
}

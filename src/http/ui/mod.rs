//! The web dashboard `modrun serve` shows at `/`: runs live, one run with
//! its log, modules with a start form made from their schema, sign-in.
//!
//! Pages are HTML rendered here from the same registry and runner calls as
//! the JSON API; a little plain JavaScript (`assets/app.js`) keeps them live
//! over the event stream and sends starts and cancels to the JSON API
//! itself, so nothing the API does is written twice. Assets are embedded in
//! the binary and served with an ETag. With a token, a sign-in form sets an
//! HttpOnly, SameSite=Strict session cookie (never a token in a URL); state
//! changes stay JSON requests, which a page of another site cannot send.

mod pages;

use std::sync::LazyLock;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::handlers::{next_cursor, parse_cursor, parse_status};
use super::{ApiError, AppState};
use crate::registry::RunFilter;

/// The session cookie's name.
pub(super) const SESSION_COOKIE: &str = "modrun_session";

/// Runs on one page of the runs table.
const PAGE: usize = 100;

/// The cookie value a signed-in browser carries: derived from the token,
/// so the token itself is never stored in the browser.
pub(super) fn session_value(token: &str) -> String {
    let digest = Sha256::digest(format!("modrun-session\0{token}"));
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `headers` carry the session cookie for `token`.
pub(super) fn has_session(headers: &HeaderMap, token: &str) -> bool {
    let expected = session_value(token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .any(|(name, value)| {
            name == SESSION_COOKIE && bool::from(value.as_bytes().ct_eq(expected.as_bytes()))
        })
}

/// Whether `path` is a dashboard page (answered with a redirect to the
/// sign-in form, not a JSON 401, when signed out).
pub(super) fn is_page(path: &str) -> bool {
    path == "/" || path.starts_with("/ui/")
}

/// Where a signed-out browser goes to sign in, coming back to `path`.
pub(super) fn sign_in_redirect(path: &str) -> Response {
    let next: String = url_escape(path);
    Redirect::to(&format!("/ui/sign-in?next={next}")).into_response()
}

fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An embedded asset: its bytes, content type, and ETag.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: String,
}

fn asset(body: &'static str, content_type: &'static str) -> Asset {
    let digest = Sha256::digest(body.as_bytes());
    let etag = format!(
        "\"{}\"",
        digest[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    Asset {
        body,
        content_type,
        etag,
    }
}

static APP_JS: LazyLock<Asset> = LazyLock::new(|| {
    asset(
        include_str!("assets/app.js"),
        "text/javascript; charset=utf-8",
    )
});
static APP_CSS: LazyLock<Asset> =
    LazyLock::new(|| asset(include_str!("assets/app.css"), "text/css; charset=utf-8"));

/// The version of the assets, for their URLs: a new build is a new URL.
pub(super) fn asset_version() -> &'static str {
    APP_JS.etag.trim_matches('"')
}

/// `GET /ui/assets/{file}`: served with an ETag, revalidated by browsers.
pub(super) async fn assets(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let asset: &Asset = match file.as_str() {
        "app.js" => &APP_JS,
        "app.css" => &APP_CSS,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|tag| tag.trim() == asset.etag));
    let caching = [
        (header::ETAG, asset.etag.clone()),
        (header::CACHE_CONTROL, "no-cache".to_owned()),
    ];
    if cached {
        return (StatusCode::NOT_MODIFIED, caching).into_response();
    }
    (
        caching,
        [(header::CONTENT_TYPE, asset.content_type)],
        asset.body,
    )
        .into_response()
}

#[derive(Deserialize)]
pub(super) struct SignInQuery {
    next: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct SignInForm {
    token: String,
    next: Option<String>,
}

/// Where to go after signing in: a path on this server, never elsewhere.
fn local_path(next: Option<&str>) -> &str {
    match next {
        Some(path) if path.starts_with('/') && !path.starts_with("//") && !path.contains('\\') => {
            path
        }
        _ => "/",
    }
}

/// `GET /ui/sign-in`: the form (or, without a token, straight on).
pub(super) async fn sign_in_form(
    State(state): State<AppState>,
    Query(query): Query<SignInQuery>,
) -> Response {
    let next = local_path(query.next.as_deref());
    if state.token.is_none() {
        return Redirect::to(next).into_response();
    }
    Html(pages::sign_in(next, None).into_string()).into_response()
}

/// `POST /ui/sign-in`: a right token sets the session cookie.
pub(super) async fn sign_in(
    State(state): State<AppState>,
    Form(form): Form<SignInForm>,
) -> Response {
    let next = local_path(form.next.as_deref()).to_owned();
    let Some(token) = &state.token else {
        return Redirect::to(&next).into_response();
    };
    if !bool::from(form.token.as_bytes().ct_eq(token.as_bytes())) {
        let page = pages::sign_in(&next, Some("That token is not this server's."));
        return (StatusCode::UNAUTHORIZED, Html(page.into_string())).into_response();
    }
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        session_value(token)
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response()
}

/// `POST /ui/sign-out`: forgets the session cookie.
pub(super) async fn sign_out() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/ui/sign-in")).into_response()
}

/// The runs that ended lately an overview reads, at most.
const OVERVIEW_ENDED: usize = 100_000;

/// `GET /`: what is happening now, runs per status, the last hour in a
/// chart and per module, and the latest runs.
pub(super) async fn overview(State(state): State<AppState>) -> Result<Html<String>, ApiError> {
    let latest = RunFilter {
        limit: Some(10),
        ..RunFilter::default()
    };
    let registry = state.runner.registry();
    let runs = registry.list_summaries(&latest).await?;
    let now = chrono::Utc::now();
    let tally = registry
        .tally(now - chrono::Duration::hours(1), OVERVIEW_ENDED)
        .await?;
    let nodes = registry.nodes().await?;
    let view = pages::OverviewView {
        latest: &runs,
        tally: &tally,
        nodes: &nodes,
        now,
    };
    Ok(Html(pages::overview(&state, &view).into_string()))
}

#[derive(Deserialize)]
pub(super) struct RunsQuery {
    status: Option<String>,
    module: Option<String>,
    cursor: Option<String>,
    id: Option<String>,
}

/// `GET /ui/runs`: the runs, newest first, a page at a time; `id` finds one.
pub(super) async fn runs(
    State(state): State<AppState>,
    Query(query): Query<RunsQuery>,
) -> Result<Response, ApiError> {
    if let Some(id) = query
        .id
        .as_deref()
        .map(str::trim)
        .filter(|id| !id.is_empty())
    {
        return Ok(Redirect::to(&format!("/ui/runs/{}", url_escape(id))).into_response());
    }
    let status = query
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(parse_status)
        .transpose()?;
    let module = query.module.filter(|module| !module.is_empty());
    let after = query.cursor.as_deref().map(parse_cursor).transpose()?;
    let filter = RunFilter {
        statuses: status.into_iter().collect(),
        module_id: module.clone(),
        limit: Some(PAGE),
        after,
    };
    let runs = state.runner.registry().list_summaries(&filter).await?;
    let next = next_cursor(&runs, PAGE);
    let view = pages::RunsView {
        runs: &runs,
        status,
        module: module.as_deref(),
        first_page: query.cursor.is_none(),
        next: next.as_deref(),
        modules: &state.runner.host().module_ids(),
    };
    Ok(Html(pages::runs(&view).into_string()).into_response())
}

/// `GET /ui/runs/{run_id}`: one run, whole.
pub(super) async fn run(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> Result<Response, ApiError> {
    let registry = state.runner.registry();
    let Some(run) = registry.get_run(&run_id).await? else {
        let page = pages::not_found(&format!("There is no run {run_id}."));
        return Ok((StatusCode::NOT_FOUND, Html(page.into_string())).into_response());
    };
    let history = registry.history(&run_id).await?;
    Ok(Html(pages::run(&run, &history).into_string()).into_response())
}

/// `GET /ui/modules`: every module, its limits and grants, its last load
/// error, and a start form made from its schema.
pub(super) async fn modules(State(state): State<AppState>) -> Html<String> {
    let host = state.runner.host();
    Html(pages::modules(&host.modules(), &host.failures()).into_string())
}

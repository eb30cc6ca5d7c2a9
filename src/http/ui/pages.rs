//! The dashboard's HTML. Everything a page shows is escaped by the
//! template; data the script needs rides in `data-` attributes.

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;

use super::super::AppState;
use super::asset_version;
use crate::module::{LoadFailure, ModuleSummary};
use crate::registry::{Ended, NodeStatus, RunSummary, Tally};
use crate::run::{LogEntry, Run, RunStatus, StatusChange};

/// Every status, in the order of the flow.
const STATUSES: [RunStatus; 5] = RunStatus::ALL;

/// The outcomes the chart stacks, bottom up.
const OUTCOMES: [RunStatus; 3] = [
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Cancelled,
];

/// A page's head: its title, the stylesheet, and with `script` the script.
fn page_head(title: &str, script: bool) -> Markup {
    let version = asset_version();
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · modrun" }
            link rel="stylesheet" href={ "/ui/assets/app.css?v=" (version) };
            @if script { script src={ "/ui/assets/app.js?v=" (version) } defer {} }
        }
    }
}

/// The frame of every page: head, navigation, `body`.
fn layout(title: &str, current: &str, body: Markup) -> Markup {
    let page = current
        .rsplit('/')
        .next()
        .filter(|name| !name.is_empty())
        .unwrap_or("overview");
    let nav = [
        ("/", "Overview"),
        ("/ui/runs", "Runs"),
        ("/ui/modules", "Modules"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            (page_head(title, true))
            body {
                header.top {
                    a.brand href="/" { "modrun" }
                    nav aria-label="Main" {
                        @for (href, name) in nav {
                            @if href == current {
                                a href=(href) aria-current="page" { (name) }
                            } @else {
                                a href=(href) { (name) }
                            }
                        }
                    }
                    form.sign-out method="post" action="/ui/sign-out" {
                        button type="submit" { "Sign out" }
                    }
                }
                main data-page=(page) { (body) }
            }
        }
    }
}

fn badge(status: RunStatus) -> Markup {
    html! { span class={ "badge " (status.as_str()) } data-status=(status.as_str()) { (status.as_str()) } }
}

fn time(at: DateTime<Utc>) -> Markup {
    html! { time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S")) } }
}

fn duration(started: Option<DateTime<Utc>>, ended: Option<DateTime<Utc>>) -> String {
    match (started, ended) {
        (Some(started), Some(ended)) => seconds((ended - started).num_milliseconds()),
        _ => String::new(),
    }
}

fn seconds(millis: i64) -> String {
    if millis < 1000 {
        format!("{millis} ms")
    } else {
        format!("{:.1} s", millis as f64 / 1000.0)
    }
}

fn progress_bar(fraction: Option<f64>, message: &str) -> Markup {
    let percent = fraction.map_or(0.0, |f| (f * 100.0).clamp(0.0, 100.0));
    html! {
        @if fraction.is_some() {
            progress max="100" value=(format!("{percent:.0}")) title=(message) { (format!("{percent:.0}%")) }
        }
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// The runs table; rows carry what the script needs to keep them live.
fn runs_table(runs: &[RunSummary]) -> Markup {
    html! {
        div.scroll {
            table.runs {
                thead { tr {
                    th scope="col" { "Run" } th scope="col" { "Module" } th scope="col" { "Status" }
                    th scope="col" { "Created" } th scope="col" { "Duration" } th scope="col" { "Progress" }
                } }
                tbody #runs-body {
                    @for run in runs {
                        tr data-run=(run.run_id) {
                            td { a href={ "/ui/runs/" (run.run_id) } { code { (&run.run_id[..8.min(run.run_id.len())]) } } }
                            td { (run.module_id) }
                            td.status { (badge(run.status)) }
                            td { (time(run.created_at)) }
                            td.duration { (duration(run.started_at, run.completed_at)) }
                            td.progress {
                                @if let (RunStatus::Queued, Some(at)) = (run.status, run.not_before) {
                                    "not before " (time(at))
                                }
                                @if run.status == RunStatus::Running {
                                    (progress_bar(run.progress.as_ref().map(|p| p.fraction), run.progress.as_ref().map_or("", |p| p.message.as_str())))
                                }
                            }
                        }
                    }
                }
            }
        }
        @if runs.is_empty() { p.empty { "No runs here yet." } }
    }
}

/// What the overview shows.
pub(super) struct OverviewView<'a> {
    pub latest: &'a [RunSummary],
    pub tally: &'a Tally,
    pub nodes: &'a [NodeStatus],
    pub now: DateTime<Utc>,
}

pub(super) fn overview(state: &AppState, view: &OverviewView<'_>) -> Markup {
    let OverviewView {
        latest,
        tally,
        nodes,
        now,
    } = *view;
    let manager = state.runner.manager();
    let host = state.runner.host();
    let health = state.runner.registry().health();
    let failing = host.failures().len()
        + host
            .modules()
            .iter()
            .filter(|module| module.last_error.is_some())
            .count();
    layout(
        "Overview",
        "/",
        html! {
            h1 { "Overview" }
            section.cards aria-label="Now" {
                div.card { span.figure #active-count { (manager.active_task_count()) } span { "active now" } }
                div.card { span.figure #queued-count { (manager.queued_task_count()) } span { "queued" } }
                div.card { span.figure { (host.module_ids().len()) } span { "modules" } }
                div.card { span.figure { (failing) } span { "load errors" } }
                div.card {
                    @match &health.unavailable {
                        None => { span.figure.ok { "ok" } span { "registry" } }
                        Some(reason) => { span.figure.bad { "degraded" } span { (reason) } }
                    }
                }
            }
            h2 { "Runs by status" }
            section.cards.statuses aria-label="Runs by status" {
                @for (status, count) in &tally.counts {
                    a.card href={ "/ui/runs?status=" (status.as_str()) } {
                        span.figure { (count) } (badge(*status))
                    }
                }
            }
            @if !nodes.is_empty() {
                h2 { "Nodes" }
                div.scroll { table.nodes {
                    thead { tr {
                        th scope="col" { "Node" } th scope="col" { "Last heartbeat" }
                        th scope="col" { "Lease" } th scope="col" { "Running" } th scope="col" { "Joined" }
                    } }
                    tbody {
                        @for node in nodes {
                            tr {
                                td.node { (node.node) }
                                td { (seconds((now - node.heartbeat_at).num_milliseconds().max(0))) " ago" }
                                td {
                                    @if node.lease_until > now { "live, " (seconds((node.lease_until - now).num_milliseconds())) " left" }
                                    @else { span.bad { "expired" } }
                                }
                                td { a href="/ui/runs?status=running" { (node.running) } }
                                td { (time(node.started_at)) }
                            }
                        }
                    }
                } }
            }
            h2 { "Finished in the last hour" }
            (chart(&tally.ended, now))
            (module_table(&tally.ended))
            h2 { "Latest runs" }
            div data-live="runs" data-first-page="true" { (runs_table(latest)) }
            p { a href="/ui/runs" { "All runs →" } }
        },
    )
}

/// Runs finished per minute over the hour before `now`, stacked by
/// outcome: an SVG drawn here, nothing to load.
fn chart(ended: &[Ended], now: DateTime<Utc>) -> Markup {
    const MINUTES: usize = 60;
    const BAR: f64 = 10.0;
    const HEIGHT: f64 = 120.0;
    let mut buckets = [[0u64; 3]; MINUTES];
    for run in ended {
        let minutes_ago = usize::try_from((now - run.completed_at).num_minutes()).unwrap_or(0);
        let outcome = OUTCOMES.iter().position(|s| *s == run.status);
        if let (Some(outcome), true) = (outcome, minutes_ago < MINUTES) {
            buckets[MINUTES - 1 - minutes_ago][outcome] += 1;
        }
    }
    let tallest = buckets
        .iter()
        .map(|b| b.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let totals: Vec<u64> = (0..3).map(|i| buckets.iter().map(|b| b[i]).sum()).collect();
    let label = format!(
        "Runs finished per minute over the last hour: {} completed, {} failed, {} cancelled",
        totals[0], totals[1], totals[2]
    );
    let width = BAR * MINUTES as f64;
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {width} {}", HEIGHT + 16.0)) role="img" aria-label=(label) preserveAspectRatio="none" {
                @for (minute, counts) in buckets.iter().enumerate() {
                    @let mut base = HEIGHT;
                    @for (outcome, count) in counts.iter().enumerate() {
                        @if *count > 0 {
                            @let height = *count as f64 / tallest as f64 * HEIGHT;
                            @let top = { base -= height; base };
                            rect class=(OUTCOMES[outcome].as_str()) x=(minute as f64 * BAR + 1.0) y=(top) width=(BAR - 2.0) height=(height) {
                                title { (count) " " (OUTCOMES[outcome].as_str()) ", " (MINUTES - minute) " min ago" }
                            }
                        }
                    }
                }
                line x1="0" y1=(HEIGHT) x2=(width) y2=(HEIGHT) class="axis" {}
                text x="0" y=(HEIGHT + 14.0) class="axis" { "60 min ago" }
                text x=(width) y=(HEIGHT + 14.0) class="axis" text-anchor="end" { "now" }
            }
            figcaption {
                @for (outcome, total) in OUTCOMES.iter().zip(&totals) {
                    span class={ "legend " (outcome.as_str()) } { (total) " " (outcome.as_str()) } " "
                }
                "(busiest minute: " (tallest) ")"
            }
        }
    }
}

/// Per module, over the runs that ended lately: how many, the share that
/// failed, and the median and 95th percentile of their durations.
fn module_table(ended: &[Ended]) -> Markup {
    let mut modules: std::collections::BTreeMap<&str, (u64, u64, Vec<i64>)> = Default::default();
    for run in ended {
        let entry = modules.entry(run.module_id.as_str()).or_default();
        entry.0 += 1;
        if run.status == RunStatus::Failed {
            entry.1 += 1;
        }
        if let Some(started) = run.started_at {
            entry
                .2
                .push((run.completed_at - started).num_milliseconds().max(0));
        }
    }
    for (_, _, durations) in modules.values_mut() {
        durations.sort_unstable();
    }
    let percentile = |sorted: &[i64], fraction: f64| -> String {
        if sorted.is_empty() {
            return String::new();
        }
        let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
        seconds(sorted[index])
    };
    html! {
        @if !modules.is_empty() {
            div.scroll { table.modules {
                thead { tr {
                    th scope="col" { "Module" } th scope="col" { "Runs" } th scope="col" { "Failed" }
                    th scope="col" { "p50" } th scope="col" { "p95" }
                } }
                tbody {
                    @for (module, (runs, failed, durations)) in &modules {
                        tr {
                            td { a href={ "/ui/runs?module=" (module) } { (module) } }
                            td { (runs) }
                            td { (format!("{:.1}%", *failed as f64 * 100.0 / *runs as f64)) }
                            td { (percentile(durations, 0.5)) }
                            td { (percentile(durations, 0.95)) }
                        }
                    }
                }
            } }
        }
    }
}

/// What the runs page shows.
pub(super) struct RunsView<'a> {
    pub runs: &'a [RunSummary],
    pub status: Option<RunStatus>,
    pub module: Option<&'a str>,
    pub first_page: bool,
    pub next: Option<&'a str>,
    pub modules: &'a [String],
}

pub(super) fn runs(view: &RunsView<'_>) -> Markup {
    let status = view.status.map(RunStatus::as_str).unwrap_or_default();
    let module = view.module.unwrap_or_default();
    let next = view.next.map(|cursor| {
        let mut link = format!("/ui/runs?cursor={cursor}");
        if !status.is_empty() {
            link.push_str(&format!("&status={status}"));
        }
        if !module.is_empty() {
            link.push_str(&format!("&module={module}"));
        }
        link
    });
    layout(
        "Runs",
        "/ui/runs",
        html! {
            h1 { "Runs" }
            form.filters method="get" action="/ui/runs" role="search" {
                label { "Status "
                    select name="status" {
                        option value="" { "any" }
                        @for s in STATUSES {
                            option value=(s.as_str()) selected[s.as_str() == status] { (s.as_str()) }
                        }
                    }
                }
                label { "Module "
                    select name="module" {
                        option value="" { "any" }
                        @for id in view.modules {
                            option value=(id) selected[id == module] { (id) }
                        }
                    }
                }
                button type="submit" { "Filter" }
                label { "Find by id " input type="search" name="id" placeholder="run id" autocomplete="off"; }
                button type="submit" { "Find" }
            }
            div data-live="runs" data-first-page=(view.first_page) data-status=(status) data-module=(module) {
                (runs_table(view.runs))
            }
            nav.pages aria-label="Pages" {
                @if !view.first_page { a href="/ui/runs" { "← Newest" } }
                @if let Some(next) = next { a href=(next) rel="next" { "Older →" } }
            }
        },
    )
}

fn log_rows(log: &[LogEntry]) -> Markup {
    html! {
        @for entry in log {
            tr class={ "log " (entry.level.as_str()) } {
                td { (time(entry.at)) }
                td { (entry.level.as_str()) }
                td { (entry.source.as_str()) }
                td { pre { (entry.message) } }
            }
        }
    }
}

pub(super) fn run(run: &Run, history: &[StatusChange]) -> Markup {
    let parameters = Value::Object(run.parameters.clone());
    let active = run.status.is_active();
    layout(
        &format!("Run {}", &run.run_id[..8.min(run.run_id.len())]),
        "/ui/runs",
        html! {
            article.run data-run-id=(run.run_id) data-module=(run.module_id) data-parameters=(parameters.to_string()) data-priority=(run.priority) {
                h1 { "Run " code { (run.run_id) } }
                p.summary {
                    span #run-status { (badge(run.status)) }
                    " of " a href="/ui/modules" { (run.module_name) } " (" code { (run.module_id) } ")"
                }
                p.actions {
                    button #cancel type="button" hidden[!active] { "Cancel" }
                    button #run-again type="button" { "Run again" }
                    span #action-error role="alert" {}
                }
                div #run-progress { @if let Some(p) = &run.progress { (progress_bar(Some(p.fraction), &p.message)) " " (p.message) } }
                dl.facts {
                    dt { "Created" } dd { (time(run.created_at)) }
                    @if let Some(at) = run.not_before { dt { "Not before" } dd { (time(at)) } }
                    @if run.priority != 0 { dt { "Priority" } dd { (run.priority) } }
                    dt { "Started" } dd #started { @if let Some(at) = run.started_at { (time(at)) } }
                    dt { "Ended" } dd #ended { @if let Some(at) = run.completed_at { (time(at)) } }
                    dt { "Duration" } dd #duration { (duration(run.started_at, run.completed_at)) }
                    dt { "Module version" } dd { code { (run.module_version.as_deref().unwrap_or("")) } }
                    @if let Some(node) = &run.node { dt { "Node" } dd { (node) } }
                    @if let Some(code) = run.exit_code { dt { "Exit code" } dd { (code) } }
                }
                section #error-section hidden[run.error_message.is_none()] {
                    h2 { "Error" }
                    pre #error.error { (run.error_message.as_deref().unwrap_or("")) }
                }
                section #output-section hidden[run.output.is_none()] {
                    h2 { "Output" }
                    pre #output { (run.output.as_ref().map(pretty).unwrap_or_default()) }
                }
                h2 { "Parameters" }
                pre { (pretty(&parameters)) }
                h2 { "History" }
                ol.timeline #timeline {
                    @for change in history {
                        li { (badge(change.status)) " " (time(change.at)) @if let Some(message) = &change.message { " — " (message) } }
                    }
                }
                h2 { "Log" }
                div.scroll { table.log {
                    thead { tr { th scope="col" { "At" } th scope="col" { "Level" } th scope="col" { "Source" } th scope="col" { "Message" } } }
                    tbody #log { (log_rows(&run.log)) }
                } }
            }
        },
    )
}

/// A start form field for one property of a JSON Schema.
fn field(name: &str, schema: &Value, required: bool) -> Markup {
    let kind = schema["type"].as_str().unwrap_or("");
    let id = format!("field-{name}");
    let title = schema["description"].as_str().unwrap_or("");
    html! {
        div.field {
            @if kind == "boolean" {
                label for=(id) { input #(id) type="checkbox" name=(name) data-kind="boolean"; " " (name) }
            } @else {
                label for=(id) { (name) @if required { " *" } }
                @if let Some(choices) = schema["enum"].as_array() {
                    select #(id) name=(name) data-kind="enum" required[required] {
                        @if !required { option value="" { "—" } }
                        @for choice in choices {
                            option value=(choice.to_string()) { (choice.as_str().map_or_else(|| choice.to_string(), str::to_owned)) }
                        }
                    }
                } @else if kind == "string" {
                    input #(id) type="text" name=(name) data-kind="string" required[required]
                        minlength=[schema["minLength"].as_u64()] maxlength=[schema["maxLength"].as_u64()];
                } @else if kind == "integer" || kind == "number" {
                    input #(id) type="number" name=(name) data-kind=(kind) required[required]
                        step=(if kind == "integer" { "1" } else { "any" })
                        min=[schema["minimum"].as_f64()] max=[schema["maximum"].as_f64()];
                } @else {
                    textarea #(id) name=(name) data-kind="json" rows="3" required[required] placeholder="JSON" {}
                }
            }
            @if !title.is_empty() { small { (title) } }
            span.field-error data-for=(name) role="alert" {}
        }
    }
}

/// The start form made from a module's parameter schema: a field per
/// property it knows, raw JSON where it does not.
fn start_form(module: &ModuleSummary) -> Markup {
    let schema = &module.info.parameters_schema;
    let properties = schema["properties"].as_object();
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    html! {
        form.start data-module=(module.info.id) novalidate {
            @match properties {
                Some(properties) => {
                    @for (name, property) in properties {
                        (field(name, property, required.contains(&name.as_str())))
                    }
                }
                None => {
                    div.field {
                        label for={ "params-" (module.info.id) } { "Parameters (a JSON object)" }
                        textarea #{ "params-" (module.info.id) } name="" data-kind="object" rows="3" { "{}" }
                        span.field-error data-for="" role="alert" {}
                    }
                }
            }
            fieldset.start-options {
                legend { "When" }
                div.field {
                    label for={ "priority-" (module.info.id) } { "Priority (higher starts first)" }
                    input #{ "priority-" (module.info.id) } type="number" data-option="priority" min="-32768" max="32767" step="1" placeholder="0";
                }
                div.field {
                    label for={ "delay-" (module.info.id) } { "Start after (500ms, 30s, 10min)" }
                    input #{ "delay-" (module.info.id) } type="text" data-option="delay" placeholder="now";
                }
            }
            span.form-error role="alert" {}
            button type="submit" { "Start " (module.info.id) }
        }
    }
}

pub(super) fn modules(modules: &[ModuleSummary], failures: &[LoadFailure]) -> Markup {
    layout(
        "Modules",
        "/ui/modules",
        html! {
            h1 { "Modules" }
            @if !failures.is_empty() {
                section.failures aria-label="Files that do not load" {
                    h2 { "Not loaded" }
                    ul { @for failure in failures {
                        li.load-error { code { (failure.path.display()) } ": " (failure.error) }
                    } }
                }
            }
            @if modules.is_empty() { p.empty { "No modules are loaded." } }
            @for module in modules {
                section.module id={ "module-" (module.info.id) } {
                    h2 { (module.info.name) " " code { (module.info.id) } " " small { (module.info.version) } }
                    p { (module.info.description) }
                    @if let Some(error) = &module.last_error {
                        p.load-error role="alert" { "The newest version did not load (this one keeps serving): " (error.error) }
                    }
                    dl.facts {
                        dt { "Content hash" } dd { code { (module.content_hash) } }
                        dt { "Loaded" } dd { (time(module.loaded_at)) }
                        dt { "Timeout" } dd { (format!("{} s", module.manifest.limits.timeout.as_secs_f64())) }
                        dt { "Memory" } dd { (module.manifest.limits.memory_bytes >> 20) " MiB" }
                        dt { "At once" } dd { (module.manifest.limits.max_concurrent.map_or("no limit".to_owned(), |n| n.to_string())) }
                        dt { "Grants" } dd {
                            @if module.manifest.grants.env.is_empty() && module.manifest.grants.dirs.is_empty() { "none" }
                            @for name in &module.manifest.grants.env { code { "$" (name) } " " }
                            @for dir in &module.manifest.grants.dirs {
                                code { (dir.host.display()) " → " (dir.guest) } (if dir.writable { " (writable) " } else { " (read-only) " })
                            }
                        }
                    }
                    details open {
                        summary { "Start a run" }
                        (start_form(module))
                    }
                }
            }
        },
    )
}

pub(super) fn sign_in(next: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (page_head("Sign in", false))
            body {
                main.sign-in {
                    h1 { "modrun" }
                    form method="post" action="/ui/sign-in" {
                        input type="hidden" name="next" value=(next);
                        label for="token" { "This server's token" }
                        input #token type="password" name="token" autocomplete="current-password" required autofocus;
                        @if let Some(error) = error { p.error role="alert" { (error) } }
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

pub(super) fn not_found(message: &str) -> Markup {
    layout(
        "Not found",
        "",
        html! { h1 { "Not found" } p { (message) } p { a href="/ui/runs" { "All runs" } } (PreEscaped("")) },
    )
}

// modrun's dashboard: keeps its pages live over the event stream (/events)
// and sends starts and cancels to the JSON API. Plain JavaScript, no build.
'use strict';

const TERMINAL = ['completed', 'failed', 'cancelled'];

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function badge(status) {
  return el('span', { class: `badge ${status}`, 'data-status': status }, status);
}

function when(at) {
  const date = new Date(at);
  const shown = isNaN(date) ? at : date.toISOString().replace('T', ' ').slice(0, 19);
  return el('time', { datetime: at }, shown);
}

function seconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function progressBar(progress) {
  const percent = Math.round(Math.min(1, Math.max(0, progress.fraction)) * 100);
  const bar = el('progress', { max: '100', value: String(percent), title: progress.message || '' }, `${percent}%`);
  return bar;
}

// An error answer of the API, readable.
async function apiError(response) {
  try {
    const body = await response.json();
    return body.error || { message: `the server answered ${response.status}` };
  } catch (_) {
    return { message: `the server answered ${response.status}` };
  }
}

// Starts a run; `options` (priority, delay) go in the query string.
async function startRun(module, parameters, options = {}) {
  const query = new URLSearchParams(Object.entries(options).filter(([, value]) => value !== ''));
  const search = query.size ? `?${query}` : '';
  const response = await fetch(`/modules/${encodeURIComponent(module)}/runs${search}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(parameters),
  });
  if (response.status === 202) return { runId: (await response.json()).run_id };
  return { error: await apiError(response) };
}

// Live events, resumed by the browser with Last-Event-ID after a drop.
function listen(query, handlers) {
  const source = new EventSource(`/events${query}`);
  for (const [name, handle] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => handle(JSON.parse(event.data)));
  }
  return source;
}

// --- The runs table (overview and runs pages) ---------------------------

function runsTable(container) {
  const body = container.querySelector('tbody');
  const firstPage = container.dataset.firstPage === 'true';
  const onlyStatus = container.dataset.status || '';
  const onlyModule = container.dataset.module || '';
  const started = new Map();

  function row(runId) {
    return body.querySelector(`tr[data-run="${CSS.escape(runId)}"]`);
  }

  function newRow(runId, moduleId, createdAt) {
    const tr = el('tr', { 'data-run': runId });
    const link = el('a', { href: `/ui/runs/${encodeURIComponent(runId)}` });
    link.append(el('code', {}, runId.slice(0, 8)));
    const cells = [el('td'), el('td', {}, moduleId), el('td', { class: 'status' }), el('td'), el('td', { class: 'duration' }), el('td', { class: 'progress' })];
    cells[0].append(link);
    cells[3].append(when(createdAt));
    tr.append(...cells);
    body.prepend(tr);
    const empty = container.querySelector('.empty');
    if (empty) empty.remove();
    while (body.rows.length > 100) body.lastElementChild.remove();
    return tr;
  }

  function show(runId, moduleId, status, at) {
    let tr = row(runId);
    if (!tr) {
      // A new run shows on the first page, when the filters let it.
      const fits = firstPage && (!onlyModule || onlyModule === moduleId) && (!onlyStatus || onlyStatus === status);
      if (!fits) return;
      tr = newRow(runId, moduleId, at);
    }
    tr.querySelector('.status').replaceChildren(badge(status));
    if (status === 'running') {
      started.set(runId, Date.parse(at));
      // A run that waited for its time no longer does.
      tr.querySelector('.progress').replaceChildren();
    }
    if (TERMINAL.includes(status)) {
      tr.querySelector('.progress').replaceChildren();
      const from = started.get(runId);
      if (from) tr.querySelector('.duration').textContent = seconds(Date.parse(at) - from);
    }
  }

  listen('', {
    status: (event) => show(event.run_id, event.module_id, event.change.status, event.change.at),
    snapshot: (run) => {
      if (run.started_at) started.set(run.run_id, Date.parse(run.started_at));
      if (row(run.run_id)) show(run.run_id, run.module_id, run.status, run.completed_at || run.created_at);
    },
    progress: (event) => {
      const tr = row(event.run_id);
      if (tr) tr.querySelector('.progress').replaceChildren(progressBar(event.progress));
    },
  });
}

// --- One run -------------------------------------------------------------

function runPage(article) {
  const runId = article.dataset.runId;
  const module = article.dataset.module;
  const cancel = document.getElementById('cancel');
  const again = document.getElementById('run-again');
  const problem = document.getElementById('action-error');

  function logRow(entry) {
    const tr = el('tr', { class: `log ${entry.level}` });
    const at = el('td');
    at.append(when(entry.at));
    const message = el('td');
    message.append(el('pre', {}, entry.message));
    tr.append(at, el('td', {}, entry.level), el('td', {}, entry.source), message);
    return tr;
  }

  // The finished run, whole: output, error, and the log as saved.
  async function refresh() {
    const response = await fetch(`/runs/${encodeURIComponent(runId)}`);
    if (!response.ok) return;
    const { run, history } = await response.json();
    const timeline = (history || []).map((change) => {
      const item = el('li');
      item.append(badge(change.status), ' ', when(change.at));
      if (change.message) item.append(` — ${change.message}`);
      return item;
    });
    document.getElementById('timeline').replaceChildren(...timeline);
    document.getElementById('run-status').replaceChildren(badge(run.status));
    cancel.hidden = TERMINAL.includes(run.status);
    const error = document.getElementById('error-section');
    error.hidden = !run.error_message;
    document.getElementById('error').textContent = run.error_message || '';
    const output = document.getElementById('output-section');
    output.hidden = run.output === null || run.output === undefined;
    document.getElementById('output').textContent = output.hidden ? '' : JSON.stringify(run.output, null, 2);
    if (run.started_at) document.getElementById('started').replaceChildren(when(run.started_at));
    if (run.completed_at) {
      document.getElementById('ended').replaceChildren(when(run.completed_at));
      if (run.started_at) {
        document.getElementById('duration').textContent = seconds(Date.parse(run.completed_at) - Date.parse(run.started_at));
      }
    }
    document.getElementById('log').replaceChildren(...(run.log || []).map(logRow));
  }

  listen(`?run_id=${encodeURIComponent(runId)}`, {
    status: (event) => {
      const change = event.change;
      document.getElementById('run-status').replaceChildren(badge(change.status));
      const item = el('li');
      item.append(badge(change.status), ' ', when(change.at));
      if (change.message) item.append(` — ${change.message}`);
      document.getElementById('timeline').append(item);
      if (TERMINAL.includes(change.status)) {
        document.getElementById('run-progress').replaceChildren();
        refresh();
      }
    },
    snapshot: () => refresh(),
    progress: (event) => {
      document.getElementById('run-progress').replaceChildren(progressBar(event.progress), ` ${event.progress.message}`);
    },
    log: (event) => document.getElementById('log').append(logRow(event.entry)),
  });

  cancel.addEventListener('click', async () => {
    problem.textContent = '';
    cancel.disabled = true;
    const response = await fetch(`/runs/${encodeURIComponent(runId)}`, { method: 'DELETE' });
    cancel.disabled = false;
    if (!response.ok) problem.textContent = (await apiError(response)).message;
  });

  // The same parameters and priority; a delay the first run had is not
  // carried: run again means now.
  again.addEventListener('click', async () => {
    problem.textContent = '';
    const { priority } = article.dataset;
    const options = priority && priority !== '0' ? { priority } : {};
    const started = await startRun(module, JSON.parse(article.dataset.parameters), options);
    if (started.runId) window.location.assign(`/ui/runs/${encodeURIComponent(started.runId)}`);
    else problem.textContent = started.error.message;
  });
}

// --- Start forms (modules page) -------------------------------------------

// A form's fields as parameters; a message per field that cannot be read.
function readForm(form) {
  const parameters = {};
  const problems = {};
  for (const input of form.querySelectorAll('[data-kind]')) {
    const name = input.name;
    const kind = input.dataset.kind;
    const text = input.value.trim();
    try {
      if (kind === 'boolean') {
        parameters[name] = input.checked;
      } else if (text === '') {
        continue;
      } else if (kind === 'string') {
        parameters[name] = input.value;
      } else if (kind === 'integer' || kind === 'number') {
        const number = Number(text);
        if (Number.isNaN(number)) throw new Error('not a number');
        parameters[name] = number;
      } else if (kind === 'object') {
        Object.assign(parameters, JSON.parse(text));
      } else {
        parameters[name] = JSON.parse(text);
      }
    } catch (error) {
      problems[name] = kind === 'integer' || kind === 'number' ? 'not a number' : `not JSON: ${error.message}`;
    }
  }
  return { parameters, problems };
}

function showProblems(form, problems, general) {
  for (const slot of form.querySelectorAll('.field-error')) slot.textContent = problems[slot.dataset.for] || '';
  form.querySelector('.form-error').textContent = general || '';
}

function startForm(form) {
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const { parameters, problems } = readForm(form);
    if (Object.keys(problems).length) {
      showProblems(form, problems);
      return;
    }
    showProblems(form, {});
    const button = form.querySelector('button[type=submit]');
    button.disabled = true;
    const options = {};
    for (const input of form.querySelectorAll('[data-option]')) options[input.dataset.option] = input.value.trim();
    const started = await startRun(form.dataset.module, parameters, options);
    button.disabled = false;
    if (started.runId) {
      window.location.assign(`/ui/runs/${encodeURIComponent(started.runId)}`);
      return;
    }
    // Schema problems name their field: "/name: ...".
    const byField = {};
    const general = [];
    for (const detail of started.error.details || []) {
      const match = /^\/([^/:]+)[^:]*: (.*)$/.exec(detail);
      const field = match && form.querySelector(`.field-error[data-for="${CSS.escape(match[1])}"]`);
      if (field) byField[match[1]] = match[2];
      else general.push(detail);
    }
    const message = general.length || !Object.keys(byField).length ? [started.error.message, ...general].join('; ') : '';
    showProblems(form, byField, message);
  });
}

// Modules change under a running server (hot reload): the page is fetched
// again now and then, and shown anew when it changed, unless someone is
// filling in a form.
function watchModules(main) {
  let seen = main.innerHTML;
  setInterval(async () => {
    if (document.activeElement && document.activeElement.closest('form.start')) return;
    const response = await fetch(window.location.pathname);
    if (!response.ok) return;
    const html = await response.text();
    const fresh = new DOMParser().parseFromString(html, 'text/html').querySelector('main');
    if (!fresh || fresh.innerHTML === seen) return;
    seen = fresh.innerHTML;
    main.replaceChildren(...fresh.childNodes);
    for (const form of main.querySelectorAll('form.start')) startForm(form);
  }, 1000);
}

document.addEventListener('DOMContentLoaded', () => {
  for (const container of document.querySelectorAll('[data-live="runs"]')) runsTable(container);
  const article = document.querySelector('article.run');
  if (article) runPage(article);
  for (const form of document.querySelectorAll('form.start')) startForm(form);
  const modules = document.querySelector('main[data-page="modules"]');
  if (modules) watchModules(modules);
});

/* spkd dashboard. Plain JS, no framework, no build step; talks only to the same-origin v1 API.
 *
 * The API key lives in sessionStorage (gone when the tab closes) and goes out as a Bearer header.
 * EventSource cannot send headers, so the event stream is read with fetch() and parsed here, which
 * keeps keys out of URLs (and out of server logs). Downloads likewise: fetch -> blob -> object URL.
 */
'use strict';

(function () {
  const KEY_STORE = 'spkd.apiKey';
  const FINAL = new Set(['succeeded', 'failed', 'cancelled']);
  // A job one can pause: it has not stopped, and no worker has yet stopped it on request.
  const PAUSABLE = new Set(['queued', 'validating', 'running']);
  const JOBS_REFRESH_MS = 3000;
  const JOB_REFRESH_MS = 2000;
  const STAGE_NAMES = {
    teacher_finetune: 'Teacher fine-tune', baseline: 'Baseline student', distill: 'Distillation',
    evaluate: 'Evaluation', export: 'Export',
  };
  // Which accuracy card a finished stage fills while the job is still running.
  const STAGE_ACC = { teacher_finetune: 'teacher', baseline: 'baseline', distill: 'distilled' };

  const $ = (sel) => document.querySelector(sel);
  const state = { route: null, timers: [], stream: null, jobsCursor: null, job: null, curves: {}, seenEvents: new Set() };

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, body) {
      const err = (body && body.error) || {};
      super(err.message || (status ? `HTTP ${status}` : 'network error'));
      this.status = status; this.code = err.code || null; this.field = err.field || null;
    }
  }

  function apiKey() { return sessionStorage.getItem(KEY_STORE); }

  async function api(method, path, { body, headers = {}, raw = false } = {}) {
    const h = Object.assign({ Authorization: `Bearer ${apiKey() || ''}` }, headers);
    let payload = body;
    if (body !== undefined && !(body instanceof FormData)) { h['Content-Type'] = 'application/json'; payload = JSON.stringify(body); }
    let res;
    try {
      res = await fetch(path, { method, headers: h, body: payload, cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, { error: { code: 'network', message: 'The server did not answer; retrying.' } });
    }
    if (res.status === 401) { signOut('Your API key was not accepted; sign in again.'); throw new ApiError(401, null); }
    if (!res.ok) {
      let data = null;
      try { data = await res.json(); } catch (e) { /* not JSON: keep the status */ }
      throw new ApiError(res.status, data);
    }
    if (raw) return res;
    return res.status === 204 ? null : res.json();
  }

  // List endpoints answer {data: [...], next_cursor}; tolerate a bare array too.
  function items(page) { return Array.isArray(page) ? page : (page.data || page.items || page.jobs || page.datasets || page.models || []); }
  function nextCursor(page) { return Array.isArray(page) ? null : (page.next_cursor || null); }

  // ---------- small helpers ----------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v; else if (k === 'text') node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function announce(msg) { const a = $('#announce'); a.textContent = ''; setTimeout(() => { a.textContent = msg; }, 30); }
  function pct(v) { return typeof v === 'number' && isFinite(v) ? `${(100 * v).toFixed(1)}%` : '–'; }
  function num(v, digits = 1) { return typeof v === 'number' && isFinite(v) ? v.toFixed(digits) : '–'; }
  function duration(s) {
    if (typeof s !== 'number' || !isFinite(s) || s < 0) return '–';
    s = Math.round(s);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }
  function toDate(t) {
    if (t === null || t === undefined) return null;
    if (typeof t === 'number') return new Date(t < 1e12 ? t * 1000 : t);
    const d = new Date(t); return isNaN(d) ? null : d;
  }
  function age(t) {
    const d = toDate(t); if (!d) return '–';
    const s = Math.max(0, (Date.now() - d.getTime()) / 1000);
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }
  function bytes(n) {
    if (typeof n !== 'number') return '';
    const u = ['B', 'KB', 'MB', 'GB']; let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
  }
  function randomId() {
    const b = new Uint8Array(16); crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  }
  function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }
  function every(ms, fn) { const t = setInterval(fn, ms); state.timers.push(t); }
  function stopTimers() { state.timers.forEach(clearInterval); state.timers = []; if (state.stream) { state.stream.abort(); state.stream = null; } }

  function accOf(metrics, who) {
    const m = metrics && metrics[who];
    return m && typeof m === 'object' ? m.val_acc : null;
  }

  // Fraction of the whole job done, from the spec's enabled stages weighted by their epochs.
  function overallFraction(job) {
    const p = Object.assign({ stage: job.stage }, job.progress || {});
    if (typeof p.fraction === 'number') return p.fraction;
    if (job.status === 'succeeded') return 1;
    const spec = job.spec || {};
    const train = spec.train || {};
    const ep = train.epochs || 1;
    const plan = [];
    if (spec.teacher && spec.teacher.finetune) plan.push(['teacher_finetune', spec.teacher.finetune.epochs || ep]);
    if (spec.baseline !== false) plan.push(['baseline', ep]);
    plan.push(['distill', ep], ['evaluate', 0.5], ['export', 0.5]);
    const total = plan.reduce((a, [, w]) => a + w, 0);
    let done = 0;
    for (const [stage, w] of plan) {
      if (stage !== p.stage) { done += w; continue; }
      const epochs = p.epochs || 1;
      // An epoch_end means that epoch is complete; step progress means part of it is.
      const part = p.epoch_done ? 1 : (p.steps ? (p.step || 0) / p.steps : 0);
      const within = ((p.epoch || 1) - 1 + part) / epochs;
      return Math.min(1, (done + w * Math.max(0, within)) / total);
    }
    return 0;
  }

  // ---------- routing ----------

  const VIEWS = ['signin', 'jobs', 'job', 'new'];

  function parseRoute() {
    const h = location.hash.replace(/^#\/?/, '');
    if (!apiKey()) return { view: 'signin' };
    if (h.startsWith('jobs/')) return { view: 'job', id: decodeURIComponent(h.slice(5)) };
    if (h === 'new') return { view: 'new' };
    return { view: 'jobs' };
  }

  function show(route, focus) {
    stopTimers();
    state.route = route;
    for (const v of VIEWS) $(`#view-${v}`).hidden = v !== route.view;
    $('#nav').hidden = !apiKey();
    document.querySelectorAll('[data-nav]').forEach((a) => {
      if (a.dataset.nav === route.view) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    });
    const titles = { signin: 'Sign in', jobs: 'Jobs', job: `Job ${route.id || ''}`, new: 'New job' };
    document.title = `${titles[route.view]} · spkd`;
    if (route.view === 'jobs') enterJobs();
    if (route.view === 'job') enterJob(route.id);
    if (route.view === 'new') enterNew();
    // Move focus to the new view's heading so keyboard and screen-reader users land in the right place.
    if (focus) { const h = $(`#view-${route.view} h1`); if (h) h.focus(); }
  }

  function onHash() { show(parseRoute(), true); }

  // ---------- sign in / out ----------

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORE);
    stopTimers();
    $('#signin-error').textContent = message || '';
    if (location.hash !== '#/signin') location.hash = '#/signin'; else show(parseRoute(), true);
  }

  async function onSignIn(ev) {
    ev.preventDefault();
    const key = $('#apikey').value.trim();
    const err = $('#signin-error');
    if (!key) { err.textContent = 'Enter your API key.'; $('#apikey').focus(); return; }
    sessionStorage.setItem(KEY_STORE, key);
    try {
      await api('GET', '/v1/jobs?limit=1');
    } catch (e) {
      if (e.status !== 401) { sessionStorage.removeItem(KEY_STORE); err.textContent = e.message; }
      $('#apikey').focus();
      return;
    }
    err.textContent = '';
    $('#apikey').value = '';
    announce('Signed in.');
    if (location.hash === '#/jobs') show(parseRoute(), true); else location.hash = '#/jobs';
  }

  // ---------- jobs list ----------

  function enterJobs() {
    state.jobsCursor = null; state.jobsExpanded = false;
    refreshJobs();
    // Once older pages are shown, stop redrawing: a refresh would drop them.
    every(JOBS_REFRESH_MS, () => { if (!state.jobsExpanded) refreshJobs(); });
  }

  async function refreshJobs(append = false) {
    const status = $('#status-filter').value;
    const q = new URLSearchParams({ limit: '20' });
    if (status) q.set('status', status);
    if (append && state.jobsCursor) q.set('after', state.jobsCursor);
    let page;
    try {
      page = await api('GET', `/v1/jobs?${q}`);
    } catch (e) {
      if (e.status !== 401) $('#jobs-error').textContent = e.message;
      return;
    }
    $('#jobs-error').textContent = '';
    const jobs = items(page);
    const tbody = $('#jobs-table tbody');
    // A refresh must not steal keyboard focus: remember which job's link had it, restore it after.
    const focused = tbody.contains(document.activeElement) ? document.activeElement.closest('tr').dataset.job : null;
    if (!append) tbody.replaceChildren();
    for (const job of jobs) tbody.append(jobRow(job));
    if (focused) {
      const link = tbody.querySelector(`tr[data-job="${CSS.escape(focused)}"] a`);
      if (link) link.focus({ preventScroll: true });
    }
    // Auto-refresh only redraws the first page; "Load more" appends older ones on request.
    state.jobsCursor = nextCursor(page);
    if (append) state.jobsExpanded = true;
    $('#jobs-more').hidden = !state.jobsCursor;
    $('#jobs-empty').hidden = tbody.children.length > 0;
    $('#jobs-updated').textContent = `Updated ${new Date().toLocaleTimeString()}`;
  }

  function jobRow(job) {
    const p = job.progress || {};
    const frac = overallFraction(job);
    const m = job.metrics || {};
    const spec = job.spec || {};
    const label = spec.teacher && spec.student ? `${spec.teacher.model} → ${spec.student.model}` : '';
    const prog = el('progress', { max: '1', value: String(frac), 'aria-label': `Job ${job.id} progress` });
    return el('tr', { 'data-job': job.id },
      el('td', { 'data-label': 'Job' }, el('a', { href: `#/jobs/${encodeURIComponent(job.id)}`, text: job.id }),
        label ? el('div', { class: 'help', text: label }) : null),
      el('td', { 'data-label': 'Status' }, el('span', { class: `badge ${job.status}`, text: job.status })),
      el('td', { 'data-label': 'Stage', text: STAGE_NAMES[job.stage || p.stage] || job.stage || p.stage || '–' }),
      el('td', { 'data-label': 'Progress' }, el('span', {}, prog, ` ${Math.round(100 * frac)}%`)),
      el('td', { 'data-label': 'Teacher', text: pct(accOf(m, 'teacher')) }),
      el('td', { 'data-label': 'Baseline', text: pct(accOf(m, 'baseline')) }),
      el('td', { 'data-label': 'Distilled', text: pct(accOf(m, 'distilled')) }),
      el('td', { 'data-label': 'Age', text: age(job.created_at) }),
    );
  }

  // ---------- one job ----------

  function enterJob(id) {
    state.job = null; state.curves = {}; state.seenEvents = new Set(); state.streamEnded = false; state.loadedFinal = false; state.maxFrac = 0;
    $('#job-h').textContent = id;
    $('#job-status').textContent = ''; $('#job-status').className = 'badge';
    $('#job-models').textContent = ''; $('#job-error-msg').textContent = '';
    $('#job-failure').hidden = true; $('#job-cancel').hidden = true;
    $('#job-pause').hidden = true; $('#job-resume').hidden = true;
    $('#events').replaceChildren();
    $('#artifacts').replaceChildren(el('li', { class: 'help', text: 'None yet.' }));
    ['#p-stage', '#p-epoch', '#p-step', '#p-ips', '#p-eta', '#p-stream'].forEach((s) => { $(s).textContent = '–'; });
    ['teacher', 'baseline', 'distilled'].forEach((w) => { $(`#acc-${w}`).textContent = '–'; });
    $('#acc-gain').textContent = '';
    $('#job-progress').value = 0;
    drawCurves();
    refreshJob(id).then(() => {
      const ctl = new AbortController();
      state.stream = ctl;
      streamEvents(id, ctl.signal);
    });
    every(JOB_REFRESH_MS, () => { if (!state.job || !FINAL.has(state.job.status)) refreshJob(id); });
  }

  async function refreshJob(id) {
    let job;
    try {
      job = await api('GET', `/v1/jobs/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e.status !== 401) $('#job-error-msg').textContent = e.status === 404 ? `No job ${id} for this API key.` : e.message;
      return;
    }
    if (state.route.view !== 'job' || state.route.id !== id) return;
    $('#job-error-msg').textContent = '';
    state.job = job;
    renderJob(job);
    // Artifacts and final curves once, when the job is first seen finished.
    if (FINAL.has(job.status) && !state.loadedFinal) {
      state.loadedFinal = true;
      loadArtifacts(id);
      if (job.metrics && job.metrics.curves) mergeCurves(job.metrics.curves);
    }
  }

  function renderJob(job) {
    const badge = $('#job-status');
    badge.textContent = job.status; badge.className = `badge ${job.status}`;
    const spec = job.spec || {};
    if (spec.teacher && spec.student) {
      const ds = spec.dataset ? (spec.dataset.id || spec.dataset.path || (spec.dataset.hf && `hf:${spec.dataset.hf}`)) : '';
      $('#job-models').textContent = `${spec.teacher.model} → ${spec.student.model} on ${ds}`;
    }
    const cancel = $('#job-cancel');
    cancel.hidden = FINAL.has(job.status);
    // A running job stops at its next training step; say so instead of offering the button again.
    cancel.disabled = Boolean(job.cancel_requested) && !FINAL.has(job.status);
    cancel.textContent = cancel.disabled ? 'Cancelling…' : 'Cancel job';
    // Pause: queued, validating or running; a cancel request makes it moot (cancel wins).
    const pause = $('#job-pause');
    pause.hidden = !PAUSABLE.has(job.status) || Boolean(job.cancel_requested);
    pause.disabled = Boolean(job.pause_requested) && !pause.hidden;
    pause.textContent = pause.disabled ? 'Pausing…' : 'Pause job';
    $('#job-resume').hidden = job.status !== 'paused';
    renderProgress(job.progress || {}, job);
    const failed = job.status === 'failed' && job.error;
    $('#job-failure').hidden = !failed;
    if (failed) {
      $('#fail-code').textContent = job.error.code || '–';
      $('#fail-message').textContent = job.error.message || '–';
      $('#fail-field').textContent = job.error.field || '–';
    }
    const m = job.metrics || {};
    for (const who of ['teacher', 'baseline', 'distilled']) {
      const v = accOf(m, who);
      if (typeof v === 'number') $(`#acc-${who}`).textContent = pct(v);
    }
    if (typeof m.gain === 'number') $('#acc-gain').textContent = `Gain from distillation: ${(100 * m.gain).toFixed(1)} points over the baseline.` + gainDetail(m);
  }

  // 'auto' (or empty) for the automatic weight, else the number the user typed (the API checks it).
  function spWeight(text) {
    const t = String(text || '').trim().toLowerCase();
    return t === '' || t === 'auto' ? 'auto' : Number(t);
  }

  // The gain's error bars and which student shipped (metrics.comparison / metrics.shipped).
  function gainDetail(m) {
    const c = m.comparison;
    let text = '';
    if (c && Array.isArray(c.ci95_points) && c.mcnemar) {
      const [lo, hi] = c.ci95_points.map((v) => (v >= 0 ? '+' : '') + v.toFixed(1));
      text += ` 95 % CI ${lo} to ${hi} points, McNemar p = ${Number(c.mcnemar.p_value).toPrecision(3)}: ${c.verdict}.`;
    }
    if (m.shipped) text += ` Shipped as student.*: the ${m.shipped} student.`;
    return text;
  }

  function renderProgress(p, job) {
    const stage = p.stage || (job && job.stage);
    if (stage) $('#p-stage').textContent = STAGE_NAMES[stage] || stage;
    if (p.epoch) $('#p-epoch').textContent = `${p.epoch} / ${p.epochs || '?'}`;
    if (p.step) $('#p-step').textContent = `${p.step} / ${p.steps || '?'}`;
    if (typeof p.images_per_sec === 'number') $('#p-ips').textContent = num(p.images_per_sec);
    if (job && (FINAL.has(job.status) || job.status === 'paused')) $('#p-eta').textContent = '–';
    else if (typeof p.eta_s === 'number') $('#p-eta').textContent = duration(p.eta_s);
    if (job) {
      // Never step back: the polled job and the live stream report at different moments.
      const frac = Math.max(state.maxFrac || 0, overallFraction(Object.assign({}, job, { progress: p })));
      state.maxFrac = frac;
      $('#job-progress').value = frac;
      $('#job-progress-label').textContent = `Overall progress: ${Math.round(100 * frac)}%`;
    }
  }

  // Parse one SSE block ("event:", "data:", "id:" lines) and hand the event on.
  function sseDispatch(block, onEvent) {
    let type = 'message'; const data = []; let id = null;
    for (const line of block.split('\n')) {
      if (!line || line.startsWith(':')) continue;
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? '' : line.slice(i + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') type = value; else if (field === 'data') data.push(value); else if (field === 'id') id = value;
    }
    if (!data.length) return id;
    let parsed;
    try { parsed = JSON.parse(data.join('\n')); } catch (e) { parsed = { message: data.join('\n') }; }
    onEvent(type, parsed, id);
    return id;
  }

  async function streamEvents(id, signal) {
    let lastId = null; let delay = 1000;
    while (!signal.aborted) {
      $('#p-stream').textContent = 'connecting';
      try {
        const headers = { Authorization: `Bearer ${apiKey() || ''}`, Accept: 'text/event-stream' };
        if (lastId) headers['Last-Event-ID'] = lastId;
        const res = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, { headers, signal, cache: 'no-store' });
        if (res.status === 401) { signOut('Your API key was not accepted; sign in again.'); return; }
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        $('#p-stream').textContent = 'live';
        delay = 1000;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          // Normalise line endings, but keep a trailing CR: its LF may arrive in the next chunk.
          const hold = buf.endsWith('\r') ? '\r' : '';
          buf = (hold ? buf.slice(0, -1) : buf).replace(/\r\n?/g, '\n');
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const got = sseDispatch(buf.slice(0, cut), onEvent);
            if (got) lastId = got;
            buf = buf.slice(cut + 2);
          }
          buf += hold;
        }
      } catch (e) {
        if (signal.aborted) return;
      }
      if (state.streamEnded || (state.job && FINAL.has(state.job.status))) { $('#p-stream').textContent = 'ended'; return; }
      $('#p-stream').textContent = 'reconnecting';
      await sleep(delay); delay = Math.min(delay * 2, 15000);
    }
  }

  function onEvent(type, ev) {
    const kind = ev.kind || ev.type || type;
    const data = Object.assign({}, ev.data || {}, ev);
    // Replays after a reconnect repeat events; a seq/id makes each one count once.
    const key = ev.seq !== undefined ? `s${ev.seq}` : (ev.id !== undefined ? `i${ev.id}` : null);
    if (key) { if (state.seenEvents.has(key)) return; state.seenEvents.add(key); }
    if (kind === 'progress') { renderProgress(data, state.job); return; }
    addEventLine(kind, ev.message || '', ev.created_at);
    if (kind === 'epoch_end') {
      mergeCurves({ [data.stage]: [data] });
      renderProgress({ stage: data.stage, epoch: data.epoch, epochs: data.epochs, images_per_sec: data.images_per_sec, epoch_done: true }, state.job);
      announce(`${STAGE_NAMES[data.stage] || data.stage}: epoch ${data.epoch} of ${data.epochs} done, validation accuracy ${pct(data.val_acc)}.`);
    } else if (kind === 'stage_started') {
      renderProgress({ stage: data.stage }, state.job);
    } else if (kind === 'stage_finished' && STAGE_ACC[data.stage] && typeof data.val_acc === 'number') {
      $(`#acc-${STAGE_ACC[data.stage]}`).textContent = pct(data.val_acc);
    } else if (kind === 'status' || kind === 'end') {
      // The stream says the status changed: show it now, then fetch the full job (metrics, error).
      if (state.job && data.status) { state.job.status = data.status; renderJob(state.job); }
      if (kind === 'end') state.streamEnded = true;
      if (state.job) refreshJob(state.job.id);
    }
  }

  function addEventLine(kind, message, ts) {
    const d = toDate(ts);
    const when = d ? d.toLocaleTimeString() : '';
    const cls = kind === 'warning' ? 'warning' : (kind === 'error' || kind === 'failed' ? 'error' : null);
    const list = $('#events');
    list.append(el('li', { class: cls }, when ? `${when} ` : '', el('strong', { text: kind }), message ? ` ${message}` : ''));
    while (list.children.length > 300) list.firstChild.remove();
    list.scrollTop = list.scrollHeight;
  }

  // ---------- curves (inline SVG, drawn here) ----------

  function mergeCurves(curves) {
    for (const [stage, rows] of Object.entries(curves || {})) {
      const byEpoch = new Map((state.curves[stage] || []).map((r) => [r.epoch, r]));
      for (const r of rows || []) if (typeof r.epoch === 'number') byEpoch.set(r.epoch, r);
      state.curves[stage] = [...byEpoch.values()].sort((a, b) => a.epoch - b.epoch);
    }
    drawCurves();
  }

  function drawCurves() {
    const box = $('#curves');
    const stages = Object.keys(state.curves).filter((s) => state.curves[s].length);
    if (!stages.length) { box.replaceChildren(el('p', { class: 'help', text: 'No epoch finished yet.' })); return; }
    const order = Object.keys(STAGE_NAMES);
    stages.sort((a, b) => order.indexOf(a) - order.indexOf(b));
    box.replaceChildren(...stages.flatMap((s) => [
      chart(s, 'loss', state.curves[s]), chart(s, 'acc', state.curves[s]),
    ]));
  }

  const SVGNS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs = {}, text) {
    const n = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function chart(stage, metric, rows) {
    const W = 360, H = 200, L = 44, R = 10, T = 10, B = 30;
    const isAcc = metric === 'acc';
    const keys = [`train_${metric}`, `val_${metric}`];
    const vals = rows.flatMap((r) => keys.map((k) => r[k])).filter((v) => typeof v === 'number' && isFinite(v));
    const epochs = Math.max(rows[rows.length - 1].epochs || 1, rows[rows.length - 1].epoch || 1);
    let lo = isAcc ? 0 : Math.min(...vals, 0), hi = isAcc ? 1 : Math.max(...vals, 1e-9);
    if (!isAcc) { hi *= 1.05; lo = Math.min(lo, 0); }
    const x = (e) => L + (epochs <= 1 ? (W - L - R) / 2 : ((e - 1) / (epochs - 1)) * (W - L - R));
    const y = (v) => T + (1 - (v - lo) / (hi - lo || 1)) * (H - T - B);
    const last = rows[rows.length - 1];
    const title = `${STAGE_NAMES[stage] || stage}: ${isAcc ? 'accuracy' : 'loss'} over ${rows.length} epoch(s); ` +
      `last epoch train ${fmtv(last[keys[0]], isAcc)}, validation ${fmtv(last[keys[1]], isAcc)}`;
    const s = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title, 'data-stage': stage, 'data-metric': metric });
    s.append(svg('title', {}, title));
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      s.append(svg('line', { class: 'gridline', x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      s.append(svg('text', { x: L - 4, y: y(v) + 4, 'text-anchor': 'end' }, isAcc ? `${Math.round(v * 100)}%` : v.toPrecision(2)));
    }
    const step = Math.max(1, Math.ceil(epochs / 8));
    for (let e = 1; e <= epochs; e += step) s.append(svg('text', { x: x(e), y: H - B + 14, 'text-anchor': 'middle' }, String(e)));
    s.append(svg('text', { x: (L + W - R) / 2, y: H - 2, 'text-anchor': 'middle' }, 'epoch'));
    s.append(svg('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }));
    s.append(svg('line', { class: 'axis', x1: L, x2: L, y1: T, y2: H - B }));
    const cls = isAcc ? 'accl' : 'loss';
    keys.forEach((k, i) => {
      const pts = rows.filter((r) => typeof r[k] === 'number' && isFinite(r[k])).map((r) => [x(r.epoch), y(r[k])]);
      if (!pts.length) return;
      s.append(svg('polyline', { class: `${i ? 'val' : 'train'} ${cls}`, points: pts.map((p) => p.join(',')).join(' ') }));
      // Markers too, so a single epoch shows: filled for validation, hollow for training.
      pts.forEach(([px, py]) => s.append(svg('circle', { class: `${cls}${i ? '' : ' hollow'}`, cx: px, cy: py, r: 3 })));
    });
    const legend = el('div', { class: 'legend', 'aria-hidden': 'true' },
      el('span', {}, el('span', { class: `swatch ${cls}` }), 'validation'),
      el('span', {}, el('span', { class: `swatch dashed ${cls}` }), 'training (dashed)'));
    return el('figure', {}, el('figcaption', { text: `${STAGE_NAMES[stage] || stage} – ${isAcc ? 'accuracy' : 'loss'}` }), s, legend);
  }

  function fmtv(v, isAcc) { return isAcc ? pct(v) : num(v, 3); }

  // ---------- artifacts ----------

  async function loadArtifacts(id) {
    let page;
    try { page = await api('GET', `/v1/jobs/${encodeURIComponent(id)}/artifacts`); } catch (e) { return; }
    const list = $('#artifacts');
    const arts = items(page);
    if (!arts.length) { list.replaceChildren(el('li', { class: 'help', text: 'No artifacts.' })); return; }
    list.replaceChildren(...arts.map((a) => {
      const btn = el('button', { type: 'button', 'data-artifact': a.name, text: `Download ${a.name}` });
      btn.addEventListener('click', () => download(id, a.name, btn));
      return el('li', {}, btn, el('span', { text: bytes(a.size) }), a.sha256 ? el('code', { title: 'sha256', text: `sha256 ${a.sha256}` }) : null);
    }));
  }

  async function download(id, name, btn) {
    btn.disabled = true;
    try {
      const res = await api('GET', `/v1/jobs/${encodeURIComponent(id)}/artifacts/${encodeURIComponent(name)}`, { raw: true });
      const url = URL.createObjectURL(await res.blob());
      const a = el('a', { href: url, download: name, hidden: 'hidden' });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      announce(`Downloaded ${name}.`);
    } catch (e) {
      if (e.status !== 401) $('#job-error-msg').textContent = `Download of ${name} failed: ${e.message}`;
    } finally {
      btn.disabled = false;
      btn.focus();
    }
  }

  async function onCancel() {
    const job = state.job; if (!job) return;
    const btn = $('#job-cancel');
    btn.disabled = true;
    try {
      await api('POST', `/v1/jobs/${encodeURIComponent(job.id)}/cancel`);
      announce('Cancel requested.');
      await refreshJob(job.id);
    } catch (e) {
      if (e.status !== 401) $('#job-error-msg').textContent = e.message;
    } finally {
      if (!state.job || !state.job.cancel_requested) btn.disabled = false;
      if (btn.hidden || btn.disabled) $('#job-h').focus();
    }
  }

  // Pause or resume (the same shape as cancel): POST, then show what the server answered.
  async function onPauseResume(action) {
    const job = state.job; if (!job) return;
    const btn = $(`#job-${action}`);
    btn.disabled = true;
    try {
      await api('POST', `/v1/jobs/${encodeURIComponent(job.id)}/${action}`);
      announce(action === 'pause' ? 'Pause requested.' : 'Job resumed.');
      $('#job-error-msg').textContent = '';
      await refreshJob(job.id);
    } catch (e) {
      if (e.status !== 401) $('#job-error-msg').textContent = e.message;
      if (state.job) renderJob(state.job);  // the buttons as the job now stands
    } finally {
      if (!state.job || !(action === 'pause' && state.job.pause_requested)) btn.disabled = false;
      if (btn.hidden || btn.disabled) $('#job-h').focus();
    }
  }

  // ---------- new job ----------

  async function enterNew() {
    try {
      const page = await api('GET', '/v1/datasets');
      const sel = $('#f-dataset'); const keep = sel.value;
      sel.replaceChildren(el('option', { value: '', text: '(use a server folder instead)' }),
        ...items(page).map((d) => el('option', { value: d.id, text: datasetLabel(d) })));
      if (keep) sel.value = keep;
    } catch (e) { /* the form still works with a folder path */ }
    try {
      const page = await api('GET', '/v1/models');
      const names = items(page).map((m) => (typeof m === 'string' ? m : m.name)).filter(Boolean);
      $('#model-names').replaceChildren(...names.slice(0, 2000).map((n) => el('option', { value: n })));
    } catch (e) { /* free text still works */ }
  }

  function datasetLabel(d) {
    const classes = d.classes ? `${d.classes.length} classes` : '';
    return [d.name || d.filename || d.id, classes, d.id].filter(Boolean).join(' · ');
  }

  function onUpload(ev) {
    ev.preventDefault();
    const file = $('#upload-file').files[0];
    const status = $('#upload-status'); const err = $('#upload-error');
    err.textContent = '';
    if (!file) { err.textContent = 'Choose a zip file first.'; $('#upload-file').focus(); return; }
    const form = new FormData(); form.append('file', file, file.name);
    // XMLHttpRequest, not fetch: it reports upload progress for big zips.
    const xhr = new XMLHttpRequest();
    const name = file.name.replace(/\.zip$/i, '');
    xhr.open('POST', `/v1/datasets?name=${encodeURIComponent(name)}`);
    xhr.setRequestHeader('Authorization', `Bearer ${apiKey() || ''}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) status.textContent = `Uploading… ${Math.round((100 * e.loaded) / e.total)}%`; };
    xhr.onerror = () => { err.textContent = 'Upload failed: the server did not answer.'; };
    xhr.onload = () => {
      let body = null; try { body = JSON.parse(xhr.responseText); } catch (e) { /* keep null */ }
      if (xhr.status === 401) { signOut('Your API key was not accepted; sign in again.'); return; }
      if (xhr.status >= 400) { status.textContent = ''; err.textContent = `Upload failed: ${new ApiError(xhr.status, body).message}`; return; }
      if (body && body.status === 'validating') { waitValidated(body, status, err); return; }
      uploaded(body || {}, status);
    };
    status.textContent = 'Uploading…';
    xhr.send(form);
  }

  // A large zip answers 202 `validating`: poll the dataset until it is ready or failed.
  async function waitValidated(d, status, err) {
    status.textContent = `Uploaded ${d.id}; validating…`;
    while (d.status === 'validating') {
      await new Promise((res) => setTimeout(res, 1000));
      try { d = await api('GET', `/v1/datasets/${d.id}`); } catch (e) { err.textContent = `Validation status unknown: ${e.message}`; return; }
    }
    if (d.status === 'failed') {
      status.textContent = '';
      err.textContent = `Upload failed: ${(d.error || {}).message || 'validation failed'} (${(d.error || {}).code || 'failed'})`;
      return;
    }
    uploaded(d, status);
  }

  function uploaded(d, status) {
    const rejected = (d.rejected || []).length;
    status.textContent = `Uploaded ${d.id}: ${(d.classes || []).join(', ')}` + (rejected ? `; ${rejected} file(s) rejected` : '');
    const sel = $('#f-dataset');
    sel.append(el('option', { value: d.id, text: datasetLabel(d) }));
    sel.value = d.id;
    $('#f-dataset-path').value = '';
    announce(status.textContent);
  }

  // Spec field path (as the API reports it) -> the input to focus.
  const FIELD_INPUTS = {
    'teacher.model': '#f-teacher', 'teacher.weights': '#f-teacher-weights', 'teacher.finetune.epochs': '#f-teacher-ft',
    'student.model': '#f-student', 'student.weights': '#f-student-weights', dataset: '#f-dataset',
    'dataset.id': '#f-dataset', 'dataset.path': '#f-dataset-path', 'train.epochs': '#f-epochs',
    'distill.sp_weight': '#f-sp', 'train.batch_size': '#f-bs', 'train.lr': '#f-lr', 'train.image_size': '#f-size',
    'train.num_workers': '#f-workers',
  };

  function buildSpec() {
    const v = (id) => $(id).value.trim();
    const ft = parseInt(v('#f-teacher-ft') || '0', 10);
    const teacher = { model: v('#f-teacher'), weights: v('#f-teacher-weights') || 'hub' };
    if (ft > 0) teacher.finetune = { epochs: ft };
    const dataset = v('#f-dataset') ? { id: v('#f-dataset') } : { path: v('#f-dataset-path') };
    return {
      teacher,
      student: { model: v('#f-student'), weights: v('#f-student-weights') || 'hub' },
      dataset,
      distill: { sp_weight: spWeight(v('#f-sp')) },
      train: {
        epochs: parseInt(v('#f-epochs'), 10), batch_size: parseInt(v('#f-bs'), 10),
        lr: Number(v('#f-lr')), image_size: parseInt(v('#f-size'), 10),
        ...(v('#f-workers') !== '' ? { num_workers: parseInt(v('#f-workers'), 10) } : {}),
      },
      baseline: $('#f-baseline').checked,
    };
  }

  let idemKey = null;
  async function onCreate(ev) {
    ev.preventDefault();
    const err = $('#job-form-error'); err.textContent = '';
    document.querySelectorAll('#job-form [aria-invalid]').forEach((n) => n.removeAttribute('aria-invalid'));
    const spec = buildSpec();
    if (!spec.dataset.id && !spec.dataset.path) { err.textContent = 'Pick an uploaded dataset or type a folder.'; $('#f-dataset').focus(); return; }
    // One key per intended job: a double click or a retry after a timeout creates it once.
    idemKey = idemKey || randomId();
    const btn = ev.submitter || $('#job-form button[type=submit]');
    btn.disabled = true;
    try {
      const job = await api('POST', '/v1/jobs', { body: spec, headers: { 'Idempotency-Key': idemKey } });
      idemKey = null;
      announce(`Job ${job.id} created.`);
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      if (e.status === 401) return;
      if (e.status && e.status < 500) idemKey = null;
      err.textContent = e.field ? `${e.field}: ${e.message}` : e.message;
      const input = e.field && FIELD_INPUTS[e.field];
      if (input) { $(input).setAttribute('aria-invalid', 'true'); $(input).setAttribute('aria-errormessage', 'job-form-error'); $(input).focus(); }
    } finally {
      btn.disabled = false;
    }
  }

  // ---------- start ----------

  function init() {
    $('#signin-form').addEventListener('submit', onSignIn);
    $('#signout').addEventListener('click', () => signOut('Signed out.'));
    $('#status-filter').addEventListener('change', () => { state.jobsExpanded = false; refreshJobs(); });
    $('#jobs-more').addEventListener('click', () => refreshJobs(true));
    $('#job-cancel').addEventListener('click', onCancel);
    $('#job-pause').addEventListener('click', () => onPauseResume('pause'));
    $('#job-resume').addEventListener('click', () => onPauseResume('resume'));
    $('#upload-form').addEventListener('submit', onUpload);
    $('#job-form').addEventListener('submit', onCreate);
    window.addEventListener('hashchange', onHash);
    show(parseRoute(), false);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init); else init();
})();

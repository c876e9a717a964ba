/* One job's page: status and actions (pause, resume, cancel), once it succeeded its result first
 * (result.js) and a drop zone to try the model (predict.js), progress, accuracies, curves, events
 * (live), artifacts once it is finished. Polled every 2 s until final, and followed live. */

import { api } from './api.js';
import { artifactPath, download, loadArtifacts } from './artifacts.js';
import { mergeCurves, resetCurves } from './charts.js';
import { hidePredict, initPredict, showPredict } from './predict.js';
import { renderResult, resetResult } from './result.js';
import { route } from './route.js';
import { followEvents } from './sse.js';
import { loadStages, overallFraction, stageTitle } from './stages.js';
import { $, accOf, announce, duration, el, every, newStream, num, pct, rowEval, rowSplit, toDate } from './util.js';

const FINAL = new Set(['succeeded', 'failed', 'cancelled']);
// A job one can pause: it has not stopped, and no worker has yet stopped it on request.
const PAUSABLE = new Set(['queued', 'validating', 'running']);
const JOB_REFRESH_MS = 2000;

const shown = { job: null, seenEvents: new Set(), streamEnded: false, loadedFinal: false, maxFrac: 0 };

export function initJob() {
  $('#job-cancel').addEventListener('click', onCancel);
  $('#job-pause').addEventListener('click', () => onPauseResume('pause'));
  $('#job-resume').addEventListener('click', () => onPauseResume('resume'));
  // The shipped student's hub folder as one zip, and the report, fetched with the key.
  $('#res-zip').addEventListener('click', downloader('student', '?format=zip', 'student.zip'));
  $('#res-report').addEventListener('click', downloader('report.html', '', 'report.html'));
  initPredict();
}

// A click handler that saves the shown job's artifact `name` (+ `query`) as `<job id>-<file>`.
function downloader(name, query, file) {
  return (e) => { if (shown.job) download(artifactPath(shown.job.id, name, query), `${shown.job.id}-${file}`, e.currentTarget); };
}

export function enterJob(id) {
  Object.assign(shown, { job: null, seenEvents: new Set(), streamEnded: false, loadedFinal: false, maxFrac: 0 });
  $('#job-h').textContent = id;
  $('#job-status').textContent = ''; $('#job-status').className = 'badge';
  $('#job-models').textContent = ''; $('#job-error-msg').textContent = '';
  $('#job-failure').hidden = true; $('#job-cancel').hidden = true;
  $('#job-pause').hidden = true; $('#job-resume').hidden = true;
  $('#events').replaceChildren();
  $('#artifacts').replaceChildren(el('p', { class: 'help', text: 'None yet.' }));
  ['#p-stage', '#p-epoch', '#p-step', '#p-ips', '#p-eta', '#p-stream'].forEach((s) => { $(s).textContent = '–'; });
  ['teacher', 'baseline', 'distilled'].forEach((w) => { $(`#acc-${w}`).textContent = '–'; });
  $('#acc-gain').textContent = '';
  $('#job-progress').value = 0;
  resetResult(); hidePredict();
  resetCurves();
  refreshJob(id).then(() => {
    const ctl = newStream();
    followEvents(`/v1/jobs/${encodeURIComponent(id)}/events`, {
      signal: ctl.signal,
      onEvent,
      onState: (text) => { $('#p-stream').textContent = text; },
      finished: () => shown.streamEnded || Boolean(shown.job && FINAL.has(shown.job.status)),
    });
  });
  every(JOB_REFRESH_MS, () => { if (!shown.job || !FINAL.has(shown.job.status)) refreshJob(id); });
}

async function refreshJob(id) {
  let job;
  try {
    [job] = await Promise.all([api('GET', `/v1/jobs/${encodeURIComponent(id)}`), loadStages()]);
  } catch (e) {
    if (e.status !== 401) $('#job-error-msg').textContent = e.status === 404 ? `No job ${id} for this API key.` : e.message;
    return;
  }
  if (route.view !== 'job' || route.id !== id) return;
  $('#job-error-msg').textContent = '';
  shown.job = job;
  renderJob(job);
  // Artifacts and final curves once, when the job is first seen finished.
  if (FINAL.has(job.status) && !shown.loadedFinal) {
    shown.loadedFinal = true;
    loadArtifacts(id).then((names) => { if (job.status === 'succeeded') showPredict(id, names); });
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
  renderResult(job);
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
  if (typeof m.gain === 'number') $('#acc-gain').textContent = `Distilled minus baseline: ${(100 * m.gain).toFixed(1)} points on the report split.`;
}

function renderProgress(p, job) {
  const stage = p.stage || (job && job.stage);
  // A job that ended reads as such, not as the last stage it ran.
  if (job && FINAL.has(job.status)) $('#p-stage').textContent = job.status === 'succeeded' ? 'finished' : job.status;
  else if (stage) $('#p-stage').textContent = stageTitle(stage);
  if (p.epoch) $('#p-epoch').textContent = `${p.epoch} / ${p.epochs || '?'}`;
  if (p.step) $('#p-step').textContent = `${p.step} / ${p.steps || '?'}`;
  if (typeof p.images_per_sec === 'number') $('#p-ips').textContent = num(p.images_per_sec);
  if (job && (FINAL.has(job.status) || job.status === 'paused')) $('#p-eta').textContent = '–';
  else if (typeof p.eta_s === 'number') $('#p-eta').textContent = duration(p.eta_s);
  if (job) {
    // Never step back: the polled job and the live stream report at different moments.
    const frac = Math.max(shown.maxFrac || 0, overallFraction(Object.assign({}, job, { progress: p })));
    shown.maxFrac = frac;
    $('#job-progress').value = frac;
    $('#job-progress-label').textContent = `Overall progress: ${Math.round(100 * frac)}%`;
  }
}

function onEvent(type, ev) {
  const kind = ev.kind || ev.type || type;
  const data = Object.assign({}, ev.data || {}, ev);
  // Replays after a reconnect repeat events; a seq/id makes each one count once.
  const key = ev.seq !== undefined ? `s${ev.seq}` : (ev.id !== undefined ? `i${ev.id}` : null);
  if (key) { if (shown.seenEvents.has(key)) return; shown.seenEvents.add(key); }
  if (kind === 'progress') { renderProgress(data, shown.job); return; }
  addEventLine(kind, ev.message || '', ev.created_at);
  if (kind === 'epoch_end') {
    mergeCurves({ [data.stage]: [ev.data || data] });  // the row only: every other number in it is a loss term
    renderProgress({ stage: data.stage, epoch: data.epoch, epochs: data.epochs, images_per_sec: data.images_per_sec, epoch_done: true }, shown.job);
    announce(`${stageTitle(data.stage)}: epoch ${data.epoch} of ${data.epochs} done, ${rowSplit(data)}-split accuracy ${pct(rowEval(data, 'acc'))}.`);
  } else if (kind === 'stage_started') {
    renderProgress({ stage: data.stage }, shown.job);
  } else if (kind === 'status' || kind === 'end') {
    // The stream says the status changed: show it now, then fetch the full job (metrics, error).
    if (shown.job && data.status) { shown.job.status = data.status; renderJob(shown.job); }
    if (kind === 'end') shown.streamEnded = true;
    if (shown.job) refreshJob(shown.job.id);
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

async function onCancel() {
  const job = shown.job; if (!job) return;
  const btn = $('#job-cancel');
  btn.disabled = true;
  try {
    await api('POST', `/v1/jobs/${encodeURIComponent(job.id)}/cancel`);
    announce('Cancel requested.');
    await refreshJob(job.id);
  } catch (e) {
    if (e.status !== 401) $('#job-error-msg').textContent = e.message;
  } finally {
    if (!shown.job || !shown.job.cancel_requested) btn.disabled = false;
    if (btn.hidden || btn.disabled) $('#job-h').focus();
  }
}

// Pause or resume (the same shape as cancel): POST, then show what the server answered.
async function onPauseResume(action) {
  const job = shown.job; if (!job) return;
  const btn = $(`#job-${action}`);
  btn.disabled = true;
  try {
    await api('POST', `/v1/jobs/${encodeURIComponent(job.id)}/${action}`);
    announce(action === 'pause' ? 'Pause requested.' : 'Job resumed.');
    $('#job-error-msg').textContent = '';
    await refreshJob(job.id);
  } catch (e) {
    if (e.status !== 401) $('#job-error-msg').textContent = e.message;
    if (shown.job) renderJob(shown.job);  // the buttons as the job now stands
  } finally {
    if (!shown.job || !(action === 'pause' && shown.job.pause_requested)) btn.disabled = false;
    if (btn.hidden || btn.disabled) $('#job-h').focus();
  }
}

/* The jobs list: the first page refreshed every few seconds, older pages on request. */

import { api, items, nextCursor } from './api.js';
import { loadStages, overallFraction, stageTitle } from './stages.js';
import { $, accOf, age, el, every, pct } from './util.js';

const JOBS_REFRESH_MS = 3000;
const list = { cursor: null, expanded: false };

export function initJobs() {
  $('#status-filter').addEventListener('change', () => { list.expanded = false; refreshJobs(); });
  $('#jobs-more').addEventListener('click', () => refreshJobs(true));
}

export function enterJobs() {
  list.cursor = null; list.expanded = false;
  refreshJobs();
  // Once older pages are shown, stop redrawing: a refresh would drop them.
  every(JOBS_REFRESH_MS, () => { if (!list.expanded) refreshJobs(); });
}

async function refreshJobs(append = false) {
  const status = $('#status-filter').value;
  const q = new URLSearchParams({ limit: '20' });
  if (status) q.set('status', status);
  if (append && list.cursor) q.set('after', list.cursor);
  let page;
  try {
    [page] = await Promise.all([api('GET', `/v1/jobs?${q}`), loadStages()]);
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
  list.cursor = nextCursor(page);
  if (append) list.expanded = true;
  $('#jobs-more').hidden = !list.cursor;
  $('#jobs-empty').hidden = tbody.children.length > 0;
  $('#jobs-updated').textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

function jobRow(job) {
  const p = job.progress || {};
  const frac = overallFraction(job);
  const m = job.metrics || {};
  const spec = job.spec || {};
  const label = spec.teacher && spec.student ? `${spec.teacher.model} → ${spec.student.model}` : '';
  const stage = job.stage || p.stage;
  const prog = el('progress', { max: '1', value: String(frac), 'aria-label': `Job ${job.id} progress` });
  return el('tr', { 'data-job': job.id },
    el('td', { 'data-label': 'Job' }, el('a', { href: `#/jobs/${encodeURIComponent(job.id)}`, text: job.id }),
      label ? el('div', { class: 'help', text: label }) : null),
    el('td', { 'data-label': 'Status' }, el('span', { class: `badge ${job.status}`, text: job.status })),
    el('td', { 'data-label': 'Stage', text: stage ? stageTitle(stage) : '–' }),
    el('td', { 'data-label': 'Progress' }, el('span', {}, prog, ` ${Math.round(100 * frac)}%`)),
    el('td', { 'data-label': 'Teacher', text: pct(accOf(m, 'teacher')) }),
    el('td', { 'data-label': 'Baseline', text: pct(accOf(m, 'baseline')) }),
    el('td', { 'data-label': 'Distilled', text: pct(accOf(m, 'distilled')) }),
    el('td', { 'data-label': 'Age', text: age(job.created_at) }),
  );
}

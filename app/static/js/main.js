/* spkd dashboard: plain ES modules, no framework, no build step; talks only to the same-origin v1
 * API. This module is the router (#/jobs, #/jobs/<id>, #/new, sign-in) and signs in and out; each
 * view lives in its own module:
 *   api.js       fetch with the key, errors (ApiError), 401 -> sign out
 *   stages.js    the stage list from GET /v1/stages: titles, order, a job's overall progress
 *   jobs.js      the jobs list            job.js       one job (sse.js: its live events,
 *   newjob.js    the new-job form                      charts.js: curves, artifacts.js: downloads,
 *                                                      result.js: what shipped, predict.js: try it)
 *   datasets.js  dataset choice and upload
 *   util.js      DOM and format helpers, the view's timers    route.js  the view on screen
 */

import { api, apiKey, clearApiKey, onUnauthorized, setApiKey } from './api.js';
import { initDatasets } from './datasets.js';
import { enterJob, initJob } from './job.js';
import { enterJobs, initJobs } from './jobs.js';
import { enterNew, initNewJob } from './newjob.js';
import { setRoute } from './route.js';
import { $, announce, stopTimers } from './util.js';

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
  setRoute(route);
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
  clearApiKey();
  stopTimers();
  $('#signin-error').textContent = message || '';
  if (location.hash !== '#/signin') location.hash = '#/signin'; else show(parseRoute(), true);
}

async function onSignIn(ev) {
  ev.preventDefault();
  const key = $('#apikey').value.trim();
  const err = $('#signin-error');
  if (!key) { err.textContent = 'Enter your API key.'; $('#apikey').focus(); return; }
  setApiKey(key);
  try {
    await api('GET', '/v1/jobs?limit=1');
  } catch (e) {
    if (e.status !== 401) { clearApiKey(); err.textContent = e.message; }
    $('#apikey').focus();
    return;
  }
  err.textContent = '';
  $('#apikey').value = '';
  announce('Signed in.');
  if (location.hash === '#/jobs') show(parseRoute(), true); else location.hash = '#/jobs';
}

// ---------- start ----------

function init() {
  onUnauthorized(signOut);
  $('#signin-form').addEventListener('submit', onSignIn);
  $('#signout').addEventListener('click', () => signOut('Signed out.'));
  initJobs();
  initJob();
  initDatasets();
  initNewJob();
  window.addEventListener('hashchange', onHash);
  show(parseRoute(), false);
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init); else init();

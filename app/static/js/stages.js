/* The stages of a job, as the server lists them (GET /v1/stages, from common/spec.py): their order,
 * titles, which spec fields plan them and hold their epochs, and which accuracy each yields.
 * Fetched once per page load; until then a stage shows under its own name. */

import { api, items } from './api.js';

let list = [];
let loading = null;

// The stage list; resolves even when the request fails (the next call tries again).
export function loadStages() {
  if (!loading) {
    loading = api('GET', '/v1/stages')
      .then((page) => { list = items(page); return list; })
      .catch(() => { loading = null; return list; });
  }
  return loading;
}

export function stageOrder() { return list.map((s) => s.name); }
export function stageTitle(name) { const s = list.find((x) => x.name === name); return (s && s.title) || name; }

// spec.<dotted> of a job's spec (as the API returns it), undefined where a part is missing.
function field(spec, dotted) {
  let v = spec;
  for (const part of dotted.split('.')) v = v === null || v === undefined ? undefined : v[part];
  return v;
}

// Fraction of the whole job done, from the spec's planned stages weighted by their epochs (a stage
// without training steps weighs half an epoch).
export function overallFraction(job) {
  const p = Object.assign({ stage: job.stage }, job.progress || {});
  if (typeof p.fraction === 'number') return p.fraction;
  if (job.status === 'succeeded') return 1;
  const spec = job.spec || {};
  const ep = (spec.train || {}).epochs || 1;
  const plan = list
    .filter((s) => !s.planned_by || field(spec, s.planned_by))
    .map((s) => [s.name, s.trains ? (s.epochs_from && field(spec, s.epochs_from)) || ep : 0.5]);
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

/* The new-job form: a spec from the fields, POST /v1/jobs with an Idempotency-Key, and the API's
 * error shown on the field it names. */

import { api, items } from './api.js';
import { loadDatasets } from './datasets.js';
import { $, announce, el, randomId } from './util.js';

// Spec field path (as the API reports it) -> the input to focus.
const FIELD_INPUTS = {
  'teacher.model': '#f-teacher', 'teacher.weights': '#f-teacher-weights', 'teacher.finetune.epochs': '#f-teacher-ft',
  'student.model': '#f-student', 'student.weights': '#f-student-weights', dataset: '#f-dataset',
  'dataset.id': '#f-dataset', 'dataset.path': '#f-dataset-path', 'train.epochs': '#f-epochs',
  'distill.sp_weight': '#f-sp', 'train.batch_size': '#f-bs', 'train.lr': '#f-lr', 'train.image_size': '#f-size',
  'train.num_workers': '#f-workers',
};

let idemKey = null;

export function initNewJob() {
  $('#job-form').addEventListener('submit', onCreate);
}

export async function enterNew() {
  await loadDatasets();
  try {
    const page = await api('GET', '/v1/models');
    const names = items(page).map((m) => (typeof m === 'string' ? m : m.name)).filter(Boolean);
    $('#model-names').replaceChildren(...names.slice(0, 2000).map((n) => el('option', { value: n })));
  } catch (e) { /* free text still works */ }
}

// 'auto' (or empty) for the automatic weight, else the number the user typed (the API checks it).
function spWeight(text) {
  const t = String(text || '').trim().toLowerCase();
  return t === '' || t === 'auto' ? 'auto' : Number(t);
}

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

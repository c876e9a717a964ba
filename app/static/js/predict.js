/* Try a succeeded job's shipped student: drop 1-16 images on the zone (or choose them with the file
 * input, for the keyboard) -> POST /v1/jobs/{id}/predict (multipart parts `images`, top_k=3) -> the
 * top labels with their probabilities per image. The API's error (422 not_an_image, 429 with
 * Retry-After...) is shown as it says it. */

import { api } from './api.js';
import { $, announce, el, pct } from './util.js';

const MAX_IMAGES = 16;
const TOP_K = 3;
let jobId = null;

export function initPredict() {
  const zone = $('#drop');
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (e) => { e.preventDefault(); zone.classList.remove('over'); classify([...e.dataTransfer.files]); });
  $('#try-file').addEventListener('change', (e) => { classify([...e.target.files]); e.target.value = ''; });
}

// Show the zone for a succeeded job with student.onnx among its artifacts; hide it otherwise.
export function showPredict(id, artifactNames) {
  const ok = artifactNames.includes('student.onnx');
  if (jobId !== id) { $('#try-results').replaceChildren(); $('#try-error').textContent = ''; $('#try-status').textContent = ''; }
  jobId = ok ? id : null;
  $('#try').hidden = !ok;
}

export function hidePredict() { jobId = null; $('#try').hidden = true; }

async function classify(files) {
  const id = jobId;
  if (!id || !files.length) return;
  const err = $('#try-error'); err.textContent = '';
  if (files.length > MAX_IMAGES) { err.textContent = `Choose at most ${MAX_IMAGES} images (${files.length} given).`; return; }
  const form = new FormData();
  files.forEach((f) => form.append('images', f, f.name));
  $('#try-status').textContent = `Classifying ${files.length} image${files.length > 1 ? 's' : ''}…`;
  try {
    const res = await api('POST', `/v1/jobs/${encodeURIComponent(id)}/predict?top_k=${TOP_K}`, { body: form, raw: true });
    const out = await res.json();
    if (id !== jobId) return;
    $('#try-results').replaceChildren(...out.predictions.map((p, i) => resultItem(p, files[i])));
    $('#try-status').textContent = `${out.model.architecture} (${out.model.trained}, ${out.model.file}):`;
    announce(out.predictions.map((p) => `${p.file}: ${p.top[0].label}`).join('; '));
  } catch (e) {
    $('#try-status').textContent = '';
    if (e.status === 401) return;
    const retry = e.status === 429 && e.retryAfter ? ` Retry in ${e.retryAfter} s.` : '';
    err.textContent = `${e.message}${e.code ? ` (${e.code})` : ''}${retry}`;
  }
}

function resultItem(p, file) {
  const img = file ? el('img', { src: URL.createObjectURL(file), alt: '', width: '64', height: '64' }) : null;
  if (img) img.addEventListener('load', () => URL.revokeObjectURL(img.src));
  return el('li', { 'data-file': p.file }, img, el('div', {},
    el('strong', { class: 'file', text: p.file }),
    el('ol', { class: 'topk' }, ...p.top.map((t) => el('li', {}, el('span', { class: 'label', text: t.label }), ` ${pct(t.probability)}`)))));
}

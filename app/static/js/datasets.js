/* Datasets on the new-job page: the uploaded ones to choose from, and uploading a zip (with
 * progress; a large zip is validated in the background and polled until ready or failed). */

import { ApiError, api, authHeader, items, unauthorized } from './api.js';
import { $, announce, el } from './util.js';

export function initDatasets() {
  $('#upload-form').addEventListener('submit', onUpload);
}

// Fill the dataset choice with this key's uploads, keeping the one chosen.
export async function loadDatasets() {
  try {
    const page = await api('GET', '/v1/datasets');
    const sel = $('#f-dataset'); const keep = sel.value;
    sel.replaceChildren(el('option', { value: '', text: '(use a server folder instead)' }),
      ...items(page).map((d) => el('option', { value: d.id, text: datasetLabel(d) })));
    if (keep) sel.value = keep;
  } catch (e) { /* the form still works with a folder path */ }
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
  xhr.setRequestHeader('Authorization', authHeader());
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) status.textContent = `Uploading… ${Math.round((100 * e.loaded) / e.total)}%`; };
  xhr.onerror = () => { err.textContent = 'Upload failed: the server did not answer.'; };
  xhr.onload = () => {
    let body = null; try { body = JSON.parse(xhr.responseText); } catch (e) { /* keep null */ }
    if (xhr.status === 401) { unauthorized(); return; }
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

/* A finished job's artifacts, grouped (models, reports, logs), each folder collapsed in a <details>,
 * listed with size and sha256, downloaded through fetch -> blob -> object URL so the key never goes
 * into a link. */

import { api, items } from './api.js';
import { $, announce, bytes, el } from './util.js';

const GROUPS = [['models', 'Models'], ['reports', 'Reports'], ['logs', 'Logs (TensorBoard)']];

// A folder stays whole in one group: tensorboard/ is logs, the hub folders (student/...) are models.
function groupOf(name) {
  if (name.startsWith('tensorboard/') || name.endsWith('.log')) return 'logs';
  if (name.includes('/')) return 'models';
  return /\.(html|md|csv|png)$|^metrics\.json$/.test(name) ? 'reports' : 'models';
}

// Lists the artifacts of job `id`; resolves to their names ([] when the list failed).
export async function loadArtifacts(id) {
  let page;
  try { page = await api('GET', `/v1/jobs/${encodeURIComponent(id)}/artifacts`); } catch (e) { return []; }
  const box = $('#artifacts');
  const arts = items(page);
  if (!arts.length) { box.replaceChildren(el('p', { class: 'help', text: 'No artifacts.' })); return []; }
  box.replaceChildren(...GROUPS.map(([key, title]) => {
    const mine = arts.filter((a) => groupOf(a.name) === key);
    return mine.length ? el('section', { class: 'art-group' }, el('h3', { text: title }), listOf(id, mine)) : null;
  }).filter(Boolean));
  return arts.map((a) => a.name);
}

// Top-level files first, then one collapsed <details> per folder (first path segment).
function listOf(id, arts) {
  const files = arts.filter((a) => !a.name.includes('/'));
  const folders = new Map();
  for (const a of arts) {
    if (!a.name.includes('/')) continue;
    const dir = a.name.split('/')[0];
    if (!folders.has(dir)) folders.set(dir, []);
    folders.get(dir).push(a);
  }
  const list = el('ul', { class: 'artifacts' }, ...files.map((a) => fileItem(id, a)));
  for (const [dir, members] of folders) {
    const total = members.reduce((s, a) => s + (a.size || 0), 0);
    list.append(el('li', { class: 'folder' }, el('details', {},
      el('summary', { text: `${dir}/ (${members.length} files, ${bytes(total)})` }),
      el('ul', { class: 'artifacts' }, ...members.map((a) => fileItem(id, a))))));
  }
  return list;
}

function fileItem(id, a) {
  const btn = el('button', { type: 'button', 'data-artifact': a.name, text: `Download ${a.name}` });
  btn.addEventListener('click', () => download(artifactPath(id, a.name), a.name.split('/').pop(), btn));
  return el('li', {}, btn, el('span', { text: bytes(a.size) }), a.sha256 ? el('code', { title: 'sha256', text: `sha256 ${a.sha256}` }) : null);
}

export function artifactPath(id, name, query = '') {
  return `/v1/jobs/${encodeURIComponent(id)}/artifacts/${name.split('/').map(encodeURIComponent).join('/')}${query}`;
}

// GET `path` with the key and hand the body to the browser as the file `filename`.
export async function download(path, filename, btn) {
  btn.disabled = true;
  try {
    const res = await api('GET', path, { raw: true });
    const url = URL.createObjectURL(await res.blob());
    const a = el('a', { href: url, download: filename, hidden: 'hidden' });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    announce(`Downloaded ${filename}.`);
  } catch (e) {
    if (e.status !== 401) $('#job-error-msg').textContent = `Download of ${filename} failed: ${e.message}`;
  } finally {
    btn.disabled = false;
    btn.focus();
  }
}

/* A finished job's artifacts: listed with size and sha256, downloaded through fetch -> blob ->
 * object URL so the key never goes into a link. */

import { api, items } from './api.js';
import { $, announce, bytes, el } from './util.js';

export async function loadArtifacts(id) {
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

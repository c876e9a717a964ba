/* A job's live event stream, read with fetch() and parsed here: EventSource cannot send headers,
 * and this keeps the API key out of URLs (and out of server logs). Reconnects with Last-Event-ID,
 * backing off from 1 s to 15 s, until the stream ends or the view stops it. */

import { authHeader, unauthorized } from './api.js';
import { sleep } from './util.js';

// Parse one SSE block ("event:", "data:", "id:" lines) and hand the event on; returns its id.
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

// Follow `url` until `signal` aborts or, after the stream closes, `finished()` says there is no more:
// `onEvent(type, data, id)` per event, `onState` with connecting / live / reconnecting / ended.
export async function followEvents(url, { signal, onEvent, onState, finished }) {
  let lastId = null; let delay = 1000;
  while (!signal.aborted) {
    onState('connecting');
    try {
      const headers = { Authorization: authHeader(), Accept: 'text/event-stream' };
      if (lastId) headers['Last-Event-ID'] = lastId;
      const res = await fetch(url, { headers, signal, cache: 'no-store' });
      if (res.status === 401) { unauthorized(); return; }
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      onState('live');
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
    if (finished()) { onState('ended'); return; }
    onState('reconnecting');
    await sleep(delay); delay = Math.min(delay * 2, 15000);
  }
}

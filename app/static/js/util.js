/* Small helpers every view uses: DOM building, announcements, number and time formats, and the
 * timers and event stream of the view on screen (the router stops them when the view changes). */

export const $ = (sel) => document.querySelector(sel);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v; else if (k === 'text') node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

export function announce(msg) { const a = $('#announce'); a.textContent = ''; setTimeout(() => { a.textContent = msg; }, 30); }
export function pct(v) { return typeof v === 'number' && isFinite(v) ? `${(100 * v).toFixed(1)}%` : '–'; }
export function num(v, digits = 1) { return typeof v === 'number' && isFinite(v) ? v.toFixed(digits) : '–'; }
export function duration(s) {
  if (typeof s !== 'number' || !isFinite(s) || s < 0) return '–';
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
export function toDate(t) {
  if (t === null || t === undefined) return null;
  if (typeof t === 'number') return new Date(t < 1e12 ? t * 1000 : t);
  const d = new Date(t); return isNaN(d) ? null : d;
}
export function age(t) {
  const d = toDate(t); if (!d) return '–';
  const s = Math.max(0, (Date.now() - d.getTime()) / 1000);
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}
export function bytes(n) {
  if (typeof n !== 'number') return '';
  const u = ['B', 'KB', 'MB', 'GB']; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
export function randomId() {
  const b = new Uint8Array(16); crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}
export function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

// The report-split accuracy of `who` (teacher, baseline, distilled) in a job's metrics. Jobs stored
// before every number named its split call it `val_acc`: read as the fallback (docs/artifacts.md#names-every-number-names-its-split).
export function accOf(metrics, who) { return reportAcc(metrics && metrics[who]); }
export function reportAcc(block) {
  if (!block || typeof block !== 'object') return null;
  return typeof block.report_acc === 'number' ? block.report_acc : (typeof block.val_acc === 'number' ? block.val_acc : null);
}
// An epoch row's accuracy and CE loss on the split it was scored on (`eval_split`); old rows: val_*.
export function rowSplit(row) { return row.eval_split || 'selection'; }
export function rowEval(row, what) {
  const v = row[`${rowSplit(row)}_${what}`];
  return typeof v === 'number' ? v : row[`val_${what}`];
}

// ---------- the view on screen: its timers and its event stream ----------

const running = { timers: [], stream: null };

export function every(ms, fn) { const t = setInterval(fn, ms); running.timers.push(t); }

// An AbortController for the view's event stream; stopTimers aborts it.
export function newStream() { const ctl = new AbortController(); running.stream = ctl; return ctl; }

export function stopTimers() {
  running.timers.forEach(clearInterval); running.timers = [];
  if (running.stream) { running.stream.abort(); running.stream = null; }
}

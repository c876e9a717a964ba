/* The job page's curves, as inline SVG drawn here: every stage on the same axes, so the baseline and
 * the distilled student read against each other. Three charts: the accuracy on the split each epoch
 * was scored on (the selection split; the report split when the job has none), the cross-entropy of
 * each stage (training and that split), and the distillation terms apart (as weighted into the
 * training loss): a distilled student's CE+SP total is never drawn against a CE-only one. */

import { $, el, num, pct, rowEval, rowSplit } from './util.js';
import { stageOrder, stageTitle } from './stages.js';

let curves = {};  // stage -> rows by epoch, of the job on screen

// Keys of an epoch row that are not a loss term (every other number is one: ce, sp, kd, ...).
const NOT_TERMS = new Set(['epoch', 'epochs', 'seconds', 'images_per_sec', 'lr', 'train_loss', 'train_acc',
  'selection_acc', 'selection_loss', 'report_acc', 'report_loss', 'val_acc', 'val_loss']);
// One colour per stage (Okabe-Ito, readable by colour-blind people), one dash pattern per term.
const COLOURS = ['#009e73', '#0072b2', '#d55e00', '#cc79a7', '#e69f00', '#56b4e9'];
const DASHES = ['', '6 3', '2 3', '8 3 2 3'];

export function resetCurves() { curves = {}; drawCurves(); }

export function mergeCurves(more) {
  for (const [stage, rows] of Object.entries(more || {})) {
    const byEpoch = new Map((curves[stage] || []).map((r) => [r.epoch, r]));
    for (const r of rows || []) if (typeof r.epoch === 'number') byEpoch.set(r.epoch, r);
    curves[stage] = [...byEpoch.values()].sort((a, b) => a.epoch - b.epoch);
  }
  drawCurves();
}

function drawCurves() {
  const box = $('#curves');
  const stages = Object.keys(curves).filter((s) => curves[s].length);
  if (!stages.length) { box.replaceChildren(el('p', { class: 'help', text: 'No epoch finished yet.' })); return; }
  const order = stageOrder();
  stages.sort((a, b) => order.indexOf(a) - order.indexOf(b));
  const split = rowSplit(curves[stages[0]][0]);
  const colour = (s) => COLOURS[Math.max(0, order.indexOf(s)) % COLOURS.length];
  const acc = stages.map((s) => series(s, `${stageTitle(s)}, ${split} split`, colour(s), '', (r) => rowEval(r, 'acc')));
  const ce = stages.flatMap((s) => [
    series(s, `${stageTitle(s)}, ${split} split`, colour(s), '', (r) => rowEval(r, 'loss')),
    series(s, `${stageTitle(s)}, training`, colour(s), '5 4', ceOf, 'train'),
  ]);
  const dist = stages.flatMap((s) => terms(curves[s]).filter((t) => t !== 'ce').map((t, i) =>
    series(s, `${stageTitle(s)}, ${t} (training, weighted)`, colour(s), DASHES[i % DASHES.length], (r) => r[t], 'train', t)));
  box.replaceChildren(
    chart('acc', `Accuracy on the ${split} split`, acc, true),
    chart('ce', 'Cross-entropy of each stage', ce, false),
    dist.length ? chart('terms', 'Distillation terms (training, weighted)', dist, false)
      : el('p', { class: 'help', 'data-metric': 'terms', text: 'No distillation terms yet: they are drawn apart from the cross-entropy.' }),
  );
}

// A row's training CE: the `ce` term; rows without terms (older jobs' fine-tuning) carry only the total.
function ceOf(r) { return typeof r.ce === 'number' ? r.ce : (terms([r]).length ? null : r.train_loss); }

// The named loss terms of a stage's rows, first seen first (ce, then sp, kd, ... as the engine names them).
function terms(rows) {
  const seen = new Set();
  for (const r of rows) for (const [k, v] of Object.entries(r)) if (!NOT_TERMS.has(k) && typeof v === 'number') seen.add(k);
  return [...seen];
}

function series(stage, label, colour, dash, value, kind = 'val', term = '') {
  const pts = curves[stage].map((r) => [r.epoch, value(r)]).filter(([, v]) => typeof v === 'number' && isFinite(v));
  return { stage, label, colour, dash, pts, kind, term };
}

const SVGNS = 'http://www.w3.org/2000/svg';
function svg(tag, attrs = {}, text) {
  const n = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== '' && v !== undefined) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

function chart(metric, caption, all, isAcc) {
  const W = 420, H = 220, L = 44, R = 10, T = 10, B = 30;
  const lines = all.filter((s) => s.pts.length);
  const vals = lines.flatMap((s) => s.pts.map(([, v]) => v));
  const epochs = Math.max(1, ...Object.values(curves).flatMap((rows) => rows.map((r) => Math.max(r.epochs || 1, r.epoch || 1))));
  let lo = isAcc ? 0 : Math.min(...vals, 0), hi = isAcc ? 1 : Math.max(...vals, 1e-9) * 1.05;
  const x = (e) => L + (epochs <= 1 ? (W - L - R) / 2 : ((e - 1) / (epochs - 1)) * (W - L - R));
  const y = (v) => T + (1 - (v - lo) / (hi - lo || 1)) * (H - T - B);
  const lastOf = (s) => `${s.label} ${isAcc ? pct(s.pts[s.pts.length - 1][1]) : num(s.pts[s.pts.length - 1][1], 3)}`;
  const title = `${caption}, per epoch, every stage on the same axes; last epoch: ${lines.map(lastOf).join('; ') || 'none'}`;
  const s = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title, 'data-metric': metric });
  s.append(svg('title', {}, title));
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    s.append(svg('line', { class: 'gridline', x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    s.append(svg('text', { x: L - 4, y: y(v) + 4, 'text-anchor': 'end' }, isAcc ? `${Math.round(v * 100)}%` : v.toPrecision(2)));
  }
  const step = Math.max(1, Math.ceil(epochs / 8));
  for (let e = 1; e <= epochs; e += step) s.append(svg('text', { x: x(e), y: H - B + 14, 'text-anchor': 'middle' }, String(e)));
  s.append(svg('text', { x: (L + W - R) / 2, y: H - 2, 'text-anchor': 'middle' }, 'epoch'));
  s.append(svg('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }));
  s.append(svg('line', { class: 'axis', x1: L, x2: L, y1: T, y2: H - B }));
  for (const line of lines) {
    const pts = line.pts.map(([e, v]) => [x(e), y(v)]);
    const attrs = { class: `${line.kind} series`, stroke: line.colour, 'stroke-dasharray': line.dash, 'data-stage': line.stage, 'data-term': line.term };
    s.append(svg('polyline', { ...attrs, points: pts.map((p) => p.join(',')).join(' ') }));
    // Markers too, so a single epoch shows: filled for the eval split, hollow for training.
    pts.forEach(([px, py]) => s.append(svg('circle', { class: line.kind === 'val' ? 'dot' : 'dot hollow', stroke: line.colour, fill: line.kind === 'val' ? line.colour : '#fff', cx: px, cy: py, r: 3 })));
  }
  const legend = el('ul', { class: 'legend', 'aria-hidden': 'true' }, ...lines.map((line) => el('li', {}, swatch(line), line.label)));
  return el('figure', {}, el('figcaption', { text: caption }), s, legend);
}

function swatch(line) {
  const s = svg('svg', { class: 'swatch', viewBox: '0 0 24 6', width: 24, height: 6 });
  s.append(svg('line', { x1: 0, x2: 24, y1: 3, y2: 3, stroke: line.colour, 'stroke-width': 3, 'stroke-dasharray': line.dash }));
  return s;
}

/* The job page's curves: loss and accuracy per epoch and stage, as inline SVG drawn here. */

import { $, el, num, pct } from './util.js';
import { stageOrder, stageTitle } from './stages.js';

let curves = {};  // stage -> rows by epoch, of the job on screen

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
  box.replaceChildren(...stages.flatMap((s) => [
    chart(s, 'loss', curves[s]), chart(s, 'acc', curves[s]),
  ]));
}

const SVGNS = 'http://www.w3.org/2000/svg';
function svg(tag, attrs = {}, text) {
  const n = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

function chart(stage, metric, rows) {
  const W = 360, H = 200, L = 44, R = 10, T = 10, B = 30;
  const isAcc = metric === 'acc';
  const keys = [`train_${metric}`, `val_${metric}`];
  const vals = rows.flatMap((r) => keys.map((k) => r[k])).filter((v) => typeof v === 'number' && isFinite(v));
  const epochs = Math.max(rows[rows.length - 1].epochs || 1, rows[rows.length - 1].epoch || 1);
  let lo = isAcc ? 0 : Math.min(...vals, 0), hi = isAcc ? 1 : Math.max(...vals, 1e-9);
  if (!isAcc) { hi *= 1.05; lo = Math.min(lo, 0); }
  const x = (e) => L + (epochs <= 1 ? (W - L - R) / 2 : ((e - 1) / (epochs - 1)) * (W - L - R));
  const y = (v) => T + (1 - (v - lo) / (hi - lo || 1)) * (H - T - B);
  const last = rows[rows.length - 1];
  const title = `${stageTitle(stage)}: ${isAcc ? 'accuracy' : 'loss'} over ${rows.length} epoch(s); ` +
    `last epoch train ${fmtv(last[keys[0]], isAcc)}, selection split ${fmtv(last[keys[1]], isAcc)}`;
  const s = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title, 'data-stage': stage, 'data-metric': metric });
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
  const cls = isAcc ? 'accl' : 'loss';
  keys.forEach((k, i) => {
    const pts = rows.filter((r) => typeof r[k] === 'number' && isFinite(r[k])).map((r) => [x(r.epoch), y(r[k])]);
    if (!pts.length) return;
    s.append(svg('polyline', { class: `${i ? 'val' : 'train'} ${cls}`, points: pts.map((p) => p.join(',')).join(' ') }));
    // Markers too, so a single epoch shows: filled for the selection split, hollow for training.
    pts.forEach(([px, py]) => s.append(svg('circle', { class: `${cls}${i ? '' : ' hollow'}`, cx: px, cy: py, r: 3 })));
  });
  const legend = el('div', { class: 'legend', 'aria-hidden': 'true' },
    el('span', {}, el('span', { class: `swatch ${cls}` }), 'selection split'),
    el('span', {}, el('span', { class: `swatch dashed ${cls}` }), 'training (dashed)'));
  return el('figure', {}, el('figcaption', { text: `${stageTitle(stage)} – ${isAcc ? 'accuracy' : 'loss'}` }), s, legend);
}

function fmtv(v, isAcc) { return isAcc ? pct(v) : num(v, 3); }

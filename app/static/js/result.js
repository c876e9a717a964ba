/* A succeeded job's result, first on its page: which student shipped and why, its accuracy on the
 * report split, the gain over the baseline with its 95 % interval and verdict (metrics.comparison),
 * and, when the job measured them (metrics.deploy; null with export.measure: false), size and speed
 * against the teacher and the int8 model's accuracy, with the plain warning when it is not usable. */

import { $, el, num, pct, reportAcc } from './util.js';

const signed = (v) => `${v >= 0 ? '+' : ''}${v.toFixed(1)}`;

export function resetResult() {
  $('#result').hidden = true;
  ['#res-shipped', '#res-reason', '#res-verdict', '#res-headline', '#res-int8', '#res-int8-warning', '#res-deploy-note'].forEach((s) => { $(s).textContent = ''; });
  $('#res-acc').textContent = '–'; $('#res-gain').textContent = '–';
  $('#res-deploy').hidden = true; $('#res-int8-warning').hidden = true;
  $('#res-deploy-table tbody').replaceChildren();
}

export function renderResult(job) {
  const m = job.metrics || {};
  if (job.status !== 'succeeded' || !m.shipped) return;
  $('#result').hidden = false;
  $('#res-shipped').textContent = `Shipped: the ${m.shipped} student, as student/ (timm's hub layout) and student.onnx.`;
  $('#res-reason').textContent = m.shipped_reason ? `Why: ${m.shipped_reason}.` : '';
  const shipped = m[m.shipped] || {};
  $('#res-acc').textContent = pct(reportAcc(shipped));
  const c = m.comparison;
  if (c && typeof c.gain_points === 'number') {
    const [lo, hi] = c.ci95_points || [];
    $('#res-gain').textContent = `${signed(c.gain_points)} points`;
    const p = c.mcnemar ? `, McNemar p = ${Number(c.mcnemar.p_value).toPrecision(3)}` : '';
    $('#res-verdict').textContent = `Distilled vs baseline on the report split (${c.n} images): 95 % CI ${signed(lo)} to ${signed(hi)} points${p}: ${c.verdict}.`;
  } else {
    $('#res-gain').textContent = 'no baseline';
  }
  renderDeploy(m.deploy);
}

function renderDeploy(d) {
  if (!d || !d.models) return;
  $('#res-deploy').hidden = false;
  const head = d.student_vs_teacher && d.student_vs_teacher.headline;
  $('#res-headline').textContent = head ? `${head[0].toUpperCase()}${head.slice(1)}.` : 'Not every model could be timed.';
  const rows = [];
  for (const role of ['teacher', 'baseline', 'student']) {
    const r = d.models[role];
    if (!r || r.same_as) continue;
    rows.push(row(role === 'student' ? `student (${r.trained || '?'}, shipped)` : role, r.accuracy, r.params, r.onnx_bytes, r.latency_ms));
  }
  const i8 = d.int8;
  if (i8 && !i8.error) rows.push(row(`student int8${i8.usable ? '' : ' (do not use)'}`, i8.accuracy, d.models.student && d.models.student.params, i8.onnx_bytes, i8.latency_ms));
  $('#res-deploy-table tbody').replaceChildren(...rows);
  if (i8) {
    $('#res-int8').textContent = i8.error ? i8.error : `int8 student (${i8.file}): ${pct(i8.accuracy)} on the report split, ${signed(-i8.drop_points)} points vs fp32, same top-1 as fp32 on ${pct(i8.agreement)} of images.`;
    const bad = !i8.error && i8.usable === false;
    $('#res-int8-warning').hidden = !bad;
    if (bad) $('#res-int8-warning').textContent = `Do not use ${i8.file}: it loses ${i8.drop_points.toFixed(1)} points against the fp32 model (allowed: ${i8.max_drop_points}). Ship student.onnx.`;
  }
  const cpu = d.cpu || {};
  $('#res-deploy-note').textContent = `CPU latency: onnxruntime, batch ${cpu.batch || 1}, ${cpu.threads || '?'} thread(s), on ${cpu.processor || 'the worker'}; one run, this machine.`;
}

function row(name, acc, params, onnxBytes, lat) {
  const cells = [pct(acc), params ? `${num(params / 1e6, 2)} M` : '–', onnxBytes ? num(onnxBytes / 1e6, 1) : '–', num((lat || {}).p50, 2)];
  const labels = ['Accuracy (report split)', 'Params', 'ONNX MB', 'p50 ms'];
  return el('tr', {}, el('th', { scope: 'row', text: name }), ...cells.map((t, i) => el('td', { 'data-label': labels[i], text: t })));
}

// Baton's dashboard: one page, live over server-sent events, no dependencies.
'use strict';

const state = {
  session: null,       // {who, role, mayAct, csrf}
  rollouts: [],        // the controller's views, as `baton status -o json` shows them
  auditSeq: {},        // rollout -> count of audit entries written (refetch on change)
  series: {},          // rollout -> [{at, revision, rps, errorRate, p50, p99}]
  history: {},         // rollout -> {revisions, events}
  historyFor: {},      // rollout -> auditSeq the history was fetched at
  live: false,
};

const CHART_WINDOW_MS = 5 * 60 * 1000;
const COLORS = { stable: '#2f6fdf', canary: '#e8891c', aborted: '#8d95a5', previous: '#b4bac6' };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    // Through the CSSOM: the page's CSP forbids inline style attributes.
    else if (k === 'style') e.style.cssText = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function clock(ms) {
  const d = new Date(ms);
  return d.toISOString().slice(11, 23);
}

function toast(text, isError) {
  const t = document.getElementById('toast');
  t.textContent = text;
  t.className = isError ? 'error' : '';
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

async function api(path, options) {
  const r = await fetch(path, Object.assign({ credentials: 'same-origin' }, options || {}));
  if (r.status === 401) { location.href = '/ui/login'; throw new Error('logged out'); }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || ('HTTP ' + r.status));
  return body;
}

// --- actions ---------------------------------------------------------------

const ACTIONS = {
  promote: ['Promote', 'Go past the current pause or analysis step.'],
  'promote-full': ['Promote fully', 'Skip every remaining step and send 100 % of traffic to the new revision.'],
  abort: ['Abort', 'Send all traffic back to the stable revision and scale the new one away.'],
  retry: ['Retry', 'Roll the aborted revision out again from the first step.'],
  undo: ['Undo', 'Roll back to the previous stable revision.'],
};

function confirmAction(name, action) {
  const dlg = document.getElementById('confirm');
  const [title, text] = ACTIONS[action];
  document.getElementById('confirm-title').textContent = `${title} ${name}?`;
  document.getElementById('confirm-text').textContent = text;
  const ok = document.getElementById('confirm-ok');
  ok.dataset.action = action;
  ok.dataset.rollout = name;
  dlg.returnValue = '';
  dlg.onclose = async () => {
    if (dlg.returnValue !== 'ok') return;
    try {
      const r = await api(`/ui/api/rollouts/${encodeURIComponent(name)}/${action}`, {
        method: 'POST',
        headers: { 'X-CSRF-Token': state.session.csrf },
      });
      toast(`${title}: ${r.result || 'done'}`);
    } catch (e) {
      toast(`${title} refused: ${e.message}`, true);
    }
  };
  dlg.showModal();
}

// --- views ----------------------------------------------------------------

function phaseBadge(phase, id) {
  return el('span', { class: `badge phase-${phase}`, id, text: phase });
}

function versionOf(r, revName) {
  const rev = (r.revisions || []).find(x => x.name === revName);
  return rev ? (rev.appVersion || `#${rev.number}`) : revName;
}

function stepText(r) {
  if (!r.step) return r.strategy;
  const i = r.step.index, n = r.step.total;
  if (!r.canaryRevision) return `${n} steps`;
  return i < n ? `step ${i + 1}/${n}: ${r.step.steps[i]}` : `all ${n} steps done`;
}

function weightBar(r) {
  const bar = el('div', { class: 'bar', style: 'display:flex' });
  for (const rev of r.revisions || []) {
    if (!rev.weight) continue;
    const s = el('span', { title: `${rev.appVersion || rev.name}: ${rev.weight} %` });
    s.style.width = rev.weight + '%';
    s.style.background = COLORS[rev.role] || COLORS.previous;
    bar.append(s);
  }
  return bar;
}

function listView() {
  const rows = state.rollouts.map(r => el('tr', { 'data-rollout': r.name },
    el('td', {}, el('a', { href: `#/r/${encodeURIComponent(r.name)}`, text: r.name })),
    el('td', {}, phaseBadge(r.phase)),
    el('td', { text: r.strategy }),
    el('td', { text: stepText(r) }),
    el('td', { text: r.stableRevision ? versionOf(r, r.stableRevision) : '-' }),
    el('td', { text: r.canaryRevision ? versionOf(r, r.canaryRevision) : '-' }),
    el('td', { style: 'width:220px' }, weightBar(r)),
  ));
  return el('section', { class: 'panel' },
    el('h2', { text: 'Rollouts' }),
    state.rollouts.length === 0 ? el('p', { class: 'muted', text: 'No rollouts yet: `baton apply -f SPEC`.' }) :
      el('table', { id: 'rollouts' },
        el('thead', {}, el('tr', {}, ['Name', 'Phase', 'Strategy', 'Step', 'Stable', 'Canary', 'Traffic'].map(t => el('th', { text: t })))),
        el('tbody', {}, rows)));
}

function stepsPanel(r) {
  let items;
  if (r.step) {
    const current = r.canaryRevision ? r.step.index : r.step.total;
    items = r.step.steps.map((s, i) => el('li', {
      class: i < current ? 'done' : (i === current ? 'current' : 'pending'),
      'data-index': i,
      'aria-current': i === current ? 'step' : null,
      text: `${i + 1}. ${s}`,
    }));
  } else if (r.strategy === 'blueGreen') {
    items = ['preview', 'smoke tests', 'switch'].map(s => el('li', { text: s }));
  } else {
    items = [el('li', { text: 'rolling: instances replaced one batch at a time' })];
  }
  return el('section', { class: 'panel' }, el('h2', { text: 'Steps' }), el('ol', { class: 'steps', id: 'steps' }, items));
}

function weightsPanel(r) {
  const rows = (r.revisions || []).map(rev => el('div', { class: 'row', 'data-revision': rev.name },
    el('div', {}, el('span', { class: 'swatch', style: `background:${COLORS[rev.role] || COLORS.previous}` }),
      `${rev.appVersion || rev.name} `, el('span', { class: 'muted', text: `#${rev.number} ${rev.role}${rev.preview ? ' +preview' : ''}` })),
    el('div', { class: `bar role-${rev.role}` }, el('span', { style: `width:${rev.weight}%` })),
    el('div', { class: 'weight', text: `${rev.weight} %` }),
    el('div', { class: 'muted', text: `${rev.readyReplicas}/${rev.desiredReplicas} ready` }),
  ));
  return el('section', { class: 'panel weights', id: 'weights' }, el('h2', { text: 'Traffic' }), rows);
}

function instancesPanel(r) {
  const rows = [];
  for (const rev of r.revisions || []) {
    for (const i of rev.instances || []) {
      rows.push(el('tr', {}, el('td', { text: rev.appVersion || rev.name }), el('td', { text: i.address || '' }),
        el('td', { text: i.state || '' }), el('td', { text: i.pid || '' })));
    }
  }
  return el('section', { class: 'panel' }, el('h2', { text: 'Instances' }),
    rows.length ? el('table', { id: 'instances' }, el('thead', {}, el('tr', {}, ['Version', 'Address', 'State', 'PID'].map(t => el('th', { text: t })))), el('tbody', {}, rows))
      : el('p', { class: 'muted', text: 'none' }));
}

function gatesPanel(r) {
  const rows = (r.gates || []).map(g => {
    const last = g.last || {};
    const verdict = (last.verdict || '-').toLowerCase();
    return el('tr', { 'data-gate': g.name },
      el('td', { text: g.name }), el('td', { text: g.passes }), el('td', { text: g.failures }),
      el('td', { text: g.inconclusive }),
      el('td', { class: `verdict-${verdict}`, text: last.verdict || '-' }),
      el('td', { text: last.detail || '' }));
  });
  return el('section', { class: 'panel' }, el('h2', { text: 'Analysis' }),
    rows.length ? el('table', { id: 'gates' }, el('thead', {}, el('tr', {}, ['Gate', 'Passes', 'Failures', 'Inconclusive', 'Last', 'Detail'].map(t => el('th', { text: t })))), el('tbody', {}, rows))
      : el('p', { class: 'muted', text: 'No gate has measured this revision yet.' }));
}

// A line chart per revision over the last minutes; `lines` are [label, value, dash].
function chart(r, id, title, lines, format) {
  const W = 600, H = 170, L = 48, R = 8, T = 10, B = 22;
  const points = (state.series[r.name] || []);
  // The window grows with the data, from one minute up to five.
  const now = Date.now();
  const earliest = points.length ? points[0].at : now;
  const span = Math.min(CHART_WINDOW_MS, Math.max(60000, now - earliest));
  const from = now - span;
  const byRev = new Map();
  let max = 0;
  for (const p of points) {
    if (p.at < from) continue;
    if (!byRev.has(p.revision)) byRev.set(p.revision, []);
    const vs = lines.map(([, value]) => value(p));
    byRev.get(p.revision).push([p.at, vs]);
    for (const v of vs) if (v !== null && v !== undefined && v > max) max = v;
  }
  max = max > 0 ? max * 1.1 : 1;
  const s = svg('svg', { class: 'chart', id, viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': title });
  const x = t => L + (t - from) / span * (W - L - R);
  const y = v => T + (1 - v / max) * (H - T - B);
  for (const f of [0, 0.5, 1]) {
    s.append(svg('line', { x1: L, x2: W - R, y1: y(max * f), y2: y(max * f), stroke: '#e5e7eb' }));
    const t = svg('text', { x: 4, y: y(max * f) + 3 });
    t.textContent = format(max * f);
    s.append(t);
  }
  const t0 = svg('text', { x: L, y: H - 6 }); t0.textContent = `${Math.round(span / 1000)} s ago`; s.append(t0);
  const t1 = svg('text', { x: W - R - 22, y: H - 6 }); t1.textContent = 'now'; s.append(t1);
  const legend = el('div', { class: 'legend' });
  for (const [rev, pts] of byRev) {
    const info = (r.revisions || []).find(x => x.name === rev);
    const color = COLORS[info ? info.role : 'previous'] || COLORS.previous;
    lines.forEach(([label, , dash], li) => {
      let d = '', pen = false;
      for (const [at, vs] of pts) {
        const v = vs[li];
        if (v === null || v === undefined) { pen = false; continue; }
        d += `${pen ? 'L' : 'M'}${x(at).toFixed(1)},${y(v).toFixed(1)} `;
        pen = true;
      }
      const attrs = { d, fill: 'none', stroke: color, 'stroke-width': 2, 'data-revision': rev, 'data-line': label };
      if (dash) attrs['stroke-dasharray'] = '4 3';
      if (d) s.append(svg('path', attrs));
    });
    legend.append(el('span', {}, el('span', { class: 'swatch', style: `background:${color}` }), `${versionOf(r, rev)}  `));
  }
  return el('div', {}, el('h2', { text: title }), s, legend);
}

function chartsPanel(r) {
  const ms = v => v === null || v === undefined ? null : v * 1000;
  return el('section', { class: 'panel' }, el('div', { class: 'grid' },
    chart(r, 'chart-latency', 'Latency per revision: p99 solid, p50 dashed (ms)',
      [['p99', p => ms(p.p99), false], ['p50', p => ms(p.p50), true]], v => v.toFixed(v < 10 ? 1 : 0)),
    chart(r, 'chart-errors', 'Error rate per revision (%)',
      [['errors', p => p.errorRate === null || p.errorRate === undefined ? null : p.errorRate * 100, false]], v => v.toFixed(1)),
  ));
}

function auditPanel(r) {
  const h = state.history[r.name];
  const events = h ? (h.events || []).slice(-60).reverse() : [];
  const rows = events.map(e => el('tr', {},
    el('td', { text: clock(e.at) }), el('td', { text: e.actor }), el('td', { text: e.action }), el('td', { text: e.reason })));
  return el('section', { class: 'panel' }, el('h2', { text: 'Audit trail' }),
    el('div', { class: 'audit' }, el('table', { id: 'audit' },
      el('thead', {}, el('tr', {}, ['Time (UTC)', 'Actor', 'Action', 'Reason'].map(t => el('th', { text: t })))),
      el('tbody', {}, rows))));
}

function rolloutView(name) {
  const r = state.rollouts.find(x => x.name === name);
  if (!r) return el('section', { class: 'panel' }, el('p', { text: `No rollout named ${name}.` }), el('a', { href: '#/', text: 'All rollouts' }));
  maybeFetchHistory(name);
  const may = state.session && state.session.mayAct;
  const buttons = Object.keys(ACTIONS).map(a => el('button', {
    id: `act-${a}`, type: 'button', disabled: !may, class: a === 'abort' ? 'danger' : null,
    title: may ? ACTIONS[a][1] : 'your role may watch, not act',
    onclick: () => confirmAction(name, a),
  }, ACTIONS[a][0]));
  return el('div', { 'data-rollout-page': name },
    el('p', {}, el('a', { href: '#/', text: '← all rollouts' })),
    el('section', { class: 'panel' },
      el('div', { class: 'head' }, el('h1', { id: 'rollout-name', text: r.name }), phaseBadge(r.phase, 'phase'),
        el('span', { class: 'muted', text: `${r.strategy} · ${r.listen}` })),
      el('p', { class: 'message', id: 'message' }, el('strong', { text: 'Last decision: ' }), r.message || '-'),
      el('div', { class: 'actions' }, buttons)),
    stepsPanel(r), weightsPanel(r), chartsPanel(r), gatesPanel(r), instancesPanel(r), auditPanel(r));
}

function render() {
  const app = document.getElementById('app');
  const m = location.hash.match(/^#\/r\/(.+)$/);
  const view = m ? rolloutView(decodeURIComponent(m[1])) : listView();
  const scroll = app.querySelector('.audit') ? app.querySelector('.audit').scrollTop : 0;
  app.replaceChildren(view);
  const audit = app.querySelector('.audit');
  if (audit) audit.scrollTop = scroll;
}

async function maybeFetchHistory(name) {
  const seq = state.auditSeq[name] || 0;
  if (state.historyFor[name] === seq || maybeFetchHistory.busy) return;
  maybeFetchHistory.busy = true;
  try {
    state.history[name] = await api(`/ui/api/rollouts/${encodeURIComponent(name)}/history`);
    state.historyFor[name] = seq;
    render();
  } catch (e) {
    // shown again on the next status event
  } finally {
    setTimeout(() => { maybeFetchHistory.busy = false; }, 500);
  }
}

// --- live updates -----------------------------------------------------------

function connect() {
  const conn = document.getElementById('conn');
  const es = new EventSource('/ui/events');
  es.onopen = () => { state.live = true; conn.textContent = 'live'; conn.className = 'conn live'; };
  es.onerror = () => { state.live = false; conn.textContent = 'reconnecting…'; conn.className = 'conn down'; };
  es.addEventListener('status', ev => {
    const s = JSON.parse(ev.data);
    state.rollouts = s.rollouts || [];
    state.auditSeq = s.audit || {};
    render();
  });
  es.addEventListener('series', ev => { state.series = JSON.parse(ev.data) || {}; });
  es.addEventListener('points', ev => {
    const fresh = JSON.parse(ev.data) || {};
    const cutoff = Date.now() - CHART_WINDOW_MS - 60000;
    for (const [name, pts] of Object.entries(fresh)) {
      const list = (state.series[name] || []).concat(pts).filter(p => p.at >= cutoff);
      state.series[name] = list;
    }
    render();
  });
}

async function main() {
  try {
    state.session = await api('/ui/api/session');
  } catch (e) {
    return;
  }
  document.getElementById('who').textContent = `${state.session.who} (${state.session.role})`;
  document.getElementById('logout').addEventListener('click', async () => {
    await fetch('/ui/logout', { method: 'POST', headers: { 'X-CSRF-Token': state.session.csrf } });
    location.href = '/ui/login';
  });
  window.addEventListener('hashchange', render);
  connect();
}

main();

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
  loaded: false,       // a first status arrived
  updates: 0,          // status events applied (shown as #app[data-updates])
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

// --- updating in place ------------------------------------------------------

// A view is built once per page (the list, or one rollout) and then patched: a node
// is written only when its text or attributes change, and a list's elements are keyed,
// so focus, a text selection and the scroll position survive five updates a second.

function setText(node, text) {
  const t = text === null || text === undefined ? '' : String(text);
  if (node.textContent !== t) node.textContent = t;
}

function setAttr(node, k, v) {
  if (v === null || v === undefined || v === false) {
    if (node.hasAttribute(k)) node.removeAttribute(k);
    return;
  }
  const s = v === true ? '' : String(v);
  if (node.getAttribute(k) !== s) node.setAttribute(k, s);
}

// Remembered, not read back: the CSSOM returns colours normalised (`rgb(...)`).
function setStyle(node, prop, v) {
  node.$style = node.$style || {};
  if (node.$style[prop] === v) return;
  node.$style[prop] = v;
  node.style[prop] = v;
}

// One child of `parent` per item, keyed by `keyOf`: made once by `make`, patched by
// `patch` on every update, removed when its item is gone. Children are moved only
// when out of order (moving a node takes its focus away).
function keyed(parent, items, keyOf, make, patch) {
  const counts = new Map();
  const keys = items.map((item, i) => {
    const k = String(keyOf(item, i));
    const n = counts.get(k) || 0;
    counts.set(k, n + 1);
    return n ? `${k}#${n}` : k;
  });
  const wanted = new Set(keys);
  const old = new Map();
  for (const child of Array.from(parent.children)) {
    if (wanted.has(child.dataset.key)) old.set(child.dataset.key, child);
    else child.remove();
  }
  let cursor = parent.firstElementChild;
  items.forEach((item, i) => {
    let node = old.get(keys[i]);
    if (!node) {
      node = make(item, i);
      node.dataset.key = keys[i];
    }
    patch(node, item, i);
    if (node === cursor) cursor = cursor.nextElementSibling;
    else parent.insertBefore(node, cursor);
  });
}

function table(id, headings) {
  const body = el('tbody');
  const t = el('table', { id }, el('thead', {}, el('tr', {}, headings.map(h => el('th', { text: h })))), body);
  return [t, body];
}

// --- views ----------------------------------------------------------------

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

function roleColor(role) {
  return COLORS[role] || COLORS.previous;
}

// The bar is what the router confirmed serving; while that is unknown (`null`), the
// desired weight is drawn faded and said to be unconfirmed.
function servedOf(rev) {
  return rev.servedWeight === null || rev.servedWeight === undefined ? null : rev.servedWeight;
}

function barWeight(rev) {
  const s = servedOf(rev);
  return s === null ? rev.weight : s;
}

// [shown, note]: the note (the desired weight) only while it differs from the served one.
function weightTexts(rev) {
  const s = servedOf(rev);
  if (s === null) return [`${rev.weight} %`, ' (desired, unconfirmed)'];
  if (s !== rev.weight) return [`${s} %`, ` → desired ${rev.weight} %`];
  return [`${s} %`, ''];
}

// Warnings on a rollout: the router's refusal, and Baton's own trouble (a full state
// disk), each said apart from the rollout's state.
function warningText(r) {
  const w = [];
  if (r.routingError) w.push(`⚠ Not served as asked: ${r.routingError}`);
  if (r.batonError) w.push(`⚠ Baton's own problem, not the rollout's: ${r.batonError}`);
  return w.join(' · ');
}

function patchPhase(badge, phase) {
  setAttr(badge, 'class', `badge phase-${phase}`);
  setText(badge, phase);
}

// The list's traffic column: one stacked bar, a segment per revision served.
function patchStack(bar, r) {
  const revs = (r.revisions || []).filter(rev => barWeight(rev) > 0);
  keyed(bar, revs, rev => rev.name, () => el('span'), (s, rev) => {
    const [shown, note] = weightTexts(rev);
    setStyle(s, 'width', barWeight(rev) + '%');
    setStyle(s, 'background', roleColor(rev.role));
    setAttr(s, 'class', servedOf(rev) === null ? 'unconfirmed' : null);
    setAttr(s, 'title', `${rev.appVersion || rev.name}: ${shown}${note}`);
  });
}

function listRow(r) {
  const $ = {
    link: el('a', { href: `#/r/${encodeURIComponent(r.name)}` }),
    warn: el('div', { class: 'routing-error', hidden: true }),
    phase: el('span'),
    strategy: el('td'), step: el('td'), stable: el('td'), canary: el('td'),
    bar: el('div', { class: 'bar stack' }),
  };
  const tr = el('tr', { 'data-rollout': r.name },
    el('td', {}, $.link, $.warn), el('td', {}, $.phase), $.strategy, $.step, $.stable, $.canary,
    el('td', { class: 'traffic' }, $.bar));
  tr.$ = $;
  return tr;
}

function patchListRow(tr, r) {
  const $ = tr.$;
  setText($.link, r.name);
  setText($.warn, warningText(r));
  setAttr($.warn, 'hidden', !warningText(r));
  patchPhase($.phase, r.phase);
  setText($.strategy, r.strategy);
  setText($.step, stepText(r));
  setText($.stable, r.stableRevision ? versionOf(r, r.stableRevision) : '-');
  setText($.canary, r.canaryRevision ? versionOf(r, r.canaryRevision) : '-');
  patchStack($.bar, r);
}

function listView() {
  const empty = el('p', { class: 'muted', text: 'No rollouts yet: `baton apply -f SPEC`.' });
  const [t, body] = table('rollouts', ['Name', 'Phase', 'Strategy', 'Step', 'Stable', 'Canary', 'Traffic']);
  const root = el('section', { class: 'panel' }, el('h2', { text: 'Rollouts' }), empty, t);
  return {
    root,
    update() {
      setAttr(empty, 'hidden', state.rollouts.length !== 0);
      setAttr(t, 'hidden', state.rollouts.length === 0);
      keyed(body, state.rollouts, r => r.name, listRow, patchListRow);
    },
  };
}

function stepsPanel() {
  const list = el('ol', { class: 'steps', id: 'steps' });
  const root = el('section', { class: 'panel' }, el('h2', { text: 'Steps' }), list);
  return {
    root,
    update(r) {
      let items;
      if (r.step) {
        const current = r.canaryRevision ? r.step.index : r.step.total;
        items = r.step.steps.map((s, i) => ({
          key: `step-${i}`,
          text: `${i + 1}. ${s}`,
          class: i < current ? 'done' : (i === current ? 'current' : 'pending'),
          index: i,
          current: i === current ? 'step' : null,
        }));
      } else if (r.strategy === 'blueGreen') {
        items = ['preview', 'smoke tests', 'switch'].map(s => ({ key: s, text: s }));
      } else {
        items = [{ key: 'rolling', text: 'rolling: instances replaced one batch at a time' }];
      }
      keyed(list, items, it => it.key, () => el('li'), (li, it) => {
        setText(li, it.text);
        setAttr(li, 'class', it.class);
        setAttr(li, 'data-index', it.index);
        setAttr(li, 'aria-current', it.current);
      });
    },
  };
}

function weightRow() {
  const $ = {
    swatch: el('span', { class: 'swatch' }),
    version: el('span'),
    about: el('span', { class: 'muted' }),
    bar: el('div'),
    fill: el('span'),
    shown: el('span', { class: 'served' }),
    note: el('span', { class: 'desired' }),
    ready: el('div', { class: 'muted' }),
  };
  $.bar.append($.fill);
  const row = el('div', { class: 'row' },
    el('div', {}, $.swatch, $.version, ' ', $.about), $.bar,
    el('div', { class: 'weight' }, $.shown, $.note), $.ready);
  row.$ = $;
  return row;
}

function patchWeightRow(row, rev) {
  const $ = row.$;
  const [shown, note] = weightTexts(rev);
  setAttr(row, 'data-revision', rev.name);
  setStyle($.swatch, 'background', roleColor(rev.role));
  setText($.version, rev.appVersion || rev.name);
  setText($.about, `#${rev.number} ${rev.role}${rev.preview ? ' +preview' : ''}`);
  setAttr($.bar, 'class', `bar role-${rev.role}${servedOf(rev) === null ? ' unconfirmed' : ''}`);
  setStyle($.fill, 'width', barWeight(rev) + '%');
  setText($.shown, shown);
  setText($.note, note);
  setAttr($.note, 'hidden', !note);
  setText($.ready, `${rev.readyReplicas}/${rev.desiredReplicas} ready`);
}

function weightsPanel() {
  const rows = el('div');
  const root = el('section', { class: 'panel weights', id: 'weights' }, el('h2', { text: 'Traffic' }), rows);
  return {
    root,
    update(r) { keyed(rows, r.revisions || [], rev => rev.name, weightRow, patchWeightRow); },
  };
}

// A panel holding a table, or a note while the table would be empty.
function tablePanel(title, id, headings, emptyText, itemsOf, keyOf, cells) {
  const [t, body] = table(id, headings);
  const empty = el('p', { class: 'muted', text: emptyText });
  const root = el('section', { class: 'panel' }, el('h2', { text: title }), t, empty);
  return {
    root,
    body,
    update(r) {
      const items = itemsOf(r);
      setAttr(t, 'hidden', items.length === 0);
      setAttr(empty, 'hidden', items.length !== 0);
      keyed(body, items, keyOf, () => el('tr', {}, headings.map(() => el('td'))), (tr, item) => {
        cells(item).forEach(([text, cls], i) => {
          setText(tr.children[i], text);
          setAttr(tr.children[i], 'class', cls);
        });
      });
    },
  };
}

function instancesPanel() {
  return tablePanel('Instances', 'instances', ['Version', 'Address', 'State', 'PID'], 'none',
    r => (r.revisions || []).flatMap(rev => (rev.instances || []).map(i => ({ rev, i }))),
    ({ rev, i }) => `${rev.name}|${i.address || ''}|${i.pid || ''}`,
    ({ rev, i }) => [[rev.appVersion || rev.name], [i.address || ''], [i.state || ''], [i.pid || '']]);
}

function gatesPanel() {
  return tablePanel('Analysis', 'gates', ['Gate', 'Passes', 'Failures', 'Inconclusive', 'Last', 'Detail'],
    'No gate has measured this revision yet.',
    r => r.gates || [],
    g => g.name,
    g => {
      const last = g.last || {};
      const verdict = (last.verdict || '-').toLowerCase();
      return [[g.name], [g.passes], [g.failures], [g.inconclusive],
        [last.verdict || '-', `verdict-${verdict}`], [last.detail || '']];
    });
}

// A line chart per revision over the last minutes; `lines` are [label, value, dash].
function chart(id, title, lines, format) {
  const W = 600, H = 170, L = 48, R = 8, T = 10, B = 22;
  const s = svg('svg', { class: 'chart', id, viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': title });
  const grid = [0, 0.5, 1].map(f => {
    const line = svg('line', { x1: L, x2: W - R, stroke: '#e5e7eb' });
    const label = svg('text', { x: 4 });
    s.append(line, label);
    return [f, line, label];
  });
  const since = svg('text', { x: L, y: H - 6 });
  const now = svg('text', { x: W - R - 22, y: H - 6 });
  now.textContent = 'now';
  const paths = svg('g', {});
  s.append(since, now, paths);
  const legend = el('div', { class: 'legend' });
  const root = el('div', {}, el('h2', { text: title }), s, legend);
  return {
    root,
    update(r) {
      const points = (state.series[r.name] || []);
      // The window grows with the data, from one minute up to five.
      const t = Date.now();
      const earliest = points.length ? points[0].at : t;
      const span = Math.min(CHART_WINDOW_MS, Math.max(60000, t - earliest));
      const from = t - span;
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
      const x = at => L + (at - from) / span * (W - L - R);
      const y = v => T + (1 - v / max) * (H - T - B);
      for (const [f, line, label] of grid) {
        const at = y(max * f).toFixed(1);
        setAttr(line, 'y1', at);
        setAttr(line, 'y2', at);
        setAttr(label, 'y', (y(max * f) + 3).toFixed(1));
        setText(label, format(max * f));
      }
      setText(since, `${Math.round(span / 1000)} s ago`);
      const drawn = [];
      for (const [rev, pts] of byRev) {
        const info = (r.revisions || []).find(v => v.name === rev);
        const color = roleColor(info ? info.role : 'previous');
        lines.forEach(([label, , dash], li) => {
          let d = '', pen = false;
          for (const [at, vs] of pts) {
            const v = vs[li];
            if (v === null || v === undefined) { pen = false; continue; }
            d += `${pen ? 'L' : 'M'}${x(at).toFixed(1)},${y(v).toFixed(1)} `;
            pen = true;
          }
          if (d) drawn.push({ rev, label, dash, color, d });
        });
      }
      keyed(paths, drawn, p => `${p.rev}|${p.label}`,
        p => svg('path', { fill: 'none', 'stroke-width': 2, 'data-revision': p.rev, 'data-line': p.label }),
        (path, p) => {
          setAttr(path, 'd', p.d);
          setAttr(path, 'stroke', p.color);
          setAttr(path, 'stroke-dasharray', p.dash ? '4 3' : null);
        });
      keyed(legend, Array.from(byRev.keys()), rev => rev, () => {
        const item = el('span', {}, el('span', { class: 'swatch' }), el('span'));
        return item;
      }, (item, rev) => {
        const info = (r.revisions || []).find(v => v.name === rev);
        setStyle(item.firstChild, 'background', roleColor(info ? info.role : 'previous'));
        setText(item.lastChild, `${versionOf(r, rev)}  `);
      });
    },
  };
}

function chartsPanel() {
  const ms = v => v === null || v === undefined ? null : v * 1000;
  const charts = [
    chart('chart-latency', 'Latency per revision: p99 solid, p50 dashed (ms)',
      [['p99', p => ms(p.p99), false], ['p50', p => ms(p.p50), true]], v => v.toFixed(v < 10 ? 1 : 0)),
    chart('chart-errors', 'Error rate per revision (%)',
      [['errors', p => p.errorRate === null || p.errorRate === undefined ? null : p.errorRate * 100, false]], v => v.toFixed(1)),
  ];
  return {
    root: el('section', { class: 'panel' }, el('div', { class: 'grid' }, charts.map(c => c.root))),
    update(r) { for (const c of charts) c.update(r); },
  };
}

function auditPanel() {
  const [t, body] = table('audit', ['Time (UTC)', 'Actor', 'Action', 'Reason']);
  const root = el('section', { class: 'panel' }, el('h2', { text: 'Audit trail' }), el('div', { class: 'audit' }, t));
  return {
    root,
    update(r) {
      const h = state.history[r.name];
      const events = h ? (h.events || []).slice(-60).reverse() : [];
      // Keyed by content: the server keeps a bounded trail, so positions shift.
      keyed(body, events, e => `${e.at}|${e.actor}|${e.action}|${e.reason}`,
        e => el('tr', {}, el('td', { text: clock(e.at) }), el('td', { text: e.actor }),
          el('td', { text: e.action }), el('td', { text: e.reason })),
        () => {});
    },
  };
}

function rolloutView(name) {
  const missing = el('section', { class: 'panel', hidden: true },
    el('p', { text: `No rollout named ${name}.` }), el('a', { href: '#/', text: 'All rollouts' }));
  const buttons = Object.keys(ACTIONS).map(a => el('button', {
    id: `act-${a}`, type: 'button', class: a === 'abort' ? 'danger' : null,
    onclick: () => confirmAction(name, a),
  }, ACTIONS[a][0]));
  const $ = {
    name: el('h1', { id: 'rollout-name' }),
    phase: el('span', { id: 'phase' }),
    about: el('span', { class: 'muted' }),
    routing: el('p', { class: 'routing-error', id: 'routing-error', role: 'alert', hidden: true }),
    message: el('span'),
  };
  const panels = [stepsPanel(), weightsPanel(), chartsPanel(), gatesPanel(), instancesPanel(), auditPanel()];
  const page = el('div', { 'data-rollout-page': name },
    el('p', {}, el('a', { href: '#/', text: '← all rollouts' })),
    el('section', { class: 'panel' },
      el('div', { class: 'head' }, $.name, $.phase, $.about),
      $.routing,
      el('p', { class: 'message', id: 'message' }, el('strong', { text: 'Last decision: ' }), $.message),
      el('div', { class: 'actions' }, buttons)),
    panels.map(p => p.root));
  return {
    root: el('div', {}, missing, page),
    update() {
      const r = state.rollouts.find(x => x.name === name);
      setAttr(missing, 'hidden', !!r);
      setAttr(page, 'hidden', !r);
      if (!r) return;
      maybeFetchHistory(name);
      const may = state.session && state.session.mayAct;
      for (const [i, b] of buttons.entries()) {
        const a = Object.keys(ACTIONS)[i];
        setAttr(b, 'disabled', !may);
        setAttr(b, 'title', may ? ACTIONS[a][1] : 'your role may watch, not act');
      }
      setText($.name, r.name);
      patchPhase($.phase, r.phase);
      setText($.about, `${r.strategy} · ${r.listen}`);
      setText($.routing, warningText(r));
      setAttr($.routing, 'hidden', !warningText(r));
      setText($.message, r.message || '-');
      for (const p of panels) p.update(r);
    },
  };
}

// The current view, rebuilt only when the address changes page.
let view = null;

function render() {
  if (!state.loaded) return;
  const app = document.getElementById('app');
  const m = location.hash.match(/^#\/r\/(.+)$/);
  let name = null;
  if (m) {
    try { name = decodeURIComponent(m[1]); } catch (e) { name = m[1]; }
  }
  const key = name === null ? 'list' : `r/${name}`;
  if (!view || view.key !== key) {
    view = name === null ? listView() : rolloutView(name);
    view.key = key;
    app.replaceChildren(view.root);
  }
  view.update();
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
    state.loaded = true;
    state.updates += 1;
    document.getElementById('app').dataset.updates = state.updates;
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

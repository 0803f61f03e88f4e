// celery_semaphore dashboard. Every string from Redis reaches the page as a text node
// (el() below, textContent): never through innerHTML, so a gate named "<script>" is text.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const TOKEN_KEY = "celery-semaphore-dashboard-token";
  const COUNTERS = ["granted", "dispatched", "released", "reclaimed", "parked", "rejected",
    "expired", "dropped", "cancelled", "replaced"];
  const state = {
    sort: "name", order: "asc", filter: "", offset: 0, count: 50, gate: null, parked: 0,
    config: null, token: sessionStorage.getItem(TOKEN_KEY) || "", tokenOk: false,
    detail: null, arrived: 0, source: null,
  };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function age(s) {
    if (s === null || s === undefined) return "—";
    s = Math.max(0, s);
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " m";
  }
  const limitText = (limit) => (limit === null ? "?" : limit < 0 ? "per key" : String(limit));

  // -- the live stream ------------------------------------------------------------------
  function connect() {
    if (state.source) state.source.close();
    const query = new URLSearchParams({
      sort: state.sort, order: state.order, filter: state.filter,
      offset: state.offset, count: state.count,
    });
    if (state.gate !== null) { query.set("gate", state.gate); query.set("parked", state.parked); }
    state.source = new EventSource("/api/events?" + query);
    state.source.onmessage = (event) => render(JSON.parse(event.data));
    state.source.onerror = () => live("Connection to the dashboard lost; retrying…", true);
  }
  function live(text, bad) { $("live").textContent = text; $("live").classList.toggle("bad", !!bad); }

  function render(message) {
    state.arrived = Date.now();
    if (message.error) live("Stale: " + message.error, true);
    else live("Live, read " + new Date(message.read_at * 1000).toLocaleTimeString(), false);
    renderGates(message.gates);
    renderDetail(message.detail);
  }

  function renderGates(page) {
    const body = $("gates").tBodies[0];
    body.replaceChildren(...page.rows.map(gateRow));
    if (!page.rows.length) {
      body.append(el("tr", {}, el("td", { colspan: 10, class: "muted" },
        page.total ? "No gate matches the filter." : "No gate known yet: call a gated task, or check the Redis URL.")));
    }
    const last = page.offset + page.rows.length;
    $("page-info").textContent = (page.rows.length ? `${page.offset + 1}–${last}` : "0") +
      ` of ${page.matched}` + (page.matched < page.total ? ` (${page.total} gates in all)` : " gates");
    $("prev").disabled = page.offset === 0;
    $("next").disabled = last >= page.matched;
    state.offset = page.offset;
    for (const th of document.querySelectorAll("#gates th")) {
      th.setAttribute("aria-sort", th.dataset.sort === state.sort ? (state.order === "asc" ? "ascending" : "descending") : "none");
    }
  }

  function bar(held, limit) {
    const share = limit > 0 ? Math.min(1, held / limit) : (held > 0 ? 1 : 0);
    const fill = el("div", { class: "fill" });
    fill.style.width = (share * 100).toFixed(1) + "%";
    const why = limit === null ? "No call has named this gate yet: its limit is set by the first." :
      limit < 0 ? "Only its keys have limits." : null;
    return el("div", { class: "bar" + (limit > 0 && held >= limit ? " full" : ""), title: why }, fill,
      el("span", { class: "bar-text" }, `${held} / ${limitText(limit)}`));
  }

  function gateRow(g) {
    const waiting = g.waiting_time + g.waiting_requirements;
    const row = el("tr", { tabindex: "0", class: g.gate === state.gate ? "selected" : null },
      el("td", { class: "name" }, g.gate),
      el("td", { class: "use" }, bar(g.held, g.limit)),
      el("td", { class: "num parked" }, g.parked),
      el("td", { class: "num waiting", title: `${g.waiting_time} for a start time, ${g.waiting_requirements} for requirements` }, waiting),
      el("td", { class: "num oldest" }, age(g.oldest_parked_s)),
      el("td", { class: "paused" }, g.paused ? el("span", { class: "paused-flag" }, "paused") : "no"),
      ...["granted", "released", "reclaimed", "cancelled"].map((name) =>
        el("td", { class: "num counter " + name }, g.counters[name] ?? 0)));
    row.dataset.gate = g.gate;
    const open = () => openGate(g.gate);
    row.addEventListener("click", open);
    row.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
    return row;
  }

  // -- one gate -------------------------------------------------------------------------
  function openGate(gate) {
    if (state.gate !== gate) {
      state.parked = 0;
      $("d-result").textContent = ""; $("d-graph").hidden = true; $("d-limit").value = ""; $("d-key").value = "";
    }
    state.gate = gate;
    history.replaceState(null, "", "#gate=" + encodeURIComponent(gate));
    $("d-name").textContent = gate;
    $("detail").hidden = false;
    $("d-confirm").hidden = true;
    connect();
  }
  function closeGate() {
    state.gate = null; state.detail = null;
    $("detail").hidden = true;
    history.replaceState(null, "", location.pathname);
    connect();
  }

  function renderDetail(d) {
    state.detail = d;
    if (!d || d.gate !== state.gate) return;
    if (d.missing) { $("d-summary").textContent = "No gate of this name is known any more."; return; }
    const s = d.status;
    const parts = [`held ${s.held} of ${limitText(s.limit)} (peak ${s.peak})`, `${s.parked} parked`,
      `${s.waiting_time} waiting for a start time`, `${s.waiting_requirements} waiting for requirements`,
      `oldest parked ${age(s.oldest_parked_s)}`, `group ${s.group}`];
    $("d-summary").replaceChildren(parts.join(" · "), s.paused ? el("strong", { class: "paused-flag" }, " · paused") : "");
    if (document.activeElement !== $("d-limit") && s.limit > 0 && !$("d-limit").value) $("d-limit").value = s.limit;
    chart($("c-load"), d.series.ago_s, [["held", d.series.held], ["parked", d.series.parked]], (v) => String(Math.round(v)));
    chart($("c-wait"), d.series.ago_s, [["p50", d.series.p50], ["p90", d.series.p90], ["p99", d.series.p99]], (v) => v.toPrecision(2));
    const loading = (n) => [el("tr", {}, el("td", { colspan: n, class: "muted" }, "Reading…"))];
    const empty = (n, text) => [el("tr", {}, el("td", { colspan: n, class: "muted" }, text))];
    if (d.loading) {
      $("d-holders").tBodies[0].replaceChildren(...loading(9));
      $("d-parked").tBodies[0].replaceChildren(...loading(8));
    } else {
      const holders = d.holders.map((h) => el("tr", {},
        el("td", { class: "id" }, h.task_id), el("td", { class: "long" }, h.task), el("td", { class: "key" }, h.key), el("td", {}, h.state),
        el("td", {}, h.pid === null ? h.worker : `${h.worker}:${h.pid}`), el("td", { class: "num" }, age(h.held_s)),
        el("td", { class: "num" }, age(h.lease_left_s)), el("td", { class: "num" }, h.fence), el("td", {}, cancelButton(h.task_id))));
      $("d-holders").tBodies[0].replaceChildren(...(holders.length ? holders : empty(9, "No call holds this gate.")));
      $("d-holders-count").textContent = d.holders_total > d.holders.length ? `(${d.holders.length} of ${d.holders_total} shown)` : `(${d.holders_total})`;
      const parked = d.parked.map((p) => el("tr", {},
        el("td", { class: "num" }, p.position), el("td", { class: "id" }, p.task_id), el("td", { class: "long" }, p.task),
        el("td", { class: "num" }, p.priority), el("td", { class: "key" }, p.key), el("td", { class: "num" }, age(p.age_s)),
        el("td", { class: "long" }, p.waits_for), el("td", {}, cancelButton(p.task_id))));
      $("d-parked").tBodies[0].replaceChildren(...(parked.length ? parked : empty(8, "No call is parked here.")));
    }
    const first = d.parked_offset + 1, last = d.parked_offset + (d.parked ? d.parked.length : 0);
    $("d-parked-count").textContent = `(${s.parked})`;
    $("p-info").textContent = last >= first ? `${first}–${last} of ${s.parked}` : `none of ${s.parked}`;
    $("p-prev").disabled = d.parked_offset === 0;
    $("p-next").disabled = last >= s.parked || d.parked_offset + d.parked_page > d.parked_max_offset;
    const keys = s.busiest_keys.map(([key, units]) => el("tr", {}, el("td", { class: "key" }, key === "" ? "(no key)" : key), el("td", { class: "num" }, units)));
    $("d-keys").tBodies[0].replaceChildren(...(keys.length ? keys : empty(2, "No key holds units.")));
    $("d-counters").tBodies[0].replaceChildren(...COUNTERS.map((name) => el("tr", {}, el("td", {}, name), el("td", { class: "num" }, s.counters[name] ?? 0))));
    updateActions();
  }

  // Seconds back to "-15 min" at most; a younger dashboard spans what it has (a minute at least).
  function chart(node, ago, lines, label) {
    const W = 600, H = 170, L = 44, R = 8, T = 22, B = 20;
    const span = Math.min(900, Math.max(60, ...ago));
    const x = (a) => L + (1 - Math.min(a, span) / span) * (W - L - R);
    const values = lines.flatMap(([, v]) => v.filter((n) => n !== null));
    const top = Math.max(1e-9, ...values) * 1.1 || 1;
    const y = (v) => T + (1 - v / top) * (H - T - B);
    node.replaceChildren();
    for (const f of [0, 0.5, 1]) {
      node.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: y(top * f), y2: y(top * f) }));
      node.append(svg("text", { x: L - 4, y: y(top * f) + 4, "text-anchor": "end" }, values.length ? label(top * f) : ""));
    }
    const mark = (a) => (a === 0 ? "now" : span > 120 ? `−${(a / 60).toFixed(a % 60 ? 1 : 0)} min` : `−${Math.round(a)} s`);
    for (const f of [1, 2 / 3, 1 / 3, 0]) {
      node.append(svg("text", { x: x(span * f), y: H - 4, "text-anchor": f === 1 ? "start" : f === 0 ? "end" : "middle" }, mark(span * f)));
    }
    lines.forEach(([name, series], i) => {
      node.append(svg("rect", { class: "swatch-" + name, x: L + i * 80, y: 4, width: 10, height: 10 }));
      node.append(svg("text", { x: L + 14 + i * 80, y: 13 }, name));
      let points = [];
      const flush = () => {
        if (points.length > 1) node.append(svg("polyline", { class: "line " + name, points: points.map((p) => p.join(",")).join(" ") }));
        else if (points.length) node.append(svg("circle", { class: "swatch-" + name, cx: points[0][0], cy: points[0][1], r: 3 }));
        points = [];
      };
      series.forEach((v, j) => { if (v === null) flush(); else points.push([x(ago[j]).toFixed(1), y(v).toFixed(1)]); });
      flush();
    });
    if (!ago.length) node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "The first sample comes within 5 s."));
  }

  // -- actions --------------------------------------------------------------------------
  function actionsBlocked() {
    if (!state.config) return "Loading…";
    if (!state.config.actions) return "Actions are off: the dashboard was started without a token (start it with --token, or set semaphore_dashboard_token).";
    if (!state.tokenOk) return "Actions are off until you enter the dashboard's token above.";
    return null;
  }
  function cancelButton(taskId) {
    const button = el("button", { type: "button", class: "action cancel" }, "Cancel");
    button.dataset.task = taskId;
    button.addEventListener("click", () => act("cancel", { task_id: taskId }));
    return button;
  }
  function updateActions() {
    const why = actionsBlocked();
    for (const button of document.querySelectorAll("button.action")) {
      button.disabled = why !== null;
      if (why) button.title = why; else button.removeAttribute("title");
    }
    $("d-actions-note").textContent = why || "";
    $("actions-note").textContent = why || "Actions are on.";
    $("actions-note").classList.toggle("good", why === null);
    const form = $("token-form");
    form.hidden = !(state.config && state.config.actions);
  }
  async function post(verb, body) {
    const headers = { "Content-Type": "application/json" };
    headers[state.config.token_header] = state.token;
    const response = await fetch("/api/action/" + verb, { method: "POST", headers, body: JSON.stringify(body) });
    const doc = await response.json().catch(() => ({ error: response.statusText }));
    return { ok: response.ok, status: response.status, text: doc.message || doc.error || String(response.status) };
  }
  async function act(verb, body) {
    if (actionsBlocked() !== null) return;
    const result = await post(verb, { gate: state.gate, ...body });
    $("d-result").textContent = result.text;
    $("d-result").classList.toggle("bad", !result.ok);
    if (result.status === 403) { state.tokenOk = false; updateActions(); }
  }
  async function useToken(token) {
    state.token = token;
    const result = await post("check", {});
    state.tokenOk = result.ok;
    if (result.ok) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    updateActions();
    if (!result.ok) { $("actions-note").textContent = "Token refused: " + result.text; }
  }

  // -- explain --------------------------------------------------------------------------
  async function explainCall(taskId) {
    const response = await fetch("/api/explain?" + new URLSearchParams({ task_id: taskId }));
    const doc = await response.json();
    $("explain").hidden = false;
    const events = $("x-events").tBodies[0];
    if (!response.ok) {
      $("x-title").textContent = "Task " + taskId;
      $("x-reason").textContent = doc.error; $("x-more").textContent = ""; events.replaceChildren();
      return;
    }
    $("x-title").textContent = `${doc.task}[${doc.task_id}] ${doc.state}`;
    $("x-reason").textContent = doc.reason;
    $("x-more").replaceChildren(`gate ${doc.gates.join(", ")} · group ${doc.group} · result ${doc.result_state}` +
      (doc.position === null ? "" : ` · position ${doc.position} in the release order`));
    if (doc.gates.length) {
      const open = el("button", { type: "button" }, "Open its gate");
      open.addEventListener("click", () => openGate(doc.gates[0]));
      $("x-more").append(" ", open);
    }
    events.replaceChildren(...doc.events.map((e) => el("tr", {}, el("td", {}, e.at.replace("T", " ").slice(0, 23)), el("td", {}, e.event), el("td", {}, e.state))));
  }

  // -- wiring ---------------------------------------------------------------------------
  function wire() {
    let typing = null;
    $("filter").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => { state.filter = $("filter").value; state.offset = 0; connect(); }, 250);
    });
    for (const th of document.querySelectorAll("#gates th")) {
      th.querySelector("button").addEventListener("click", () => {
        const numeric = th.dataset.sort !== "name";
        state.order = state.sort === th.dataset.sort ? (state.order === "asc" ? "desc" : "asc") : (numeric ? "desc" : "asc");
        state.sort = th.dataset.sort; state.offset = 0; connect();
      });
    }
    $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.count); connect(); });
    $("next").addEventListener("click", () => { state.offset += state.count; connect(); });
    $("p-prev").addEventListener("click", () => { state.parked = Math.max(0, state.parked - 50); connect(); });
    $("p-next").addEventListener("click", () => { state.parked += 50; connect(); });
    $("d-close").addEventListener("click", closeGate);
    $("x-close").addEventListener("click", () => { $("explain").hidden = true; });
    $("explain-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const id = $("explain-id").value.trim();
      if (id) explainCall(id);
    });
    $("token-form").addEventListener("submit", (event) => { event.preventDefault(); useToken($("token").value); });
    $("d-resize").addEventListener("click", () => {
      const limit = Number($("d-limit").value), key = $("d-key").value;
      if (!Number.isInteger(limit) || limit < (key ? 0 : 1)) { $("d-result").textContent = "Type a whole number of units (at least 1)."; return; }
      act("resize", key ? { limit, key } : { limit });
    });
    $("d-pause").addEventListener("click", () => act("pause", {}));
    $("d-resume").addEventListener("click", () => act("resume", {}));
    $("d-purge").addEventListener("click", () => {
      const parked = state.detail && state.detail.status ? state.detail.status.parked : "every";
      $("d-confirm-text").textContent = `Cancel ${parked} parked calls of gate “${state.gate}”? They never run.`;
      $("d-confirm").hidden = false;
    });
    $("d-purge-no").addEventListener("click", () => { $("d-confirm").hidden = true; });
    $("d-purge-yes").addEventListener("click", () => { $("d-confirm").hidden = true; act("purge", { confirm: state.gate }); });
    $("d-graph-draw").addEventListener("click", () => {
      const img = $("d-graph");
      img.onerror = () => { img.hidden = true; $("d-graph-note").textContent = "The graph could not be drawn."; };
      img.onload = () => { img.hidden = false; $("d-graph-note").textContent = ""; };
      img.src = "/api/graph.svg?" + new URLSearchParams({ gate: state.gate, at: Date.now() });
    });
  }

  async function start() {
    wire();
    state.config = await (await fetch("/api/config")).json();
    $("app").textContent = state.config.app ? `app ${state.config.app} ·` : "";
    $("source").textContent = `gates in ${state.config.redis}`;
    if (!state.config.graphviz) {
      $("d-graph-draw").disabled = true;
      $("d-graph-note").textContent = "Graphviz's dot is not installed where the dashboard runs.";
    }
    if (state.config.actions && state.token) await useToken(state.token);
    updateActions();
    const wanted = /^#gate=(.*)$/.exec(location.hash);
    if (wanted) openGate(decodeURIComponent(wanted[1])); else connect();
  }
  start();
})();

// The live console: reads the portfolio's /events stream and shows the stack as it is now.
//
// How it stays correct and responsive (see qtrader/viewer/app.py for the stream):
// - The first message of a connection is the present (a "state" event, seq 0); after it come
//   batches numbered 1, 2, 3... A number that does not follow the last one is a lost message:
//   it is shown as a gap marker, never papered over. "dropped" counts events the server had
//   to drop for this page (it read too slowly); a new connection starts at 1 again, and what
//   happened while disconnected is shown as a gap of its own.
// - Messages only update the model; the DOM is written at most once per frame
//   (requestAnimationFrame), and only the parts that changed, so a burst of 500 events or a
//   snapshot with hundreds of positions costs one render.
// - Lists keep the newest KEEP rows each; the equity curve the newest CURVE_POINTS snapshots.
// - A lost connection is retried with exponential back-off (0.5 s doubling to 30 s, jittered);
//   the back-off resets once a connection delivered the present.
// - Read-only: nothing is ever sent on the socket.
// Money arrives as exact decimal strings; it is rounded for display in decimal (fixed()),
// never through a float, so the page shows the portfolio's own figures.
(() => {
  "use strict";

  const KEEP = 100;
  const CURVE_POINTS = 600;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const SILENT_AFTER_REPORTS = 3; // reports missed before a worker is shown as silent
  const ROLE_ORDER = ["marketdata", "inference", "execution", "portfolio"];

  const model = {
    policy: null,
    latch: null,
    stops: new Map(),
    snapshot: null,
    curve: [],
    workers: new Map(),
    // The newest KEEP rows of each list; "serial" counts every row ever added, "shown" how many
    // of them are on the page, so a render adds only the new rows.
    lists: {
      orders: { items: [], serial: 0, shown: 0, row: orderRow },
      fills: { items: [], serial: 0, shown: 0, row: fillRow },
      alerts: { items: [], serial: 0, shown: 0, row: alertRow },
    },
    lastSeq: 0,
    gaps: 0,
    reconnects: 0,
    dropped: 0,
    gapNote: "",
    connection: "connecting",
    retryAt: 0,
    attempts: 0,
    clockOffsetMs: 0, // server clock minus this page's clock, from the state's now_ms
    lostAt: 0,
  };

  // --- rendering, batched per frame --------------------------------------------------------

  const dirty = new Set();
  let frameRequested = false;

  function mark(...parts) {
    for (const part of parts) dirty.add(part);
    if (!frameRequested) {
      frameRequested = true;
      requestAnimationFrame(render);
    }
  }

  const RENDERERS = {
    connection: renderConnection,
    stream: renderStream,
    policy: renderPolicy,
    latch: renderLatch,
    stops: renderStops,
    portfolio: renderPortfolio,
    curve: renderCurve,
    positions: renderPositions,
    health: renderHealth,
    orders: () => renderList("orders"),
    fills: () => renderList("fills"),
    alerts: () => renderList("alerts"),
  };

  function render() {
    frameRequested = false;
    const parts = [...dirty];
    dirty.clear();
    for (const part of parts) RENDERERS[part]();
  }

  // The countdowns and "heard ... ago" move with time, not with messages.
  setInterval(() => mark("stops", "health", "connection"), 1000);

  // --- the connection ----------------------------------------------------------------------

  function connect() {
    const url = new URL("events", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    model.connection = "connecting";
    mark("connection");
    const socket = new WebSocket(url);
    socket.onopen = () => {
      model.lastSeq = 0; // each connection numbers its batches from 1
      model.connection = "live";
      if (model.lostAt) {
        model.reconnects += 1;
        noteGap(`connection lost at ${clock(model.lostAt)}: events until ${clock(Date.now())} were not received`);
      }
      mark("connection", "stream");
    };
    socket.onmessage = (message) => {
      let batch;
      try {
        batch = JSON.parse(message.data);
      } catch (error) {
        return; // not ours to show; the next batch's number tells whether it mattered
      }
      if (onBatch(batch)) model.attempts = 0;
    };
    socket.onclose = () => {
      if (model.connection === "live") model.lostAt = Date.now();
      retry();
    };
  }

  function retry() {
    const backoff = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** model.attempts);
    const delay = backoff / 2 + Math.random() * (backoff / 2);
    model.attempts += 1;
    model.connection = "reconnecting";
    model.retryAt = Date.now() + delay;
    mark("connection");
    setTimeout(connect, delay);
  }

  // Returns whether the batch held the present (the connection is then fully up).
  function onBatch(batch) {
    if (!batch || !Array.isArray(batch.events)) return false;
    if (batch.seq > 0) {
      if (model.lastSeq > 0 && batch.seq !== model.lastSeq + 1) {
        model.gaps += 1;
        noteGap(`batches ${model.lastSeq + 1}-${batch.seq - 1} never arrived`);
      }
      model.lastSeq = batch.seq;
      mark("stream");
    }
    if (batch.dropped > 0) {
      model.dropped += batch.dropped;
      notice("dropped", `the server dropped ${batch.dropped} events for this page (it read too slowly)`);
      mark("stream");
    }
    let present = false;
    for (const event of batch.events) {
      if (event && event.kind === "state") present = true;
      apply(event);
    }
    return present;
  }

  function noteGap(text) {
    model.gapNote = `Gap at ${clock(Date.now())}: ${text}`;
    notice("gap", text);
    mark("stream");
  }

  function notice(what, detail) {
    keep("alerts", { at: Date.now(), what, detail, notice: true });
  }

  // --- applying events to the model --------------------------------------------------------

  const APPLY = {
    state: applyState,
    halt_latch: applyLatch,
    emergency_stop_view: applyStop,
    portfolio_snapshot: applySnapshot,
    workload_health: (report) => {
      model.workers.set(report.worker_id, report);
      mark("health");
    },
    order_update: (update) => keep("orders", update),
    fill: (fill) => keep("fills", fill),
    risk_alert: (alert) => keep("alerts", { at: alert.ts_ms, what: `${alert.alert_kind} alert`, detail: alert.detail }),
  };

  function apply(event) {
    const handler = event && APPLY[event.kind];
    if (handler) handler(event);
  }

  function applyState(state) {
    if (Number.isFinite(state.now_ms)) model.clockOffsetMs = state.now_ms - Date.now();
    if (state.policy) model.policy = state.policy;
    if (state.latch) applyLatch(state.latch, true);
    if (state.portfolio) applySnapshot(state.portfolio);
    // Merged, not replaced: a server that just restarted has not heard every worker yet, and
    // what this page knows still says when each was last heard (silent ones show as such).
    for (const view of state.stops || []) model.stops.set(view.name, view);
    for (const report of state.workloads || []) model.workers.set(report.worker_id, report);
    mark("policy", "stops", "health");
  }

  function applyLatch(latch, quiet) {
    const known = model.latch;
    if (known && latch.revision < known.revision) return;
    model.latch = latch;
    if (!quiet && (!known || known.revision !== latch.revision)) {
      const by = latch.issued_by ? ` by ${latch.issued_by}` : "";
      keep("alerts", {
        at: latch.issued_at_ms,
        what: `latch ${latch.state} (revision ${latch.revision})`,
        detail: `${latch.reason || "no reason given"}${by}`,
      });
    }
    mark("latch");
  }

  function applyStop(view) {
    const known = model.stops.get(view.name);
    model.stops.set(view.name, view);
    if (known && known.state !== view.state) {
      const by = view.state === "Armed" ? "" : ` by ${view.tripped_by}: ${view.reason}`;
      keep("alerts", { at: view.ts_ms, what: `stop ${view.name}`, detail: `${known.state} -> ${view.state}${by}` });
    }
    mark("stops");
  }

  function applySnapshot(snapshot) {
    model.snapshot = snapshot;
    const last = model.curve[model.curve.length - 1];
    if (!last || last.ts !== snapshot.ts_ms) {
      model.curve.push({ ts: snapshot.ts_ms, equity: Number(snapshot.equity) });
      if (model.curve.length > CURVE_POINTS) model.curve.splice(0, model.curve.length - CURVE_POINTS);
    }
    mark("portfolio", "curve", "positions");
  }

  function keep(name, item) {
    const list = model.lists[name];
    list.items.push(item);
    list.serial += 1;
    if (list.items.length > KEEP) list.items.splice(0, list.items.length - KEEP);
    mark(name);
  }

  // --- the parts of the page ---------------------------------------------------------------

  function renderConnection() {
    const node = byId("connection");
    node.dataset.state = model.connection;
    if (model.connection === "reconnecting") {
      const left = Math.max(0, model.retryAt - Date.now());
      node.textContent = `disconnected: retrying in ${(left / 1000).toFixed(1)} s (attempt ${model.attempts})`;
    } else {
      node.textContent = model.connection;
    }
  }

  function renderStream() {
    setFigure("last-seq", "seq", model.lastSeq, String(model.lastSeq));
    const gaps = byId("gaps");
    gaps.dataset.count = String(model.gaps);
    gaps.dataset.reconnects = String(model.reconnects);
    gaps.textContent = model.reconnects ? `${model.gaps} (+${model.reconnects} reconnects)` : String(model.gaps);
    setFigure("dropped", "count", model.dropped, String(model.dropped));
    const marker = byId("gap-marker");
    marker.hidden = !model.gapNote;
    marker.textContent = model.gapNote;
  }

  function renderPolicy() {
    const policy = model.policy;
    byId("policy").textContent = policy ? `${policy.name} rev ${policy.revision} (${policy.mode})` : "";
  }

  function renderLatch() {
    const latch = model.latch;
    const node = byId("latch");
    node.dataset.state = latch ? latch.state : "";
    node.dataset.revision = latch ? String(latch.revision) : "0";
    if (!latch) return;
    const held = latch.held_by && latch.held_by.length ? `, held by ${latch.held_by.join(", ")}` : "";
    node.textContent = `latch in force: ${latch.state}, revision ${latch.revision}, since ${clock(latch.issued_at_ms)}${held}`;
  }

  function renderStops() {
    const node = byId("stops");
    const stops = [...model.stops.values()].sort((a, b) => a.name.localeCompare(b.name));
    node.dataset.count = String(stops.length);
    if (!stops.length) return;
    node.innerHTML = stops.map(stopHtml).join("");
  }

  function stopHtml(view) {
    const armed = view.state === "Armed";
    const rows = [];
    if (!armed) {
      rows.push(["tripped by", esc(view.tripped_by)], ["why", esc(view.reason || "no reason given")]);
      rows.push(["since", `${clock(view.tripped_at_ms)} (${duration(serverNow() - view.tripped_at_ms)} ago)`]);
      rows.push(["cooldown", cooldownHtml(view)]);
      rows.push(["reset", view.require_manual_reset ? "by hand, after the cooldown" : "by itself after the cooldown"]);
    } else if (view.tripped_at_ms) {
      rows.push(["last trip", `${clock(view.tripped_at_ms)} by ${esc(view.tripped_by)}`]);
    }
    if (view.pending_workers.length) rows.push(["not acknowledged", esc(view.pending_workers.join(", "))]);
    rows.push(["trips / resets", `${view.trip_count} / ${view.reset_count}`]);
    const list = rows.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("");
    return (
      `<div class="stop" data-name="${esc(view.name)}" data-state="${esc(view.state)}">` +
      `<span class="state">${esc(view.state)}</span> <span class="muted">EmergencyStop ${esc(view.name)}` +
      ` (latch ${esc(view.latch)}, revision ${view.latch_revision})</span><dl>${list}</dl></div>`
    );
  }

  function cooldownHtml(view) {
    if (view.cooldown_until_ms == null) return "-";
    const left = view.cooldown_until_ms - serverNow();
    const text = left > 0 ? `${duration(left)} left (until ${clock(view.cooldown_until_ms)})` : `ended at ${clock(view.cooldown_until_ms)}`;
    return `<span class="cooldown" data-left-ms="${Math.max(0, Math.round(left))}">${text}</span>`;
  }

  function renderPortfolio() {
    const s = model.snapshot;
    if (!s) return;
    setFigure("equity", "value", s.equity, fixed(s.equity, 2));
    const pnl = subtractCapital(s.equity, s.initial_capital);
    setFigure("pnl", "value", pnl, signed(fixed(pnl, 2)));
    setFigure("realized", "value", s.realized_pnl, signed(fixed(s.realized_pnl, 2)));
    setFigure("unrealized", "value", s.unrealized_pnl, signed(fixed(s.unrealized_pnl, 2)));
    setFigure("fees", "value", s.fees, fixed(s.fees, 2));
    // What moved the account besides our trades' PnL, each asset in its own units (a BNB fee
    // or transfer is never shown as USDT); the exact amounts in data-value.
    setFigure("fees-by-asset", "value", exactByAsset(s.fees_by_asset), byAsset(s.fees_by_asset));
    setFigure("funding", "value", s.funding, signed(fixed(s.funding, 2)));
    const transfers = s.transfers_by_asset;
    setFigure("transfers", "value", exactByAsset(transfers), byAsset(transfers, true));
    setFigure("other-income", "value", s.other_income, signed(fixed(s.other_income, 2)));
    setFigure("drawdown", "value", s.drawdown_pct, `${fixed(s.drawdown_pct, 2)}%`);
    setFigure("max-drawdown", "value", s.max_drawdown_pct, `${fixed(s.max_drawdown_pct, 2)}%`);
    setFigure("fills-applied", "value", s.fills_applied, String(s.fills_applied));
    setFigure("snapshot-seq", "seq", s.sequence, `snapshot ${s.sequence} at ${clock(s.ts_ms)}`);
  }

  function renderCurve() {
    const canvas = byId("equity-curve");
    const context = canvas.getContext("2d");
    const { width, height } = canvas;
    context.clearRect(0, 0, width, height);
    const points = model.curve;
    if (points.length < 2) return;
    let low = Infinity;
    let high = -Infinity;
    for (const p of points) {
      low = Math.min(low, p.equity);
      high = Math.max(high, p.equity);
    }
    const span = high - low || 1;
    const x = (i) => 50 + (i / (points.length - 1)) * (width - 60);
    const y = (v) => 10 + (1 - (v - low) / span) * (height - 20);
    context.strokeStyle = "#2b323c";
    context.beginPath();
    context.moveTo(50, y(low));
    context.lineTo(width - 10, y(low));
    context.stroke();
    context.strokeStyle = "#58a6ff";
    context.lineWidth = 1.5;
    context.beginPath();
    points.forEach((p, i) => (i ? context.lineTo(x(i), y(p.equity)) : context.moveTo(x(i), y(p.equity))));
    context.stroke();
    context.fillStyle = "#8593a3";
    context.font = "11px sans-serif";
    context.fillText(high.toFixed(2), 2, 14);
    context.fillText(low.toFixed(2), 2, height - 4);
  }

  function renderPositions() {
    const positions = model.snapshot ? [...model.snapshot.positions] : [];
    positions.sort((a, b) => a.symbol.localeCompare(b.symbol));
    const open = positions.filter((p) => Number(p.quantity) !== 0).length;
    const count = byId("positions-count");
    count.dataset.count = String(positions.length);
    count.dataset.open = String(open);
    count.textContent = `${open} open of ${positions.length}`;
    byId("positions").innerHTML = positions.map(positionRow).join("");
  }

  function positionRow(p) {
    return (
      `<tr data-symbol="${esc(p.symbol)}"><td>${esc(p.symbol)}</td>` +
      `<td class="num ${tone(p.quantity)}">${esc(p.quantity)}</td>` +
      `<td class="num">${fixed(p.avg_entry_price, 4)}</td><td class="num">${fixed(p.mark_price, 4)}</td>` +
      `<td class="num ${tone(p.unrealized_pnl)}">${signed(fixed(p.unrealized_pnl, 2))}</td>` +
      `<td class="num ${tone(p.realized_pnl)}">${signed(fixed(p.realized_pnl, 2))}</td>` +
      `<td class="num">${fixed(p.fees, 2)}</td>` +
      `<td class="num ${tone(p.funding)}">${signed(fixed(p.funding, 2))}</td></tr>`
    );
  }

  // "1.25 USDT, 0.00172000 BNB": USDT to the cent, another asset to 8 places; "-" for none.
  function byAsset(amounts, withSign) {
    if (!amounts || !amounts.length) return "-";
    const shown = (a) => fixed(a.amount, a.asset === "USDT" ? 2 : 8);
    return amounts.map((a) => `${withSign ? signed(shown(a)) : shown(a)} ${esc(a.asset)}`).join(", ");
  }

  function exactByAsset(amounts) {
    return (amounts || []).map((a) => `${a.asset}:${a.amount}`).join(" ");
  }

  function renderHealth() {
    const reports = [...model.workers.values()].sort(byRole);
    const body = byId("workloads");
    body.dataset.count = String(reports.length);
    body.innerHTML = reports.map(healthRow).join("");
  }

  function healthRow(report) {
    const age = serverNow() - report.ts_ms;
    const silent = age > SILENT_AFTER_REPORTS * report.interval_s * 1000;
    const status = silent ? "SILENT" : report.status;
    // Every dependency by name (its detail on hover); the ones not OK with their detail.
    const names = report.dependencies
      .map((d) => `<span class="status-${esc(d.status)}" title="${esc(d.detail)}">${esc(d.name)}</span>`)
      .join(" ");
    const problems = report.dependencies
      .filter((d) => d.status !== "OK")
      .map((d) => `<div class="status-${esc(d.status)}">${esc(d.name)} ${esc(d.status)}: ${esc(d.detail)}</div>`)
      .join("");
    const deps = `${names}${problems}`;
    return (
      `<tr data-service="${esc(report.service)}" data-worker="${esc(report.worker_id)}" data-status="${esc(status)}">` +
      `<td>${esc(report.service)}</td><td class="muted">${esc(report.worker_id)}</td>` +
      `<td class="status-${esc(status)}">${esc(status)}</td><td>${duration(Math.max(0, age))} ago</td>` +
      `<td class="wrap">${deps}</td></tr>`
    );
  }

  function byRole(a, b) {
    const rank = (r) => (ROLE_ORDER.includes(r.service) ? ROLE_ORDER.indexOf(r.service) : ROLE_ORDER.length);
    return rank(a) - rank(b) || a.service.localeCompare(b.service) || a.worker_id.localeCompare(b.worker_id);
  }

  // Only the rows added since the last render go in (newest first); the oldest beyond KEEP go.
  function renderList(name) {
    const list = model.lists[name];
    const body = byId(name);
    const fresh = Math.min(list.serial - list.shown, list.items.length);
    const html = [];
    for (let i = list.items.length - 1; i >= list.items.length - fresh; i -= 1) html.push(list.row(list.items[i]));
    body.insertAdjacentHTML("afterbegin", html.join(""));
    while (body.rows.length > KEEP) body.deleteRow(-1);
    list.shown = list.serial;
    body.dataset.count = String(body.rows.length);
  }

  function orderRow(u) {
    return (
      `<tr><td>${clock(u.ts_ms)}</td><td>${esc(u.symbol)}</td><td class="side-${esc(u.side)}">${esc(u.side)}</td>` +
      `<td>${esc(u.status)}</td><td class="num">${esc(u.filled_quantity)}/${esc(u.quantity)}</td>` +
      `<td class="num">${fixed(u.avg_price, 4)}</td><td class="wrap muted">${esc(u.reason || "")}</td></tr>`
    );
  }

  function fillRow(f) {
    return (
      `<tr><td>${clock(f.ts_ms)}</td><td>${esc(f.symbol)}</td><td class="side-${esc(f.side)}">${esc(f.side)}</td>` +
      `<td class="num">${esc(f.quantity)}</td><td class="num">${fixed(f.price, 4)}</td>` +
      `<td class="num">${fixed(f.fee, 4)} ${esc(f.fee_asset)}</td></tr>`
    );
  }

  function alertRow(a) {
    const cls = a.notice ? "status-DEGRADED" : "status-CRITICAL";
    return `<tr data-what="${esc(a.what)}"><td>${clock(a.at)}</td><td class="${cls}">${esc(a.what)}</td><td class="wrap">${esc(a.detail)}</td></tr>`;
  }

  // --- small helpers -----------------------------------------------------------------------

  function byId(id) {
    return document.getElementById(id);
  }

  // The exact value in a data attribute, the rounded one as text.
  function setFigure(id, key, exact, text) {
    const node = byId(id);
    node.dataset[key] = String(exact);
    node.textContent = text;
  }

  function serverNow() {
    return Date.now() + model.clockOffsetMs;
  }

  function clock(ms) {
    if (!ms) return "-";
    return new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
  }

  function duration(ms) {
    const s = Math.floor(ms / 1000);
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
  }

  function esc(value) {
    return String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  }

  function tone(text) {
    const value = Number(text);
    return value > 0 ? "pos" : value < 0 ? "neg" : "";
  }

  function signed(text) {
    return text.startsWith("-") || /^0\.0*$/.test(text) ? text : `+${text}`;
  }

  // A decimal string (as the wire sends Money: "12.5", "-0.00000001", "1E+3") as a BigInt
  // count of 10^-scale units, or null when it is not one.
  function units(text) {
    const m = /^([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/.exec(String(text).trim());
    if (!m || (m[2] === "" && !m[3])) return null;
    const frac = m[3] || "";
    const digits = BigInt((m[2] || "0") + frac);
    return { negative: m[1] === "-", digits, exponent: Number(m[4] || 0) - frac.length };
  }

  // ``text`` rounded to ``places`` decimals, half away from zero, exactly (BigInt, no float).
  function fixed(text, places) {
    const u = units(text);
    if (!u) return esc(text); // not a number: shown as it came, never as markup
    const shift = u.exponent + places;
    let scaled;
    if (shift >= 0) {
      scaled = u.digits * 10n ** BigInt(shift);
    } else {
      const divisor = 10n ** BigInt(-shift);
      scaled = u.digits / divisor;
      if (2n * (u.digits % divisor) >= divisor) scaled += 1n;
    }
    const digits = scaled.toString().padStart(places + 1, "0");
    const whole = places ? `${digits.slice(0, -places)}.${digits.slice(-places)}` : digits;
    return u.negative && scaled !== 0n ? `-${whole}` : whole;
  }

  // equity - initial capital, exactly (both decimal strings).
  function subtractCapital(equity, capital) {
    const a = units(equity);
    const b = units(capital);
    if (!a || !b) return "";
    const exponent = Math.min(a.exponent, b.exponent);
    const value = (u) => (u.negative ? -1n : 1n) * u.digits * 10n ** BigInt(u.exponent - exponent);
    const diff = value(a) - value(b);
    const negative = diff < 0n;
    const places = Math.max(0, -exponent);
    const digits = (negative ? -diff : diff).toString() + "0".repeat(Math.max(0, exponent));
    const padded = digits.padStart(places + 1, "0");
    const whole = places ? `${padded.slice(0, -places)}.${padded.slice(-places)}` : padded;
    return `${negative ? "-" : ""}${whole}`;
  }

  connect();
})();

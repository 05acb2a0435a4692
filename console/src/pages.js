// The console's pages. Each is async (ctx, arg) -> a DOM node, built from tool results only; a tool this
// cluster lacks renders as "not available on this cluster" and the rest of the page still works.

const NODE_COLS = ["id", "role", "liveness", "leader", "grpc_address", "replication", "last_seen_age", "liveness_since"];
const TASK_COLS = ["id", "name", "kind", "state", "node", "attempt", "exit_code", "error"];

function round(v, d = 1) { return typeof v === "number" ? Number(v.toFixed(d)) : v; }
function pct(used, total) {
  if (!total) return "";
  const p = Math.max(0, Math.min(100, (100 * used) / total));
  return p;
}

// Width through the CSSOM: the page's Content-Security-Policy allows no inline style attributes.
function fill(c, p) { const el = c.h("span", {}); el.style.width = `${p}%`; return el; }

async function overview(c) {
  const [status, health, alerts, sentinel] = await Promise.all([c.tool("cluster_status"), c.tool("cluster_health"), c.tool("list_alerts"),
    c.has("sentinel_health") ? c.tool("sentinel_health") : Promise.resolve({ absent: true })]);
  const out = [c.h("h1", {}, "Cluster overview")];
  if (status.error) out.push(c.failure(status));
  else {
    const s = status.result;
    const alive = s.nodes.filter((n) => n.liveness === "alive").length;
    out.push(c.card("Cluster", c.stats([
      ["health", health.result ? c.badge(health.result.status) : "-"],
      ["leader", s.leader || "none"],
      ["quorum", c.badge(s.has_quorum ? "ok" : "lost")],
      ["term", s.term], ["commit index", s.commit_index],
      ["nodes alive", `${alive} / ${s.nodes.length}`], ["version", s.version],
    ])));
    // Sentinel's summary of each node (sentinel_health: {status, nodes: [{node, score, level, stale, ...}]}) as
    // two more columns; a node that has published none yet shows them empty.
    const scored = Object.fromEntries(((sentinel.result && sentinel.result.nodes) || []).map((r) => [r.node, r]));
    const cols = sentinel.result ? [...NODE_COLS.slice(0, 3), "health", "score", ...NODE_COLS.slice(3)] : NODE_COLS;
    const nodes = s.nodes.map((n) => {
      const r = scored[n.id];
      const row = { ...n, leader: n.leader ? "leader" : "", last_seen_age: n.last_seen_age < 0 ? "" : `${round(n.last_seen_age)} s` };
      if (r) Object.assign(row, { health: r.stale ? "stale" : r.level, score: typeof r.score === "number" ? Math.round(r.score) : undefined });
      return row;
    });
    out.push(c.card("Nodes", c.table(nodes, cols, { link: { key: "id", href: (r) => `#/node/${encodeURIComponent(r.id)}` } }),
      sentinel.error && !sentinel.absent ? c.failure(sentinel) : null,
      sentinel.result && !sentinel.result.nodes.length ? c.h("p", { class: "muted" }, sentinel.result.hint) : null));
  }
  if (alerts.absent) out.push(c.card("Alerts", c.absent("Alerts")));
  else if (alerts.error) out.push(c.card("Alerts", c.failure(alerts)));
  else {
    const rows = (alerts.result.alerts || []).map((a) => (typeof a === "object" ? a : { alert: a }));
    out.push(c.card("Alerts", c.table(rows, null, { empty: "No alerts." })));
  }
  return c.h("div", {}, out);
}

async function node(c, id) {
  const [info, res, tasks] = await Promise.all([c.tool("get_node", { node_id: id }), c.tool("nodes_resources"), c.tool("tasks_list", { node: id })]);
  const out = [c.h("h1", {}, `Node ${id}`)];
  if (info.error) { out.push(c.failure(info)); return c.h("div", {}, out); }
  const n = info.result;
  out.push(c.card("Membership", c.stats([["role", c.badge(n.role)], ["liveness", c.badge(n.liveness)],
    ["leader", n.leader ? "yes" : "no"], ["gRPC", n.grpc_address], ["joined", c.ago(n.joined_at)],
    ["liveness since", c.ago(n.liveness_since)]]),
  c.h("div", { class: "actions" }, c.action("Drain", "nodes_drain", { node_id: id }, `Drain ${id}? New work stops landing there and its tasks move elsewhere.`)
    || c.action("Drain", "drain_node", { node_id: id }, `Drain ${id}?`),
  c.action("Undrain", "nodes_undrain", { node_id: id }, `Let ${id} take work again?`)
    || c.action("Undrain", "undrain_node", { node_id: id }, `Let ${id} take work again?`))));
  if (!res.error && !res.absent) {
    const r = (res.result || []).find((x) => x.id === id);
    if (r) {
      const cap = r.capacity || {}, use = r.usage || {}, run = r.running || {};
      const memUsed = cap.memory_mb && use.memory_available_mb !== undefined ? cap.memory_mb - use.memory_available_mb : null;
      const bar = (label, p) => c.h("div", {}, c.h("span", { class: "muted" }, `${label} `),
        c.h("div", { class: "bar", role: "img", "aria-label": `${label} ${Math.round(p)} percent` }, fill(c, p)));
      out.push(c.card("Resources", c.stats([["CPUs", cap.cpus], ["load (1 min)", use.load1], ["memory", `${cap.memory_mb || "?"} MB`],
        ["memory free", `${use.memory_available_mb ?? "?"} MB`], ["disk free", `${use.disk_free_gb ?? "?"} GB`],
        ["task slots", `${run.tasks || 0} / ${cap.slots ?? "?"}`], ["drained", r.drained ? "yes" : "no"],
        ["reported", c.ago(r.reported_at)]]),
      memUsed !== null ? bar("memory used", pct(memUsed, cap.memory_mb)) : null,
      cap.slots ? bar("task slots used", pct(run.tasks || 0, cap.slots)) : null,
      c.h("p", { class: "muted" }, `kinds: ${(r.kinds || []).join(", ")}`)));
    }
  }
  const running = tasks.error ? [] : (tasks.result || []).filter((t) => t.node === id);
  out.push(c.card("Work on this node", tasks.error ? c.failure(tasks)
    : c.table(running, TASK_COLS, { empty: "No tasks on this node.", link: { key: "id", href: (r) => `#/task/${encodeURIComponent(r.id)}` } })));
  out.push(await health(c, id));
  return c.h("div", {}, out);
}

// Health: the Sentinel plugin's score, factors, predictions and anomalies (sentinel_node), and charts. History is
// kept on each node (sentinel_history answers for its own node only): this console's own node gets its recorded
// series, another node the sparklines it publishes with its summary (values over the last 2 h, no timestamps).
const HISTORY = ["score", "cpu.busy_pct", "mem.avail_pct", "load.1"];
const HISTORY_HOURS = 6;

function eta(s) {
  if (s === null || s === undefined) return "";
  return s < 5400 ? `${Math.round(s / 60)} min` : s < 172800 ? `${Math.round(s / 3600)} h` : `${Math.round(s / 86400)} days`;
}

async function health(c, id) {
  const gone = () => c.card("Health", c.absent("Health charts (Sentinel)"));
  if (!c.has("sentinel_node")) return gone();
  if (id !== c.who.node_id && c.has("sentinel_health")) {
    // another node's summary comes from the replicated state: ask sentinel_health first, so a node that has
    // published none yet (or runs no sentinel) reads as such instead of as a failed call
    const all = await c.tool("sentinel_health");
    if (all.absent) return gone();
    if (all.result && !(all.result.nodes || []).some((n) => n.node === id)) {
      return c.card("Health", c.h("p", { class: "muted" }, `${id} has not published a health summary yet: the sentinel plugin publishes one `
        + "within a minute of starting. A node whose sentinel plugin is disabled publishes none (cortex plugins list on that node)."));
    }
  }
  const now = await c.tool("sentinel_node", { node: id });
  if (now.absent) return gone(); // the plugin was stopped since the page loaded
  if (now.error) return c.card("Health", c.failure(now));
  const d = now.result || {};
  const raised = d.raised || [];
  const kids = [c.stats([["score", typeof d.score === "number" ? `${Math.round(d.score)} / 100` : "-"],
    ["level", c.badge(d.stale ? "stale" : d.level || "")],
    ["assessed", d.source === "local" ? "now (this node)" : c.ago(d.ts)],
    ["alerts raised", raised.length], d.metrics ? ["metrics", d.metrics] : null])];
  if (d.stale) kids.push(c.h("p", { class: "error" }, `${id} has not published a health summary for over 15 minutes: is its agent running?`));
  kids.push(c.table((d.factors || []).map((f) => ({ factor: f.name, penalty: -f.penalty, detail: f.detail, seen_by: f.source === "leader" ? "the leader" : id })),
    null, { caption: "what lowers the score", empty: "Nothing lowers the score." }));
  kids.push(c.table((d.predictions || []).map((p) => ({ severity: p.severity, kind: p.kind, target: p.target, eta: eta(p.eta_s),
    confidence: `${Math.round((p.confidence || 0) * 100)} %`, message: p.message, alert: raised.includes(p.key) ? "raised" : "" })),
  null, { caption: "predicted failures", empty: "No failure predicted." }));
  if ((d.anomalies || []).length) kids.push(c.table(d.anomalies.map((a) => ({ signal: a.signal, value: round(a.value, 2), robust_z: a.z })), null, { caption: "anomalies" }));
  if (d.source === "local" && c.has("sentinel_history")) kids.push(...await history(c));
  else if (d.spark) {
    kids.push(...Object.entries(d.spark).filter(([, v]) => Array.isArray(v) && v.length).map(([name, v]) => chart(c, `${name} (last 2 h, as published)`, name, v.map((_, i) => i), v, false)));
    kids.push(c.h("p", { class: "muted" }, `Each node keeps its own history: run `, c.h("code", {}, "cortex console url"), ` on ${id} for its full charts.`));
  }
  return c.card("Health", ...kids);
}

// This node's recorded series (sentinel_history: {node, signal, points: [[t, v], ...]}), one chart each.
async function history(c) {
  const list = await c.tool("sentinel_history");
  if (list.error) return [c.failure(list)];
  const names = list.result.signals || [];
  const wanted = [...HISTORY.filter((n) => names.includes(n)), ...names.filter((n) => n.startsWith("disk.avail_pct:")).slice(0, 2)];
  const docs = await Promise.all(wanted.map((signal) => c.tool("sentinel_history", { signal, hours: HISTORY_HOURS, max_points: 500 })));
  return docs.map((r, i) => (r.error ? c.failure(r)
    : chart(c, `${wanted[i]} (last ${HISTORY_HOURS} h)`, wanted[i], r.result.points.map((p) => p[0]), r.result.points.map((p) => p[1]), true)));
}

function chart(c, caption, name, xs, ys, time) {
  const el = c.h("figure", { class: "chart", "aria-label": `${name} over time`, "data-signal": name, "data-points": ys.length },
    c.h("figcaption", { class: "muted" }, caption));
  const width = Math.min(900, Math.max(260, (document.getElementById("main").clientWidth || 600) - 60));
  // a score and percentages on their whole 0-100 scale: a flat 100 reads as full health, not as a mid-chart line
  const y = name === "score" || /_pct(:|$)/.test(name) ? { y: { range: [0, 100] } } : {};
  el.uplot = new c.uPlot({ width, height: 160, scales: { x: { time }, ...y }, series: [{}, { label: name, stroke: "#1f4e8c", width: 2 }], axes: [{}, {}],
    legend: { show: false } }, [xs, ys], el);
  return el;
}

// The services plugin's shapes: services_list answers one row per service {name, kind, home, holder, epoch, ha,
// run, healthy, restarts, ports, detail, lag_s, lag_node, sync}; ha_status answers {services: [{name, home,
// partners, holder, state, epoch, takeovers, givebacks, last_downtime_s, reason, lag_s, ...}], nodes}. One row
// per service joins both; the actions move every service of a node (ha_takeover / ha_giveback take `node`).
const SERVICE_COLS = ["name", "kind", "home", "partners", "holder", "epoch", "ha_state", "run", "health", "restarts",
  "lag", "sync", "last_downtime", "moves", "detail"];

function serviceRow(s, p) {
  const lag = s.lag_s === null || s.lag_s === undefined ? (s.sync === "no volume" ? "no volume" : "-") : `${round(s.lag_s)} s (${s.lag_node})`;
  return {
    name: s.name, kind: s.kind, home: s.home, partners: p ? p.partners : undefined, holder: s.holder, epoch: s.epoch,
    ha_state: s.ha, run: s.run, health: s.run === "pending" ? "pending" : s.healthy ? "healthy" : "unhealthy", restarts: s.restarts,
    lag, sync: s.sync === "no volume" ? undefined : s.sync, // a column only where some service has a volume
    last_downtime: p && typeof p.last_downtime_s === "number" ? `${round(p.last_downtime_s)} s` : p ? "-" : undefined,
    moves: p ? `${p.takeovers} takeover${p.takeovers === 1 ? "" : "s"}, ${p.givebacks} giveback${p.givebacks === 1 ? "" : "s"}` : undefined,
    detail: s.detail || (p && p.reason) || undefined,
  };
}

async function services(c) {
  const out = [c.h("h1", {}, "Services")];
  if (!c.has("services_list") && !c.has("ha_status")) { out.push(c.card("Services", c.absent("Services and HA"))); return c.h("div", {}, out); }
  const [list, ha] = await Promise.all([c.tool("services_list"), c.tool("ha_status")]);
  if (list.absent && ha.absent) { out.push(c.card("Services", c.absent("Services and HA"))); return c.h("div", {}, out); }
  const pairs = Object.fromEntries(((ha.result && ha.result.services) || []).map((p) => [p.name, p]));
  const rows = (list.result || []).map((s) => serviceRow(s, pairs[s.name]));
  // where a takeover of the holder may send this service: its home first when a partner holds it
  const others = (r) => [r.home, ...(r.partners || [])].filter((n, i, all) => n !== r.holder && all.indexOf(n) === i);
  const actions = (r) => [
    others(r).length ? c.action("Take over", "ha_takeover", { node: r.holder, wait: 0 },
      `Planned takeover of ${r.holder}: every service it holds (${r.name} among them) stops there and starts on its first ready partner (${r.name}: ${others(r).join(", then ")}), a short outage each. Go on?`) : null,
    r.holder !== r.home ? c.action("Give back", "ha_giveback", { node: r.home, wait: 0 },
      `Give ${r.home}'s services back to it (sync back first, then stop on ${r.holder} and start on ${r.home})?`) : null,
  ];
  out.push(c.card("Services and HA state", list.error ? c.failure(list)
    : c.table(rows, SERVICE_COLS, { empty: "No services deployed (cortex services deploy SPEC).", link: null, actions }),
  ha.error && !ha.absent ? c.failure(ha) : null));
  const nodes = ha.result && Array.isArray(ha.result.nodes) ? ha.result.nodes : [];
  if (nodes.length) out.push(c.card("Nodes that can run services", c.table(nodes, null, {})));
  return c.h("div", {}, out);
}

async function tasks(c) {
  const r = await c.tool("tasks_list", { limit: 200 });
  return c.h("div", {}, c.h("h1", {}, "Tasks"), c.card("Recent tasks", r.absent ? c.absent("Tasks") : r.error ? c.failure(r)
    : c.table(r.result, TASK_COLS, { empty: "No tasks yet.", link: { key: "id", href: (t) => `#/task/${encodeURIComponent(t.id)}` } })));
}

async function task(c, id) {
  const r = await c.tool("tasks_get", { task_id: id });
  const out = [c.h("h1", {}, `Task ${id}`)];
  if (r.error) { out.push(c.failure(r)); return c.h("div", {}, out); }
  const t = r.result;
  out.push(c.card("State", c.stats([["state", c.badge(t.state)], ["kind", t.kind], ["node", t.node || "-"], ["attempt", t.attempt],
    ["exit code", t.exit_code ?? "-"], ["submitted", c.ago(t.submitted_at)], ["finished", c.ago(t.finished_at)]]),
  t.error ? c.h("p", { class: "error" }, t.error) : null,
  c.h("div", { class: "actions" }, c.action("Cancel", "tasks_cancel", { task_id: id }, `Cancel task ${id}?`),
    c.action("Retry", "tasks_retry", { task_id: id }, `Run task ${id} again?`))));
  const o = t.output || {};
  out.push(c.card("Output", c.h("pre", { class: "log", tabindex: "0", "aria-label": "standard output" }, o.stdout || "(no output)"),
    o.stderr ? c.h("pre", { class: "log", tabindex: "0", "aria-label": "standard error" }, o.stderr) : null));
  out.push(c.card("Attempts", c.table(t.attempts || [], null, { empty: "Not started yet." })));
  return c.h("div", {}, out);
}

async function dlq(c) {
  const r = await c.tool("dlq_list");
  return c.h("div", {}, c.h("h1", {}, "Dead-letter queue"), c.card("Tasks that ran out of attempts", r.absent ? c.absent("The dead-letter queue")
    : r.error ? c.failure(r) : c.table(r.result, null, {
      empty: "The dead-letter queue is empty.", link: { key: "id", href: (t) => `#/task/${encodeURIComponent(t.id)}` },
      actions: (t) => [c.action("Replay", "dlq_replay", { task_ids: [t.id] }, `Queue task ${t.id} again?`)],
    })));
}

async function workflows(c) {
  const r = await c.tool("workflows_list");
  return c.h("div", {}, c.h("h1", {}, "Workflows"), c.card("Runs", r.absent ? c.absent("Workflows") : r.error ? c.failure(r)
    : c.table(r.result, null, { empty: "No workflow runs yet.", link: { key: "id", href: (w) => `#/workflow/${encodeURIComponent(w.id)}` } })));
}

const FILL = { succeeded: "#e6f4ea", running: "#e8f0fb", failed: "#fdecea", cancelled: "#fdecea", skipped: "#eef0f3", pending: "#fff4e5" };

// The DAG: steps in columns by depth (longest path from a root), edges as curves from each dependency.
function dag(c, steps) {
  const depth = {};
  const byName = Object.fromEntries(steps.map((s) => [s.name, s]));
  const d = (name, seen = new Set()) => {
    if (depth[name] !== undefined) return depth[name];
    if (seen.has(name)) return 0;
    seen.add(name);
    const deps = (byName[name] && byName[name].depends_on) || [];
    return (depth[name] = deps.length ? 1 + Math.max(...deps.map((x) => d(x, seen))) : 0);
  };
  steps.forEach((s) => d(s.name));
  const cols = {};
  steps.forEach((s) => (cols[depth[s.name]] = cols[depth[s.name]] || []).push(s.name));
  const W = 150, H = 46, GX = 60, GY = 22, pos = {};
  Object.entries(cols).forEach(([x, names]) => names.forEach((n, y) => (pos[n] = { x: 10 + x * (W + GX), y: 10 + y * (H + GY) })));
  const width = 20 + (Math.max(0, ...Object.keys(cols).map(Number)) + 1) * (W + GX) - GX;
  const height = 20 + Math.max(...Object.values(cols).map((v) => v.length)) * (H + GY) - GY;
  const svg = c.h("svg:svg", { class: "dag", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": `workflow graph: ${steps.map((s) => `${s.name} ${s.state}`).join(", ")}` });
  for (const s of steps) for (const dep of s.depends_on || []) {
    if (!pos[dep]) continue;
    const a = pos[dep], b = pos[s.name];
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    svg.append(c.h("svg:path", { d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}` }));
  }
  for (const s of steps) {
    const p = pos[s.name];
    svg.append(c.h("svg:g", { "data-step": s.name, "data-state": s.state },
      c.h("svg:rect", { x: p.x, y: p.y, width: W, height: H, rx: 6, fill: FILL[s.state] || "#ffffff" }),
      c.h("svg:text", { x: p.x + 10, y: p.y + 19, "font-weight": "600" }, s.name.length > 20 ? s.name.slice(0, 19) + "…" : s.name),
      c.h("svg:text", { x: p.x + 10, y: p.y + 36 }, `${s.state} · ${s.succeeded ?? 0}/${s.tasks_total ?? 0}`)));
  }
  return svg;
}

async function workflow(c, id) {
  const r = await c.tool("workflows_get", { workflow_id: id });
  const out = [c.h("h1", {}, `Workflow ${id}`)];
  if (r.error) { out.push(c.failure(r)); return c.h("div", {}, out); }
  const w = r.result;
  out.push(c.card("Run", c.stats([["name", w.name], ["version", w.version], ["state", c.badge(w.state)], ["started", c.ago(w.created_at)],
    ["finished", c.ago(w.finished_at)]]), c.h("div", { class: "actions" }, w.state === "running"
    ? c.action("Cancel", "workflows_cancel", { workflow_id: id }, `Cancel workflow ${id}?`) : null)));
  out.push(c.card("Steps", dag(c, w.steps)));
  const rows = w.steps.map((s) => ({ step: s.name, state: s.state, reason: s.reason, tasks: `${s.succeeded}/${s.tasks_total}`,
    depends_on: (s.depends_on || []).join(", "), task_ids: (s.tasks || []).map((t) => t.id) }));
  out.push(c.card("Step details", c.table(rows, ["step", "state", "reason", "tasks", "depends_on"], {
    actions: (s) => s.task_ids.slice(0, 5).map((t) => c.h("a", { href: `#/task/${encodeURIComponent(t)}` }, "logs")),
  })));
  return c.h("div", {}, out);
}

async function rollouts(c) {
  const r = await c.tool("update_status");
  const out = [c.h("h1", {}, "Rollouts")];
  if (r.absent) { out.push(c.card("Rollouts", c.absent("Rolling updates"))); return c.h("div", {}, out); }
  if (r.error) { out.push(c.failure(r)); return c.h("div", {}, out); }
  const ro = r.result.rollout;
  if (ro) {
    const steps = ro.steps || [];
    const done = steps.filter((s) => ["done", "skipped"].includes(s.state)).length;
    out.push(c.card(`Rollout ${ro.id || ""} to ${ro.version || "?"}`,
      c.stats([["state", c.badge(ro.state)], ["nodes done", `${done} / ${steps.length}`], ["by", ro.by || "-"],
        ["started", c.ago(ro.created_at)], ["updated", c.ago(ro.updated_at)]]),
      ro.reason ? c.h("p", { class: "error" }, ro.reason) : null,
      steps.length ? c.h("div", { class: "bar", role: "img", "aria-label": `${done} of ${steps.length} nodes done` }, fill(c, (100 * done) / steps.length)) : null,
      c.table(steps, ["node_id", "role", "from_version", "state", "reason"], { caption: "per node, in order",
        link: { key: "node_id", href: (n) => `#/node/${encodeURIComponent(n.node_id)}` } })));
  } else out.push(c.card("Current rollout", c.h("p", { class: "muted" }, "No rollout in progress.")));
  out.push(c.card("Versions by node", c.table(r.result.nodes || [], ["node_id", "version", "kind", "blessed", "fell_back", "previous", "detail", "booted_at", "reported_at"],
    { link: { key: "node_id", href: (n) => `#/node/${encodeURIComponent(n.node_id)}` } })));
  return c.h("div", {}, out);
}

async function memory(c) {
  const r = await c.tool("memory_list_threads");
  return c.h("div", {}, c.h("h1", {}, "Memory threads"), c.card("Threads", r.absent ? c.absent("Shared memory") : r.error ? c.failure(r)
    : c.table(Array.isArray(r.result) ? r.result : r.result.threads || [], null, { empty: "No memory threads yet." })));
}

export const PAGES = { overview, node, services, tasks, task, dlq, workflows, workflow, rollouts, memory };

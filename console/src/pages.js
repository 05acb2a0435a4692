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
  const [status, health, alerts] = await Promise.all([c.tool("cluster_status"), c.tool("cluster_health"), c.tool("list_alerts")]);
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
    const nodes = s.nodes.map((n) => ({ ...n, leader: n.leader ? "leader" : "", last_seen_age: n.last_seen_age < 0 ? "" : `${round(n.last_seen_age)} s` }));
    out.push(c.card("Nodes", c.table(nodes, NODE_COLS, { link: { key: "id", href: (r) => `#/node/${encodeURIComponent(r.id)}` } })));
  }
  if (alerts.absent) out.push(c.card("Alerts", c.absent("Alerts")));
  else if (alerts.error) out.push(c.card("Alerts", c.failure(alerts)));
  else {
    const rows = (alerts.result.alerts || []).map((a) => (typeof a === "object" ? a : { alert: a }));
    out.push(c.card("Alerts", c.table(rows, null, { empty: "No alerts." })));
  }
  if (c.has("sentinel_health")) {
    const sh = await c.tool("sentinel_health");
    out.push(c.card("Health scores (Sentinel)", sh.error ? c.failure(sh) : sentinelTable(c, sh.result)));
  }
  return c.h("div", {}, out);
}

function sentinelTable(c, data) {
  const rows = Array.isArray(data) ? data : data.nodes || Object.entries(data.scores || {}).map(([id, score]) => ({ id, score }));
  return c.table(rows.map((r) => ({ ...r, score: round(r.score, 2) })), null, { empty: "No scores yet." });
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

// Health charts: the Sentinel plugin's per-node score, factors, predictions and downsampled series.
async function health(c, id) {
  if (!c.has("sentinel_node")) return c.card("Health", c.absent("Health charts (Sentinel)"));
  const [now, hist] = await Promise.all([c.tool("sentinel_node", c.nodeArgs("sentinel_node", id)),
    c.has("sentinel_history") ? c.tool("sentinel_history", c.nodeArgs("sentinel_history", id)) : Promise.resolve({ absent: true })]);
  const kids = [];
  if (now.error) kids.push(c.failure(now));
  else {
    const d = now.result || {};
    kids.push(c.stats([["score", round(d.score, 2)], ["state", c.badge(d.state || d.status || "")]]));
    if (d.factors) kids.push(c.table(Array.isArray(d.factors) ? d.factors : Object.entries(d.factors).map(([k, v]) => ({ factor: k, value: typeof v === "object" ? JSON.stringify(v) : v })), null, { caption: "factors" }));
    if (d.predictions) kids.push(c.table(Array.isArray(d.predictions) ? d.predictions : Object.entries(d.predictions).map(([k, v]) => ({ prediction: k, value: typeof v === "object" ? JSON.stringify(v) : v })), null, { caption: "predictions" }));
  }
  if (!hist.absent && !hist.error) kids.push(...charts(c, hist.result));
  return c.card("Health", ...kids);
}

// A series document, as {series: {name: [[t, v], ...]}} or {t: [...], name: [...]}: one uPlot chart per series.
function charts(c, doc) {
  let series = doc && (doc.series || doc.points || doc);
  const out = [];
  if (Array.isArray(series) && series.length && typeof series[0] === "object" && !Array.isArray(series[0])) {
    const tkey = ["t", "ts", "time", "at", "timestamp"].find((k) => k in series[0]);
    if (!tkey) return out;
    const cols = { t: series.map((p) => p[tkey]) };
    for (const k of Object.keys(series[0])) if (k !== tkey && typeof series[0][k] === "number") cols[k] = series.map((p) => p[k]);
    series = cols;
  }
  if (!series || typeof series !== "object") return out;
  for (const [name, points] of Object.entries(series)) {
    let xs, ys;
    if (Array.isArray(points) && points.length && Array.isArray(points[0])) { xs = points.map((p) => p[0]); ys = points.map((p) => p[1]); }
    else if (Array.isArray(points) && Array.isArray(series.t || series.ts)) { if (name === "t" || name === "ts") continue; xs = series.t || series.ts; ys = points; }
    else continue;
    const el = c.h("figure", { class: "chart", "aria-label": `${name} over time` }, c.h("figcaption", { class: "muted" }, name));
    const width = Math.min(900, Math.max(260, (document.getElementById("main").clientWidth || 600) - 60));
    new c.uPlot({ width, height: 160, series: [{}, { label: name, stroke: "#1f4e8c", width: 2 }], axes: [{}, {}], legend: { show: false } }, [xs, ys], el);
    out.push(el);
  }
  return out;
}

async function services(c) {
  const out = [c.h("h1", {}, "Services")];
  if (!c.has("services_list") && !c.has("ha_status")) { out.push(c.card("Services", c.absent("Services and HA"))); return c.h("div", {}, out); }
  const [list, ha] = await Promise.all([c.tool("services_list"), c.tool("ha_status")]);
  const rows = list.result ? (Array.isArray(list.result) ? list.result : list.result.services || []) : [];
  out.push(c.card("Placement", list.absent ? c.absent("services_list") : list.error ? c.failure(list) : c.table(rows, null, { empty: "No services deployed." })));
  if (ha.absent) out.push(c.card("HA", c.absent("HA state")));
  else if (ha.error) out.push(c.card("HA", c.failure(ha)));
  else {
    const pairs = Array.isArray(ha.result) ? ha.result : ha.result.nodes || ha.result.pairs || [ha.result];
    out.push(c.card("HA state", c.table(pairs, null, {
      empty: "No HA partners.",
      actions: (r) => {
        const target = r.node_id || r.node || r.id || r.home;
        return [c.action("Take over", "ha_takeover", c.nodeArgs("ha_takeover", target), `Take over ${target}'s services on its partner?`),
          c.action("Give back", "ha_giveback", c.nodeArgs("ha_giveback", target), `Give ${target}'s services back to it?`)];
      },
    })));
  }
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

// The Cortex web console: one page, hash routes, data only through /api/tool/NAME (the same tools MCP sees).
// A page whose tools this cluster lacks says "not available on this cluster"; it lights up once a plugin
// offers them. Everything is built with DOM calls (never innerHTML), so cluster data cannot inject markup.
import uPlot from "uplot";

const S = { who: null, tools: {}, stream: null, lastOk: 0, busy: false, failing: false, timer: null };

// --- DOM ---------------------------------------------------------------------------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElementNS(tag.startsWith("svg:") ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml",
    tag.replace("svg:", ""));
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) { el.addEventListener(k.slice(2), v); el.dataset.live = "1"; }
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === undefined || kid === null || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const $ = (id) => document.getElementById(id);

// Bring the page on screen up to date with a freshly built copy, touching only what differs: a redraw every
// few seconds then keeps focus, scroll, text selection and the button under the pointer. Elements with
// listeners are kept when their action is the same (data-act) and replaced otherwise, so a button never acts
// on what used to be in its row; charts are replaced whole (a canvas's pixels cannot be patched).
function morph(old, neu) {
  if (old.nodeType !== neu.nodeType || old.nodeName !== neu.nodeName) return swap(old, neu);
  if (old.nodeType !== 1) { if (old.nodeValue !== neu.nodeValue) old.nodeValue = neu.nodeValue; return; }
  const live = old.dataset.live || neu.dataset.live;
  if (old.classList.contains("chart") || (live && !(old.dataset.act && old.dataset.act === neu.dataset.act))) return swap(old, neu);
  // style through the CSSOM only: setting the style attribute is an inline style the CSP blocks (and reports)
  for (const a of [...old.attributes]) if (a.name !== "style" && !neu.hasAttribute(a.name)) old.removeAttribute(a.name);
  for (const a of [...neu.attributes]) if (a.name !== "style" && old.getAttribute(a.name) !== a.value) old.setAttribute(a.name, a.value);
  if (old.style.cssText !== neu.style.cssText) old.style.cssText = neu.style.cssText;
  const a = [...old.childNodes], b = [...neu.childNodes];
  for (let i = 0; i < b.length; i++) {
    if (i < a.length) morph(a[i], b[i]);
    else old.append(b[i]);
  }
  for (let i = b.length; i < a.length; i++) { drop(a[i]); a[i].remove(); }
}
// A chart leaving the page is destroyed: uPlot keeps every plot it made in a module-wide set (and a listener on
// the window) until then, so charts redrawn every few seconds would pile up for as long as the page is open.
function drop(node) {
  if (node.nodeType !== 1) return;
  for (const el of [node, ...node.querySelectorAll("figure.chart")]) if (el.uplot) { el.uplot.destroy(); el.uplot = null; }
}
function swap(old, neu) { drop(old); old.replaceWith(neu); }
const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const ago = (t) => {
  if (!t) return "";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
};
const TONE = {
  alive: "ok", healthy: "ok", succeeded: "ok", done: "ok", completed: "ok", running: "info", leader: "info",
  serving: "ok", ok: "ok", active: "ok", true: "ok", suspect: "warn", degraded: "warn", queued: "warn",
  pending: "warn", stale: "warn", assigned: "warn", draining: "warn", retrying: "warn", paused: "warn", "taking-over": "warn",
  offline: "bad", failed: "bad", critical: "bad", unavailable: "bad", dead: "bad", cancelled: "bad", false: "bad",
  fenced: "bad", dlq: "bad", error: "bad", unhealthy: "bad", taken_over: "warn", giving_back: "warn",
};
const badge = (v) => h("span", { class: `badge ${TONE[String(v).toLowerCase()] || ""}` }, v === "" ? "-" : String(v));
function cell(key, v) {
  if (v === null || v === undefined) return "";
  if (/(^|_)(state|liveness|health|status|role|phase)$/.test(key) && typeof v !== "object") return badge(v);
  if (/(_at|^at|time|since|heartbeat|created|updated|started|finished)$/.test(key) && typeof v === "number" && v > 1e9)
    return h("span", { title: fmtTime(v) }, ago(v));
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v)) return v.map((x) => (typeof x === "object" ? JSON.stringify(x) : x)).join(", ");
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}
function table(rows, cols, opts = {}) {
  if (!rows || !rows.length) return h("p", { class: "muted" }, opts.empty || "Nothing here.");
  const keys = cols || Object.keys(rows[0]).filter((k) => typeof rows[0][k] !== "object" || rows[0][k] === null);
  const present = keys.filter((k) => rows.some((r) => r[k] !== undefined));
  return h("div", { class: "scroll" }, h("table", {},
    opts.caption ? h("caption", { class: "muted" }, opts.caption) : null,
    h("thead", {}, h("tr", {}, present.map((k) => h("th", { scope: "col" }, k.replaceAll("_", " "))),
      opts.actions ? h("th", { scope: "col" }, "actions") : null)),
    h("tbody", {}, rows.map((r) => h("tr", {}, present.map((k) => {
      const v = opts.link && k === opts.link.key ? h("a", { href: opts.link.href(r) }, String(r[k])) : cell(k, r[k]);
      return h("td", { class: typeof r[k] === "number" ? "num" : null }, v);
    }), opts.actions ? h("td", {}, h("div", { class: "actions" }, opts.actions(r))) : null)))));
}
const card = (title, ...kids) => h("section", { class: "card", "aria-label": title }, h("h2", {}, title), ...kids);
const stats = (pairs) => h("dl", { class: "stats" }, pairs.filter(Boolean).map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
const absent = (what) => h("p", { class: "absent" }, `${what}: not available on this cluster.`);
const failure = (r) => h("p", { class: "error", role: "alert" }, r.error);

// --- API -----------------------------------------------------------------------------------------------------
const API_TIMEOUT_MS = 25000; // a call the cluster cannot answer (no leader) must not freeze the page

async function api(path, body, headers = {}) {
  let res;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), API_TIMEOUT_MS);
  try {
    res = await fetch(path, body === undefined ? { credentials: "same-origin", headers, signal: abort.signal }
      : { method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json", ...headers }, body: JSON.stringify(body), signal: abort.signal });
  } catch (e) {
    if (abort.signal.aborted) return { status: 504, data: { error: `no answer within ${API_TIMEOUT_MS / 1000} s (is there a leader?); retrying with the next update` } };
    nodeDown();
    return { status: 0, data: { error: "this node does not answer; retrying" } };
  } finally {
    clearTimeout(timer);
  }
  nodeUp();
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (res.status === 401 && data.login) showLogin(data.error);
  return { status: res.status, data };
}
const has = (name) => Object.prototype.hasOwnProperty.call(S.tools, name);
async function tool(name, args = {}) {
  if (!has(name)) return { absent: true, error: `${name}: not available on this cluster` };
  const r = await api(`/api/tool/${name}`, args);
  if (r.status === 200) return { result: r.data.result };
  // absent: the plugin offering it was stopped since the page loaded; the page says "not available" again
  return { error: r.data.error || `HTTP ${r.status}`, status: r.status, absent: r.status === 404 && r.data.absent === true };
}
// The argument naming a node, as this tool spells it (node_id, node, ...): tools from other plugins may differ.
function nodeArgs(name, id) {
  const params = (S.tools[name] && S.tools[name].params) || [];
  const key = ["node_id", "node", "id", "name"].find((k) => params.includes(k)) || "node_id";
  return { [key]: id };
}
const newKey = () => (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`);

// An operator action: refused at once when the role is short (the server says which role it needs), else
// confirmed in a dialog and sent with one idempotency key however often the network makes us retry.
function action(label, name, args, question) {
  if (!has(name)) return null;
  return h("button", {
    class: S.tools[name].destructive ? "danger" : "secondary", type: "button", "data-act": `${name} ${JSON.stringify(args)}`,
    onclick: async (ev) => {
      const btn = ev.currentTarget;
      const out = $("action-result");
      const say = (text, bad) => { out.textContent = text; out.className = bad ? "error" : "muted"; };
      if (!S.tools[name].allowed) {
        const r = await api(`/api/tool/${name}`, args);
        return say(r.data.error, true);
      }
      if (!(await confirmDialog(question))) return;
      btn.disabled = true;
      const key = newKey();
      let r;
      for (let i = 0; i < 4; i++) {
        r = await api(`/api/tool/${name}`, args, { "X-Cortex-Confirm": "yes", "Idempotency-Key": key });
        if (r.status !== 0) break;
        await new Promise((ok) => setTimeout(ok, 1000 * (i + 1)));
      }
      btn.disabled = false;
      // a move the cluster refused (no ready partner, ...) is not "done": each refusal says why
      const refused = (r.status === 200 && r.data.result && Array.isArray(r.data.result.refused)) ? r.data.result.refused : [];
      const why = refused.map((x) => `${x.name}: ${x.why}`).join("; ");
      say(r.status !== 200 ? r.data.error : refused.length ? `${label}: refused for ${why}` : `${label}: done`, r.status !== 200 || refused.length > 0);
      refresh();
    },
  }, label);
}
function confirmDialog(text) {
  const dlg = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
    dlg.showModal();
    $("confirm-ok").focus();
  });
}

// --- node liveness of this console's own agent ---------------------------------------------------------------
function nodeDown() {
  if (S.failing) return;
  S.failing = true;
  const b = $("banner");
  b.hidden = false;
  b.className = "banner bad";
  b.textContent = `${S.who ? S.who.node_id : "This node"} stopped answering; retrying. What is shown is from ${new Date(S.lastOk || Date.now()).toLocaleTimeString()}.`;
}
function nodeUp() {
  S.lastOk = Date.now();
  if (!S.failing) return;
  S.failing = false;
  $("banner").hidden = true;
}

// --- pages ---------------------------------------------------------------------------------------------------
import { PAGES } from "./pages.js";

function route() {
  const parts = (location.hash.replace(/^#\/?/, "") || "").split("/").map(decodeURIComponent);
  return { page: parts[0] || "overview", arg: parts.slice(1).join("/") };
}
async function render(first) {
  if (!S.who || $("confirm").open) return;
  if (S.busy) { S.again = S.again === "first" || first ? "first" : "refresh"; return; } // drawn right after
  S.busy = true;
  const started = location.hash;
  try {
    const { page, arg } = route();
    const fn = PAGES[page] || PAGES.overview;
    for (const a of document.querySelectorAll("#nav a")) {
      const target = a.getAttribute("href").replace(/^#\/?/, "") || "overview";
      if (target === page || (page === "node" && target === "overview") || (page === "task" && target === "tasks")
        || (page === "workflow" && target === "workflows")) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    const ctx = { h, table, card, stats, absent, failure, tool, has, action, badge, nodeArgs, cell, uPlot, fmtTime, ago, who: S.who };
    const content = await fn(ctx, arg);
    if (S.failing && !first) return drop(content); // keep what is on screen; the banner says it is old
    if (location.hash !== started) return drop(content); // the reader moved on meanwhile; the queued draw shows that page
    const main = $("main");
    const note = $("action-result");
    const keep = note && !first ? [note.textContent, note.className] : ["", "muted"];
    const fresh = h("main", {}, h("p", { id: "action-result", class: keep[1], role: "status", "aria-live": "polite" }, keep[0]), content);
    if (first || !main.firstChild || main.firstChild.id !== "action-result") { drop(main); main.replaceChildren(...fresh.childNodes); }
    else morph2(main, fresh);
    main.dataset.renders = String(Number(main.dataset.renders || 0) + 1); // how often drawn (the tests watch it)
    document.title = `${main.querySelector("h1") ? main.querySelector("h1").textContent : "Cortex"} · Cortex console`;
    if (first) main.focus({ preventScroll: true });
    if (!performance.getEntriesByName("cortex-first-render").length) performance.mark("cortex-first-render"); // bench/console.py
  } finally {
    S.busy = false;
    if (S.again) { const again = S.again; S.again = null; render(again === "first"); }
  }
}
function refresh() { render(false); }
// main itself stays (its id, tabindex and focus); only its children are brought up to date
function morph2(main, fresh) {
  const a = [...main.childNodes], b = [...fresh.childNodes];
  for (let i = 0; i < b.length; i++) { if (i < a.length) morph(a[i], b[i]); else main.append(b[i]); }
  for (let i = b.length; i < a.length; i++) { drop(a[i]); a[i].remove(); }
}

// --- sign-in ------------------------------------------------------------------------------------------------
function showLogin(reason) {
  S.who = null;
  if (S.stream) { S.stream.close(); S.stream = null; }
  $("who").textContent = "";
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off", required: true,
    "aria-describedby": "token-help" });
  const err = h("p", { id: "login-error", class: reason ? "error" : "muted", role: "alert" }, reason || "");
  drop($("main"));
  $("main").replaceChildren(h("section", { class: "card login", "aria-label": "Sign in" },
    h("h1", {}, "Sign in to the Cortex console"),
    err,
    h("p", { id: "token-help" }, "Run ", h("code", {}, "cortex console url"), " on the node and open the link it prints, or paste the link's token (or the node's console token) here."),
    h("form", { onsubmit: async (ev) => {
      ev.preventDefault();
      const r = await api("/api/login", { token: input.value });
      if (r.status === 200) { history.replaceState(null, "", "/"); start(); } else { err.textContent = r.data.error; err.className = "error"; }
    } }, h("label", { for: "token" }, "Login token or console token"), input,
    h("p", {}, h("button", { type: "submit" }, "Sign in")))));
  input.focus();
}

async function start() {
  const params = new URLSearchParams(location.search);
  if (params.get("login_error")) {
    const reason = params.get("login_error");
    history.replaceState(null, "", "/" + location.hash);
    return showLogin(reason);
  }
  const r = await api("/api/whoami");
  if (r.status !== 200) { if (r.status !== 401) showLogin(r.data.error || "the console does not answer"); return; }
  S.who = r.data;
  S.tools = Object.fromEntries(r.data.tools.map((t) => [t.name, t]));
  $("who").replaceChildren(`${r.data.node_id} · ${r.data.role}`, h("button", { type: "button", class: "secondary", onclick: async () => {
    await api("/api/logout", {});
    showLogin("signed out");
  } }, "Sign out"));
  await render(true);
  listen();
}

// Live updates. The browser reconnects a dropped stream by itself; one it gave up on (the node answered with
// an error, e.g. after a restart forgot the session) is retried here, and a refused session shows the login.
function listen() {
  if (S.stream) S.stream.close();
  S.stream = new EventSource("/api/events");
  S.stream.addEventListener("refresh", () => { nodeUp(); refresh(); });
  S.stream.onopen = () => nodeUp();
  S.stream.onerror = () => {
    nodeDown();
    if (S.stream.readyState !== EventSource.CLOSED) return;
    setTimeout(async () => {
      const r = await api("/api/whoami");
      if (r.status === 200) listen();
      else if (r.status === 0 || r.status >= 500) S.stream.onerror();
    }, 3000);
  };
}

window.addEventListener("hashchange", () => render(true));
start();

// The official MCP TypeScript SDK's client against a Cortex MCP server, stdio or streamable HTTP.
//
//   node client.mjs CONFIG_JSON
//
// CONFIG_JSON: {"mode": "stdio", "command": ..., "args": [...], "env": {...}} or
//              {"mode": "http", "url": ..., "token": ...}
// Prints one line per check on stdout: {"check": NAME, "ok": true|false, "detail": ...}; the line
// {"waiting": "list_changed"} asks the driver (test_mcp_conformance.py) to change the tool list, which it
// does by stopping a plugin; the last line is {"done": true}. The SDK validates every structuredContent
// against the tool's outputSchema itself (callTool), so a result that breaks its schema fails the call.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ToolListChangedNotificationSchema } from "@modelcontextprotocol/sdk/types.js";

const config = JSON.parse(process.argv[2]);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const check = (name, ok, detail = "") => say({ check: name, ok: Boolean(ok), detail: String(detail).slice(0, 500) });

function transport(token) {
  if (config.mode === "stdio") {
    return new StdioClientTransport({ command: config.command, args: config.args, env: config.env, stderr: "inherit" });
  }
  return new StreamableHTTPClientTransport(new URL(config.url), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
}

async function attempt(name, fn) {
  try {
    await fn();
  } catch (err) {
    check(name, false, `${err?.name}: ${err?.message}`);
  }
}

const client = new Client({ name: "cortex-conformance", version: "1.0.0" });
let changed = 0;
client.setNotificationHandler(ToolListChangedNotificationSchema, () => { changed += 1; });
await client.connect(transport(config.token));
check("initialize", client.getServerVersion()?.name === "cortex", JSON.stringify(client.getServerVersion()));
check("capabilities", client.getServerCapabilities()?.tools?.listChanged === true,
  JSON.stringify(client.getServerCapabilities()));

let tools = [];
await attempt("tools/list", async () => {
  tools = (await client.listTools()).tools;
  const names = tools.map((t) => t.name);
  check("tools/list", names.includes("kv_get") && names.includes("kv_put"), names.join(","));
  const without = tools.filter((t) => !t.outputSchema || t.outputSchema.type !== "object").map((t) => t.name);
  check("tools/outputSchema", without.length === 0, without.join(","));
});

await attempt("tools/call write", async () => {
  const put = await client.callTool({ name: "kv_put", arguments: { key: "conformance/k", value: "from-ts" } });
  check("tools/call write", !put.isError && put.structuredContent?.key === "conformance/k", JSON.stringify(put));
});
await attempt("tools/call read", async () => {
  const got = await client.callTool({ name: "kv_get", arguments: { key: "conformance/k" } });
  const text = got.content?.find((c) => c.type === "text")?.text ?? "";
  check("tools/call read", !got.isError && got.structuredContent?.value === "from-ts"
    && JSON.parse(text).value === "from-ts", JSON.stringify(got));
});
await attempt("tools/call list result", async () => {
  const listed = await client.callTool({ name: "kv_list", arguments: { prefix: "conformance/" } });
  check("tools/call list result", Array.isArray(listed.structuredContent?.result), JSON.stringify(listed));
});

await attempt("resources/list", async () => {
  const resources = (await client.listResources()).resources;
  const state = resources.find((r) => r.uri === "cluster://state");
  check("resources/list", Boolean(state), resources.map((r) => r.uri).join(","));
  const read = await client.readResource({ uri: "cluster://state" });
  const doc = JSON.parse(read.contents[0].text);
  check("resources/read", read.contents[0].uri === "cluster://state" && typeof doc.leader === "string",
    read.contents[0].text.slice(0, 200));
});

// resources/templates/list: asserted when the server answers it; "absent" when it says the method is unknown.
await attempt("resources/templates/list", async () => {
  try {
    const templates = await client.listResourceTemplates();
    check("resources/templates/list", Array.isArray(templates.resourceTemplates), JSON.stringify(templates));
  } catch (err) {
    check("resources/templates/list", err?.code === -32601, `absent: ${err?.message}`);
  }
});

await attempt("errors/unknown tool", async () => {
  try {
    const r = await client.callTool({ name: "no_such_tool", arguments: {} });
    check("errors/unknown tool", r.isError && /unknown tool/.test(r.content?.[0]?.text), JSON.stringify(r));
  } catch (err) {
    check("errors/unknown tool", /unknown tool|not found/i.test(err?.message), err?.message);
  }
});
await attempt("errors/bad arguments", async () => {
  const r = await client.callTool({ name: "kv_get", arguments: { key: 5 } });
  check("errors/bad arguments", r.isError && /invalid arguments/.test(r.content?.[0]?.text), JSON.stringify(r));
});

if (config.mode === "http") {
  await attempt("errors/wrong token", async () => {
    const other = new Client({ name: "cortex-conformance-bad-token", version: "1.0.0" });
    try {
      await other.connect(transport("not-the-token"));
      check("errors/wrong token", false, "connected with a wrong token");
    } catch (err) {
      check("errors/wrong token", err?.code === 401 || /401|nauthorized/.test(err?.message), err?.message);
    }
  });
}

// list_changed: the driver stops a plugin once we say we are waiting.
say({ waiting: "list_changed" });
const deadline = Date.now() + 60000;
while (changed === 0 && Date.now() < deadline) {
  await new Promise((resolve) => setTimeout(resolve, 50));
}
check("notifications/tools/list_changed", changed > 0, `${changed} notification(s)`);
await attempt("tools/list after change", async () => {
  const after = (await client.listTools()).tools.map((t) => t.name);
  check("tools/list after change", !after.includes("list_skills"), after.join(","));
});
await client.close();
say({ done: true });
process.exit(0);

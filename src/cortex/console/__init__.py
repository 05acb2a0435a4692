"""The web console served by every agent: the cluster at a glance in a browser.

- plugin.py: the `console` plugin (options, the login tool, start/stop of the HTTP server);
- auth.py: one-time login tokens and browser sessions (pure, no I/O);
- server.py: the HTTP server (static assets, the tool-call API, server-sent events), loaded on first use;
- cli.py: `cortex console url|status`.

Every page reads its data through the plugin host's `call_tool`, the same tools and role checks MCP clients
see; a page whose tools this cluster lacks says so instead of failing. The front end's sources are in the
top-level `console/` directory (bundled by esbuild into `static/`).
"""

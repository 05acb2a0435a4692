// Bundles the console's front end into src/cortex/console/static (what the wheel carries and the agent serves).
// `npm ci && npm run build`; bootstrap.sh and the wheel's build hook run it. No CDN at run time: everything
// the page loads comes from this bundle.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

const out = new URL("../src/cortex/console/static/", import.meta.url).pathname;
mkdirSync(out, { recursive: true });
await build({
  entryPoints: ["src/app.js", "src/app.css"],
  bundle: true,
  minify: true,
  target: ["es2020"],
  outdir: out,
  legalComments: "none",
  logLevel: "warning",
});
copyFileSync(new URL("src/index.html", import.meta.url), out + "index.html");
copyFileSync(new URL("src/favicon.svg", import.meta.url), out + "favicon.svg");

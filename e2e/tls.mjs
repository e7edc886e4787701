// Browser test of the chat page over HTTPS: `netkit serve --tls-self-signed`,
// Debian's chromium trusting exactly that certificate's key (by its SPKI hash,
// not a blanket ignore). Checks the hardening headers, that two pages chat over
// wss:// under the Content-Security-Policy, and that the console stays clean
// (a CSP violation is logged there as an error).
//
// usage: node e2e/tls.mjs [path/to/netkit]   (default: target/debug/netkit)
import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { T, fail, openPage, say, seeMessage, startServer } from "./lib.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.resolve(process.argv[2] || path.join(root, "target/debug/netkit"));
const outDir = path.join(root, "target/e2e");
mkdirSync(outDir, { recursive: true });

// Base64 SHA-256 of the certificate's SubjectPublicKeyInfo, the form chromium's
// --ignore-certificate-errors-spki-list takes.
function spkiHash(certPem) {
  const spki = new X509Certificate(certPem).publicKey.export({ type: "spki", format: "der" });
  return createHash("sha256").update(spki).digest("base64");
}

// Security headers every response carries; HSTS because this is TLS. The page
// gets the page's policy; anything else (script, API) one that loads nothing.
function checkHeaders(h, what, page) {
  const csp = h["content-security-policy"] ?? fail(`${what}: no Content-Security-Policy`);
  for (const part of ["frame-ancestors 'none'", "default-src 'none'", ...(page ? ["script-src 'self'"] : [])]) {
    if (!csp.includes(part)) fail(`${what}: CSP lacks ${part}: ${csp}`);
  }
  if (/unsafe-inline|unsafe-eval/.test(csp)) fail(`${what}: CSP allows inline or eval: ${csp}`);
  if (page && !/connect-src 'self' wss:\/\/127\.0\.0\.1:\d+/.test(csp)) fail(`${what}: connect-src is not the page's own wss origin: ${csp}`);
  if (!page && csp !== "default-src 'none'; frame-ancestors 'none'") fail(`${what}: not the policy that loads nothing: ${csp}`);
  if (h["x-content-type-options"] !== "nosniff") fail(`${what}: X-Content-Type-Options is ${h["x-content-type-options"]}`);
  if (!h["referrer-policy"]) fail(`${what}: no Referrer-Policy`);
  if (!/max-age=\d+/.test(h["strict-transport-security"] ?? "")) fail(`${what}: no HSTS (${h["strict-transport-security"]})`);
}

const dataDir = mkdtempSync(path.join(os.tmpdir(), "netkit-e2e-tls-"));
const srv = await startServer(bin, dataDir, "127.0.0.1:0", ["--tls-self-signed"]);
const url = `https://${srv.http}/`;
let browser;
let ok = false;
try {
  const hash = spkiHash(readFileSync(path.join(dataDir, "tls", "cert.pem")));
  // The server logs the same hash (its stderr may arrive after the ready line).
  await new Promise((resolve, reject) => {
    const check = () => { if (srv.log().includes(`spki_sha256="${hash}"`)) { srv.child.stderr.off("data", check); resolve(); } };
    srv.child.stderr.on("data", check);
    check();
    setTimeout(() => reject(new Error(`the server did not log the SPKI hash ${hash}; log:\n${srv.log()}`)), T);
  });
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      `--ignore-certificate-errors-spki-list=${hash}`],
  });

  // Without the pin the browser refuses the certificate: the pin is what lets it in.
  {
    const other = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"] });
    const p = await (await other.newContext()).newPage();
    const err = await p.goto(url).then(() => null, (e) => e);
    await other.close();
    if (!err || !/ERR_CERT/.test(err.message)) fail(`an unpinned browser loaded the self-signed page (${err?.message})`);
  }

  const consoleErrors = [];
  const sockets = [];
  const responses = new Map(); // URL -> headers, as the browser received them
  const watch = (page) => {
    // The browser's own /favicon.ico request (the page names no icon) 404s; that
    // one is not the page's doing, every other error is.
    page.on("console", (m) => {
      const at = m.location().url;
      if (m.type() === "error" && !at.endsWith("/favicon.ico")) consoleErrors.push(`${m.text()} (${at})`);
    });
    page.on("websocket", (ws) => sockets.push(ws.url()));
    page.on("response", async (r) => responses.set(r.url(), await r.allHeaders()));
    return page;
  };
  // openPage makes its own context; watch the pages it opens through the context hook.
  const origNewContext = browser.newContext.bind(browser);
  browser.newContext = async (o) => {
    const ctx = await origNewContext(o);
    ctx.on("page", watch);
    return ctx;
  };

  const alice = await openPage(browser, url, "alice");
  for (const p of ["", "app.js"]) {
    const h = responses.get(new URL(p, url).toString()) ?? fail(`the browser never loaded /${p}`);
    checkHeaders(h, `GET /${p}`, p === "");
  }
  // A same-origin fetch from the page (allowed by connect-src 'self') sees the API's headers.
  const api = await alice.evaluate(async () => {
    const r = await fetch("/healthz");
    return Object.fromEntries(r.headers.entries());
  });
  checkHeaders(api, "fetch /healthz", false);

  const bob = await openPage(browser, url, "bob");
  await alice.locator("#member-list li", { hasText: "bob" }).waitFor({ timeout: T });
  await say(alice, "hello over tls");
  await seeMessage(bob, "hello over tls");
  await say(bob, "and back over wss");
  await seeMessage(alice, "and back over wss");
  if (sockets.length === 0) fail("no WebSocket was opened");
  for (const s of sockets) if (!s.startsWith("wss://")) fail(`a WebSocket went to ${s}, not wss://`);
  if (await alice.evaluate(() => location.protocol) !== "https:") fail("the page is not on https:");
  await alice.screenshot({ path: path.join(outDir, "tls-alice.png") });
  if (consoleErrors.length) fail(`console errors (CSP violations show here):\n${consoleErrors.join("\n")}`);
  ok = true;
  console.log(`e2e tls: ok (SPKI ${hash}, ${sockets.length} wss sockets, headers checked, console clean)`);
} finally {
  if (browser) await browser.close();
  srv.child.kill("SIGTERM");
  if (ok) rmSync(dataDir, { recursive: true, force: true });
  else console.error(`server log:\n${srv.log()}`);
}

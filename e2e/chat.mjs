// Browser test of the chat page: Debian's chromium, headless, driven by
// playwright-core. Two pages and one TCP line client exchange messages in a
// room; one page reloads and gets its history; screenshots go to target/e2e/.
//
// usage: node e2e/chat.mjs [path/to/netkit]   (default: target/debug/netkit)
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.resolve(process.argv[2] || path.join(root, "target/debug/netkit"));
const outDir = path.join(root, "target/e2e");
mkdirSync(outDir, { recursive: true });
const T = 15000;

function fail(msg) {
  throw new Error(msg);
}

// Start `netkit serve` on free ports; read the bound addresses from its log.
function startServer(dataDir, http = "127.0.0.1:0") {
  const child = spawn(
    bin,
    ["serve", "--http", http, "--chat", "127.0.0.1:0", "--tcp", "off", "--udp", "off", "--drop", "off", "--data-dir", dataDir],
    { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, NO_COLOR: "1", RUST_LOG: "info" } },
  );
  return new Promise((resolve, reject) => {
    let http = null, chat = null, buf = "";
    const timer = setTimeout(() => reject(new Error("netkit serve did not log its addresses")), T);
    child.on("exit", (code) => reject(new Error(`netkit serve exited early (${code})`)));
    child.stderr.on("data", (d) => {
      buf += d.toString();
      const h = buf.match(/listening on http:\/\/(\S+)/);
      const c = buf.match(/chat: listening on (\S+)/);
      if (h) http = h[1];
      if (c) chat = c[1];
      if (http && chat) {
        clearTimeout(timer);
        resolve({ child, http, chat });
      }
    });
  });
}

// A TCP line client with a "wait for a line containing X" helper.
function lineClient(addr) {
  const [host, port] = [addr.slice(0, addr.lastIndexOf(":")), Number(addr.slice(addr.lastIndexOf(":") + 1))];
  const sock = net.connect(port, host);
  const lines = [];
  const waiters = [];
  let buf = "";
  sock.on("data", (d) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      lines.push(line);
      for (const w of [...waiters]) if (line.includes(w.pat)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(line); }
    }
  });
  return {
    send: (l) => sock.write(l + "\n"),
    waitFor: (pat) => {
      const seen = lines.find((l) => l.includes(pat));
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const w = { pat, resolve };
        waiters.push(w);
        setTimeout(() => reject(new Error(`TCP client never got a line containing ${JSON.stringify(pat)}; got:\n${lines.join("\n")}`)), T);
      });
    },
    close: () => sock.destroy(),
  };
}

async function openPage(browser, url, nick) {
  const ctx = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await ctx.newPage();
  page.on("dialog", (d) => fail(`a dialog opened (${d.message()}): text was run as HTML`));
  page.on("pageerror", (e) => fail(`page error: ${e.message}`));
  await page.goto(url);
  await page.locator("#status", { hasText: "online as" }).waitFor({ timeout: T });
  await page.locator("#room-title", { hasText: "#lobby" }).waitFor({ timeout: T });
  // Change nick with the keyboard only.
  await page.locator("#nick-input").fill(nick);
  await page.locator("#nick-input").press("Enter");
  await page.locator("#status", { hasText: `online as ${nick}` }).waitFor({ timeout: T });
  return page;
}

async function say(page, text) {
  await page.locator("#say-input").fill(text);
  await page.keyboard.press("Enter");
}

async function seeMessage(page, text) {
  await page.locator("#messages li", { hasText: text }).first().waitFor({ timeout: T });
}

const dataDir = mkdtempSync(path.join(os.tmpdir(), "netkit-e2e-"));
let srv = await startServer(dataDir);
const url = `http://${srv.http}/`;
let browser;
let ok = false;
try {
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    // playwright gives the browser a fresh temporary profile (--user-data-dir).
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const alice = await openPage(browser, url, "alice");
  const bob = await openPage(browser, url, "bob");
  await alice.locator("#member-list li", { hasText: "bob" }).waitFor({ timeout: T });
  // The cluster panel (GET /api/cluster, polled every 5 s) lists this node and its users.
  await alice.locator("#cluster-list li.self", { hasText: "bob" }).waitFor({ timeout: T });

  const carol = lineClient(srv.chat);
  await carol.waitFor("-- welcome");
  carol.send("/nick carol");
  carol.send("/join lobby");
  await carol.waitFor("-- joined #lobby");
  await alice.locator("#messages li", { hasText: "carol joined" }).waitFor({ timeout: T });

  await say(alice, "hello from alice");
  await seeMessage(bob, "hello from alice");
  await carol.waitFor("<alice> hello from alice");

  carol.send("hi from carol on tcp");
  await seeMessage(alice, "hi from carol on tcp");
  await seeMessage(bob, "hi from carol on tcp");

  const xss = "<img src=x onerror=alert(1)>";
  await say(bob, xss);
  await seeMessage(alice, xss);
  if ((await alice.locator("#messages img").count()) !== 0) fail("a message was rendered as HTML");
  await carol.waitFor(`<bob> ${xss}`);

  await say(bob, "/me waves");
  await seeMessage(alice, "waves");
  await say(bob, "/msg alice a secret for alice");
  await alice.locator("#room-list button", { hasText: "@bob" }).waitFor({ timeout: T });
  carol.send("/msg bob psst from carol");
  await bob.locator("#room-list button", { hasText: "@carol" }).waitFor({ timeout: T });

  // Reload: the page rejoins and gets the room's history.
  await alice.reload();
  await alice.locator("#status", { hasText: "online as alice" }).waitFor({ timeout: T });
  await seeMessage(alice, "hello from alice");
  await seeMessage(alice, "hi from carol on tcp");
  await seeMessage(alice, xss);
  const times = await alice.locator("#messages li time").count();
  if (times < 3) fail("history messages have no time");
  // Live again after the reload.
  await say(alice, "back after reload");
  await seeMessage(bob, "back after reload");
  await carol.waitFor("<alice> back after reload");

  // Server restart on the same port: the pages reconnect with backoff and
  // resume after the last id they saw — no message lost, none twice.
  carol.close();
  const exited = new Promise((r) => srv.child.once("exit", r));
  srv.child.kill("SIGTERM");
  await exited;
  await alice.locator("#status", { hasText: "offline" }).waitFor({ timeout: T });
  srv = await startServer(dataDir, srv.http);
  await alice.locator("#status", { hasText: "online as alice" }).waitFor({ timeout: 30000 });
  await bob.locator("#status", { hasText: "online as bob" }).waitFor({ timeout: 30000 });
  const dave = lineClient(srv.chat);
  await dave.waitFor("-- welcome");
  dave.send("/join lobby");
  await dave.waitFor("-- joined #lobby");
  dave.send("after the restart");
  await seeMessage(alice, "after the restart");
  await seeMessage(bob, "after the restart");
  for (const [page, text] of [[alice, "after the restart"], [bob, "hello from alice"], [bob, "back after reload"]]) {
    const n = await page.locator("#messages li.msg", { hasText: text }).count();
    if (n !== 1) fail(`${JSON.stringify(text)} shown ${n} times after reconnecting`);
  }
  dave.close();

  await alice.screenshot({ path: path.join(outDir, "chat.png"), fullPage: true });
  await bob.setViewportSize({ width: 390, height: 760 });
  await bob.screenshot({ path: path.join(outDir, "chat-phone.png"), fullPage: true });
  ok = true;
  console.log(`e2e: ok — screenshots in ${path.relative(root, outDir)}/chat.png and chat-phone.png`);
} finally {
  if (browser) await browser.close();
  srv.child.kill("SIGTERM");
  rmSync(dataDir, { recursive: true, force: true });
}
process.exit(ok ? 0 : 1);

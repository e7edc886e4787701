// Helpers shared by the browser tests: start `netkit serve`, a TCP line
// client, a chat page in headless chromium.
import { spawn } from "node:child_process";
import net from "node:net";
import { chromium } from "playwright-core";

export const T = 15000;

export function fail(msg) {
  throw new Error(msg);
}

// Start `netkit serve` (chat and HTTP on free ports, other doors off, plus
// `extra` flags) with --ready-json; the bound addresses come from the one
// ready line it prints on stdout. `gossip` is set when the node is in a cluster;
// `log()` returns what the server has written to stderr so far.
export function startServer(bin, dataDir, http = "127.0.0.1:0", extra = []) {
  const child = spawn(
    bin,
    ["--ready-json", "serve", "--http", http, "--chat", "127.0.0.1:0", "--tcp", "off", "--udp", "off", "--drop", "off", "--relay", "off", "--data-dir", dataDir, ...extra],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "1", RUST_LOG: "info" } },
  );
  let log = "";
  child.stderr.on("data", (d) => { log += d.toString(); });
  return new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`netkit serve printed no ready line; log:\n${log}`)), T);
    child.on("exit", (code) => reject(new Error(`netkit serve exited early (${code}); log:\n${log}`)));
    child.stdout.on("data", (d) => {
      out += d.toString();
      const end = out.indexOf("\n");
      if (end < 0) return;
      const ready = JSON.parse(out.slice(0, end));
      if (ready.ready !== true) return reject(new Error(`not a ready line: ${out.slice(0, end)}`));
      clearTimeout(timer);
      child.stdout.removeAllListeners("data");
      child.stdout.resume(); // keep draining anything printed later
      resolve({ child, http: ready.http, chat: ready.chat, gossip: ready.cluster ?? null, log: () => log });
    });
  });
}

// A TCP line client with a "wait for a line containing X" helper.
export function lineClient(addr) {
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

// A line client that has been welcomed, taken `nick` (if given) and joined `room`.
export async function lineUser(addr, room, nick) {
  const c = lineClient(addr);
  await c.waitFor("-- welcome");
  if (nick) c.send(`/nick ${nick}`);
  c.send(`/join ${room}`);
  await c.waitFor(`-- joined #${room}`);
  return c;
}

export async function openPage(browser, url, nick) {
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

export async function say(page, text) {
  await page.locator("#say-input").fill(text);
  await page.keyboard.press("Enter");
}

export async function seeMessage(page, text) {
  await page.locator("#messages li", { hasText: text }).first().waitFor({ timeout: T });
}

// Debian's chromium, headless, with a fresh temporary profile.
export function launchBrowser() {
  return chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

// Browser test of the chat page: Debian's chromium, headless, driven by
// playwright-core. Two pages and one TCP line client exchange messages and a
// file in a room; the room's operator kicks the line client from the member
// list; one page reloads and gets its history; screenshots go to
// target/e2e/.
//
// usage: node e2e/chat.mjs [path/to/netkit]   (default: target/debug/netkit)
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { T, fail, launchBrowser, lineUser, openPage, say, seeMessage, startServer } from "./lib.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.resolve(process.argv[2] || path.join(root, "target/debug/netkit"));
const outDir = path.join(root, "target/e2e");
mkdirSync(outDir, { recursive: true });

const dataDir = mkdtempSync(path.join(os.tmpdir(), "netkit-e2e-"));
let srv = await startServer(bin, dataDir);
const url = `http://${srv.http}/`;
let browser;
let ok = false;
try {
  browser = await launchBrowser();
  const alice = await openPage(browser, url, "alice");
  const bob = await openPage(browser, url, "bob");
  await alice.locator("#member-list li", { hasText: "bob" }).waitFor({ timeout: T });
  // The cluster panel (GET /api/cluster, polled every 5 s) lists this node and its users.
  await alice.locator("#cluster-list li.self", { hasText: "bob" }).waitFor({ timeout: T });

  const carol = await lineUser(srv.chat, "lobby", "carol");
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

  // A file shared through the page's file input reaches the other page as a
  // file message (icon, name, size, link) and the line client as a `shared`
  // line; the download is byte for byte the upload, its ETag the BLAKE3.
  const fileName = "notes <b>1.txt";
  const fileBody = Buffer.from("line one\nline two\n".repeat(500));
  await alice.setInputFiles("#file-input", { name: fileName, mimeType: "text/plain", buffer: fileBody });
  const link = bob.locator("#messages li.file a", { hasText: fileName });
  await link.waitFor({ timeout: T });
  await carol.waitFor(`<alice> shared ${fileName} (9.0 kB)`);
  if ((await bob.locator("#messages b").count()) !== 0) fail("a file name was rendered as HTML");
  const got = await bob.request.get(await link.getAttribute("href"));
  if (!Buffer.from(await got.body()).equals(fileBody)) fail("the downloaded file differs from the upload");
  if (!/^attachment;/.test(got.headers()["content-disposition"] || "")) fail("a shared file is not an attachment");
  const msgs = await (await bob.request.get(url + "api/rooms/lobby/messages")).json();
  const shared = msgs.messages.find((m) => m.file && m.file.name === fileName);
  if (!shared || got.headers()["etag"] !== `"${shared.file.blake3}"`) fail("the ETag is not the file's BLAKE3");

  // An image dropped on the chat (drag and drop, as a user does from a file
  // manager) is shared the same way, and the other page shows the server's
  // thumbnail (320 px wide for a 400×300 picture) under the strict CSP.
  await alice.evaluate(async () => {
    const c = document.createElement("canvas");
    c.width = 400; c.height = 300;
    const g = c.getContext("2d");
    g.fillStyle = "#3a7"; g.fillRect(0, 0, 400, 300);
    g.fillStyle = "#fff"; g.fillRect(50, 50, 100, 100);
    const blob = await new Promise((r) => c.toBlob(r, "image/png"));
    const dt = new DataTransfer();
    dt.items.add(new File([blob], "picture.png", { type: "image/png" }));
    const chat = document.getElementById("chat");
    chat.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
    chat.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
  });
  const thumb = bob.locator("#messages li.file", { hasText: "picture.png" }).locator("img.file-thumb");
  await thumb.waitFor({ timeout: T });
  await bob.waitForFunction(() => {
    const img = document.querySelector("#messages li.file img.file-thumb");
    return img && img.complete && img.naturalWidth > 0;
  }, null, { timeout: T });
  const dims = await thumb.evaluate((img) => [img.naturalWidth, img.naturalHeight]);
  if (dims[0] !== 320 || dims[1] !== 240) fail(`the thumbnail is ${dims.join("×")}, not 320×240`);
  await carol.waitFor("<alice> shared picture.png (");

  await say(bob, "/me waves");
  await seeMessage(alice, "waves");
  await say(bob, "/msg alice a secret for alice");
  await alice.locator("#room-list button", { hasText: "@bob" }).waitFor({ timeout: T });
  carol.send("/msg bob psst from carol");
  await bob.locator("#room-list button", { hasText: "@carol" }).waitFor({ timeout: T });

  // Moderation: alice made the room, so she is its operator and her member
  // list has a kick button; bob's has none. Kicking the line user puts it
  // out with a notice everyone sees; it may join again.
  await alice.locator("#member-list li", { hasText: "op" }).filter({ hasText: "alice" }).waitFor({ timeout: T });
  if ((await bob.locator("#member-list button.member-kick").count()) !== 0) fail("a non-operator sees kick buttons");
  await alice.locator("#member-list li", { hasText: "carol" }).locator("button.member-kick").click();
  await carol.waitFor("ERR kicked");
  await alice.locator("#messages li.moderation", { hasText: "alice kicked carol from #lobby" }).waitFor({ timeout: T });
  await bob.locator("#messages li.moderation", { hasText: "alice kicked carol from #lobby" }).waitFor({ timeout: T });
  carol.send("/join lobby");
  await carol.waitFor("-- joined #lobby");

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
  srv = await startServer(bin, dataDir, srv.http);
  await alice.locator("#status", { hasText: "online as alice" }).waitFor({ timeout: 30000 });
  await bob.locator("#status", { hasText: "online as bob" }).waitFor({ timeout: 30000 });
  const dave = await lineUser(srv.chat, "lobby");
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

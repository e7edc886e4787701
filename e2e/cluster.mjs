// Browser test of the chat page in a cluster: two `netkit serve` nodes, a
// page on node a and a TCP line client on node b share a room. The page
// shows b's user as nick@node in the member list and in join notices, the
// two exchange messages across nodes, the cluster panel lists node b with
// its user, and after `kill -9` of node b the page shows the user leaving
// ("node down") and node b down. A screenshot goes to target/e2e/cluster.png.
//
// usage: node e2e/cluster.mjs [path/to/netkit]   (default: target/debug/netkit)
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { T, fail, launchBrowser, lineUser, openPage, say, seeMessage, startServer } from "./lib.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.resolve(process.argv[2] || path.join(root, "target/debug/netkit"));
const outDir = path.join(root, "target/e2e");
mkdirSync(outDir, { recursive: true });

// Fast failure detection, as the Rust cluster tests use.
function node(name, join) {
  return ["--node-name", name, "--cluster-listen", "127.0.0.1:0", "--join", join,
    "--cluster-probe-period", "200ms", "--cluster-probe-rtt", "80ms",
    "--cluster-suspect-timeout", "600ms", "--cluster-gossip-interval", "50ms"];
}

const dirs = [mkdtempSync(path.join(os.tmpdir(), "netkit-e2e-a-")), mkdtempSync(path.join(os.tmpdir(), "netkit-e2e-b-"))];
const a = await startServer(bin, dirs[0], "127.0.0.1:0", node("a", ""));
const b = await startServer(bin, dirs[1], "127.0.0.1:0", node("b", a.gossip));
let browser;
let ok = false;
try {
  browser = await launchBrowser();
  const alice = await openPage(browser, `http://${a.http}/`, "alice");
  // The cluster panel (polled every 5 s) lists node b alive.
  const nodeB = alice.locator("#cluster-list li.node", { has: alice.locator(".node-name", { hasText: /^b$/ }) });
  await nodeB.and(alice.locator("li.state-alive")).waitFor({ timeout: T });

  // A user of node b joins the room: the page shows them as carol@b.
  const carol = await lineUser(b.chat, "lobby", "carol");
  await alice.locator("#messages li", { hasText: "carol@b joined" }).waitFor({ timeout: T });
  await alice.locator("#member-list li", { hasText: "carol@b" }).waitFor({ timeout: T });
  await carol.waitFor("alice"); // b's /who and notices know alice of node a
  carol.send("/who");
  await carol.waitFor("alice@a");

  // Messages cross the nodes both ways.
  carol.send("hello from node b");
  await seeMessage(alice, "hello from node b");
  await say(alice, "hello from node a");
  await carol.waitFor("<alice> hello from node a");

  // The cluster panel shows carol as a user of node b.
  await nodeB.filter({ hasText: "carol" }).waitFor({ timeout: T });
  await alice.screenshot({ path: path.join(outDir, "cluster.png"), fullPage: true });

  // kill -9 of node b: its user leaves everywhere, and the panel shows b down.
  const exited = new Promise((r) => b.child.once("exit", r));
  b.child.kill("SIGKILL");
  await exited;
  await alice.locator("#messages li", { hasText: "carol@b left" }).filter({ hasText: "node down" }).waitFor({ timeout: T });
  await alice.locator("#member-list li", { hasText: "carol@b" }).waitFor({ state: "detached", timeout: T });
  await nodeB.and(alice.locator("li.state-down")).waitFor({ timeout: T });
  const leaves = await alice.locator("#messages li", { hasText: "carol@b left" }).count();
  if (leaves !== 1) fail(`carol@b's leave shown ${leaves} times`);
  await alice.screenshot({ path: path.join(outDir, "cluster-after-kill.png"), fullPage: true });
  ok = true;
  console.log(`e2e cluster: ok — screenshots in ${path.relative(root, outDir)}/cluster.png and cluster-after-kill.png`);
} finally {
  if (browser) await browser.close();
  a.child.kill("SIGTERM");
  b.child.kill("SIGKILL");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}
process.exit(ok ? 0 : 1);

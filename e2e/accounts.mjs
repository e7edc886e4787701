// Browser test of accounts on the chat page (`--chat-auth accounts`): a page
// registers its nick, logs out and in again with the form, reloads and stays
// logged in through its session token (the password is never kept in the
// browser's storage); another page cannot take the registered nick; the
// registered user's room survives the reload with her as its operator, and
// she kicks the other page's user from the member list.
//
// usage: node e2e/accounts.mjs [path/to/netkit]   (default: target/debug/netkit)
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { T, fail, launchBrowser, openPage, startServer } from "./lib.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.resolve(process.argv[2] || path.join(root, "target/debug/netkit"));
const outDir = path.join(root, "target/e2e");
mkdirSync(outDir, { recursive: true });

const PASSWORD = "correct horse battery staple";

// Everything the page keeps in its storage and cookies, as one string.
async function stored(page) {
  const cookies = JSON.stringify(await page.context().cookies());
  return cookies + (await page.evaluate(() => JSON.stringify([{ ...localStorage }, { ...sessionStorage }])));
}

// The page holds a session token and nowhere the password.
async function checkStorage(page, when) {
  const all = await stored(page);
  if (all.includes(PASSWORD)) fail(`the password is in the browser's storage ${when}`);
  const session = await page.evaluate(() => localStorage.getItem("netkit.session"));
  if (!session || session.length < 16) fail(`no session token in localStorage ${when} (got ${JSON.stringify(session)})`);
  return session;
}

// The page shows it is logged in as `nick`: the account form is gone and
// the log-out button shown (both change only on the server's `logged_in`).
async function loggedIn(page, nick) {
  await page.locator("#status", { hasText: `online as ${nick}` }).waitFor({ timeout: T });
  await page.locator("#logout-button").waitFor({ state: "visible", timeout: T });
  await page.locator("#account-form").waitFor({ state: "hidden", timeout: T });
}

// Joins `room` with the join form and opens it from the room list.
async function join(page, room) {
  await page.locator("#join-input").fill(room);
  await page.locator("#join-input").press("Enter");
  await openRoom(page, room);
}

async function openRoom(page, room) {
  await page.locator("#room-list button", { hasText: room }).first().click({ timeout: T });
  await page.locator("#room-title", { hasText: `#${room}` }).waitFor({ timeout: T });
}

const dataDir = mkdtempSync(path.join(os.tmpdir(), "netkit-e2e-accounts-"));
const srv = await startServer(bin, dataDir, "127.0.0.1:0", ["--chat-auth", "accounts"]);
const url = `http://${srv.http}/`;
let browser;
const pages = {};
let ok = false;
try {
  browser = await launchBrowser();
  const alice = pages.alice = await openPage(browser, url, "alice");
  if (!(await alice.locator("#account-form").isVisible())) fail("the account form is not shown under --chat-auth accounts");

  // Register the nick the page holds.
  await alice.locator("#password-input").fill(PASSWORD);
  await alice.locator("#register-button").click();
  await loggedIn(alice, "alice");
  await alice.locator("#messages li", { hasText: "logged in as alice" }).first().waitFor({ timeout: T });
  if ((await alice.locator("#password-input").inputValue()) !== "") fail("the password stays in the form after registering");
  const first = await checkStorage(alice, "after registering");

  // Log out: the token is forgotten, the page reconnects as a guest (the
  // nick is registered), and logs in again with the form.
  await alice.locator("#logout-button").click();
  await alice.locator("#account-form").waitFor({ state: "visible", timeout: T });
  await alice.locator("#status", { hasText: "online as guest-" }).waitFor({ timeout: T });
  if (await alice.evaluate(() => localStorage.getItem("netkit.session"))) fail("logging out left the session token");
  await alice.locator("#nick-input").fill("alice");
  await alice.locator("#password-input").fill("not the password");
  await alice.locator("#password-input").press("Enter");
  await alice.locator("#messages li.error", { hasText: "error:" }).last().waitFor({ timeout: T });
  if (await alice.locator("#logout-button").isVisible()) fail("a wrong password logged in");
  await alice.locator("#nick-input").fill("alice");
  await alice.locator("#password-input").fill(PASSWORD);
  await alice.locator("#password-input").press("Enter");
  await loggedIn(alice, "alice");
  const second = await checkStorage(alice, "after logging in");
  if (second === first) fail("logging in again gave the revoked session token back");

  // A room made by the logged-in user: she is its operator by account.
  await join(alice, "mods");
  await alice.locator("#member-list li", { hasText: "op" }).filter({ hasText: "alice" }).waitFor({ timeout: T });

  // Another page cannot take the registered nick, in any case.
  const bob = pages.bob = await openPage(browser, url, "bob");
  await bob.locator("#nick-input").fill("ALICE");
  await bob.locator("#nick-input").press("Enter");
  await bob.locator("#messages li.error", { hasText: "ALICE" }).first().waitFor({ timeout: T });
  await bob.locator("#status", { hasText: "online as bob" }).waitFor({ timeout: T });
  await join(bob, "mods");
  await alice.locator("#member-list li", { hasText: "bob" }).waitFor({ timeout: T });

  // Reload: the page logs in with its session token, not a password, and
  // is still the room's operator (held by the account, not the connection).
  await alice.reload();
  await loggedIn(alice, "alice");
  if ((await checkStorage(alice, "after the reload")) !== second) fail("the reload did not reuse the session token");
  await openRoom(alice, "mods");
  await alice.locator("#member-list li", { hasText: "op" }).filter({ hasText: "alice" }).waitFor({ timeout: T });
  if ((await bob.locator("#member-list button.member-kick").count()) !== 0) fail("a non-operator sees kick buttons");

  // The operator kicks bob from the member list; both pages see it.
  await alice.locator("#member-list li", { hasText: "bob" }).locator("button.member-kick").click();
  await alice.locator("#messages li.moderation", { hasText: "alice kicked bob from #mods" }).waitFor({ timeout: T });
  await bob.locator("#messages li.error", { hasText: "you were kicked from #mods" }).waitFor({ timeout: T });
  await bob.locator("#room-list button", { hasText: "mods" }).waitFor({ state: "detached", timeout: T });
  await alice.locator("#member-list li", { hasText: "bob" }).waitFor({ state: "detached", timeout: T });

  await alice.screenshot({ path: path.join(outDir, "accounts.png"), fullPage: true });
  ok = true;
  console.log(`e2e accounts: ok — screenshot in ${path.relative(root, outDir)}/accounts.png`);
} catch (e) {
  // What each page showed, to tell a refusal from a missing reply.
  for (const [name, page] of Object.entries(pages)) {
    const shown = await page.locator("#messages li").allTextContents().catch(() => []);
    console.error(`${name}'s page (${await page.locator("#status").textContent().catch(() => "?")}):\n  ${shown.join("\n  ")}`);
  }
  throw e;
} finally {
  if (browser) await browser.close();
  srv.child.kill("SIGTERM");
  rmSync(dataDir, { recursive: true, force: true });
}
process.exit(ok ? 0 : 1);

// The helpdesk console in Debian's headless Chromium, driven by playwright-core (no browser
// download): operator 1 signs in with its certificate (PKCS#12, as `cms up` writes it),
// finds the user, asks for a second approver, and does the offline unblock with the keyboard
// only; operator 2, in a second browser context with its own certificate, approves it and
// reads the audit. axe-core scans every page; screenshots go to OUT_DIR.
//
// Started by tests/tests/console_browser.rs, which sets the environment below.

import { chromium } from "playwright-core";
import { createRequire } from "node:module";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const require = createRequire(import.meta.url);
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

const consoleUrl = env("CONSOLE_URL");
const origin = new URL(consoleUrl).origin;
const outDir = env("OUT_DIR");
const userQuery = env("USER_QUERY");
const userName = env("USER_DISPLAY_NAME");
const cardSerial = env("CARD_SERIAL");
const challenge = env("CHALLENGE"); // "1603 EBDF 1C8A 2E72"
const challengeChecksum = env("CHALLENGE_CHECKSUM");
const expectedResponse = env("RESPONSE"); // groups of 4
const expectedChecksum = env("RESPONSE_CHECKSUM");
mkdirSync(outDir, { recursive: true });

const steps = [];
function step(text) {
  steps.push(text);
  console.log(`- ${text}`);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function axeScan(page, name) {
  await page.evaluate(axeSource);
  const result = await page.evaluate(async () => {
    // eslint-disable-next-line no-undef
    const r = await axe.run(document, { resultTypes: ["violations"] });
    return r.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      nodes: v.nodes.map((n) => n.target.join(" ")).slice(0, 5),
    }));
  });
  writeFileSync(join(outDir, `axe-${name}.json`), JSON.stringify(result, null, 2));
  const bad = result.filter((v) => v.impact === "serious" || v.impact === "critical");
  check(bad.length === 0, `axe on ${name}: serious or critical violations: ${JSON.stringify(bad, null, 2)}`);
  step(`axe-core on ${name}: ${result.length} violations, none serious or critical`);
}

// Presses Tab until `selector` has the focus (keyboard only, bounded).
async function tabTo(page, selector, limit = 40) {
  for (let i = 0; i < limit; i++) {
    if (await page.evaluate((s) => document.activeElement?.matches(s) ?? false, selector)) return;
    await page.keyboard.press("Tab");
  }
  throw new Error(`${selector} never got the focus with Tab`);
}

async function operatorContext(browser, p12, password) {
  const context = await browser.newContext({
    clientCertificates: [{ origin, pfxPath: p12, passphrase: password }],
    viewport: { width: 1280, height: 900 },
  });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin });
  return context;
}

const browser = await chromium.launch({ executablePath: env("CHROMIUM"), headless: true });
let failed = false;
const helpdesk = await operatorContext(browser, env("HELPDESK_P12"), env("HELPDESK_P12_PASSWORD"));
const approver = await operatorContext(browser, env("APPROVER_P12"), env("APPROVER_P12_PASSWORD"));
const page = await helpdesk.newPage();
const page2 = await approver.newPage();
try {
  // A browser without an operator certificate does not get past the TLS handshake (its
  // server-certificate check is off here, so only the missing client certificate counts).
  const anonymous = await browser.newContext({ ignoreHTTPSErrors: true });
  let refusedWith = null;
  try {
    await (await anonymous.newPage()).goto(consoleUrl, { timeout: 15000 });
  } catch (error) {
    refusedWith = error.message.split("\n")[0];
  }
  await anonymous.close();
  check(refusedWith !== null, "a browser without a client certificate got the console");
  step(`a browser without a certificate is refused (${refusedWith})`);

  // Sign in: the browser presents operator 1's certificate; the console knows who it is.
  const response = await page.goto(consoleUrl);
  check(response.ok(), `GET / answered ${response.status()}`);
  const headers = response.headers();
  check(headers["content-security-policy"]?.includes("script-src 'self'"), "no CSP on the page");
  check(headers["x-content-type-options"] === "nosniff", "no nosniff on the page");
  await page.getByText("Signed in as Operator helpdesk1").waitFor();
  await page.locator("dd.mono", { hasText: "/cms/operator/helpdesk1" }).waitFor();
  step("operator 1 signed in with its certificate (who am I shows its SPIFFE ID)");
  await axeScan(page, "whoami");

  // Search and open the user.
  await page.getByRole("link", { name: "Find a user" }).click();
  await page.getByLabel("Name, username, email or card serial").fill(userQuery);
  await page.keyboard.press("Enter");
  await page.getByRole("link", { name: userName }).waitFor();
  await axeScan(page, "search");
  await page.getByRole("link", { name: userName }).click();
  await page.getByRole("heading", { level: 1, name: userName }).waitFor();
  await page.getByRole("cell", { name: cardSerial }).waitFor();
  await axeScan(page, "user");
  step("found the user and their cards");

  // From here on, operator 1 uses the keyboard only.
  const row = page.getByRole("row").filter({ hasText: cardSerial });
  const unblockLink = row.getByRole("link", { name: "Unblock the PIN (offline)" });
  const href = await unblockLink.getAttribute("href");
  await tabTo(page, `a[href="${href}"]`);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { level: 1, name: "Offline PIN unblock" }).waitFor();
  await page.getByRole("heading", { name: "Second approver needed" }).waitFor();
  await tabTo(page, "#approval-reason");
  await page.keyboard.type("User verified by phone (callback)");
  await page.keyboard.press("Enter");
  await page.getByText("Approval requested").waitFor();
  step("keyboard: opened the unblock tab and requested a second approver");

  // Operator 2, its own certificate in a second context, approves.
  await page2.goto(`${consoleUrl}#/approvals`);
  await page2.getByText("Signed in as Operator approver1").waitFor();
  const pending = page2.getByRole("row").filter({ hasText: userName });
  await pending.waitFor();
  await axeScan(page2, "approvals");
  await pending.getByRole("button", { name: /^Approve/ }).click();
  await page2.getByText("Nothing waits for approval.").waitFor();
  step("operator 2 approved the request in its own browser context");

  // Operator 1 again, keyboard only: check the approval, type the challenge as read.
  await tabTo(page, "#approval-check");
  await page.keyboard.press("Enter");
  await page.getByText(/^Approved by /).waitFor();
  await tabTo(page, "#challenge");
  const status = page.locator("#challenge-status");
  const short = challenge.slice(0, -1).toLowerCase();
  await page.keyboard.type(short);
  check((await status.textContent()).includes("15 of 16"), `while typing: ${await status.textContent()}`);
  await page.keyboard.type(challenge.slice(-1).toLowerCase());
  await page.keyboard.press("Tab");
  check(await page.evaluate(() => document.activeElement.id === "checksum"), "Tab did not reach the checksum");
  const wrongChecksum = challengeChecksum.slice(0, 3) + (challengeChecksum[3] === "0" ? "1" : "0");
  await page.keyboard.type(wrongChecksum);
  await page.getByText("the checksum does not match the code", { exact: false }).waitFor();
  check((await page.getAttribute("#challenge", "aria-invalid")) === "true", "a wrong checksum is not marked invalid");
  await page.screenshot({ path: join(outDir, "unblock-wrong-checksum.png"), fullPage: true });
  await page.keyboard.press("Enter");
  check((await page.locator("[data-field=result]").isHidden()), "a wrong checksum was sent");
  await page.keyboard.press("Shift+Tab");
  await tabTo(page, "#checksum");
  await page.keyboard.press("Control+A");
  await page.keyboard.type(challengeChecksum);
  await page.getByText("The checksum matches").waitFor();
  step("keyboard: the challenge's checksum is checked as it is typed (a typo is refused before sending)");
  await page.keyboard.press("Enter");
  await page.locator("#response-code").waitFor({ state: "visible" });
  const shown = await page.locator("#response-code").textContent();
  const shownChecksum = await page.locator("#response-checksum").textContent();
  check(shown === expectedResponse, `response ${shown}, expected ${expectedResponse}`);
  check(shownChecksum === expectedChecksum, `checksum ${shownChecksum}, expected ${expectedChecksum}`);
  check(await page.evaluate(() => document.activeElement.id === "result-title"), "the focus did not move to the result");
  step(`keyboard: the cryptogram is shown in groups of 4 (${shown}) with its checksum ${shownChecksum}`);
  await tabTo(page, "#copy-response");
  await page.keyboard.press("Enter");
  await page.getByText("Copied the response and its checksum.").waitFor();
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  check(copied === `${expectedResponse} ${expectedChecksum}`, `clipboard holds ${copied}`);
  step("keyboard: the copy button put the response and its checksum on the clipboard");
  await page.screenshot({ path: join(outDir, "unblock.png"), fullPage: true });
  await axeScan(page, "unblock");

  // The approval was single use: the console says so and asks for a new one before sending.
  await page.getByText("The approval was used for this response").waitFor();
  await tabTo(page, "#challenge");
  await page.keyboard.type(challenge);
  await page.keyboard.press("Tab");
  await page.keyboard.type(challengeChecksum);
  await page.keyboard.press("Enter");
  await page.getByText("Request the approval of a second operator first.").waitFor();
  check(await page.evaluate(() => document.activeElement.id === "approval-reason"), "the focus did not move to the approval");
  step("keyboard: a second try asks for a new approval (the used one is not sent again)");

  // 200% zoom: the same page at half the CSS width must not scroll sideways.
  await page.setViewportSize({ width: 640, height: 900 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.screenshot({ path: join(outDir, "unblock-200-percent.png"), fullPage: true });
  check(overflow <= 0, `at 200% zoom the page scrolls sideways by ${overflow}px`);
  step("at 200% zoom (640 CSS px wide) nothing scrolls sideways");

  // Operator 2 is also an auditor: the audit view shows the cryptogram record.
  await page2.goto(`${consoleUrl}#/audit`);
  await page2.getByRole("heading", { level: 1, name: "Custody audit" }).waitFor();
  await page2.getByRole("row").filter({ hasText: "cryptogram" }).first().waitFor();
  const auditText = await page2.locator("table").textContent();
  check(!auditText.includes(challenge.replaceAll(" ", "")) && !auditText.includes(expectedResponse.split(" ")[0]),
    "the audit view shows a challenge or response");
  await axeScan(page2, "audit");
  await page2.screenshot({ path: join(outDir, "audit.png"), fullPage: true });
  step("operator 2 (auditor) sees the cryptogram in the custody audit, without the codes");

  // Operator 2 has no helpdesk role: the console warns, and the gateway refuses with a reason.
  await page2.goto(`${consoleUrl}${href}`);
  const alert2 = page2.locator("#view [role=alert]");
  await page2.getByText("You may not unblock this card offline").waitFor();
  step(`operator 2 (no helpdesk role) opening the unblock tab reads: "${(await alert2.textContent()).trim()}"`);
  await page2.getByLabel("Challenge", { exact: true }).fill(challenge);
  await page2.getByLabel("Checksum", { exact: true }).fill(challengeChecksum);
  await page2.getByRole("button", { name: "Compute the response" }).click();
  await alert2.filter({ hasNotText: "You may not unblock this card offline" }).filter({ hasText: /\S/ }).waitFor();
  check(await page2.locator("#response-code").isHidden(), "a response was shown to an operator without the helpdesk role");
  step(`the gateway refuses operator 2's try: "${(await alert2.textContent()).trim()}"`);
} catch (error) {
  failed = true;
  console.error(`FAILED: ${error.stack || error}`);
  await page.screenshot({ path: join(outDir, "failure-operator1.png"), fullPage: true }).catch(() => {});
  await page2.screenshot({ path: join(outDir, "failure-operator2.png"), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}
writeFileSync(join(outDir, "steps.txt"), `${steps.join("\n")}\n`);
console.log(`console browser scene: ${steps.length} steps done${failed ? ", then a failure" : ""}`);
process.exit(failed ? 1 : 0);

// Drives the stream console (/ui/ on the gateway's admin port) in Debian's Chromium with
// playwright-core, for tests/tests/console.rs, and reports what a user would see as JSON on
// stdout; the Rust test makes the assertions. Screenshots go to `shots`.
//
// argv[2]: JSON {chromium, admin, stream, shots}.
import { chromium } from "playwright-core";

const { chromium: executablePath, admin, stream, shots } = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath,
  headless: true,
  // This machine's network is closed: no background connections, no component updates.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const report = {};
try {
  const desktop = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await desktop.grantPermissions(["clipboard-read", "clipboard-write"], { origin: admin });
  const page = await desktop.newPage();
  const consoleErrors = [];
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push(message.text());
  });
  page.on("pageerror", (error) => consoleErrors.push(String(error)));

  // The list of streams.
  await page.goto(`${admin}/ui/`);
  report.index = {
    title: await page.title(),
    lang: await page.getAttribute("html", "lang"),
    h1: await page.locator("h1").allTextContents(),
    rows: await page.locator("tbody tr").evaluateAll((rows) =>
      rows.map((row) => ({
        id: row.dataset.stream,
        name: row.querySelector("th a").textContent,
        cells: Array.from(row.querySelectorAll("td")).map((td) => td.textContent.trim()),
      })),
    ),
  };
  await page.screenshot({ path: `${shots}/index-1280.png`, fullPage: true });

  // One stream's page: reached by its link, as a user would.
  await page.click(`tr[data-stream="${stream}"] th a`);
  await page.waitForSelector("#figures");
  report.stream = {
    url: page.url(),
    h1: await page.locator("h1").allTextContents(),
    h2: await page.locator("h2").allTextContents(),
    endpoint: await page.textContent("#endpoint"),
  };
  const tabs = page.locator('[role="tab"]');
  const tabCount = await tabs.count();
  report.tabs = [];
  for (let i = 0; i < tabCount; i++) {
    const tab = tabs.nth(i);
    await tab.click();
    const lang = (await tab.getAttribute("id")).replace(/^tab-/, "");
    const panel = page.locator(`#panel-${lang}`);
    const visiblePanels = await page.locator('[role="tabpanel"]:not([hidden])').count();
    // Copy, then read the clipboard back.
    await panel.locator("button.copy").click();
    await page.waitForFunction(
      (id) => document.querySelector(`#panel-${id} .copied`).textContent !== "",
      lang,
    );
    report.tabs.push({
      lang,
      label: await tab.textContent(),
      selected: await tab.getAttribute("aria-selected"),
      panelVisible: await panel.isVisible(),
      visiblePanels,
      copyStatus: await panel.locator(".copied").textContent(),
      copied: await page.evaluate(() => navigator.clipboard.readText()),
      shown: await page.textContent(`#code-${lang}`),
    });
  }
  // Keyboard: from the first tab, ArrowRight selects and focuses the second; End the last.
  await tabs.nth(0).click();
  await tabs.nth(0).focus();
  await page.keyboard.press("ArrowRight");
  report.keyboard = {
    afterArrow: await page.evaluate(() => document.activeElement.id),
    selectedAfterArrow: await page.getAttribute('[role="tab"][aria-selected="true"]', "id"),
  };
  await page.keyboard.press("End");
  report.keyboard.afterEnd = await page.evaluate(() => document.activeElement.id);
  await tabs.nth(0).click();

  // The test hit.
  await page.click("#send-test");
  await page.waitForSelector("#test-hit-id", { timeout: 20000 });
  report.testHit = {
    hitId: await page.textContent("#test-hit-id"),
    status: await page.textContent("#test-result"),
  };
  // The figures refresh after the hit (and every 5 s).
  await page.waitForFunction(() => Number(document.getElementById("accepted").textContent) >= 1, null, {
    timeout: 20000,
  });
  report.figures = {
    accepted: await page.textContent("#accepted"),
    refused: await page.textContent("#refused"),
    lastHit: await page.textContent("#last-hit"),
  };
  // Accessibility basics: every button and tab has a name, every panel its tab, one h1.
  report.a11y = await page.evaluate(() => ({
    unnamedButtons: Array.from(document.querySelectorAll("button")).filter(
      (b) => b.textContent.trim() === "" && !b.getAttribute("aria-label"),
    ).length,
    panelsWithoutTab: Array.from(document.querySelectorAll('[role="tabpanel"]')).filter(
      (p) => !document.getElementById(p.getAttribute("aria-labelledby")),
    ).length,
    liveRegions: document.querySelectorAll('[aria-live="polite"]').length,
    skipLink: document.querySelector("a.skip")?.getAttribute("href"),
  }));
  await page.screenshot({ path: `${shots}/stream-1280.png`, fullPage: true });
  report.consoleErrors = consoleErrors;

  // A phone: 360 px wide. Nothing may be wider than the screen.
  const phone = await browser.newContext({ viewport: { width: 360, height: 740 }, isMobile: true });
  const small = await phone.newPage();
  const widths = {};
  for (const [name, path] of [
    ["index", "/ui/"],
    ["stream", `/ui/streams/${stream}`],
  ]) {
    await small.goto(`${admin}${path}`);
    widths[name] = await small.evaluate(() => document.documentElement.scrollWidth);
    await small.screenshot({ path: `${shots}/${name}-360.png`, fullPage: true });
  }
  report.phone = {
    widths,
    sendButtonVisible: await small.isVisible("#send-test"),
  };
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report));

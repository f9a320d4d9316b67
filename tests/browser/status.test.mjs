// The status page in a real browser: headless Chromium (playwright-core, /usr/bin/chromium)
// opens tern's status page while MQTT.js clients (over TCP, from node) keep a known workload.
//
//   TERN_BIN=/path/to/release/tern node tests/browser/status.test.mjs
//
// Makes a temporary directory with a config (MQTT and metrics listeners on port 0: tern's log
// says which ports it got; a bridge to a peer that is not there), starts tern, connects 3
// clients, publishes 5 retained messages and keeps a trickle of messages going, then checks in
// the page: the numbers (clients connected, sessions, retained, subscriptions, version, store
// state, the bridge's state) reach the expected values within
// a deadline, the rate chart draws lines, a client leaving shows, and the page fetched
// nothing but its own listener (it must work offline). A screenshot goes to $SCREENSHOT, or
// to the temporary directory (kept when a check fails). One line per check, every wait
// bounded; exits non-zero if any check fails. tern and the browser are always stopped.
//
// LIVE_SECS=N keeps the workload running N seconds before the screenshot (for
// docs/status.png, so the chart shows some history).

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import mqtt from 'mqtt';

import { BrowserTest, TERN_BIN, listeningPorts, until } from './lib.mjs';

/** Longest wait for anything that should happen. */
const DEADLINE_MS = 15_000;
const LIVE_SECS = Number(process.env.LIVE_SECS || 0);

const t = new BrowserTest('status', { deadlineMs: DEADLINE_MS });
const check = t.check.bind(t);
const clients = [];
let trickle = null;

/** An MQTT.js client over TCP, connected. */
async function connect(port, id) {
  const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, { clientId: id, reconnectPeriod: 0, connectTimeout: DEADLINE_MS });
  await new Promise((resolve, reject) => {
    c.once('connect', resolve);
    c.once('error', (e) => reject(new Error(`${id}: ${e.message}`)));
  });
  clients.push(c);
  return c;
}

/** The text of element `#id` in the page ('' when absent). */
function text(page, id) {
  return page.evaluate((id) => { const e = document.getElementById(id); return e ? e.textContent : ''; }, id);
}

async function waitText(page, id, want) {
  let last = '';
  await until(async () => { last = await text(page, id); return last === want; }, DEADLINE_MS,
    `#${id} = ${JSON.stringify(want)}`, () => `(shows ${JSON.stringify(last)})`);
}

async function main() {
  const work = t.makeWork('tern-status-');
  const version = execFileSync(TERN_BIN, ['--version']).toString().trim().replace(/^tern /, '');
  const config = path.join(work, 'tern.toml');
  fs.writeFileSync(config, [
    '[[listener]]', 'bind = "127.0.0.1:0"', '',
    '[storage]', `dir = ${JSON.stringify(path.join(work, 'data'))}`, '',
    '[metrics]', 'bind = "127.0.0.1:0"', 'sys_interval = 1', '',
    // A bridge whose peer is not there: the page shows it down. Its local session counts as
    // a session (away) with one subscription.
    '[[bridge]]', 'name = "cloud"', 'addresses = ["127.0.0.1:1"]', '[[bridge.topics]]', 'pattern = "site/#"', '',
  ].join('\n'));
  const { mqttPort, httpPort } = await t.tern.start(config, work, (log) => {
    const [mqttPort] = listeningPorts(log, / listening addr=(\S+) kind="?tcp/g);
    const [httpPort] = listeningPorts(log, /status page listening addr=(\S+)/g);
    return mqttPort && httpPort && { mqttPort, httpPort };
  }, DEADLINE_MS);
  const base = `http://127.0.0.1:${httpPort}`;

  // The workload: three clients, five retained messages, one subscription, a trickle.
  const [sensor, display] = [await connect(mqttPort, 'sensor'), await connect(mqttPort, 'display')];
  const leaving = await connect(mqttPort, 'leaving');
  await display.subscribeAsync('site/#', { qos: 1 });
  await leaving.subscribeAsync('site/events', { qos: 0 });
  for (let i = 1; i <= 5; i++) {
    await sensor.publishAsync(`site/room${i}/temperature`, String(20 + i), { qos: 1, retain: true });
  }
  let n = 0;
  trickle = setInterval(() => {
    n += 1;
    // A varying rate, so the chart has a shape: 2 to 10 messages every 250 ms.
    const burst = Math.round(6 + 4 * Math.sin(n / 12) + 2 * Math.random() - 1);
    for (let k = 0; k < burst; k++) sensor.publish('site/events', `tick ${n}`, { qos: 0 });
  }, 250);

  const browser = await t.launchChromium();
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${base}/`, { timeout: DEADLINE_MS });

  await check('the page shows 3 connected clients', () => waitText(page, 'clients-connected', '3'));
  await check('the page shows 4 sessions (the bridge\'s included)', () => waitText(page, 'sessions-count', '4'));
  await check('the page shows 5 retained messages', () => waitText(page, 'retained-count', '5'));
  await check('the page shows 3 subscriptions', () => waitText(page, 'subscriptions-count', '3'));
  await check('the page shows the bridge down', () => waitText(page, 'bridge-cloud', 'down'));
  await check(`the page shows version ${version}`, () => waitText(page, 'version', version));
  await check('the page shows the store ok', () => waitText(page, 'store-state', 'ok'));
  await check('messages received count up', async () => {
    const first = Number(await text(page, 'messages-received'));
    await until(async () => Number(await text(page, 'messages-received')) > first + 20, DEADLINE_MS, 'more messages');
  });
  await check('the chart draws both rates', () => until(
    () => page.evaluate(() => document.querySelectorAll('#rates-chart polyline').length === 2),
    DEADLINE_MS, 'two lines in #rates-chart'));
  if (LIVE_SECS > 0) await new Promise((r) => setTimeout(r, LIVE_SECS * 1000));

  const shot = process.env.SCREENSHOT || path.join(work, 'status.png');
  await check(`screenshot written (${shot})`, async () => {
    await page.screenshot({ path: shot, fullPage: true });
    if (fs.statSync(shot).size < 10_000) throw new Error('suspiciously small screenshot');
  });

  await check('a client leaving shows as 2 connected', async () => {
    await leaving.endAsync();
    await waitText(page, 'clients-connected', '2');
  });
  await check('the page fetched nothing but its own listener (works offline)', async () => {
    const foreign = requests.filter((u) => !u.startsWith(`${base}/`));
    if (foreign.length) throw new Error(`fetched ${foreign.join(', ')}`);
    if (!requests.some((u) => u.startsWith(`${base}/api/status`))) throw new Error('never fetched /api/status');
  });
  await check('no script errors in the page', async () => {
    if (errors.length) throw new Error(errors.join('; '));
  });
}

// Kept when something failed: the screenshot and tern's data may tell why.
await t.run(main, {
  keepWork: true,
  cleanup: async () => {
    if (trickle) clearInterval(trickle);
    for (const c of clients) c.end(true);
  },
});

// MQTT over WebSockets from a real browser: MQTT.js in headless Chromium against a tern binary.
//
//   TERN_BIN=/path/to/release/tern node tests/browser/websocket.test.mjs
//
// Makes a temporary directory with a self-signed certificate (openssl) and a config with a
// tcp, a ws (allowed_origins: this test's page) and a wss listener, all on port 0 (tern's log
// says which ports it got); starts tern; serves a page and MQTT.js (node_modules, no network)
// from http://localhost; and in Chromium (playwright-core, /usr/bin/chromium) checks:
// ws:// with MQTT 3.1.1 and wss:// with MQTT 5 each subscribe, publish at QoS 0, 1 and 2 and
// get every message back; a message from mosquitto_pub (TCP) reaches the browser; one from
// the browser reaches a node-side MQTT.js client over TCP; a page of another origin is
// refused. One line per check, every wait bounded; exits non-zero if any check fails. tern,
// the browser and the page server are always stopped.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';

import mqtt from 'mqtt';

import { BrowserTest, HERE, TERN_BIN, listeningPorts, until } from './lib.mjs';

const MQTT_JS = path.join(HERE, 'node_modules/mqtt/dist/mqtt.min.js');
/** Longest wait for anything that should happen. */
const DEADLINE_MS = 10_000;

const t = new BrowserTest('websocket', { deadlineMs: DEADLINE_MS });
const check = t.check.bind(t);
let pageServer = null;
let tcpClient = null;

/** A self-signed certificate for localhost and 127.0.0.1. */
function makeCertificate(dir) {
  const cert = path.join(dir, 'server.crt');
  const key = path.join(dir, 'server.key');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  return { cert, key };
}

/** Serves the test page and MQTT.js on 127.0.0.1, port chosen by the kernel. */
async function startPageServer() {
  const page = '<!doctype html><meta charset="utf-8"><title>tern websocket test</title>'
    + '<script src="/mqtt.min.js"></script><p>tern websocket test</p>';
  const server = http.createServer((req, res) => {
    if (req.url === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(page);
    } else if (req.url === '/mqtt.min.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      fs.createReadStream(MQTT_JS).pipe(res);
    } else if (req.url === '/favicon.ico') {
      res.writeHead(204);
      res.end();
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return server;
}

/** mosquitto_pub, bounded by the deadline. */
function mosquittoPub(port, topic, message, qos) {
  return new Promise((resolve, reject) => {
    const p = spawn('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(port), '-i', 'browser-test-pub',
      '-t', topic, '-m', message, '-q', String(qos)], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d) => { err += d; });
    const timer = setTimeout(() => p.kill('SIGKILL'), DEADLINE_MS);
    p.once('error', (e) => { clearTimeout(timer); reject(new Error(`mosquitto_pub: ${e.message}`)); });
    p.once('exit', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(); else reject(new Error(`mosquitto_pub exited ${code}: ${err.trim()}`));
    });
  });
}

// --- In the page -----------------------------------------------------------------------------

/** Connects an MQTT.js client in the page as `id`; it records what it receives. Resolves with
 * the CONNACK's session-present flag, rejects with the reason the connection failed. */
function connectInPage(page, id, url, options) {
  return page.evaluate(async ({ id, url, options, deadline }) => {
    window.clients = window.clients || {};
    const client = mqtt.connect(url, { clientId: id, reconnectPeriod: 0, connectTimeout: deadline, ...options });
    client.received = [];
    client.on('message', (topic, payload, packet) => {
      client.received.push({ topic, payload: new TextDecoder().decode(payload), qos: packet.qos });
    });
    await new Promise((resolve, reject) => {
      client.once('connect', resolve);
      client.once('error', (e) => reject(new Error(`error: ${e.message}`)));
      client.once('close', () => reject(new Error('closed before CONNACK')));
    });
    window.clients[id] = client;
    return client.options.protocolVersion;
  }, { id, url, options, deadline: DEADLINE_MS });
}

function subscribeInPage(page, id, filter, qos) {
  return page.evaluate(async ({ id, filter, qos }) => {
    const granted = await window.clients[id].subscribeAsync(filter, { qos });
    return granted.map((g) => g.qos);
  }, { id, filter, qos });
}

/** Publishes and waits for the QoS flow to finish (PUBACK, PUBCOMP). */
function publishInPage(page, id, topic, payload, qos) {
  return page.evaluate(async ({ id, topic, payload, qos }) => {
    await window.clients[id].publishAsync(topic, payload, { qos });
  }, { id, topic, payload, qos });
}

/** Waits until client `id` has received `payload` on `topic` at `qos`. */
async function receivedInPage(page, id, topic, payload, qos) {
  try {
    await page.waitForFunction(({ id, topic, payload, qos }) => window.clients[id].received
      .some((m) => m.topic === topic && m.payload === payload && m.qos === qos),
    { id, topic, payload, qos }, { timeout: DEADLINE_MS, polling: 20 });
  } catch {
    const got = await page.evaluate((id) => JSON.stringify(window.clients[id].received), id);
    throw new Error(`${id} did not receive ${JSON.stringify(payload)} on ${topic} at QoS ${qos}; got ${got}`);
  }
}

/** Subscribe, then publish at QoS 0, 1 and 2 and get each message back. */
async function roundTrip(page, id, prefix) {
  const granted = await subscribeInPage(page, id, `${prefix}/#`, 2);
  if (granted[0] !== 2) throw new Error(`SUBACK granted ${granted}`);
  for (const qos of [0, 1, 2]) {
    const payload = `${id} at QoS ${qos}`;
    await publishInPage(page, id, `${prefix}/q${qos}`, payload, qos);
    await receivedInPage(page, id, `${prefix}/q${qos}`, payload, qos);
  }
}

// --- The test --------------------------------------------------------------------------------

async function main() {
  if (!fs.existsSync(MQTT_JS)) throw new Error(`no ${MQTT_JS}; run npm ci in ${HERE}`);
  const work = t.makeWork('tern-browser-ws-');
  const { cert, key } = makeCertificate(work);
  pageServer = await startPageServer();
  const pagePort = pageServer.address().port;
  const pageOrigin = `http://localhost:${pagePort}`;

  const configPath = path.join(work, 'tern.toml');
  fs.writeFileSync(configPath, [
    '[[listener]]', 'bind = "127.0.0.1:0"', 'kind = "tcp"', '',
    '[[listener]]', 'bind = "127.0.0.1:0"', 'kind = "ws"', 'path = "/mqtt"',
    `allowed_origins = ["${pageOrigin}"]`, '',
    '[[listener]]', 'bind = "127.0.0.1:0"', 'kind = "wss"',
    `tls = { cert = "${cert}", key = "${key}" }`, '',
    '[storage]', `dir = "${path.join(work, 'data')}"`, '',
  ].join('\n'));
  // Each listener's port, in config order, from its `listening` log line.
  const [tcpPort, wsPort, wssPort] = await t.tern.start(configPath, work, (log) => {
    const ports = listeningPorts(log, /listening addr=(\S+) kind="?\w+/g);
    return ports.length >= 3 && ports;
  }, DEADLINE_MS);
  console.log(`# tern ${TERN_BIN}: tcp ${tcpPort}, ws ${wsPort}, wss ${wssPort}; page ${pageOrigin}`);

  const browser = await t.launchChromium();
  // The wss listener's certificate is self-signed.
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.log(`# page error: ${e.message.split('\n')[0]}`));
  await page.goto(`${pageOrigin}/`, { timeout: DEADLINE_MS });
  await page.waitForFunction(() => typeof window.mqtt === 'object' && typeof window.mqtt.connect === 'function',
    null, { timeout: DEADLINE_MS });

  await check('ws:// MQTT 3.1.1: connect from an allowed origin', async () => {
    const v = await connectInPage(page, 'browser-ws', `ws://127.0.0.1:${wsPort}/mqtt`, { protocolVersion: 4 });
    if (v !== 4) throw new Error(`protocol version ${v}`);
  });
  await check('ws:// MQTT 3.1.1: subscribe, publish QoS 0, 1, 2, receive each', () => roundTrip(page, 'browser-ws', 'browser/ws'));
  await check('wss:// MQTT 5: connect (self-signed certificate)', async () => {
    const v = await connectInPage(page, 'browser-wss', `wss://localhost:${wssPort}/mqtt`, { protocolVersion: 5 });
    if (v !== 5) throw new Error(`protocol version ${v}`);
  });
  await check('wss:// MQTT 5: subscribe, publish QoS 0, 1, 2, receive each', () => roundTrip(page, 'browser-wss', 'browser/wss'));

  await check('mosquitto_pub over TCP reaches the browser (ws and wss)', async () => {
    await subscribeInPage(page, 'browser-ws', 'from-tcp/#', 1);
    await subscribeInPage(page, 'browser-wss', 'from-tcp/#', 1);
    await mosquittoPub(tcpPort, 'from-tcp/hello', 'hello from mosquitto_pub', 1);
    await receivedInPage(page, 'browser-ws', 'from-tcp/hello', 'hello from mosquitto_pub', 1);
    await receivedInPage(page, 'browser-wss', 'from-tcp/hello', 'hello from mosquitto_pub', 1);
  });

  await check('the browser reaches an MQTT.js client over TCP (QoS 2 from wss, QoS 1 from ws)', async () => {
    tcpClient = mqtt.connect(`mqtt://127.0.0.1:${tcpPort}`, { clientId: 'node-tcp', reconnectPeriod: 0, connectTimeout: DEADLINE_MS });
    await new Promise((resolve, reject) => {
      tcpClient.once('connect', resolve);
      tcpClient.once('error', reject);
    });
    const got = [];
    tcpClient.on('message', (topic, payload, packet) => got.push(`${topic} ${payload} ${packet.qos}`));
    await tcpClient.subscribeAsync('to-tcp/#', { qos: 2 });
    await publishInPage(page, 'browser-wss', 'to-tcp/wss', 'from the browser over wss', 2);
    await publishInPage(page, 'browser-ws', 'to-tcp/ws', 'from the browser over ws', 1);
    await until(() => got.includes('to-tcp/wss from the browser over wss 2') && got.includes('to-tcp/ws from the browser over ws 1'),
      DEADLINE_MS, `TCP client receiving (got ${JSON.stringify(got)})`);
  });

  await check('a page of another origin is refused by the ws listener (allowed_origins)', async () => {
    const other = await context.newPage();
    // The page's script only sees the socket close; Chromium logs the HTTP status.
    const consoleLines = [];
    other.on('console', (m) => consoleLines.push(m.text()));
    try {
      // 127.0.0.1 and localhost are different origins.
      await other.goto(`http://127.0.0.1:${pagePort}/`, { timeout: DEADLINE_MS });
      await other.waitForFunction(() => typeof window.mqtt === 'object', null, { timeout: DEADLINE_MS });
      let outcome;
      try {
        await connectInPage(other, 'intruder', `ws://127.0.0.1:${wsPort}/mqtt`, { protocolVersion: 4 });
        outcome = 'connected';
      } catch (e) {
        outcome = e.message;
      }
      if (outcome === 'connected') throw new Error('a page from http://127.0.0.1 connected');
      await until(() => consoleLines.some((l) => l.includes('Unexpected response code: 403')), DEADLINE_MS,
        `Chromium reporting HTTP 403 (console: ${JSON.stringify(consoleLines)}; MQTT.js: ${outcome.split('\n')[0]})`);
      // The same page may use the wss listener, which lists no origins.
      await connectInPage(other, 'welcome', `wss://localhost:${wssPort}/mqtt`, { protocolVersion: 5 });
    } finally {
      await other.close();
    }
  });

  await check("tern's log names each browser connection's transport (ws, wss)", async () => {
    for (const [id, transport] of [['browser-ws', 'ws'], ['browser-wss', 'wss']]) {
      const line = new RegExp(`client connected client_id=${id} .*transport="?${transport}\\b`);
      if (!line.test(t.tern.log)) throw new Error(`no "client connected" line for ${id} with transport=${transport}`);
    }
  });

  await check('clean disconnect from the browser', async () => {
    await page.evaluate(async () => {
      for (const c of Object.values(window.clients)) await c.endAsync();
    });
    for (const id of ['browser-ws', 'browser-wss']) {
      const line = new RegExp(`client disconnected client_id=${id} .*reason=client disconnected`);
      await until(() => line.test(t.tern.log), DEADLINE_MS, `tern logging the DISCONNECT of ${id}`);
    }
  });
}

await t.run(main, {
  cleanup: async () => {
    if (tcpClient) await tcpClient.endAsync(true).catch(() => {});
    if (pageServer) {
      pageServer.closeAllConnections();
      await new Promise((r) => pageServer.close(r));
    }
  },
});

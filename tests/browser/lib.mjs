// What the browser tests share: where tern and Chromium are, a tern child process whose log
// tells its ports, bounded waits, one `ok`/`FAIL` line per check, and a run that always stops
// tern and the browser (also when killed from outside) and ends with `NAME: N passed, M failed`.
// Each *.test.mjs is its own node process, so one `BrowserTest` per file.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '../..');
export const TERN_BIN = process.env.TERN_BIN
  || path.join(process.env.CARGO_TARGET_DIR ? path.resolve(REPO, process.env.CARGO_TARGET_DIR) : path.join(REPO, 'target'), 'release/tern');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

export function withDeadline(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Resolves once `cond()` holds, polling every 20 ms; rejects after `ms` with `why()`. */
export async function until(cond, ms, what, why = () => '') {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms ${why()}`.trimEnd());
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The tern binary as a child process; `log` is everything it wrote so far. */
export class Tern {
  constructor() {
    this.child = null;
    this.log = '';
  }

  /** Starts tern with `configPath` in `cwd`; resolves with `ready(log)` once that is truthy
   * (the ports read from the `listening` lines), rejects if tern exits first or after `ms`. */
  async start(configPath, cwd, ready, ms) {
    const child = spawn(TERN_BIN, ['-c', configPath], {
      cwd,
      env: { ...process.env, NO_COLOR: '1', RUST_LOG: process.env.RUST_LOG || 'info' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    const onData = (d) => { this.log += d.toString(); };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    let exited = null;
    child.once('exit', (code, signal) => { exited = `exited (code ${code}, signal ${signal})`; });
    let result = null;
    await until(() => {
      if (exited) throw new Error(`tern ${exited} before listening:\n${this.log}`);
      result = ready(this.log);
      return result;
    }, ms, 'tern listening');
    return result;
  }

  /** SIGTERM; SIGKILL if it is still running 5 s later. */
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
}

/** The port of each `listening addr=HOST:PORT` line of `log` that `re` matches (group 1 is the
 * address), in log order. */
export function listeningPorts(log, re) {
  return [...log.matchAll(re)].map((m) => Number(m[1].slice(m[1].lastIndexOf(':') + 1)));
}

/** One test file: its checks, its temporary directory, tern and the browser. */
export class BrowserTest {
  /** `name` starts the summary line; every check is bounded by twice `deadlineMs`. */
  constructor(name, { deadlineMs }) {
    this.name = name;
    this.deadlineMs = deadlineMs;
    this.passed = 0;
    this.failed = 0;
    this.tern = new Tern();
    this.browser = null;
    this.work = null;
  }

  /** Runs one check: `ok - name` or `FAIL - name: why`. */
  async check(name, fn) {
    try {
      await withDeadline(fn(), this.deadlineMs * 2, name);
      this.passed += 1;
      console.log(`ok - ${name}`);
    } catch (e) {
      this.failed += 1;
      console.log(`FAIL - ${name}: ${e && e.message ? e.message : e}`);
    }
  }

  /** A fresh temporary directory, `this.work`. */
  makeWork(prefix) {
    this.work = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
    return this.work;
  }

  /** Headless Chromium at $CHROMIUM (/usr/bin/chromium), with no background traffic of its
   * own (updates, sync, QUIC probes). */
  async launchChromium() {
    if (!fs.existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM} (apt-get install chromium)`);
    this.browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
        '--no-first-run', '--disable-component-update', '--disable-sync'],
    });
    return this.browser;
  }

  /** Runs `main` (a throw counts as a failed `setup` check), then `cleanup`, closes the
   * browser, stops tern and removes the temporary directory (kept after a failure when
   * `keepWork`); prints the end of tern's log after a failure (or with SHOW_TERN_LOG) and the
   * summary, and exits 1 if any check failed. */
  async run(main, { cleanup = async () => {}, keepWork = false } = {}) {
    // Killed from outside (CI's timeout): do not leave tern running.
    for (const signal of ['SIGINT', 'SIGTERM']) {
      process.once(signal, () => {
        if (this.tern.child) this.tern.child.kill('SIGKILL');
        process.exit(1);
      });
    }
    try {
      if (!fs.existsSync(TERN_BIN)) {
        throw new Error(`no tern binary at ${TERN_BIN}; build it (cargo build --release) or set TERN_BIN`);
      }
      await main();
    } catch (e) {
      this.failed += 1;
      console.log(`FAIL - setup: ${e && e.stack ? e.stack : e}`);
    } finally {
      try {
        await cleanup();
        if (this.browser) await this.browser.close().catch(() => {});
        await this.tern.stop();
        // Kept on request when something failed: what is in it may tell why.
        if (this.work && keepWork && this.failed > 0) console.log(`# kept ${this.work}`);
        else if (this.work) fs.rmSync(this.work, { recursive: true, force: true });
      } catch (e) {
        console.log(`# cleanup: ${e.message}`);
      }
    }
    if ((this.failed > 0 || process.env.SHOW_TERN_LOG) && this.tern.log) {
      console.log('# tern log (last 40 lines):');
      for (const line of this.tern.log.trimEnd().split('\n').slice(-40)) console.log(`#   ${line}`);
    }
    console.log(`${this.name}: ${this.passed} passed, ${this.failed} failed`);
    process.exit(this.failed > 0 ? 1 : 0);
  }
}

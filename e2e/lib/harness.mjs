// Test harness for the end-to-end tests: starts crudgate, a stand-in for the PowerSync
// service's sync endpoints, and real @powersync/node databases wired to the connector package.

import { spawn } from 'node:child_process';
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHmac, randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';

import pg from 'pg';
import { LogLevels, PowerSyncDatabase, Schema, Table, column, createConsoleLogger } from '@powersync/node';
import { CrudgateUploader } from '@crudgate/powersync-connector';

// The SDK's HTTP client honours HTTP(S)_PROXY; everything here is on loopback.
for (const v of ['HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'http_proxy', 'https_proxy', 'all_proxy']) {
  delete process.env[v];
}

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '..', '..');

/** The crudgate binary: $CRUDGATE_BIN, else <repo>/target/debug/crudgate. */
export function crudgateBin() {
  return process.env.CRUDGATE_BIN || path.join(repoRoot, 'target', 'debug', 'crudgate');
}

export const DEV_TOKEN = 'dev-token';

// -------------------------------------------------------------------------------------------
// Polling
// -------------------------------------------------------------------------------------------

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` until it returns a truthy value; fails after `timeoutMs`. */
export async function waitFor(what, check, { timeoutMs = 30_000, intervalMs = 50 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
      last = undefined;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    }
    await sleep(intervalMs);
  }
}

// -------------------------------------------------------------------------------------------
// crudgate
// -------------------------------------------------------------------------------------------

/**
 * Starts crudgate. Without `databaseUrl` it runs zero-config (its own throwaway Postgres) and
 * reports the URL. Resolves once it prints `listening on http://…`.
 */
export async function startCrudgate({ databaseUrl, port = 0, configFile } = {}) {
  const bin = crudgateBin();
  if (!fs.existsSync(bin)) {
    throw new Error(`crudgate binary not found at ${bin} (build it with cargo build -p crudgate-cli, or set CRUDGATE_BIN)`);
  }
  // With a configuration file its [auth] section decides; otherwise --auth none.
  const args = ['--listen', `127.0.0.1:${port}`, ...(configFile ? ['--config', configFile] : ['--auth', 'none'])];
  if (databaseUrl) args.push('--database-url', databaseUrl);
  // crudgate reads DATABASE_URL and CRUDGATE_* variables as configuration: none of the test
  // runner's is passed on. The demo tables have no write rules, so a crudgate given a database
  // (rather than its zero-config demo) is told to allow them.
  const env = { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' };
  delete env.DATABASE_URL;
  for (const k of Object.keys(env)) if (k.startsWith('CRUDGATE_')) delete env[k];
  if (databaseUrl) env.CRUDGATE_ENGINE__ALLOW_UNLISTED_TABLES = 'true';
  const proc = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
  let output = '';
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  const started = new Promise((resolve, reject) => {
    let dbUrl = databaseUrl;
    let buf = '';
    proc.stdout.setEncoding('utf8');
    proc.stdout.on('data', (chunk) => {
      output += chunk;
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        const db = /^database:\s*(\S+)/.exec(line);
        if (db) dbUrl = db[1];
        const l = /listening on (http:\/\/\S+)/.exec(line);
        if (l) resolve({ url: l[1].replace(/\/$/, ''), databaseUrl: dbUrl });
      }
    });
    proc.stderr.setEncoding('utf8');
    proc.stderr.on('data', (chunk) => {
      output += chunk;
      if (output.length > 200_000) output = output.slice(-100_000);
    });
    exited.then(({ code, signal }) =>
      reject(new Error(`crudgate exited (code ${code}, signal ${signal}) before listening:\n${excerpt(output)}`))
    );
  });
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`crudgate did not print "listening on" within 120 s:\n${excerpt(output)}`)),
      120_000
    );
  });
  let info;
  try {
    info = await Promise.race([started, timeout]);
  } catch (e) {
    proc.kill('SIGKILL');
    throw e;
  } finally {
    clearTimeout(timer);
  }
  started.catch(() => {}); // a later exit is reported by `exited`, not as an unhandled rejection
  assert.ok(info.databaseUrl, `crudgate printed no "database:" line:\n${output}`);
  return {
    proc,
    url: info.url,
    port: Number(new URL(info.url).port),
    databaseUrl: info.databaseUrl,
    exited,
    output: () => output,
    /** Graceful stop (SIGTERM; SIGKILL after 10 s). */
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(t);
    },
    /** Hard kill, as a crash would. */
    async kill() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill('SIGKILL');
      await exited;
    }
  };
}

/** The start and end of a long process output. */
function excerpt(text) {
  return text.length <= 6000 ? text : `${text.slice(0, 4000)}\n[…]\n${text.slice(-2000)}`;
}

/** A free TCP port on 127.0.0.1 (bound and released). */
export async function freePort() {
  const s = http.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

// -------------------------------------------------------------------------------------------
// Stand-in for the PowerSync service (sync endpoints only)
// -------------------------------------------------------------------------------------------

/**
 * A minimal stand-in for the PowerSync service, enough for the SDK's connect/upload loop:
 * `POST /sync/stream` answers NDJSON (a checkpoint with no buckets, checkpoint_complete, then
 * a keepalive every `keepaliveMs`); `GET /write-checkpoint2.json` hands out increasing write
 * checkpoints and announces each in a new checkpoint on the open streams, so the SDK reaches
 * its local target as it would against the real service.
 */
export async function startSyncStandIn({ keepaliveMs = 5_000 } = {}) {
  const streams = new Set();
  let writeCheckpoint = 0;
  const stats = { streams: 0, writeCheckpoints: 0, authHeaders: [] };

  const send = (res, obj) => res.write(JSON.stringify(obj) + '\n');
  const checkpoint = (res) => {
    send(res, {
      checkpoint: {
        last_op_id: String(writeCheckpoint),
        write_checkpoint: writeCheckpoint > 0 ? String(writeCheckpoint) : null,
        buckets: []
      }
    });
    send(res, { checkpoint_complete: { last_op_id: String(writeCheckpoint) } });
  };

  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    stats.authHeaders.push(req.headers['authorization']);
    if (req.method === 'POST' && url.pathname === '/sync/stream') {
      req.resume();
      stats.streams++;
      res.writeHead(200, { 'content-type': 'application/x-ndjson', 'cache-control': 'no-store' });
      checkpoint(res);
      const timer = setInterval(() => send(res, { token_expires_in: 3600 }), keepaliveMs);
      const entry = { res, timer };
      streams.add(entry);
      const done = () => {
        clearInterval(timer);
        streams.delete(entry);
      };
      res.on('close', done);
      req.on('close', done);
      return;
    }
    if (req.method === 'GET' && url.pathname === '/write-checkpoint2.json') {
      req.resume();
      stats.writeCheckpoints++;
      writeCheckpoint++;
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ data: { write_checkpoint: String(writeCheckpoint) } }));
      // Announce the new checkpoint, as the service would once replication caught up.
      setTimeout(() => {
        for (const s of streams) checkpoint(s.res);
      }, 10);
      return;
    }
    req.resume();
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: `stand-in has no ${req.method} ${url.pathname}` }));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    stats,
    async close() {
      for (const s of streams) {
        clearInterval(s.timer);
        s.res.destroy();
      }
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    }
  };
}

// -------------------------------------------------------------------------------------------
// Client schema (matches the server's demo Postgres schema)
// -------------------------------------------------------------------------------------------

const listsTable = () =>
  new Table({ created_at: column.text, name: column.text, owner_id: column.text });
const todosColumns = () => ({
  created_at: column.text,
  completed_at: column.text,
  description: column.text,
  completed: column.integer,
  created_by: column.text,
  completed_by: column.text,
  list_id: column.text
});

export const AppSchema = new Schema({ lists: listsTable(), todos: new Table(todosColumns()) });

/** The same schema with todos tracking previous values and metadata. */
export const TrackingSchema = new Schema({
  lists: listsTable(),
  todos: new Table(todosColumns(), { trackPrevious: true, trackMetadata: true })
});

export const COLUMNS = {
  lists: ['created_at', 'name', 'owner_id'],
  todos: ['created_at', 'completed_at', 'description', 'completed', 'created_by', 'completed_by', 'list_id']
};
const TIMESTAMP_COLUMNS = new Set(['created_at', 'completed_at']);
const BOOLEAN_COLUMNS = new Set(['completed']);

// -------------------------------------------------------------------------------------------
// A client: a real PowerSync database + connector using @crudgate/powersync-connector
// -------------------------------------------------------------------------------------------

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'crudgate-e2e-'));
process.on('exit', () => fs.rmSync(tmpRoot, { recursive: true, force: true }));

/**
 * Opens a fresh local database and a connector uploading to `crudgateUrl` through
 * @crudgate/powersync-connector. `wrapFetch(fetch)` lets a test intercept requests.
 */
export async function openClient({ schema = AppSchema, syncUrl, crudgateUrl, wrapFetch, getToken } = {}) {
  const db = new PowerSyncDatabase({
    schema,
    // Warnings and errors only; E2E_SDK_LOG=1 shows the SDK's debug log.
    logger: createConsoleLogger({ minLevel: process.env.E2E_SDK_LOG ? LogLevels.debug : LogLevels.warn }),
    database: { dbFilename: `client-${randomUUID()}.db`, dbLocation: tmpRoot }
  });
  await db.init();

  const rejections = [];
  const requests = []; // request bodies sent to crudgate
  const responses = []; // {status} or {error}
  const baseFetch = async (url, init) => {
    requests.push(JSON.parse(init.body));
    try {
      const res = await fetch(url, init);
      responses.push({ status: res.status });
      return res;
    } catch (e) {
      responses.push({ error: e });
      throw e;
    }
  };
  const uploader = new CrudgateUploader({
    url: `${crudgateUrl}/api/data`,
    getToken: getToken ?? (async () => DEV_TOKEN),
    onRejected: (r) => {
      rejections.push(r);
    },
    fetch: wrapFetch ? wrapFetch(baseFetch) : baseFetch
  });

  const uploadErrors = [];
  const connector = {
    fetchCredentials: async () => ({ endpoint: syncUrl, token: DEV_TOKEN }),
    uploadData: async (database) => {
      try {
        await uploader.uploadData(database);
      } catch (e) {
        uploadErrors.push(e);
        throw e;
      }
    }
  };

  return {
    db,
    connector,
    rejections,
    requests,
    responses,
    uploadErrors,
    async connect() {
      await db.connect(connector, { crudUploadThrottleMs: 200 });
      await waitFor('the SDK to connect to the sync stand-in', () => db.currentStatus.connected, {
        timeoutMs: 20_000
      });
    },
    async queueLength() {
      const r = await db.get('SELECT count(*) AS n FROM ps_crud');
      return Number(r.n);
    },
    /** Waits until the local upload queue is empty. */
    async waitUploaded(timeoutMs = 30_000) {
      await waitFor('the upload queue to drain', async () => (await this.queueLength()) === 0, {
        timeoutMs,
        intervalMs: 100
      });
    },
    async close() {
      try {
        await db.disconnect();
      } finally {
        await db.close();
      }
    }
  };
}

// -------------------------------------------------------------------------------------------
// Postgres
// -------------------------------------------------------------------------------------------

export async function pgConnect(databaseUrl) {
  const client = new pg.Client({ connectionString: databaseUrl });
  await client.connect();
  return client;
}

export async function truncateAll(pgc) {
  await pgc.query('TRUNCATE public.todos, public.lists CASCADE');
}

// -------------------------------------------------------------------------------------------
// Comparison of the SDK's local rows with Postgres, field by field
// -------------------------------------------------------------------------------------------

function normalise(columnName, value) {
  if (value === null || value === undefined) return null;
  if (BOOLEAN_COLUMNS.has(columnName)) {
    if (typeof value === 'boolean') return value;
    if (typeof value === 'number' || typeof value === 'bigint') return Number(value) !== 0;
    if (typeof value === 'string') return ['1', 'true', 't'].includes(value.toLowerCase());
  }
  if (TIMESTAMP_COLUMNS.has(columnName)) {
    const ms = value instanceof Date ? value.getTime() : Date.parse(String(value).replace(' ', 'T'));
    assert.ok(!Number.isNaN(ms), `unparseable timestamp in ${columnName}: ${value}`);
    return new Date(ms).toISOString();
  }
  if (columnName === 'id' || columnName === 'list_id') return String(value).toLowerCase();
  return value;
}

/**
 * Asserts that, for each table, the SDK's local rows and the Postgres rows are the same set of
 * ids with equal fields (booleans 0/1 vs true/false and timestamps normalised). `exclude` lists
 * local ids known not to be in Postgres (rejected writes). Returns the row counts.
 */
export async function assertSameRows(client, pgc, { exclude = [] } = {}) {
  const excluded = new Set(exclude.map((s) => s.toLowerCase()));
  const counts = {};
  for (const [table, cols] of Object.entries(COLUMNS)) {
    const local = (await client.db.getAll(`SELECT id, ${cols.join(', ')} FROM ${table} ORDER BY id`)).filter(
      (r) => !excluded.has(String(r.id).toLowerCase())
    );
    const remote = (await pgc.query(`SELECT id::text AS id, ${cols.join(', ')} FROM public.${table} ORDER BY id`)).rows;
    const byId = new Map(remote.map((r) => [String(r.id).toLowerCase(), r]));
    const localIds = local.map((r) => String(r.id).toLowerCase()).sort();
    const remoteIds = [...byId.keys()].sort();
    const missing = localIds.filter((id) => !byId.has(id));
    const extra = remoteIds.filter((id) => !localIds.includes(id));
    assert.deepEqual(
      { missing: missing.slice(0, 5), extra: extra.slice(0, 5), missingCount: missing.length, extraCount: extra.length },
      { missing: [], extra: [], missingCount: 0, extraCount: 0 },
      `${table}: local and Postgres ids differ`
    );
    for (const row of local) {
      const id = String(row.id).toLowerCase();
      const other = byId.get(id);
      for (const c of cols) {
        assert.deepEqual(
          normalise(c, other[c]),
          normalise(c, row[c]),
          `${table} ${id} column ${c}: Postgres ${JSON.stringify(other[c])} vs local ${JSON.stringify(row[c])}`
        );
      }
    }
    counts[table] = local.length;
  }
  return counts;
}

/** Asserts the SDK's upload queue is empty. */
export async function assertQueueEmpty(client) {
  assert.equal(await client.db.getCrudBatch(), null, 'getCrudBatch() returns null');
  assert.equal(await client.queueLength(), 0, 'ps_crud is empty');
}

export const ts = (offsetMs = 0) => new Date(Date.UTC(2025, 0, 1, 12, 0, 0) + offsetMs).toISOString();
export const uuid = () => randomUUID();

/** Writes a file in the suite's temporary folder; returns its path. */
export function writeTempFile(name, content) {
  const p = path.join(tmpRoot, name);
  fs.writeFileSync(p, content);
  return p;
}

/** An HS256 JWT over `claims`, signed with `secret` (a Buffer). */
export function signHs256(claims, secret) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const input = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${input}.${createHmac('sha256', secret).update(input).digest('base64url')}`;
}

// End-to-end tests: the real @powersync/node SDK uploading through @crudgate/powersync-connector
// to a real crudgate and Postgres. Each test ends by comparing Postgres with the SDK's local rows
// field by field and asserting the SDK's upload queue is empty.

import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';

import {
  TrackingSchema,
  assertQueueEmpty,
  assertSameRows,
  freePort,
  openClient,
  pgConnect,
  signHs256,
  startCrudgate,
  startSyncStandIn,
  truncateAll,
  ts,
  uuid,
  waitFor,
  writeTempFile
} from '../lib/harness.mjs';

let server; // zero-config crudgate: owns the throwaway Postgres
let sync; // stand-in for the PowerSync service
let pgc;

before(async () => {
  server = await startCrudgate();
  sync = await startSyncStandIn();
  pgc = await pgConnect(server.databaseUrl);
});

after(async () => {
  await pgc?.end();
  await sync?.close();
  await server?.stop();
});

beforeEach(async () => {
  await truncateAll(pgc);
});

/** Runs `fn` with a fresh, not yet connected client; closes it afterwards. */
async function withClient(options, fn) {
  const client = await openClient({ syncUrl: sync.url, crudgateUrl: server.url, ...options });
  try {
    await fn(client);
  } finally {
    await client.close();
  }
}

const insertList = (db, id, name, extra = {}) =>
  db.execute('INSERT INTO lists (id, created_at, name, owner_id) VALUES (?, ?, ?, ?)', [
    id,
    extra.created_at ?? ts(),
    name,
    extra.owner_id ?? 'user-1'
  ]);

const insertTodo = (db, id, listId, description, extra = {}) =>
  db.execute(
    `INSERT INTO todos (id, created_at, completed_at, description, completed, created_by, completed_by, list_id)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
    [
      id,
      extra.created_at ?? ts(),
      extra.completed_at ?? null,
      description,
      extra.completed ?? 0,
      extra.created_by ?? 'user-1',
      extra.completed_by ?? null,
      listId
    ]
  );

test('inserts', async () => {
  await withClient({}, async (client) => {
    const { db } = client;
    await client.connect();
    const lists = [uuid(), uuid(), uuid()];
    for (const [i, id] of lists.entries()) await insertList(db, id, `list ${i}`, { created_at: ts(i * 1000) });
    // A list with a NULL column (absent from the PUT).
    await db.execute('INSERT INTO lists (id, created_at, name) VALUES (?, ?, ?)', [uuid(), ts(5), 'no owner']);
    for (let i = 0; i < 6; i++) {
      await insertTodo(db, uuid(), lists[i % 3], `todo ${i} – ünïcødé ✓ "quoted" 'single'`, {
        created_at: ts(10_000 + i),
        completed: i % 2,
        completed_at: i % 2 ? ts(20_000 + i) : null,
        completed_by: i % 2 ? 'user-2' : null
      });
    }
    await client.waitUploaded();
    const counts = await assertSameRows(client, pgc);
    assert.deepEqual(counts, { lists: 4, todos: 6 });
    assert.deepEqual(client.rejections, []);
    await assertQueueEmpty(client);
  });
});

test('updates', async () => {
  await withClient({}, async (client) => {
    const { db } = client;
    await client.connect();
    const list = uuid();
    const todos = [uuid(), uuid(), uuid()];
    await insertList(db, list, 'groceries');
    for (const id of todos) await insertTodo(db, id, list, `buy ${id.slice(0, 4)}`);
    await client.waitUploaded();

    await db.execute('UPDATE lists SET name = ?, owner_id = ? WHERE id = ?', ['Groceries (renamed)', 'user-9', list]);
    await db.execute('UPDATE todos SET completed = 1, completed_at = ?, completed_by = ? WHERE id = ?', [
      ts(60_000),
      'user-2',
      todos[0]
    ]);
    await db.execute('UPDATE todos SET description = ? WHERE id = ?', ['buy oat milk', todos[1]]);
    // Several updates of one row, in separate transactions.
    for (let i = 0; i < 5; i++) {
      await db.execute('UPDATE todos SET description = ? WHERE id = ?', [`revision ${i}`, todos[2]]);
    }
    await client.waitUploaded();
    assert.ok(
      client.requests.some((r) => r.transactions.some((t) => t.crud.some((c) => c.op === 'PATCH'))),
      'PATCH operations were sent'
    );
    await assertSameRows(client, pgc);
    const row = (await pgc.query('SELECT completed, description FROM todos WHERE id = $1', [todos[2]])).rows[0];
    assert.equal(row.description, 'revision 4');
    assert.deepEqual(client.rejections, []);
    await assertQueueEmpty(client);
  });
});

test('deletes', async () => {
  await withClient({}, async (client) => {
    const { db } = client;
    await client.connect();
    const [keep, drop] = [uuid(), uuid()];
    const keepTodos = [uuid(), uuid(), uuid()];
    const dropTodos = [uuid(), uuid()];
    await insertList(db, keep, 'keep');
    await insertList(db, drop, 'drop');
    for (const id of keepTodos) await insertTodo(db, id, keep, 'keep me');
    for (const id of dropTodos) await insertTodo(db, id, drop, 'in dropped list');
    await client.waitUploaded();
    assert.equal((await pgc.query('SELECT count(*)::int AS n FROM todos')).rows[0].n, 5);

    await db.execute('DELETE FROM todos WHERE id = ?', [keepTodos[0]]);
    // Delete a list and its todos locally, as an app would (Postgres cascades too).
    await db.writeTransaction(async (tx) => {
      await tx.execute('DELETE FROM todos WHERE list_id = ?', [drop]);
      await tx.execute('DELETE FROM lists WHERE id = ?', [drop]);
    });
    // Deleting a row inserted and deleted while queued.
    const transient = uuid();
    await insertTodo(db, transient, keep, 'short-lived');
    await db.execute('DELETE FROM todos WHERE id = ?', [transient]);
    await client.waitUploaded();

    const counts = await assertSameRows(client, pgc);
    assert.deepEqual(counts, { lists: 1, todos: 2 });
    const gone = await pgc.query('SELECT id FROM todos WHERE id = ANY($1::uuid[])', [[keepTodos[0], ...dropTodos, transient]]);
    assert.equal(gone.rowCount, 0);
    assert.deepEqual(client.rejections, []);
    await assertQueueEmpty(client);
  });
});

test('multi-statement writeTransactions', async () => {
  await withClient({}, async (client) => {
    const { db } = client;
    await client.connect();
    const lists = [uuid(), uuid()];
    for (const [n, list] of lists.entries()) {
      await db.writeTransaction(async (tx) => {
        await tx.execute('INSERT INTO lists (id, created_at, name, owner_id) VALUES (?, ?, ?, ?)', [list, ts(n), `tx list ${n}`, 'user-1']);
        for (let i = 0; i < 4; i++) {
          await tx.execute(
            'INSERT INTO todos (id, created_at, description, completed, list_id) VALUES (?, ?, ?, 0, ?)',
            [uuid(), ts(100 + i), `tx ${n} todo ${i}`, list]
          );
        }
        await tx.execute('UPDATE lists SET name = ? WHERE id = ?', [`tx list ${n} (final)`, list]);
        await tx.execute("UPDATE todos SET completed = 1, completed_at = ? WHERE list_id = ? AND description LIKE '%todo 0'", [
          ts(500),
          list
        ]);
      });
    }
    await client.waitUploaded();
    const sent = client.requests.flatMap((r) => r.transactions);
    const big = sent.filter((t) => t.crud.length === 7);
    assert.equal(big.length, 2, `two transactions of 7 operations were sent (got sizes ${sent.map((t) => t.crud.length)})`);
    for (const t of big) {
      assert.deepEqual(t.crud.map((c) => c.op), ['PUT', 'PUT', 'PUT', 'PUT', 'PUT', 'PATCH', 'PATCH']);
      assert.ok(t.crud.every((c) => c.transaction_id === t.transaction_id));
    }
    const counts = await assertSameRows(client, pgc);
    assert.deepEqual(counts, { lists: 2, todos: 8 });
    assert.deepEqual(client.rejections, []);
    await assertQueueEmpty(client);
  });
});

test('an update that sets a column to NULL', async () => {
  await withClient({}, async (client) => {
    const { db } = client;
    await client.connect();
    const list = uuid();
    const todo = uuid();
    await insertList(db, list, 'nulls', { owner_id: 'someone' });
    await insertTodo(db, todo, list, 'done, then undone', {
      completed: 1,
      completed_at: ts(1000),
      completed_by: 'user-2'
    });
    await client.waitUploaded();
    const before = (await pgc.query('SELECT completed_at, completed_by FROM todos WHERE id = $1', [todo])).rows[0];
    assert.notEqual(before.completed_at, null);

    await db.execute('UPDATE todos SET completed = 0, completed_at = NULL, completed_by = NULL WHERE id = ?', [todo]);
    await db.execute('UPDATE lists SET owner_id = NULL WHERE id = ?', [list]);
    await client.waitUploaded();

    const patch = client.requests
      .flatMap((r) => r.transactions.flatMap((t) => t.crud))
      .find((c) => c.op === 'PATCH' && c.id === todo);
    assert.deepEqual(patch.op_data, { completed: 0, completed_at: null, completed_by: null });
    const after = (await pgc.query('SELECT completed, completed_at, completed_by FROM todos WHERE id = $1', [todo])).rows[0];
    assert.deepEqual(after, { completed: false, completed_at: null, completed_by: null });
    assert.equal((await pgc.query('SELECT owner_id FROM lists WHERE id = $1', [list])).rows[0].owner_id, null);
    await assertSameRows(client, pgc);
    assert.deepEqual(client.rejections, []);
    await assertQueueEmpty(client);
  });
});

test('a table with previous values and metadata', async () => {
  await withClient({ schema: TrackingSchema }, async (client) => {
    const { db } = client;
    await client.connect();
    const list = uuid();
    const [a, b] = [uuid(), uuid()];
    await insertList(db, list, 'tracked');
    await db.execute(
      'INSERT INTO todos (id, created_at, description, completed, list_id, _metadata) VALUES (?, ?, ?, 0, ?, ?)',
      [a, ts(1), 'with metadata', list, JSON.stringify({ source: 'e2e', step: 'insert' })]
    );
    await insertTodo(db, b, list, 'to delete');
    await client.waitUploaded();
    await db.execute('UPDATE todos SET description = ?, completed = 1, _metadata = ? WHERE id = ?', [
      'changed',
      JSON.stringify({ source: 'e2e', step: 'update' }),
      a
    ]);
    await db.execute('DELETE FROM todos WHERE id = ?', [b]);
    await client.waitUploaded();

    const ops = client.requests.flatMap((r) => r.transactions.flatMap((t) => t.crud));
    const put = ops.find((c) => c.op === 'PUT' && c.id === a);
    assert.deepEqual(JSON.parse(put.metadata), { source: 'e2e', step: 'insert' });
    assert.equal(put.previous_values, undefined, 'no previous values on PUT');
    const patch = ops.find((c) => c.op === 'PATCH' && c.id === a);
    assert.deepEqual(JSON.parse(patch.metadata), { source: 'e2e', step: 'update' });
    assert.equal(patch.previous_values.description, 'with metadata');
    assert.equal(patch.previous_values.completed, 0);
    const del = ops.find((c) => c.op === 'DELETE' && c.id === b);
    assert.equal(del.previous_values.description, 'to delete');
    assert.equal(del.op_data, undefined);
    // The lists table tracks neither.
    const listPut = ops.find((c) => c.table === 'lists');
    assert.equal(listPut.metadata, undefined);

    const counts = await assertSameRows(client, pgc);
    assert.deepEqual(counts, { lists: 1, todos: 1 });
    assert.deepEqual(client.rejections, []);
    await assertQueueEmpty(client);
  });
});

/** Makes `n` writes while disconnected: one list and n-1 todos, each its own transaction. */
async function offlineWrites(db, n) {
  const list = uuid();
  await insertList(db, list, 'bulk');
  const ids = [];
  for (let i = 1; i < n; i++) {
    const id = uuid();
    ids.push(id);
    await insertTodo(db, id, list, `bulk todo ${i}`, { created_at: ts(i), completed: i % 3 === 0 ? 1 : 0 });
  }
  return { list, todos: ids };
}

test('1,000 writes made while disconnected, uploaded after connect', async () => {
  await withClient({}, async (client) => {
    const { db } = client;
    const { todos } = await offlineWrites(db, 1000);
    assert.equal(await client.queueLength(), 1000);
    assert.equal((await pgc.query('SELECT count(*)::int AS n FROM todos')).rows[0].n, 0, 'nothing uploaded while disconnected');

    await client.connect();
    await client.waitUploaded(60_000);
    const counts = await assertSameRows(client, pgc);
    assert.deepEqual(counts, { lists: 1, todos: todos.length });
    // Batched: at most 50 transactions per request.
    assert.ok(client.requests.every((r) => r.transactions.length <= 50));
    assert.ok(client.requests.length >= 20 && client.requests.length <= 25, `${client.requests.length} requests`);
    assert.deepEqual(client.rejections, []);
    await assertQueueEmpty(client);
  });
});

test('a rejected write (foreign key violation) followed by good writes', async () => {
  await withClient({}, async (client) => {
    const { db } = client;
    const list = uuid();
    const orphan = uuid();
    const good = [uuid(), uuid(), uuid()];
    await insertList(db, list, 'real list');
    await insertTodo(db, good[0], list, 'before the bad one');
    await insertTodo(db, orphan, uuid(), 'references no list');
    await insertTodo(db, good[1], list, 'after the bad one');
    await db.execute('UPDATE todos SET completed = 1, completed_at = ? WHERE id = ?', [ts(9), good[0]]);
    await insertTodo(db, good[2], list, 'last');
    await client.connect();
    await client.waitUploaded();

    assert.equal(client.rejections.length, 1, 'onRejected called once');
    const r = client.rejections[0];
    assert.equal(r.code, 'FOREIGN_KEY_VIOLATION');
    assert.equal(r.requiresClientHandling, false);
    assert.equal(r.operationIndex, 0);
    assert.equal(r.operation.id, orphan);
    assert.equal(r.transaction.crud[0].id, orphan);
    assert.equal(typeof r.message, 'string');
    assert.ok(r.message.length > 0);

    assert.equal((await pgc.query('SELECT count(*)::int AS n FROM todos WHERE id = $1', [orphan])).rows[0].n, 0);
    // The SDK keeps the rejected row locally until the sync stream corrects it; compare the rest.
    const counts = await assertSameRows(client, pgc, { exclude: [orphan] });
    assert.deepEqual(counts, { lists: 1, todos: 3 });
    await assertQueueEmpty(client);
  });
});

/**
 * Installs a trigger counting every row application (insert or update) per todo id, so a
 * transaction applied twice shows up as a count of 2.
 */
async function installApplyCounter(pgc) {
  await pgc.query(`
    CREATE TABLE IF NOT EXISTS e2e_apply_count (id uuid PRIMARY KEY, n int NOT NULL);
    TRUNCATE e2e_apply_count;
    CREATE OR REPLACE FUNCTION e2e_count_apply() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO e2e_apply_count (id, n) VALUES (NEW.id, 1)
        ON CONFLICT (id) DO UPDATE SET n = e2e_apply_count.n + 1;
      RETURN NULL;
    END $$;
    DROP TRIGGER IF EXISTS e2e_count_apply ON public.todos;
    CREATE TRIGGER e2e_count_apply AFTER INSERT OR UPDATE ON public.todos
      FOR EACH ROW EXECUTE FUNCTION e2e_count_apply();
  `);
}

async function removeApplyCounter(pgc) {
  await pgc.query('DROP TRIGGER IF EXISTS e2e_count_apply ON public.todos');
}

/** Asserts `expected` todos exist and each was applied exactly once. */
async function assertAppliedOnce(pgc, client, expected) {
  const total = (await pgc.query('SELECT count(*)::int AS n FROM todos')).rows[0].n;
  assert.equal(total, expected, 'nothing lost');
  const counted = (await pgc.query('SELECT count(*)::int AS ids FROM e2e_apply_count')).rows[0];
  const doubled = (await pgc.query('SELECT count(*)::int AS n FROM e2e_apply_count WHERE n > 1')).rows[0].n;
  assert.equal(counted.ids, expected, 'every todo applied');
  assert.equal(client.rejections.length, 0, `no rejections (got ${client.rejections.map((r) => r.code)})`);
  assert.equal(doubled, 0, `nothing applied twice (${doubled} todos were applied more than once: replayed after the lost response)`);
}

test('crudgate restarted mid-upload: nothing lost, nothing doubled', async (t) => {
  // Instance B shares A's database and is killed and restarted on the same port.
  const port = await freePort();
  let b = await startCrudgate({ databaseUrl: server.databaseUrl, port });

  await installApplyCounter(pgc);

  let killed = false;
  const killAt = 4; // kill during the 4th request
  let requestNo = 0;
  const wrapFetch = (inner) => async (url, init) => {
    requestNo++;
    if (requestNo !== killAt) return inner(url, init);
    const before = (await pgc.query('SELECT count(*)::int AS n FROM todos')).rows[0].n;
    const pending = inner(url, init).then(
      (res) => ({ res }),
      (error) => ({ error })
    );
    // Kill as soon as this request has committed something (mid-batch, most likely), or when its
    // response arrives, whichever comes first; the client gets no acknowledgement either way.
    let answered = false;
    pending.then(() => (answered = true));
    await waitFor(
      'the 4th request to commit',
      async () => answered || (await pgc.query('SELECT count(*)::int AS n FROM todos')).rows[0].n > before,
      { timeoutMs: 20_000, intervalMs: 2 }
    );
    await b.kill();
    killed = true;
    await pending;
    throw new TypeError('fetch failed (crudgate killed mid-request; response lost)');
  };

  try {
    await withClient({ crudgateUrl: b.url, wrapFetch }, async (client) => {
      const { db } = client;
      const { todos } = await offlineWrites(db, 1000);
      await client.connect();

      await waitFor('crudgate B to be killed mid-upload', () => killed, { timeoutMs: 30_000 });
      const idsAtKill = new Set((await pgc.query('SELECT id::text AS id FROM todos')).rows.map((r) => r.id));
      const committedAtKill = idsAtKill.size;
      const requestsAtKill = client.requests.length;
      assert.ok(committedAtKill > 0 && committedAtKill < todos.length, `killed mid-upload (${committedAtKill} todos committed)`);
      t.diagnostic(`killed crudgate B with ${committedAtKill} of ${todos.length} todos committed`);
      // Let the SDK hit the dead server at least once more, then start B again on the same port.
      await waitFor('an upload attempt against the stopped server', () => client.uploadErrors.length >= 2, {
        timeoutMs: 20_000
      });
      b = await startCrudgate({ databaseUrl: server.databaseUrl, port });

      await client.waitUploaded(60_000);

      // The unacknowledged request was sent again, including transactions already committed.
      const replayed = client.requests
        .slice(requestsAtKill)
        .flatMap((r) => r.transactions.flatMap((tx) => tx.crud.map((c) => c.id)))
        .filter((id) => idsAtKill.has(id));
      assert.ok(replayed.length > 0, 'committed but unacknowledged transactions were sent again');
      t.diagnostic(`${replayed.length} already-committed todos were sent again after the restart`);

      await assertAppliedOnce(pgc, client, todos.length);

      const counts = await assertSameRows(client, pgc);
      assert.deepEqual(counts, { lists: 1, todos: todos.length });
      await assertQueueEmpty(client);
    });
  } finally {
    await removeApplyCounter(pgc);
    await b.stop();
  }
});

test('crudgate killed while its transaction waits on a lock: nothing lost, nothing doubled', async (t) => {
  const port = await freePort();
  let b = await startCrudgate({ databaseUrl: server.databaseUrl, port });
  await installApplyCounter(pgc);
  // A second session holds a lock that blocks inserts into todos, so crudgate's first upload
  // stops inside its database transaction; crudgate is killed there, then the lock released.
  const locker = await pgConnect(server.databaseUrl);
  let lockHeld = false;
  try {
    await withClient({ crudgateUrl: b.url }, async (client) => {
      const { db } = client;
      const { todos } = await offlineWrites(db, 200);
      await locker.query('BEGIN');
      await locker.query('LOCK TABLE public.todos IN SHARE ROW EXCLUSIVE MODE');
      lockHeld = true;
      await client.connect();

      await waitFor(
        'crudgate to block on the lock inside its transaction',
        async () =>
          (
            await pgc.query(
              `SELECT count(*)::int AS n FROM pg_stat_activity
                WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid() AND datname = current_database()`
            )
          ).rows[0].n > 0,
        { timeoutMs: 20_000, intervalMs: 20 }
      );
      await b.kill();
      await locker.query('ROLLBACK');
      lockHeld = false;
      // The blocked backend notices its client is gone; wait until nothing waits any more.
      await waitFor('the dead connection\'s backend to finish', async () =>
        (
          await pgc.query(
            `SELECT count(*)::int AS n FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid() AND datname = current_database()`
          )
        ).rows[0].n === 0
      );
      const committedAtKill = (await pgc.query('SELECT count(*)::int AS n FROM todos')).rows[0].n;
      t.diagnostic(`${committedAtKill} of ${todos.length} todos committed by the killed instance`);
      assert.ok(committedAtKill < todos.length, 'killed before the upload finished');

      await waitFor('an upload attempt against the stopped server', () => client.uploadErrors.length >= 1, {
        timeoutMs: 20_000
      });
      b = await startCrudgate({ databaseUrl: server.databaseUrl, port });
      await client.waitUploaded(60_000);

      await assertAppliedOnce(pgc, client, todos.length);
      const counts = await assertSameRows(client, pgc);
      assert.deepEqual(counts, { lists: 1, todos: todos.length });
      await assertQueueEmpty(client);
    });
  } finally {
    if (lockHeld) await locker.query('ROLLBACK').catch(() => {});
    await locker.end();
    await removeApplyCounter(pgc);
    await b.stop();
  }
});

test('bearer token refreshed after a 401 (crudgate verifying JWTs)', async () => {
  const secret = randomBytes(32);
  const configFile = writeTempFile(
    'jwt.toml',
    `[auth]\nmode = "jwt"\naudiences = ["crudgate-e2e"]\nhs256_secret = "${secret.toString('base64url')}"\n`
  );
  const b = await startCrudgate({ databaseUrl: server.databaseUrl, configFile });
  const now = Math.floor(Date.now() / 1000);
  const token = (iat) => signHs256({ sub: 'user-1', aud: 'crudgate-e2e', iat, exp: iat + 600 }, secret);
  const calls = [];
  // The app's cached token has expired; a refresh gets a valid one.
  const getToken = async ({ refresh }) => {
    calls.push(refresh);
    return refresh ? token(now) : token(now - 3600);
  };
  try {
    await withClient({ crudgateUrl: b.url, getToken }, async (client) => {
      const { db } = client;
      const list = uuid();
      await insertList(db, list, 'authenticated');
      await insertTodo(db, uuid(), list, 'with a fresh token');
      await client.connect();
      await client.waitUploaded();

      assert.deepEqual(calls.slice(0, 2), [false, true], 'getToken, then getToken({refresh: true}) after the 401');
      assert.deepEqual(
        client.responses.slice(0, 2).map((r) => r.status),
        [401, 200]
      );
      const counts = await assertSameRows(client, pgc);
      assert.deepEqual(counts, { lists: 1, todos: 1 });
      assert.deepEqual(client.rejections, []);
      await assertQueueEmpty(client);
    });
  } finally {
    await b.stop();
  }
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { CommonPowerSyncDatabase, PowerSyncBackendConnector } from '@powersync/common';

import {
  ClientHandlingRequiredError,
  CrudgateUploader,
  HttpUploadError,
  NetworkUploadError,
  NotAttemptedError,
  RetryableUploadError,
  type CrudEntryLike,
  type CrudTransactionLike,
  type Rejection,
  type TransactionResult,
  type UploadDatabase,
  type WireRequest
} from '../src/index.js';

// ---------------------------------------------------------------------------------------------
// Compile-time check: the real SDK database and connector types fit this package's types.
// ---------------------------------------------------------------------------------------------
export function sdkTypesFit(uploader: CrudgateUploader): PowerSyncBackendConnector {
  return {
    fetchCredentials: async () => null,
    uploadData: async (db: CommonPowerSyncDatabase) => {
      await uploader.uploadData(db);
    }
  };
}

// ---------------------------------------------------------------------------------------------
// A fake local queue with the SDK's semantics: complete() on a transaction removes it and
// everything before it; the iterator yields the queue's transactions in order.
// ---------------------------------------------------------------------------------------------
class FakeQueue implements UploadDatabase {
  queue: { crud: CrudEntryLike[]; transactionId: number }[] = [];
  completeCalls = 0;
  private nextOp = 1;
  private nextTx = 1;

  constructor(private readonly withIterator = true) {}

  /** Adds a transaction of `n` PUTs to table `t`; returns its id. */
  add(n = 1, table = 'todos', extra: Partial<CrudEntryLike> = {}): number {
    const txId = this.nextTx++;
    const crud: CrudEntryLike[] = [];
    for (let i = 0; i < n; i++) {
      const op = this.nextOp++;
      crud.push({
        clientId: op,
        id: `00000000-0000-4000-8000-${String(op).padStart(12, '0')}`,
        op: 'PUT',
        table,
        transactionId: txId,
        opData: { description: `item ${op}` },
        ...extra
      });
    }
    this.queue.push({ crud, transactionId: txId });
    return txId;
  }

  private wrap(t: { crud: CrudEntryLike[]; transactionId: number }): CrudTransactionLike {
    return {
      crud: t.crud,
      transactionId: t.transactionId,
      complete: async () => {
        this.completeCalls++;
        const idx = this.queue.findIndex((q) => q.transactionId === t.transactionId);
        assert.ok(idx >= 0, 'complete() on a transaction no longer queued');
        this.queue.splice(0, idx + 1);
      }
    };
  }

  async getClientId(): Promise<string> {
    return 'c1d2e3f4-0000-4000-8000-000000000001';
  }

  async getNextCrudTransaction(): Promise<CrudTransactionLike | null> {
    const first = this.queue[0];
    return first ? this.wrap(first) : null;
  }

  get getCrudTransactions(): UploadDatabase['getCrudTransactions'] {
    if (!this.withIterator) return undefined;
    return () => {
      const snapshot = [...this.queue];
      const self = this;
      return (async function* () {
        for (const t of snapshot) yield self.wrap(t);
      })();
    };
  }

  txIds(): number[] {
    return this.queue.map((q) => q.transactionId);
  }
}

// ---------------------------------------------------------------------------------------------
// A local HTTP server whose answers each test scripts.
// ---------------------------------------------------------------------------------------------
interface Received {
  headers: http.IncomingHttpHeaders;
  body: WireRequest;
}
type Answer = { status?: number; body: unknown } | ((req: Received) => { status?: number; body: unknown });

async function withServer(
  answers: Answer[] | ((req: Received, n: number) => { status?: number; body: unknown }),
  fn: (url: string, received: Received[]) => Promise<void>
): Promise<void> {
  const received: Received[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const r: Received = { headers: req.headers, body: JSON.parse(Buffer.concat(chunks).toString('utf8')) };
      received.push(r);
      let answer: { status?: number; body: unknown };
      if (typeof answers === 'function') {
        answer = answers(r, received.length - 1);
      } else {
        const a = answers[received.length - 1];
        assert.ok(a, `unexpected request #${received.length}`);
        answer = typeof a === 'function' ? a(r) : a;
      }
      res.writeHead(answer.status ?? 200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(answer.body));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  try {
    await fn(`http://127.0.0.1:${port}/api/data`, received);
  } finally {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

const ok = (n: number): { body: { results: TransactionResult[] } } => ({
  body: { results: Array.from({ length: n }, () => ({ status: 'success' as const })) }
});
const successFor = (req: Received) => ({
  body: { results: req.body.transactions.map(() => ({ status: 'success' })) }
});

function uploader(url: string, extra: Partial<ConstructorParameters<typeof CrudgateUploader>[0]> = {}) {
  return new CrudgateUploader({ url, getToken: async () => 'tok', ...extra });
}

// ---------------------------------------------------------------------------------------------

test('empty queue sends nothing', async () => {
  await withServer([], async (url, received) => {
    const q = new FakeQueue();
    const summary = await uploader(url).uploadData(q);
    assert.deepEqual(summary, { sent: 0, completed: 0, rejected: 0 });
    assert.equal(received.length, 0);
  });
});

test('request body and headers follow the contract', async () => {
  await withServer([ok(3)], async (url, received) => {
    const q = new FakeQueue();
    q.add(1);
    q.add(1, 'lists', {
      op: 'PATCH',
      opData: { name: null },
      previousValues: { name: 'old' },
      metadata: '{"source":"test"}'
    });
    q.add(1, 'todos', { op: 'DELETE', opData: undefined });
    const summary = await uploader(url, { getToken: async () => 'secret-token' }).uploadData(q);
    assert.deepEqual(summary, { sent: 3, completed: 3, rejected: 0 });
    assert.equal(received.length, 1);
    const r = received[0]!;
    assert.equal(r.headers['authorization'], 'Bearer secret-token');
    assert.equal(r.headers['powersync-client-id'], 'c1d2e3f4-0000-4000-8000-000000000001');
    assert.match(String(r.headers['content-type']), /^application\/json/);
    assert.deepEqual(r.body, {
      client_id: 'c1d2e3f4-0000-4000-8000-000000000001',
      transactions: [
        {
          transaction_id: 1,
          crud: [
            {
              id: '00000000-0000-4000-8000-000000000001',
              op: 'PUT',
              table: 'todos',
              transaction_id: 1,
              op_id: 1,
              op_data: { description: 'item 1' }
            }
          ]
        },
        {
          transaction_id: 2,
          crud: [
            {
              id: '00000000-0000-4000-8000-000000000002',
              op: 'PATCH',
              table: 'lists',
              transaction_id: 2,
              op_id: 2,
              op_data: { name: null },
              previous_values: { name: 'old' },
              metadata: '{"source":"test"}'
            }
          ]
        },
        {
          transaction_id: 3,
          crud: [
            {
              id: '00000000-0000-4000-8000-000000000003',
              op: 'DELETE',
              table: 'todos',
              transaction_id: 3,
              op_id: 3
            }
          ]
        }
      ]
    });
    assert.deepEqual(q.txIds(), []);
    assert.equal(q.completeCalls, 1, 'complete() once, on the last accepted transaction');
  });
});

test('a transaction without an id is sent without transaction_id (never an invented one)', async () => {
  await withServer([ok(1)], async (url, received) => {
    const q = new FakeQueue(false);
    q.add(2, 'todos', { transactionId: undefined });
    (q.queue[0] as { transactionId?: number }).transactionId = undefined;
    await uploader(url).uploadData(q);
    const tx = received[0]!.body.transactions[0]!;
    assert.equal('transaction_id' in tx, false);
    assert.deepEqual(
      tx.crud.map((c) => ['transaction_id' in c, c.op_id]),
      [
        [false, 1],
        [false, 2]
      ]
    );
  });
});

test('packs at most maxTransactions per request', async () => {
  await withServer(successFor, async (url, received) => {
    const q = new FakeQueue();
    for (let i = 0; i < 120; i++) q.add(1);
    const u = uploader(url);
    assert.equal((await u.uploadData(q)).sent, 50);
    assert.equal((await u.uploadData(q)).sent, 50);
    assert.equal((await u.uploadData(q)).sent, 20);
    assert.equal((await u.uploadData(q)).sent, 0);
    assert.deepEqual(
      received.map((r) => r.body.transactions.length),
      [50, 50, 20]
    );
    assert.deepEqual(q.txIds(), []);
  });
});

test('packs at most maxOperations per request, never splitting a transaction', async () => {
  await withServer(successFor, async (url, received) => {
    const q = new FakeQueue();
    q.add(4);
    q.add(4);
    q.add(12); // larger than maxOperations: goes alone
    q.add(1);
    const u = uploader(url, { maxOperations: 10 });
    while ((await u.uploadData(q)).sent > 0) {
      /* drain */
    }
    assert.deepEqual(
      received.map((r) => r.body.transactions.map((t) => t.crud.length)),
      [[4, 4], [12], [1]]
    );
  });
});

test('works without the transaction iterator (one transaction per request)', async () => {
  await withServer(successFor, async (url, received) => {
    const q = new FakeQueue(false);
    q.add(2);
    q.add(3);
    const u = uploader(url);
    while ((await u.uploadData(q)).sent > 0) {
      /* drain */
    }
    assert.deepEqual(
      received.map((r) => r.body.transactions.length),
      [1, 1]
    );
    assert.deepEqual(q.txIds(), []);
  });
});

test('fatal_error without client handling: onRejected, completed, batch continues', async () => {
  const fatal: TransactionResult = {
    status: 'fatal_error',
    requires_client_handling: false,
    message: 'transaction failed',
    failed_operation: {
      error_code: 'FOREIGN_KEY_VIOLATION',
      message: 'list does not exist',
      details: { constraint: 'todos_list_id_fkey' },
      operation_index: 1
    }
  };
  await withServer(
    [{ body: { results: [{ status: 'success' }, fatal, { status: 'not_attempted' }, { status: 'not_attempted' }] } }, ok(2)],
    async (url, received) => {
      const q = new FakeQueue();
      q.add(1);
      const bad = q.add(2);
      q.add(1);
      q.add(1);
      const rejections: Rejection[] = [];
      const u = uploader(url, { onRejected: (r) => void rejections.push(r) });
      // The stop after a rejection is normal: return, so the SDK uploads the rest at once.
      assert.deepEqual(await u.uploadData(q), { sent: 4, completed: 2, rejected: 1 });
      assert.deepEqual(q.txIds(), [3, 4]);
      assert.equal(rejections.length, 1);
      const r = rejections[0]!;
      assert.equal(r.transaction.transactionId, bad);
      assert.equal(r.operationIndex, 1);
      assert.equal(r.operation?.clientId, 3);
      assert.equal(r.code, 'FOREIGN_KEY_VIOLATION');
      assert.equal(r.message, 'list does not exist');
      assert.deepEqual(r.details, { constraint: 'todos_list_id_fkey' });
      assert.equal(r.requiresClientHandling, false);
      assert.deepEqual(await u.uploadData(q), { sent: 2, completed: 2, rejected: 0 });
      assert.deepEqual(q.txIds(), []);
      assert.equal(received.length, 2);
    }
  );
});

test('retryable_error: completes the prefix, waits retry_after_ms, throws', async () => {
  await withServer(
    [
      {
        body: {
          results: [
            { status: 'success' },
            { status: 'retryable_error', message: 'deadlock', retry_after_ms: 150 },
            { status: 'not_attempted' }
          ]
        }
      }
    ],
    async (url) => {
      const q = new FakeQueue();
      q.add();
      q.add();
      q.add();
      const started = Date.now();
      await assert.rejects(uploader(url).uploadData(q), (e: unknown) => {
        assert.ok(e instanceof RetryableUploadError);
        assert.equal(e.retryAfterMs, 150);
        assert.match(e.message, /deadlock/);
        return true;
      });
      assert.ok(Date.now() - started >= 140, 'waited for retry_after_ms');
      assert.deepEqual(q.txIds(), [2, 3]);
    }
  );
});

test('fatal_error requiring client handling: callback, prefix completed, throws, stays queued', async () => {
  await withServer(
    [
      {
        body: {
          results: [
            { status: 'success' },
            {
              status: 'fatal_error',
              requires_client_handling: true,
              message: 'conflict',
              failed_operation: { error_code: 'UNIQUE_VIOLATION', message: 'dup', details: null, operation_index: 0 }
            },
            { status: 'not_attempted' }
          ]
        }
      }
    ],
    async (url) => {
      const q = new FakeQueue();
      q.add();
      q.add();
      q.add();
      const rejections: Rejection[] = [];
      await assert.rejects(
        uploader(url, { onRejected: (r) => void rejections.push(r) }).uploadData(q),
        ClientHandlingRequiredError
      );
      assert.equal(rejections.length, 1);
      assert.equal(rejections[0]!.requiresClientHandling, true);
      assert.equal(rejections[0]!.code, 'UNIQUE_VIOLATION');
      assert.deepEqual(q.txIds(), [2, 3]);
    }
  );
});

test('not_attempted first: nothing completed, throws', async () => {
  await withServer([{ body: { results: [{ status: 'not_attempted' }] } }], async (url) => {
    const q = new FakeQueue();
    q.add();
    await assert.rejects(uploader(url).uploadData(q), NotAttemptedError);
    assert.deepEqual(q.txIds(), [1]);
    assert.equal(q.completeCalls, 0);
  });
});

test('a short results array: the missing ones count as not attempted', async () => {
  await withServer([ok(1)], async (url) => {
    const q = new FakeQueue();
    q.add();
    q.add();
    assert.deepEqual(await uploader(url).uploadData(q), { sent: 2, completed: 1, rejected: 0 });
    assert.deepEqual(q.txIds(), [2]);
  });
});

test('onRejected throwing: prefix before it completed, error propagates', async () => {
  await withServer(
    [
      {
        body: {
          results: [
            { status: 'success' },
            {
              status: 'fatal_error',
              requires_client_handling: false,
              message: 'bad',
              failed_operation: { error_code: 'CHECK_VIOLATION', message: 'bad', details: {}, operation_index: 0 }
            }
          ]
        }
      }
    ],
    async (url) => {
      const q = new FakeQueue();
      q.add();
      q.add();
      await assert.rejects(
        uploader(url, {
          onRejected: () => {
            throw new Error('app failed');
          }
        }).uploadData(q),
        /app failed/
      );
      assert.deepEqual(q.txIds(), [2]);
    }
  );
});

test('401: refreshes the token once and retries', async () => {
  await withServer([{ status: 401, body: { message: 'expired' } }, ok(1)], async (url, received) => {
    const q = new FakeQueue();
    q.add();
    const calls: boolean[] = [];
    const u = uploader(url, {
      getToken: async ({ refresh }) => {
        calls.push(refresh);
        return refresh ? 'fresh' : 'stale';
      }
    });
    assert.equal((await u.uploadData(q)).completed, 1);
    assert.deepEqual(calls, [false, true]);
    assert.deepEqual(
      received.map((r) => r.headers['authorization']),
      ['Bearer stale', 'Bearer fresh']
    );
  });
});

test('401 twice: throws, nothing completed', async () => {
  await withServer(
    [
      { status: 401, body: { message: 'expired' } },
      { status: 401, body: { message: 'still bad' } }
    ],
    async (url, received) => {
      const q = new FakeQueue();
      q.add();
      await assert.rejects(uploader(url).uploadData(q), (e: unknown) => {
        assert.ok(e instanceof HttpUploadError);
        assert.equal(e.status, 401);
        assert.equal(e.serverMessage, 'still bad');
        return true;
      });
      assert.equal(received.length, 2);
      assert.deepEqual(q.txIds(), [1]);
    }
  );
});

test('400: throws with the server message', async () => {
  await withServer([{ status: 400, body: { message: 'invalid request body at transactions' } }], async (url) => {
    const q = new FakeQueue();
    q.add();
    await assert.rejects(uploader(url).uploadData(q), (e: unknown) => {
      assert.ok(e instanceof HttpUploadError);
      assert.equal(e.status, 400);
      assert.match(e.message, /invalid request body at transactions/);
      return true;
    });
    assert.deepEqual(q.txIds(), [1]);
  });
});

test('503 and 500: throws, nothing completed', async () => {
  for (const status of [503, 500]) {
    await withServer([{ status, body: { message: 'database unavailable' } }], async (url) => {
      const q = new FakeQueue();
      q.add();
      await assert.rejects(uploader(url).uploadData(q), (e: unknown) => {
        assert.ok(e instanceof HttpUploadError);
        assert.equal(e.status, status);
        return true;
      });
      assert.deepEqual(q.txIds(), [1]);
    });
  }
});

test('a 200 that is not the contract: throws, nothing completed', async () => {
  await withServer([{ body: { ok: true } }], async (url) => {
    const q = new FakeQueue();
    q.add();
    await assert.rejects(uploader(url).uploadData(q), HttpUploadError);
    assert.deepEqual(q.txIds(), [1]);
  });
});

test('network error: throws NetworkUploadError, nothing completed', async () => {
  // Find a port nobody listens on.
  const probe = http.createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address() as AddressInfo;
  await new Promise<void>((resolve) => probe.close(() => resolve()));
  const q = new FakeQueue();
  q.add();
  await assert.rejects(uploader(`http://127.0.0.1:${port}/api/data`).uploadData(q), NetworkUploadError);
  assert.deepEqual(q.txIds(), [1]);
});

test('request timeout: throws NetworkUploadError', async () => {
  const server = http.createServer(() => {
    /* never answers */
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  try {
    const q = new FakeQueue();
    q.add();
    await assert.rejects(
      uploader(`http://127.0.0.1:${port}/api/data`, { requestTimeoutMs: 200 }).uploadData(q),
      NetworkUploadError
    );
    assert.deepEqual(q.txIds(), [1]);
  } finally {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});

test('rejects bad options', () => {
  assert.throws(() => new CrudgateUploader({ url: '', getToken: async () => 't' }), TypeError);
  assert.throws(() => uploader('http://x/api/data', { maxTransactions: 0 }), RangeError);
  assert.throws(() => uploader('http://x/api/data', { maxOperations: 1.5 }), RangeError);
});

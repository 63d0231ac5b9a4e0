/**
 * `@crudgate/powersync-connector`: uploads a PowerSync client's queued local writes to a
 * crudgate write endpoint (`POST /api/data`, PowerSync's reference write API) and completes
 * exactly what the server accepted.
 *
 * Use {@link CrudgateUploader.uploadData} from your `PowerSyncBackendConnector.uploadData`.
 *
 * The types below describe only the parts of the PowerSync SDK this package touches, so the
 * package has no runtime dependency on the SDK; `@powersync/common` 2.x database and
 * transaction objects satisfy them.
 *
 * @packageDocumentation
 */

// ---------------------------------------------------------------------------------------------
// The SDK surface we use (structurally compatible with @powersync/common 2.x)
// ---------------------------------------------------------------------------------------------

/** One queued change, as the PowerSync SDK exposes it (`CrudEntry`). */
export interface CrudEntryLike {
  /** Auto-incrementing local operation id (`op_id`); unique per local database. */
  clientId: number;
  /** Id of the changed row. */
  id: string;
  /** `PUT`, `PATCH` or `DELETE`. */
  op: string;
  /** Changed columns; absent for DELETE. */
  opData?: Record<string, unknown>;
  /** Previous values, for tables that track them (PATCH and DELETE only). */
  previousValues?: Record<string, unknown>;
  /** Client table name. */
  table: string;
  /** Local transaction id; shared by all operations of one local transaction. */
  transactionId?: number;
  /** Metadata string, for tables that track metadata. */
  metadata?: string;
}

/** One local transaction from the upload queue (`CrudTransaction`). */
export interface CrudTransactionLike {
  crud: CrudEntryLike[];
  /** Removes this transaction and everything queued before it from the upload queue. */
  complete: (writeCheckpoint?: string) => Promise<void>;
  transactionId?: number;
}

/** The parts of a PowerSync database (`AbstractPowerSyncDatabase`) the uploader uses. */
export interface UploadDatabase {
  getClientId(): Promise<string>;
  /** The oldest transaction not yet completed, or null when the queue is empty. */
  getNextCrudTransaction(): Promise<CrudTransactionLike | null>;
  /**
   * Iterates over queued transactions, oldest first (`@powersync/common` 1.3x+/2.x). Completing
   * one completes those emitted before it. Optional: without it one transaction is sent per
   * request.
   */
  getCrudTransactions?(): AsyncIterable<CrudTransactionLike, unknown>;
}

// ---------------------------------------------------------------------------------------------
// The wire contract (REFERENCE §4)
// ---------------------------------------------------------------------------------------------

/** One operation as sent in the request body. */
export interface WireOperation {
  id: string;
  op: string;
  table: string;
  /** Absent when the SDK recorded the change without a transaction id. */
  transaction_id?: number;
  /**
   * The SDK's local operation id (`CrudEntry.clientId`). An extra field beyond the reference
   * contract (servers ignore unknown fields); with `client_id` it uniquely names the operation.
   */
  op_id?: number;
  op_data?: Record<string, unknown>;
  previous_values?: Record<string, unknown>;
  metadata?: string;
}

/** One transaction as sent in the request body. */
export interface WireTransaction {
  /**
   * The SDK's local transaction id; servers deduplicate replays by (client_id, transaction_id).
   * Absent when the SDK has none (such a transaction cannot be deduplicated).
   */
  transaction_id?: number;
  crud: WireOperation[];
}

/** The request body of `POST /api/data`. */
export interface WireRequest {
  client_id: string;
  transactions: WireTransaction[];
}

/** Details of the operation a fatal error is about. */
export interface FailedOperation {
  error_code: string;
  message: string;
  details?: unknown;
  operation_index: number;
}

/** The server's verdict on one transaction. */
export type TransactionResult =
  | { status: 'success' }
  | { status: 'retryable_error'; message?: string; retry_after_ms?: number }
  | {
      status: 'fatal_error';
      requires_client_handling: boolean;
      message?: string;
      failed_operation?: FailedOperation;
    }
  | { status: 'not_attempted' };

/** The 200 response body of `POST /api/data`. */
export interface WireResponse {
  results: TransactionResult[];
}

// ---------------------------------------------------------------------------------------------
// Options and callbacks
// ---------------------------------------------------------------------------------------------

/** A transaction the server refused permanently (a `fatal_error` result). */
export interface Rejection {
  /** The local transaction that was refused. */
  transaction: CrudTransactionLike;
  /** Index in `transaction.crud` of the operation that failed, when the server named one. */
  operationIndex: number | undefined;
  /** The operation that failed, when the server named one. */
  operation: CrudEntryLike | undefined;
  /** Error code, e.g. `FOREIGN_KEY_VIOLATION` (`UNCLASSIFIED_ERROR` when the server gave none). */
  code: string;
  /** Human-readable message (the operation's message, else the transaction's). */
  message: string;
  /** Machine-readable details from the server (constraint, column, …), if any. */
  details: unknown;
  /**
   * false: the transaction has been (or is about to be) removed from the upload queue; the
   * write is lost unless the app re-applies it. true: it stays queued and blocks the uploads
   * behind it until the app deals with it (for example by deleting or fixing the local row and
   * writing a compensating change); the uploader throws after the callback.
   */
  requiresClientHandling: boolean;
  /** The raw result object from the server. */
  result: TransactionResult;
}

/** Options for {@link CrudgateUploader}. */
export interface CrudgateUploaderOptions {
  /** Full URL of the write endpoint, e.g. `https://api.example.com/api/data`. */
  url: string;
  /**
   * Returns the bearer token to send (usually the same JWT the app gives PowerSync). Called
   * with `{refresh: false}` before each request and once with `{refresh: true}` after a 401.
   */
  getToken: (options: { refresh: boolean }) => Promise<string>;
  /**
   * Called once per refused transaction, before the queue advances past it. If it throws, the
   * transactions accepted before the refused one are completed, the refused one is not, and the
   * error propagates (so the SDK retries and the callback runs again later).
   */
  onRejected?: (rejection: Rejection) => void | Promise<void>;
  /** Most transactions per request (default 50, the reference API's limit). */
  maxTransactions?: number;
  /**
   * Most operations per request (default 1000). A single transaction larger than this is still
   * sent, alone, since a transaction cannot be split.
   */
  maxOperations?: number;
  /** Abort a request after this many milliseconds (default 60 000). */
  requestTimeoutMs?: number;
  /** Upper bound for waiting on a `retry_after_ms` hint (default 30 000). */
  maxRetryAfterMs?: number;
  /** The fetch implementation (default: the global `fetch`). */
  fetch?: typeof fetch;
  /** Extra request headers. */
  headers?: Record<string, string>;
}

// ---------------------------------------------------------------------------------------------
// Errors (thrown from uploadData so the SDK retries the upload later)
// ---------------------------------------------------------------------------------------------

/** Base class of the errors {@link CrudgateUploader.uploadData} throws. */
export class UploadError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The server answered with an HTTP error (or a body that is not the contract's). */
export class HttpUploadError extends UploadError {
  constructor(
    message: string,
    /** HTTP status; 0 when the response body was unusable. */
    readonly status: number,
    /** The server's message, when it sent one. */
    readonly serverMessage?: string
  ) {
    super(message);
  }
}

/** The request could not be made or no response arrived (network error, timeout). */
export class NetworkUploadError extends UploadError {}

/** The server asked to retry a transaction later (`retryable_error`). */
export class RetryableUploadError extends UploadError {
  constructor(
    message: string,
    readonly retryAfterMs: number
  ) {
    super(message);
  }
}

/** A transaction was refused with `requires_client_handling: true`; it stays queued. */
export class ClientHandlingRequiredError extends UploadError {
  constructor(
    message: string,
    readonly rejection: Rejection
  ) {
    super(message);
  }
}

/** The server did not attempt the first transaction of the batch (`not_attempted`). */
export class NotAttemptedError extends UploadError {}

// ---------------------------------------------------------------------------------------------
// The uploader
// ---------------------------------------------------------------------------------------------

/** What one {@link CrudgateUploader.uploadData} call did. */
export interface UploadSummary {
  /** Transactions sent in the request (0 when the queue was empty). */
  sent: number;
  /** Transactions completed (removed from the local queue): successes plus rejections. */
  completed: number;
  /** Transactions refused with `requires_client_handling: false` (included in `completed`). */
  rejected: number;
}

const DEFAULT_MAX_TRANSACTIONS = 50;
const DEFAULT_MAX_OPERATIONS = 1000;
const DEFAULT_REQUEST_TIMEOUT_MS = 60_000;
const DEFAULT_MAX_RETRY_AFTER_MS = 30_000;

/**
 * Uploads queued transactions to a crudgate (or any reference-contract) write endpoint.
 *
 * Each {@link uploadData} call sends one request with up to `maxTransactions` whole
 * transactions / `maxOperations` operations, completes the contiguous accepted prefix of the
 * results, and returns; the SDK calls it again while the queue is not empty. It throws when the
 * SDK should retry later (every 5 s by default).
 */
export class CrudgateUploader {
  private readonly url: string;
  private readonly getToken: CrudgateUploaderOptions['getToken'];
  private readonly onRejected: CrudgateUploaderOptions['onRejected'];
  private readonly maxTransactions: number;
  private readonly maxOperations: number;
  private readonly requestTimeoutMs: number;
  private readonly maxRetryAfterMs: number;
  private readonly fetchImpl: typeof fetch;
  private readonly headers: Record<string, string>;

  constructor(options: CrudgateUploaderOptions) {
    if (!options.url) throw new TypeError('CrudgateUploader: url is required');
    if (typeof options.getToken !== 'function') {
      throw new TypeError('CrudgateUploader: getToken is required');
    }
    this.url = options.url;
    this.getToken = options.getToken;
    this.onRejected = options.onRejected;
    this.maxTransactions = positive(options.maxTransactions, DEFAULT_MAX_TRANSACTIONS, 'maxTransactions');
    this.maxOperations = positive(options.maxOperations, DEFAULT_MAX_OPERATIONS, 'maxOperations');
    this.requestTimeoutMs = positive(options.requestTimeoutMs, DEFAULT_REQUEST_TIMEOUT_MS, 'requestTimeoutMs');
    this.maxRetryAfterMs = options.maxRetryAfterMs ?? DEFAULT_MAX_RETRY_AFTER_MS;
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== 'function') throw new TypeError('CrudgateUploader: no fetch implementation');
    this.fetchImpl = f;
    this.headers = { ...(options.headers ?? {}) };
  }

  /**
   * Uploads one batch of queued transactions. Call it from your connector's `uploadData`:
   *
   * ```ts
   * uploadData: (db) => uploader.uploadData(db).then(() => undefined)
   * ```
   *
   * @throws {@link UploadError} subclasses when the SDK should retry later.
   */
  async uploadData(db: UploadDatabase): Promise<UploadSummary> {
    const transactions = await this.readBatch(db);
    if (transactions.length === 0) return { sent: 0, completed: 0, rejected: 0 };

    const clientId = await db.getClientId();
    const body: WireRequest = {
      client_id: clientId,
      transactions: transactions.map(toWireTransaction)
    };
    const response = await this.send(JSON.stringify(body), clientId);
    return this.applyResults(transactions, response.results);
  }

  /** Reads whole transactions from the queue, oldest first, within the batch limits. */
  private async readBatch(db: UploadDatabase): Promise<CrudTransactionLike[]> {
    if (typeof db.getCrudTransactions !== 'function') {
      const next = await db.getNextCrudTransaction();
      return next && next.crud.length > 0 ? [next] : [];
    }
    const batch: CrudTransactionLike[] = [];
    let operations = 0;
    for await (const tx of db.getCrudTransactions()) {
      if (tx.crud.length === 0) continue;
      if (batch.length > 0 && operations + tx.crud.length > this.maxOperations) break;
      batch.push(tx);
      operations += tx.crud.length;
      if (batch.length >= this.maxTransactions || operations >= this.maxOperations) break;
    }
    return batch;
  }

  /** POSTs the body; retries once with a refreshed token after a 401. */
  private async send(body: string, clientId: string): Promise<WireResponse> {
    let refresh = false;
    for (;;) {
      const token = await this.getToken({ refresh });
      const res = await this.post(body, clientId, token);
      if (res.status === 401 && !refresh) {
        await drain(res);
        refresh = true;
        continue;
      }
      return await this.readResponse(res);
    }
  }

  private async post(body: string, clientId: string, token: string): Promise<Response> {
    const controller = new AbortController();
    const timer = setTimeout(
      () => controller.abort(new Error(`no response within ${this.requestTimeoutMs} ms`)),
      this.requestTimeoutMs
    );
    try {
      return await this.fetchImpl(this.url, {
        method: 'POST',
        headers: {
          ...this.headers,
          'content-type': 'application/json',
          accept: 'application/json',
          authorization: `Bearer ${token}`,
          'powersync-client-id': clientId
        },
        body,
        signal: controller.signal
      });
    } catch (e) {
      throw new NetworkUploadError(`POST ${this.url} failed: ${errorMessage(e)}`, { cause: e });
    } finally {
      clearTimeout(timer);
    }
  }

  private async readResponse(res: Response): Promise<WireResponse> {
    let text: string;
    try {
      text = await res.text();
    } catch (e) {
      throw new NetworkUploadError(`reading the response of POST ${this.url} failed: ${errorMessage(e)}`, {
        cause: e
      });
    }
    const parsed = tryParse(text);
    if (res.status !== 200) {
      const serverMessage =
        isObject(parsed) && typeof parsed.message === 'string' ? parsed.message : undefined;
      const shown = serverMessage ?? (text.slice(0, 500) || res.statusText);
      if (res.status === 400) {
        throw new HttpUploadError(
          `the server rejected the request as malformed (400), a bug in the client or server: ${shown}`,
          400,
          serverMessage
        );
      }
      if (res.status === 401 || res.status === 403) {
        throw new HttpUploadError(`not authorized (${res.status}): ${shown}`, res.status, serverMessage);
      }
      throw new HttpUploadError(`server error (${res.status}): ${shown}`, res.status, serverMessage);
    }
    if (!isObject(parsed) || !Array.isArray(parsed.results)) {
      throw new HttpUploadError(
        `the 200 response is not {"results":[…]}: ${text.slice(0, 500)}`,
        0
      );
    }
    return parsed as unknown as WireResponse;
  }

  /** Completes the contiguous accepted prefix; throws where the SDK must retry. */
  private async applyResults(
    transactions: CrudTransactionLike[],
    results: TransactionResult[]
  ): Promise<UploadSummary> {
    let accepted = 0; // number of leading transactions accepted
    let rejected = 0;
    let stop: UploadError | null = null;
    let retryAfterMs = 0;

    for (let i = 0; i < transactions.length; i++) {
      const tx = transactions[i]!;
      const result = results[i];
      if (!isObject(result) || typeof result.status !== 'string') {
        // A missing or unreadable result is treated as not attempted.
        stop = accepted === 0 ? new NotAttemptedError(`no usable result for transaction ${i} of the batch`) : null;
        break;
      }
      if (result.status === 'success') {
        accepted++;
        continue;
      }
      if (result.status === 'fatal_error') {
        const rejection = toRejection(tx, result);
        try {
          if (this.onRejected) await this.onRejected(rejection);
        } catch (e) {
          await this.completeThrough(transactions, accepted);
          throw e;
        }
        if (rejection.requiresClientHandling) {
          stop = new ClientHandlingRequiredError(
            `transaction ${describeTx(tx)} refused (${rejection.code}: ${rejection.message}); it stays queued until the app handles it`,
            rejection
          );
          break;
        }
        accepted++;
        rejected++;
        continue;
      }
      if (result.status === 'retryable_error') {
        const hint = typeof result.retry_after_ms === 'number' && result.retry_after_ms > 0 ? result.retry_after_ms : 0;
        retryAfterMs = Math.min(hint, this.maxRetryAfterMs);
        stop = new RetryableUploadError(
          `transaction ${describeTx(tx)} failed temporarily: ${result.message ?? 'retryable error'}`,
          retryAfterMs
        );
        break;
      }
      // not_attempted (or a status this client does not know): stop here. If something before
      // it was accepted, return normally so the SDK uploads the rest right away.
      if (accepted === 0) {
        stop = new NotAttemptedError(
          `the server did not attempt transaction ${describeTx(tx)} (status ${JSON.stringify(result.status)})`
        );
      }
      break;
    }

    await this.completeThrough(transactions, accepted);
    if (stop) {
      if (retryAfterMs > 0) await sleep(retryAfterMs);
      throw stop;
    }
    return { sent: transactions.length, completed: accepted, rejected };
  }

  /** Completes the first `count` transactions (completing the last completes all before it). */
  private async completeThrough(transactions: CrudTransactionLike[], count: number): Promise<void> {
    if (count > 0) await transactions[count - 1]!.complete();
  }
}

/** Maps one SDK transaction to the wire shape. */
export function toWireTransaction(tx: CrudTransactionLike): WireTransaction {
  // Never invent an id: a made-up one could equal a real transaction id of this client and
  // make the server take a different transaction for a replay.
  const txId = tx.transactionId ?? tx.crud[0]?.transactionId;
  const crud = tx.crud.map((entry) => toWireOperation(entry, txId));
  return txId === undefined || txId === null ? { crud } : { transaction_id: txId, crud };
}

/** Maps one SDK `CrudEntry` to the wire shape, omitting absent fields. */
export function toWireOperation(entry: CrudEntryLike, fallbackTxId?: number): WireOperation {
  const op: WireOperation = {
    id: entry.id,
    op: entry.op,
    table: entry.table
  };
  const txId = entry.transactionId ?? fallbackTxId;
  if (txId !== undefined && txId !== null) op.transaction_id = txId;
  op.op_id = entry.clientId;
  if (entry.opData != null) op.op_data = entry.opData;
  if (entry.previousValues != null) op.previous_values = entry.previousValues;
  if (entry.metadata != null) op.metadata = entry.metadata;
  return op;
}

function toRejection(
  tx: CrudTransactionLike,
  result: Extract<TransactionResult, { status: 'fatal_error' }>
): Rejection {
  const failed = isObject(result.failed_operation) ? result.failed_operation : undefined;
  const index =
    failed && Number.isInteger(failed.operation_index) && failed.operation_index >= 0
      ? failed.operation_index
      : undefined;
  return {
    transaction: tx,
    operationIndex: index,
    operation: index === undefined ? undefined : tx.crud[index],
    code: (failed && typeof failed.error_code === 'string' && failed.error_code) || 'UNCLASSIFIED_ERROR',
    message: (failed && typeof failed.message === 'string' && failed.message) || result.message || 'rejected',
    details: failed?.details,
    requiresClientHandling: result.requires_client_handling === true,
    result
  };
}

function describeTx(tx: CrudTransactionLike): string {
  const id = tx.transactionId ?? tx.crud[0]?.transactionId;
  return id === undefined ? '(no id)' : String(id);
}

function positive(value: number | undefined, fallback: number, name: string): number {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value < 1) {
    throw new RangeError(`CrudgateUploader: ${name} must be a positive integer`);
  }
  return value;
}

function isObject(v: unknown): v is Record<string, any> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function tryParse(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

async function drain(res: Response): Promise<void> {
  try {
    await res.arrayBuffer();
  } catch {
    // ignore: we are about to retry anyway
  }
}

function errorMessage(e: unknown): string {
  if (e instanceof Error) {
    const cause = (e as { cause?: unknown }).cause;
    return cause instanceof Error ? `${e.message} (${cause.message})` : e.message;
  }
  return String(e);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * A QMP client (QEMU Machine Protocol) over a UNIX socket registered with the Reactor: one JSON
 * object per line, commands tagged with an id, events delivered to listeners. Connects exactly once.
 *
 * What QEMU sends is checked before use: a line that is not JSON, JSON that is not an object, a
 * greeting, event or reply of the wrong shape, or a line longer than QMP_MAX_LINE_BYTES ends the
 * connection with a QmpProtocolError naming the line, what it held and what was expected. The line
 * buffer never grows past QMP_MAX_LINE_BYTES.
 * @module
 */
import { connectUnix, type OwnedFd, type Reactor, UnixSocket, type Watch } from "../../ffi/mod.ts";

/** QMP's greeting: `{"QMP": {"version": ..., "capabilities": [...]}}`. */
export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

/** An asynchronous QMP event. */
export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** A command QEMU answered with `{"error": {...}}`. */
export class QmpError extends Error {
  readonly command: string;
  readonly errorClass: string;
  readonly desc: string;
  constructor(command: string, errorClass: string, desc: string) {
    super(`${command}: ${errorClass}: ${desc}`);
    this.name = "QmpError";
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

/** The QMP connection ended (QEMU quit or died) before an answer came. */
export class QmpClosedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "QmpClosedError";
  }
}

/**
 * QEMU broke the protocol (a line that is not a JSON object, a message of the wrong shape, a line
 * too long); the client closed the connection because of it.
 */
export class QmpProtocolError extends QmpClosedError {
  constructor(message: string) {
    super(message);
    this.name = "QmpProtocolError";
  }
}

/**
 * The longest line (one QMP message) accepted from QEMU, in bytes, newline excluded. QEMU's largest
 * answers (`query-qmp-schema`) are a few hundred KiB; a longer line, or that many bytes with no
 * newline yet, is a protocol error and the buffer holding it is dropped.
 */
export const QMP_MAX_LINE_BYTES = 16 * 1024 * 1024;

/** Initial (and kept) size of the buffer for a partial line; it grows up to QMP_MAX_LINE_BYTES. */
const LINE_BUFFER_BYTES = 65536;
const NEWLINE = 0x0a;

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

const encoder = new TextEncoder();

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Reactor, socketPair } from "../../ffi/mod.ts";
 *
 * const reactor = new Reactor();
 * const running = reactor.run();
 * // QmpClient.connect(path, reactor) for QEMU's monitor socket; here QEMU's end is scripted:
 * const [ours, monitor] = socketPair();
 * const qmp = QmpClient.fromSocket(ours, reactor);
 * const qemu = (line: unknown) => monitor.sendMsg(new TextEncoder().encode(JSON.stringify(line) + "\n"));
 * qemu({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 }, package: "" }, capabilities: [] } });
 * assert.equal((await qmp.greeting).version.qemu.minor, 2);
 * const status = qmp.execute("query-status"); // sends {"execute": "query-status", "id": 1}
 * qemu({ return: { status: "running", running: true }, id: 1 });
 * assert.deepEqual(await status, { status: "running", running: true });
 * qmp.close(); // closes its socket; pending commands reject with QmpClosedError
 * monitor.close();
 * reactor.stop();
 * await running;
 * reactor.close();
 * ```
 */
export class QmpClient {
  /** Resolves with QEMU's greeting; rejects if the connection ends first. */
  readonly greeting: Promise<QmpGreeting>;
  /** Resolves when the connection has ended (peer closed, or close()). */
  readonly closed: Promise<void>;
  readonly #sock: UnixSocket;
  readonly #watch: Watch;
  readonly #pending = new Map<number, Pending>();
  readonly #listeners = new Set<(e: QmpEvent) => void>();
  readonly #buf = new Uint8Array(65536);
  readonly #decoder = new TextDecoder();
  readonly #label: string;
  /** The line received so far without its newline: `#partial[0..#partialBytes)`. */
  #partial = new Uint8Array(LINE_BUFFER_BYTES);
  #partialBytes = 0;
  /** Lines received (1-based number of the last one), for error messages. */
  #lines = 0;
  #out: { data: Uint8Array<ArrayBuffer>; fds: OwnedFd[] }[] = [];
  #nextId = 1;
  #greeted = false;
  #ended = false;
  #endError: QmpClosedError | null = null;
  #resolveGreeting!: (g: QmpGreeting) => void;
  #rejectGreeting!: (e: Error) => void;
  #resolveClosed!: () => void;

  private constructor(sock: UnixSocket, reactor: Reactor, label: string) {
    this.#sock = sock;
    this.#label = label;
    this.greeting = new Promise((res, rej) => {
      this.#resolveGreeting = res;
      this.#rejectGreeting = rej;
    });
    // Nobody may be waiting on the greeting when QEMU dies early: avoid an unhandled rejection.
    this.greeting.catch(() => {});
    this.closed = new Promise((res) => (this.#resolveClosed = res));
    this.#watch = reactor.add(sock.fd, { readable: true }, (r) => {
      if (r.writable) this.#flush();
      if (r.readable || r.hangup || r.error) this.#read();
    });
  }

  /** Connects to a QMP socket at `path` exactly once (no retry: a refused connect means QEMU is gone). */
  static connect(path: string, reactor: Reactor): QmpClient {
    return new QmpClient(connectUnix(path), reactor, path);
  }

  /** Wraps an already connected socket. */
  static fromSocket(sock: UnixSocket, reactor: Reactor, label = "QMP"): QmpClient {
    return new QmpClient(sock, reactor, label);
  }

  /** Calls `cb` for every event; returns a function that stops it. */
  onEvent(cb: (e: QmpEvent) => void): () => void {
    this.#listeners.add(cb);
    return () => this.#listeners.delete(cb);
  }

  /** Whether the connection has ended. */
  get ended(): boolean {
    return this.#ended;
  }

  /**
   * Why the connection ended (null while open): a QmpProtocolError when QEMU broke the protocol,
   * else a QmpClosedError (QEMU closed it, a socket error, or close()).
   */
  get endError(): QmpClosedError | null {
    return this.#endError;
  }

  /**
   * Sends one command and resolves with its `return` value; rejects with QmpError for an `error`
   * answer, QmpClosedError when the connection ends first (QmpProtocolError when QEMU broke the
   * protocol, also for commands after that).
   */
  execute(
    command: string,
    args?: Record<string, unknown>,
    options: { fds?: OwnedFd[] } = {},
  ): Promise<unknown> {
    const fds = options.fds ?? [];
    if (this.#ended) {
      for (const f of fds) f.close();
      // After a protocol error, say what it was (QEMU may have sent it in the same read as an answer).
      const err = this.#endError instanceof QmpProtocolError
        ? new QmpProtocolError(`${command}: ${this.#endError.message}`)
        : new QmpClosedError(`${command}: QMP connection ${this.#label} is closed`);
      return Promise.reject(err);
    }
    const id = this.#nextId++;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    const p = new Promise<unknown>((resolve, reject) => this.#pending.set(id, { command, resolve, reject }));
    // The fds travel (SCM_RIGHTS) with the command's first byte, as `getfd` and `add-fd` want them;
    // they are closed here once sent.
    this.#out.push({ data: encoder.encode(JSON.stringify(msg) + "\n"), fds });
    this.#flush();
    return p;
  }

  #flush(): void {
    while (this.#out.length > 0 && !this.#ended) {
      const head = this.#out[0];
      let n: number | null;
      try {
        n = this.#sock.sendMsg(head.data, head.fds);
      } catch (e) {
        this.#end(new QmpClosedError(`send failed: ${(e as Error).message}`));
        return;
      }
      if (n === null) {
        this.#watch.modify({ readable: true, writable: true });
        return;
      }
      for (const f of head.fds) f.close();
      if (n < head.data.byteLength) this.#out[0] = { data: head.data.slice(n), fds: [] };
      else this.#out.shift();
    }
    if (!this.#ended) this.#watch.modify({ readable: true });
  }

  #read(): void {
    while (!this.#ended) {
      let got;
      try {
        got = this.#sock.recvMsg(this.#buf);
      } catch (e) {
        this.#end(new QmpClosedError(`receive failed: ${(e as Error).message}`));
        return;
      }
      if (got === null) return;
      for (const fd of got.fds) fd.close();
      if (got.bytes === 0) {
        this.#end(new QmpClosedError("QEMU closed the QMP connection"));
        return;
      }
      this.#received(this.#buf.subarray(0, got.bytes));
    }
  }

  /** Splits received bytes into lines (a newline byte never occurs inside a UTF-8 sequence). */
  #received(chunk: Uint8Array): void {
    let start = 0;
    while (!this.#ended) {
      const nl = chunk.indexOf(NEWLINE, start);
      const piece = chunk.subarray(start, nl < 0 ? chunk.length : nl);
      if (this.#partialBytes + piece.length > QMP_MAX_LINE_BYTES) {
        this.#partial = new Uint8Array(LINE_BUFFER_BYTES);
        this.#partialBytes = 0;
        const limit = `${QMP_MAX_LINE_BYTES} bytes (QMP_MAX_LINE_BYTES)`;
        this.#violation(
          `line ${this.#lines + 1}: more than ${limit} without a newline; expected one JSON object per line`,
        );
        return;
      }
      if (nl < 0) {
        this.#append(piece);
        return;
      }
      let line: Uint8Array = piece;
      if (this.#partialBytes > 0) {
        this.#append(piece);
        line = this.#partial.subarray(0, this.#partialBytes);
      }
      this.#lines++;
      const text = this.#decoder.decode(line);
      this.#partialBytes = 0;
      if (this.#partial.byteLength > LINE_BUFFER_BYTES) this.#partial = new Uint8Array(LINE_BUFFER_BYTES);
      this.#message(text);
      start = nl + 1;
    }
  }

  /** Adds bytes to the partial line (the caller checked the bound), growing its buffer by doubling. */
  #append(bytes: Uint8Array): void {
    const need = this.#partialBytes + bytes.length;
    if (need > this.#partial.byteLength) {
      let size = this.#partial.byteLength;
      while (size < need) size *= 2;
      const grown = new Uint8Array(Math.min(size, QMP_MAX_LINE_BYTES));
      grown.set(this.#partial.subarray(0, this.#partialBytes));
      this.#partial = grown;
    }
    this.#partial.set(bytes, this.#partialBytes);
    this.#partialBytes = need;
  }

  #message(text: string): void {
    const line = text.trim();
    if (!line) return;
    const n = this.#lines;
    let m: unknown;
    try {
      m = JSON.parse(line);
    } catch {
      // Quoted: whatever QEMU sent (control characters included) shows escaped.
      this.#violation(
        `line ${n}: expected a JSON object, got text that is not JSON: ${JSON.stringify(excerpt(line))}`,
      );
      return;
    }
    if (!isObject(m)) {
      this.#violation(`line ${n}: expected a JSON object, got ${describe(m, line)}`);
      return;
    }
    if (!this.#greeted && "QMP" in m) {
      if (!isGreeting(m.QMP)) {
        this.#violation(
          `line ${n}: expected the greeting {"QMP": {"version": {"qemu": {"major", "minor", "micro"}, "package"}, ` +
            `"capabilities": [...]}}, got ${excerpt(line)}`,
        );
        return;
      }
      this.#greeted = true;
      this.#resolveGreeting(m.QMP);
      return;
    }
    if ("event" in m) {
      if (
        typeof m.event !== "string" || (m.data !== undefined && !isObject(m.data)) ||
        (m.timestamp !== undefined && !isObject(m.timestamp))
      ) {
        this.#violation(
          `line ${n}: expected an event {"event": NAME, "data"?: {...}, "timestamp"?: {...}}, got ${
            excerpt(line)
          }`,
        );
        return;
      }
      for (const cb of this.#listeners) cb(m as unknown as QmpEvent);
      return;
    }
    if ("error" in m) {
      const err = m.error;
      if (!isObject(err) || typeof err.class !== "string" || typeof err.desc !== "string") {
        this.#violation(
          `line ${n}: expected "error" to be {"class": STRING, "desc": STRING}, got ${excerpt(line)}`,
        );
        return;
      }
      // An error without one of our ids answers input QEMU could not parse: nobody to tell.
      const p = this.#take(m.id);
      p?.reject(new QmpError(p.command, err.class, err.desc));
      return;
    }
    if ("return" in m) {
      this.#take(m.id)?.resolve(m.return); // an id we are not waiting for is an answer to nobody
      return;
    }
    this.#violation(
      `line ${n}: expected ${this.#greeted ? "" : "the greeting, "}an event, a "return" or an "error", got ${
        excerpt(line)
      }`,
    );
  }

  /** The pending command with this id, removed; undefined when the id is none of ours. */
  #take(id: unknown): Pending | undefined {
    if (typeof id !== "number") return undefined;
    const p = this.#pending.get(id);
    this.#pending.delete(id);
    return p;
  }

  /** QEMU broke the protocol: end the connection with a QmpProtocolError naming the line and what it held. */
  #violation(what: string): void {
    this.#end(new QmpProtocolError(`QMP protocol error on ${this.#label}: ${what}`));
  }

  #end(cause: QmpClosedError): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#endError = cause;
    this.#watch.remove();
    this.#sock.close();
    for (const o of this.#out) for (const f of o.fds) f.close();
    this.#out = [];
    const Kind = cause instanceof QmpProtocolError ? QmpProtocolError : QmpClosedError;
    if (!this.#greeted) {
      this.#rejectGreeting(
        cause instanceof QmpProtocolError
          ? cause
          : new QmpClosedError(`${this.#label}: ${cause.message} before the QMP greeting`),
      );
    }
    for (const p of this.#pending.values()) p.reject(new Kind(`${p.command}: ${cause.message}`));
    this.#pending.clear();
    this.#resolveClosed();
  }

  /** Closes the connection; pending commands reject with QmpClosedError. */
  close(): void {
    this.#end(new QmpClosedError("connection closed by mpq"));
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isGreeting(v: unknown): v is QmpGreeting {
  if (!isObject(v) || !isObject(v.version) || !isObject(v.version.qemu)) return false;
  const q = v.version.qemu;
  return [q.major, q.minor, q.micro].every((x) => Number.isInteger(x)) &&
    typeof v.version.package === "string" &&
    Array.isArray(v.capabilities) && v.capabilities.every((c) => typeof c === "string");
}

/** At most 120 characters of a line for an error message. */
function excerpt(line: string): string {
  return line.length > 120 ? `${line.slice(0, 117)}...` : line;
}

/** What a JSON value that is not an object is: "an array: [1,2]", "null", ... */
function describe(v: unknown, line: string): string {
  if (v === null) return "null";
  const kind = Array.isArray(v) ? "an array" : `a ${typeof v}`;
  return `${kind}: ${excerpt(line)}`;
}

/**
 * Whether `actual` matches every key of `expected` (deeply; extra keys in `actual` are fine).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(matchesExpectation({ status: "running", running: true }, { status: "running" }), true);
 * assert.equal(matchesExpectation({ status: "paused", running: false }, { status: "running" }), false);
 * ```
 */
export function matchesExpectation(actual: unknown, expected: unknown): boolean {
  if (expected === null || typeof expected !== "object") return Object.is(actual, expected);
  if (actual === null || typeof actual !== "object") return false;
  if (Array.isArray(expected)) {
    return Array.isArray(actual) && actual.length === expected.length &&
      expected.every((e, i) => matchesExpectation(actual[i], e));
  }
  return Object.entries(expected).every(([k, v]) =>
    matchesExpectation((actual as Record<string, unknown>)[k], v)
  );
}

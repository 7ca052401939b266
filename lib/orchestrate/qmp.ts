/**
 * A QMP client (QEMU Machine Protocol) over a UNIX socket registered with the Reactor: one JSON
 * object per line, commands tagged with an id, events delivered to listeners. Connects exactly once.
 * @module
 */
import { connectUnix, type Reactor, UnixSocket, type Watch } from "../../ffi/mod.ts";

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

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

const encoder = new TextEncoder();

/**
 * @example
 * const qmp = QmpClient.connect("/tmp/mpq-x/qmp.sock", reactor);
 * await qmp.greeting;
 * await qmp.execute("qmp_capabilities");
 * const status = await qmp.execute("query-status"); // { status: "running", running: true, ... }
 * qmp.close();
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
  #text = "";
  #out: Uint8Array<ArrayBuffer>[] = [];
  #nextId = 1;
  #greeted = false;
  #ended = false;
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
   * Sends one command and resolves with its `return` value; rejects with QmpError for an `error`
   * answer, QmpClosedError when the connection ends first.
   */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.#ended) {
      return Promise.reject(new QmpClosedError(`${command}: QMP connection ${this.#label} is closed`));
    }
    const id = this.#nextId++;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    const p = new Promise<unknown>((resolve, reject) => this.#pending.set(id, { command, resolve, reject }));
    this.#out.push(encoder.encode(JSON.stringify(msg) + "\n"));
    this.#flush();
    return p;
  }

  #flush(): void {
    while (this.#out.length > 0 && !this.#ended) {
      const head = this.#out[0];
      let n: number | null;
      try {
        n = this.#sock.sendMsg(head);
      } catch (e) {
        this.#end(`send failed: ${(e as Error).message}`);
        return;
      }
      if (n === null) {
        this.#watch.modify({ readable: true, writable: true });
        return;
      }
      if (n < head.byteLength) this.#out[0] = head.slice(n);
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
        this.#end(`receive failed: ${(e as Error).message}`);
        return;
      }
      if (got === null) return;
      for (const fd of got.fds) fd.close();
      if (got.bytes === 0) {
        this.#end("QEMU closed the QMP connection");
        return;
      }
      this.#text += this.#decoder.decode(this.#buf.subarray(0, got.bytes), { stream: true });
      let nl: number;
      while ((nl = this.#text.indexOf("\n")) >= 0) {
        const line = this.#text.slice(0, nl).trim();
        this.#text = this.#text.slice(nl + 1);
        if (line) this.#message(line);
      }
    }
  }

  #message(line: string): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(line);
    } catch {
      this.#end(`QEMU sent a line that is not JSON: ${line.slice(0, 200)}`);
      return;
    }
    if (!this.#greeted && "QMP" in m) {
      this.#greeted = true;
      this.#resolveGreeting(m.QMP as QmpGreeting);
      return;
    }
    if ("event" in m) {
      for (const cb of this.#listeners) cb(m as unknown as QmpEvent);
      return;
    }
    const id = m.id;
    const p = typeof id === "number" ? this.#pending.get(id) : undefined;
    if (!p) return; // an answer to nobody (QEMU answers unparseable input without an id)
    this.#pending.delete(id as number);
    if ("error" in m) {
      const err = m.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, err.class ?? "GenericError", err.desc ?? "(no description)"));
    } else {
      p.resolve(m.return);
    }
  }

  #end(reason: string): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#watch.remove();
    this.#sock.close();
    if (!this.#greeted) {
      this.#rejectGreeting(new QmpClosedError(`${this.#label}: ${reason} before the QMP greeting`));
    }
    for (const p of this.#pending.values()) p.reject(new QmpClosedError(`${p.command}: ${reason}`));
    this.#pending.clear();
    this.#resolveClosed();
  }

  /** Closes the connection; pending commands reject with QmpClosedError. */
  close(): void {
    this.#end("connection closed by mpq");
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Whether `actual` matches every key of `expected` (deeply; extra keys in `actual` are fine).
 * @example
 * matchesExpectation({ status: "running", running: true }, { status: "running" }); // true
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

/**
 * Socket I/O of one vhost-user connection on the reactor: reads the 12-byte header with recvmsg
 * (the fds travel with it), then the payload, hands each message to the handler and writes the
 * reply. Framing errors (bad version, oversized payload, more than 8 fds) close the connection;
 * the daemon then serves the next one. A message whose handling waits for I/O (a ring stop)
 * pauses reading: messages are handled strictly in order, and the event loop keeps running.
 * @module
 */
import type { OwnedFd, Reactor, UnixSocket, Watch } from "../../ffi/mod.ts";
import type { MessageHandler, Outcome } from "./handler.ts";
import { decodeHeader, HEADER_SIZE, MAX_FDS, requestName } from "./message.ts";

/** Options for a connection. */
export interface ConnectionOptions {
  /** The reactor the socket is watched on. */
  reactor: Reactor;
  /**
   * Called once after the connection closed and the handler released everything (after the
   * device's in-flight requests drained: the next front-end must not be served before).
   */
  onClose?: (reason: string) => void;
  /** Diagnostics (default console.error). */
  log?: (line: string) => void;
  /** Log every message (MPQ_VHOST_TRACE=1). */
  trace?: boolean;
}

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Reactor, socketPair } from "../../ffi/mod.ts";
 * import { RngDevice } from "./devices/rng.ts";
 * import { VhostUserHandler } from "./handler.ts";
 * import { decodeU64, encodeMessage, Flags, HEADER_SIZE, Request } from "./message.ts";
 * import { Metrics } from "./metrics.ts";
 *
 * const [socket, frontEnd] = socketPair(); // `socket` as a listener accepts it
 * const reactor = new Reactor();
 * const device = new RngDevice();
 * const handler = new VhostUserHandler(device, { reactor, metrics: new Metrics("rng", 1) });
 * const closed = Promise.withResolvers<string>();
 * // onClose: the daemon serves the next front-end from here.
 * new VhostUserConnection(socket, handler, { reactor, onClose: closed.resolve });
 * const running = reactor.run();
 * const reply = new Uint8Array(HEADER_SIZE + 8);
 * const answered = Promise.withResolvers<void>();
 * const watch = reactor.add(frontEnd.fd, { readable: true }, () => {
 *   frontEnd.recvMsg(reply);
 *   watch.remove();
 *   answered.resolve();
 * });
 * frontEnd.sendMsg(encodeMessage(Request.GET_QUEUE_NUM, Flags.VERSION, new Uint8Array(0)));
 * await answered.promise;
 * assert.equal(decodeU64(Request.GET_QUEUE_NUM, reply.subarray(HEADER_SIZE)), 1n);
 * frontEnd.close();
 * assert.equal(await closed.promise, "front-end closed the connection"); // the socket is closed
 * reactor.stop();
 * await running;
 * device.close();
 * reactor.close();
 * ```
 */
export class VhostUserConnection {
  readonly #sock: UnixSocket;
  readonly #handler: MessageHandler;
  #watch: Watch | null;
  readonly #opts: ConnectionOptions;
  readonly #log: (line: string) => void;
  readonly #hdr = new Uint8Array(HEADER_SIZE);
  #hdrGot = 0;
  #request = 0;
  #flags = 0;
  #payload: Uint8Array<ArrayBuffer> | null = null;
  #payGot = 0;
  #fds: OwnedFd[] = [];
  #out: { data: Uint8Array<ArrayBuffer>; fds: OwnedFd[] }[] = [];
  #closed = false;
  #wantWrite = false;
  /** A message's outcome is pending: the socket is not watched meanwhile. */
  #paused = false;

  constructor(sock: UnixSocket, handler: MessageHandler, options: ConnectionOptions) {
    this.#sock = sock;
    this.#handler = handler;
    this.#opts = options;
    this.#log = options.log ?? ((l) => console.error(l));
    this.#watch = this.#watchSocket(false);
  }

  #watchSocket(writable: boolean): Watch {
    return this.#opts.reactor.add(this.#sock.fd, { readable: true, writable }, (r) => {
      try {
        if (r.writable) this.#flushOut();
        if (r.readable || r.hangup || r.error) this.#onReadable();
      } catch (e) {
        this.close(`${(e as Error).message}`);
      }
    });
  }

  /** Whether the connection has closed. */
  get closed(): boolean {
    return this.#closed;
  }

  #onReadable(): void {
    while (!this.#closed && !this.#paused) {
      if (this.#payload === null) {
        const got = this.#sock.recvMsg(this.#hdr.subarray(this.#hdrGot));
        if (got === null) return;
        this.#takeFds(got.fds);
        if (got.bytes === 0) return this.close("front-end closed the connection");
        this.#hdrGot += got.bytes;
        if (this.#hdrGot < HEADER_SIZE) continue;
        const h = decodeHeader(this.#hdr);
        this.#request = h.request;
        this.#flags = h.flags;
        this.#payload = new Uint8Array(h.size);
        this.#payGot = 0;
      }
      if (this.#payGot < this.#payload.byteLength) {
        const got = this.#sock.recvMsg(this.#payload.subarray(this.#payGot));
        if (got === null) return;
        this.#takeFds(got.fds);
        if (got.bytes === 0) return this.close("front-end closed the connection mid-message");
        this.#payGot += got.bytes;
        if (this.#payGot < this.#payload.byteLength) continue;
      }
      this.#dispatch();
    }
  }

  #takeFds(fds: OwnedFd[]): void {
    for (const f of fds) this.#fds.push(f);
    if (this.#fds.length > MAX_FDS) {
      throw new Error(`${this.#fds.length} fds with one message, at most ${MAX_FDS}`);
    }
  }

  #dispatch(): void {
    const msg = {
      request: this.#request,
      flags: this.#flags,
      payload: this.#payload!,
      fds: this.#fds as (OwnedFd | null)[],
    };
    this.#hdrGot = 0;
    this.#payload = null;
    this.#fds = [];
    if (this.#opts.trace) {
      this.#log(
        `mpq vhost: <- ${requestName(msg.request)} flags 0x${
          msg.flags.toString(16)
        } ${msg.payload.byteLength}B ${msg.fds.length} fd(s)`,
      );
    }
    let out: Outcome | Promise<Outcome>;
    try {
      out = this.#handler.handle(msg);
    } finally {
      for (const f of msg.fds) f?.close();
    }
    if (!(out instanceof Promise)) return this.#deliver(out);
    // Stop watching the socket (a hang-up would be reported on every turn) until it settles.
    this.#paused = true;
    this.#watch?.remove();
    this.#watch = null;
    out.then(
      (o) => this.#resume(o),
      (e) => this.#resume({ close: `${requestName(msg.request)}: ${(e as Error).message ?? e}` }),
    );
  }

  #resume(out: Outcome): void {
    this.#paused = false;
    if (this.#closed) {
      for (const f of out.fds ?? []) f.close();
      return;
    }
    try {
      this.#watch = this.#watchSocket(this.#wantWrite);
      this.#deliver(out);
      this.#onReadable();
    } catch (e) {
      this.close(`${(e as Error).message}`);
    }
  }

  #deliver(out: Outcome): void {
    if (out.reply) this.#send(out.reply, out.fds ?? []);
    else for (const f of out.fds ?? []) f.close();
    if (out.close) this.close(out.close);
  }

  #send(data: Uint8Array<ArrayBuffer>, fds: OwnedFd[]): void {
    this.#out.push({ data, fds });
    this.#flushOut();
  }

  #flushOut(): void {
    while (this.#out.length > 0 && !this.#closed) {
      const item = this.#out[0];
      const n = this.#sock.sendMsg(item.data, item.fds);
      if (n === null) {
        if (!this.#wantWrite) this.#watch?.modify({ readable: true, writable: true });
        this.#wantWrite = true;
        return;
      }
      for (const f of item.fds) f.close();
      item.fds = [];
      if (n < item.data.byteLength) {
        item.data = item.data.subarray(n);
        continue;
      }
      this.#out.shift();
    }
    if (!this.#closed && this.#wantWrite) {
      this.#wantWrite = false;
      this.#watch?.modify({ readable: true });
    }
  }

  /**
   * Closes the connection: socket close, handler cleanup (which may wait for in-flight I/O),
   * then onClose. Idempotent.
   */
  close(reason = "closed"): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#watch?.remove();
    this.#watch = null;
    for (const f of this.#fds) f.close();
    this.#fds = [];
    for (const o of this.#out) for (const f of o.fds) f.close();
    this.#out = [];
    this.#sock.close();
    const done = () => this.#opts.onClose?.(reason);
    let wait: Promise<void> | void;
    try {
      wait = this.#handler.close();
    } catch (e) {
      done();
      throw e;
    }
    if (wait) {
      wait.then(done, (e) => {
        this.#log(`mpq vhost: closing the connection: ${(e as Error).message ?? e}`);
        done();
      });
    } else done();
  }
}

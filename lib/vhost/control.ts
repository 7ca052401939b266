/**
 * A control socket speaking JSON lines on the reactor: each request is one line
 * `{"id": 1, "cmd": "list", "args": {...}}`, answered by one line `{"id": 1, "ok": true, "result": ...}`
 * or `{"id": 1, "ok": false, "error": "..."}`, in order. The peer is not trusted: a line that is
 * not a JSON object, an unknown command or bad arguments get an error reply; a line longer than
 * {@link MAX_LINE} closes that connection. The socket is created mode 0600.
 * @module
 */
import { listenUnix, type Reactor, type UnixListener, type UnixSocket, type Watch } from "../../ffi/mod.ts";

/** Longest request line. */
export const MAX_LINE = 1 << 16;

/** A command: its result is sent as `result`; a thrown Error's message as `error`. */
export type ControlCommand = (args: Record<string, unknown>) => unknown | Promise<unknown>;

/** Options of a control server. */
export interface ControlOptions {
  reactor: Reactor;
  commands: Readonly<Record<string, ControlCommand>>;
  /** Diagnostics (default console.error). */
  log?: (line: string) => void;
  /** What its log lines start with (default "mpq vhost"). */
  name?: string;
  /**
   * Offer `subscribe`: that connection then also gets every {@link ControlServer.publish}ed event,
   * one line each, `{"event": NAME, "data": ...}`, between the replies.
   */
  events?: boolean;
}

/** A subscriber whose unsent events pass this many bytes is too slow: it is disconnected. */
export const MAX_EVENT_BACKLOG = 1 << 20;

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Reactor } from "../../ffi/mod.ts";
 *
 * const dir = Deno.makeTempDirSync();
 * const reactor = new Reactor();
 * const ctl = new ControlServer(`${dir}/vhost.ctl`, { reactor, commands: { list: () => ["rng0"] } });
 * const running = reactor.run();
 * const client = await Deno.connect({ transport: "unix", path: ctl.path });
 * await client.write(new TextEncoder().encode('{"id": 1, "cmd": "list"}\n'));
 * const reply = new Uint8Array(256);
 * const n = await client.read(reply);
 * assert.equal(new TextDecoder().decode(reply.subarray(0, n!)), '{"id":1,"ok":true,"result":["rng0"]}\n');
 * client.close();
 * ctl.close(); // every connection, and the socket (its path is removed)
 * reactor.stop();
 * await running;
 * reactor.close();
 * Deno.removeSync(dir);
 * ```
 */
export class ControlServer {
  readonly path: string;
  readonly #listener: UnixListener;
  readonly #watch: Watch;
  readonly #conns = new Set<ControlConnection>();

  constructor(path: string, options: ControlOptions) {
    this.path = path;
    this.#listener = listenUnix(path, { mode: 0o600 });
    this.#watch = options.reactor.add(this.#listener.fd, { readable: true }, () => {
      for (;;) {
        const sock = this.#listener.accept();
        if (!sock) return;
        const c = new ControlConnection(sock, options, () => this.#conns.delete(c));
        this.#conns.add(c);
      }
    });
  }

  /** Sends an event to every connection that subscribed. */
  publish(event: string, data: unknown = null): void {
    for (const c of this.#conns) c.event(event, data);
  }

  /** Closes every connection and the socket (its path is removed). */
  close(): void {
    for (const c of this.#conns) c.close();
    this.#watch.remove();
    this.#listener.close();
  }
}

class ControlConnection {
  readonly #sock: UnixSocket;
  readonly #opts: ControlOptions;
  readonly #onClose: () => void;
  #watch: Watch;
  #in = new Uint8Array(4096);
  #inLen = 0;
  #out: Uint8Array[] = [];
  #outBytes = 0;
  #subscribed = false;
  #busy = false;
  #closed = false;
  readonly #buf = new Uint8Array(4096);

  constructor(sock: UnixSocket, opts: ControlOptions, onClose: () => void) {
    this.#sock = sock;
    this.#opts = opts;
    this.#onClose = onClose;
    this.#watch = opts.reactor.add(sock.fd, { readable: true }, (r) => {
      try {
        if (r.writable) this.#flush();
        if (r.readable || r.hangup || r.error) this.#read();
      } catch (e) {
        this.#log(`control connection: ${(e as Error).message}`);
        this.close();
      }
    });
  }

  #log(line: string): void {
    (this.#opts.log ?? ((l) => console.error(l)))(`${this.#opts.name ?? "mpq vhost"}: ${line}`);
  }

  #read(): void {
    while (!this.#closed) {
      const got = this.#sock.recvMsg(this.#buf);
      if (got === null) break;
      for (const f of got.fds) f.close();
      if (got.bytes === 0) {
        this.close();
        return;
      }
      if (this.#inLen + got.bytes > this.#in.byteLength) {
        const bigger = new Uint8Array(
          Math.min(MAX_LINE + 4096, Math.max(this.#in.byteLength * 2, this.#inLen + got.bytes)),
        );
        bigger.set(this.#in.subarray(0, this.#inLen));
        this.#in = bigger;
      }
      this.#in.set(this.#buf.subarray(0, got.bytes), this.#inLen);
      this.#inLen += got.bytes;
      if (this.#in.subarray(0, this.#inLen).indexOf(10) < 0 && this.#inLen > MAX_LINE) {
        this.#send({ id: null, ok: false, error: `request line longer than ${MAX_LINE} bytes` });
        this.#flush();
        this.close();
        return;
      }
    }
    this.#next();
  }

  /** Handles the next complete line, one at a time (replies go out in request order). */
  #next(): void {
    while (!this.#busy && !this.#closed) {
      const nl = this.#in.subarray(0, this.#inLen).indexOf(10);
      if (nl < 0) return;
      const line = new TextDecoder().decode(this.#in.subarray(0, nl));
      this.#in.copyWithin(0, nl + 1, this.#inLen);
      this.#inLen -= nl + 1;
      if (line.trim() === "") continue;
      this.#handle(line);
    }
  }

  #handle(line: string): void {
    let req: unknown;
    try {
      req = JSON.parse(line);
    } catch (e) {
      return this.#send({ id: null, ok: false, error: `request is not JSON: ${(e as Error).message}` });
    }
    if (typeof req !== "object" || req === null || Array.isArray(req)) {
      return this.#send({ id: null, ok: false, error: "a request must be a JSON object" });
    }
    const { id = null, cmd, args = {} } = req as { id?: unknown; cmd?: unknown; args?: unknown };
    if (typeof cmd !== "string") return this.#send({ id, ok: false, error: `cmd: expected a string` });
    if (typeof args !== "object" || args === null || Array.isArray(args)) {
      return this.#send({ id, ok: false, error: "args: expected a JSON object" });
    }
    const commands = this.#opts.commands;
    if (cmd === "subscribe" && this.#opts.events) {
      this.#subscribed = true;
      return this.#send({ id, ok: true, result: { subscribed: true } });
    }
    if (!Object.hasOwn(commands, cmd)) {
      return this.#send({
        id,
        ok: false,
        error: `unknown command ${JSON.stringify(cmd)} (commands: ${Object.keys(commands).join(", ")})`,
      });
    }
    let result: unknown;
    try {
      result = commands[cmd](args as Record<string, unknown>);
    } catch (e) {
      return this.#send({ id, ok: false, error: (e as Error).message ?? String(e) });
    }
    if (!(result instanceof Promise)) return this.#send({ id, ok: true, result: result ?? null });
    this.#busy = true;
    result.then(
      (r) => this.#send({ id, ok: true, result: r ?? null }),
      (e) => this.#send({ id, ok: false, error: (e as Error).message ?? String(e) }),
    ).finally(() => {
      this.#busy = false;
      this.#next();
    });
  }

  /** An event for a subscribed connection (others ignore it). */
  event(name: string, data: unknown): void {
    if (!this.#subscribed || this.#closed) return;
    if (this.#outBytes > MAX_EVENT_BACKLOG) {
      this.#log(
        `control connection: a subscriber left ${this.#outBytes} bytes of events unread: disconnected`,
      );
      this.close();
      return;
    }
    this.#send({ event: name, data });
  }

  #send(reply: unknown): void {
    if (this.#closed) return;
    const line = new TextEncoder().encode(JSON.stringify(reply) + "\n");
    this.#out.push(line);
    this.#outBytes += line.byteLength;
    this.#flush();
  }

  #flush(): void {
    while (this.#out.length > 0 && !this.#closed) {
      const n = this.#sock.sendMsg(this.#out[0] as Uint8Array<ArrayBuffer>);
      if (n === null) {
        this.#watch.modify({ readable: true, writable: true });
        return;
      }
      this.#outBytes -= n;
      if (n < this.#out[0].byteLength) this.#out[0] = this.#out[0].subarray(n);
      else this.#out.shift();
    }
    if (!this.#closed) this.#watch.modify({ readable: true });
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#watch.remove();
    this.#sock.close();
    this.#onClose();
  }
}

/**
 * An ivshmem peer in TypeScript, like contrib ivshmem-client: connects to a server, keeps the
 * shared memory fd and every peer's eventfds, rings doorbells and reports notifications.
 * Used by `mpq ivshmem client`, the integration tests and the end-to-end helpers.
 * @module
 */
import {
  EventFd,
  fstat,
  mapShared,
  type OwnedFd,
  type Reactor,
  type UnixSocket,
  type Watch,
} from "../../ffi/mod.ts";
import { connectUnix } from "../../ffi/mod.ts";
import { ClientDecoder, decodeMessage, MESSAGE_SIZE, ProtocolError } from "./protocol.ts";

/**
 * What a client reports; `mpq ivshmem client --json` prints these objects one per line.
 * - joined: the initial sequence is complete (own id, own vector count, peers already there);
 * - peer-joined / peer-left: another peer came (all its vectors arrived) or went;
 * - notification: one of our vectors was rung; `count` is the eventfd counter (kicks coalesce);
 * - disconnected: the server closed the connection or broke the protocol.
 */
export type IvshmemEvent =
  | { event: "joined"; id: number; vectors: number; peers: number[]; shmSize: number }
  | { event: "peer-joined"; peer: number; vectors: number }
  | { event: "peer-left"; peer: number }
  | { event: "notification"; vector: number; count: number }
  | { event: "disconnected"; reason: string };

/** Options for IvshmemClient.connect. */
export interface ClientOptions {
  /** Called for every event, in order. */
  onEvent?: (event: IvshmemEvent) => void;
  /** Keep events for next() (default true; a long-running CLI turns it off). */
  queueEvents?: boolean;
  /** Debug lines. */
  log?: (line: string) => void;
}

const PAGE = 4096;

interface Waiter {
  match: (e: IvshmemEvent) => boolean;
  resolve: (e: IvshmemEvent) => void;
  reject: (e: Error) => void;
  /** Leave the event in the queue for the next caller too. */
  keep: boolean;
  timer?: ReturnType<typeof setTimeout>;
}

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Reactor } from "../../ffi/mod.ts";
 * import { IvshmemServer } from "./server.ts";
 *
 * const dir = Deno.makeTempDirSync();
 * const reactor = new Reactor();
 * const running = reactor.run();
 * const server = IvshmemServer.open(reactor, {
 *   socketPath: `${dir}/ivshmem.sock`,
 *   shm: { dir: "/dev/shm" },
 *   size: 4096,
 *   vectors: 1,
 * });
 * const a = await IvshmemClient.connect(reactor, server.socketPath); // resolves once joined
 * const b = await IvshmemClient.connect(reactor, server.socketPath);
 * await a.next((e) => e.event === "peer-joined"); // a has b's eventfds now
 * a.notify(b.id, 0);
 * const rung = await b.next((e) => e.event === "notification");
 * assert.deepEqual(rung, { event: "notification", vector: 0, count: 1 });
 * a.close();
 * b.close();
 * server.close();
 * reactor.stop();
 * await running;
 * reactor.close();
 * Deno.removeSync(dir);
 * ```
 */
export class IvshmemClient {
  readonly #reactor: Reactor;
  readonly #sock: UnixSocket;
  #watch: Watch | null = null;
  readonly #decoder = new ClientDecoder();
  readonly #buf = new Uint8Array(MESSAGE_SIZE);
  #have = 0;
  #msgFd: OwnedFd | null = null;
  #shm: OwnedFd | null = null;
  #shmSize = 0;
  readonly #own: Array<{ ev: EventFd; watch: Watch }> = [];
  readonly #peers = new Map<number, EventFd[]>();
  readonly #options: ClientOptions;
  readonly #queue: IvshmemEvent[] = [];
  readonly #waiters = new Set<Waiter>();
  #closed = false;
  #disconnected: string | null = null;

  private constructor(reactor: Reactor, sock: UnixSocket, options: ClientOptions) {
    this.#reactor = reactor;
    this.#sock = sock;
    this.#options = options;
  }

  /**
   * Connects to the server at `path` and resolves once joined (rejects if the server closes or
   * breaks the protocol first). The reactor must be running for this to complete.
   */
  static async connect(reactor: Reactor, path: string, options: ClientOptions = {}): Promise<IvshmemClient> {
    const sock = connectUnix(path, { maxFds: 1 });
    const client = new IvshmemClient(reactor, sock, options);
    try {
      client.#watch = reactor.add(sock.fd, { readable: true }, () => client.#onSocket());
      await client.next((e) => e.event === "joined" || e.event === "disconnected", { keep: true }).then(
        (e) => {
          if (e.event === "disconnected") throw new ProtocolError(`${path}: ${e.reason}`);
        },
      );
    } catch (e) {
      client.close();
      throw e;
    }
    return client;
  }

  /** Own peer id. */
  get id(): number {
    return this.#decoder.id;
  }

  /** Own vector count. */
  get vectors(): number {
    return this.#own.length;
  }

  /** Size of the shared memory in bytes. */
  get shmSize(): number {
    return this.#shmSize;
  }

  /** The shared memory fd (owned by the client). */
  get shm(): OwnedFd {
    if (!this.#shm) throw new ProtocolError("no shared memory received yet");
    return this.#shm;
  }

  /** Other peers and how many vectors each has, in id order. */
  peers(): Map<number, number> {
    return new Map([...this.#peers].sort((a, b) => a[0] - b[0]).map(([id, fds]) => [id, fds.length]));
  }

  /** Why the connection ended, or null while connected. */
  get disconnected(): string | null {
    return this.#disconnected;
  }

  #emit(e: IvshmemEvent): void {
    this.#options.onEvent?.(e);
    let taken = false;
    for (const w of this.#waiters) {
      if (w.match(e)) {
        this.#waiters.delete(w);
        if (w.timer !== undefined) clearTimeout(w.timer);
        w.resolve(e);
        if (!w.keep) taken = true;
      }
    }
    if (!taken && (this.#options.queueEvents ?? true)) this.#queue.push(e);
  }

  /**
   * The next event matching `match` (default: any), taking it from the queue if it already
   * happened. Rejects after `timeoutMs` (when given) naming what it waited for.
   */
  next(
    match: (e: IvshmemEvent) => boolean = () => true,
    options: { timeoutMs?: number; keep?: boolean } = {},
  ): Promise<IvshmemEvent> {
    const i = this.#queue.findIndex(match);
    if (i >= 0) {
      const e = this.#queue[i];
      if (!options.keep) this.#queue.splice(i, 1);
      return Promise.resolve(e);
    }
    return new Promise((resolve, reject) => {
      const w: Waiter = { match, resolve, reject, keep: options.keep ?? false };
      if (options.timeoutMs !== undefined) {
        w.timer = setTimeout(() => {
          this.#waiters.delete(w);
          reject(new Error(`ivshmem client: no matching event within ${options.timeoutMs} ms`));
        }, options.timeoutMs);
      }
      this.#waiters.add(w);
    });
  }

  #onSocket(): void {
    if (this.#closed) return;
    try {
      while (true) {
        const r = this.#sock.recvMsg(this.#buf.subarray(this.#have));
        if (r === null) break;
        if (r.bytes === 0) {
          for (const f of r.fds) f.close();
          this.#disconnect("server closed the connection");
          return;
        }
        if (r.fds.length > 0) {
          if (this.#msgFd) r.fds.forEach((f) => f.close());
          else this.#msgFd = r.fds[0];
        }
        this.#have += r.bytes;
        if (this.#have < MESSAGE_SIZE) continue;
        this.#have = 0;
        const fd = this.#msgFd;
        this.#msgFd = null;
        this.#handle(decodeMessage(this.#buf), fd);
      }
      for (const e of this.#decoder.flush()) this.#handleEvent(e, null);
    } catch (e) {
      this.#disconnect(e instanceof Error ? e.message : String(e));
    }
  }

  #handle(value: bigint, fd: OwnedFd | null): void {
    let events;
    try {
      events = this.#decoder.push(value, fd !== null);
    } catch (e) {
      fd?.close();
      throw e;
    }
    if (events.length === 0) fd?.close();
    for (const e of events) this.#handleEvent(e, fd);
  }

  #handleEvent(e: ReturnType<ClientDecoder["flush"]>[number], fd: OwnedFd | null): void {
    switch (e.type) {
      case "shm":
        this.#shm = fd;
        this.#shmSize = fstat(fd!).size;
        this.#options.log?.(`shm fd received (${this.#shmSize} bytes)`);
        return;
      case "vector": {
        const ev = new EventFd(fd!);
        if (e.peer === this.#decoder.id) {
          const vector = e.vector;
          const watch = this.#reactor.add(ev.fd, { readable: true }, () => {
            const count = ev.drain();
            if (count > 0n) this.#emit({ event: "notification", vector, count: Number(count) });
          });
          this.#own.push({ ev, watch });
        } else {
          let list = this.#peers.get(e.peer);
          if (!list) this.#peers.set(e.peer, list = []);
          list.push(ev);
        }
        return;
      }
      case "joined":
        this.#emit({ event: "joined", id: e.id, vectors: e.vectors, peers: e.peers, shmSize: this.#shmSize });
        return;
      case "peer-joined":
        this.#emit({ event: "peer-joined", peer: e.peer, vectors: e.vectors });
        return;
      case "peer-left":
        for (const f of this.#peers.get(e.peer) ?? []) f.close();
        this.#peers.delete(e.peer);
        this.#emit({ event: "peer-left", peer: e.peer });
        return;
    }
  }

  #disconnect(reason: string): void {
    if (this.#disconnected !== null) return;
    this.#disconnected = reason;
    this.#watch?.remove();
    this.#watch = null;
    this.#emit({ event: "disconnected", reason });
  }

  /** Rings `peer`'s vector (writes 1 to its eventfd). Throws naming an unknown peer or vector. */
  notify(peer: number, vector: number): void {
    const fds = peer === this.id ? this.#own.map((o) => o.ev) : this.#peers.get(peer);
    if (!fds) {
      throw new RangeError(
        `cannot find peer_id = ${peer} (known: ${[...this.peers().keys()].join(", ") || "none"})`,
      );
    }
    if (!Number.isInteger(vector) || vector < 0 || vector >= fds.length) {
      throw new RangeError(`invalid vector ${vector} on peer ${peer}: it has ${fds.length}`);
    }
    fds[vector].signal();
  }

  /** Rings every vector of `peer`. */
  notifyAll(peer: number): void {
    const n = peer === this.id ? this.#own.length : this.#peers.get(peer)?.length ?? 0;
    if (n === 0) this.notify(peer, 0);
    for (let v = 0; v < n; v++) this.notify(peer, v);
  }

  /** Rings every vector of every other peer. */
  broadcast(): void {
    for (const peer of this.#peers.keys()) this.notifyAll(peer);
  }

  #window<T>(offset: number, length: number, fn: (bytes: Uint8Array<ArrayBuffer>) => T): T {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new RangeError(`shm range must be whole numbers >= 0: got offset ${offset}, length ${length}`);
    }
    if (offset + length > this.#shmSize) {
      throw new RangeError(
        `shm range ${offset}+${length} is past the end of the shared memory (${this.#shmSize} bytes)`,
      );
    }
    if (length === 0) return fn(new Uint8Array(0));
    const start = offset - (offset % PAGE);
    using region = mapShared(this.shm, offset + length - start, { offset: start });
    return fn(region.bytes.subarray(offset - start, offset - start + length));
  }

  /** A copy of `length` bytes of the shared memory at `offset`. */
  read(offset: number, length: number): Uint8Array<ArrayBuffer> {
    return this.#window(offset, length, (b) => b.slice());
  }

  /** Writes `data` into the shared memory at `offset`. */
  write(offset: number, data: Uint8Array): void {
    this.#window(offset, data.byteLength, (b) => b.set(data));
  }

  /** Own id and vectors, then every peer and its vectors, like contrib ivshmem-client's `dump`. */
  dump(): string {
    const lines = [`our_id = ${this.id}`];
    this.#own.forEach((_, v) => lines.push(`  vector ${v} is enabled`));
    for (const [id, n] of this.peers()) {
      lines.push(`peer_id = ${id}`);
      for (let v = 0; v < n; v++) lines.push(`  vector ${v} is enabled`);
    }
    return lines.join("\n");
  }

  /** Leaves: closes the socket, every eventfd and the shm fd. Pending next() calls reject. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#watch?.remove();
    this.#watch = null;
    for (const o of this.#own.splice(0)) {
      o.watch.remove();
      o.ev.close();
    }
    for (const fds of this.#peers.values()) for (const f of fds) f.close();
    this.#peers.clear();
    this.#msgFd?.close();
    this.#shm?.close();
    this.#sock.close();
    for (const w of this.#waiters) {
      if (w.timer !== undefined) clearTimeout(w.timer);
      w.reject(new Error("ivshmem client closed"));
    }
    this.#waiters.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

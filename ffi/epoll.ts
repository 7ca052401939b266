/**
 * The epoll reactor: fds register readable/writable callbacks; one nonblocking epoll_wait is in
 * flight at a time, so the event loop keeps turning (timers, signals, other async work); a wake
 * eventfd ends the wait for shutdown. Components never own a loop: they register with this one.
 * @module
 */
import { libc } from "./_libc.ts";
import { EPOLL_EVENT } from "./_layout.ts";
import { check, Errno, ErrnoError, lastErrno } from "./errno.ts";
import { EventFd } from "./eventfd.ts";
import { OwnedFd } from "./fd.ts";
import { IoUring, probeIoUring } from "./io_uring.ts";
import { socketPair, type UnixSocket } from "./socket.ts";
import net from "node:net";
import { setImmediate } from "node:timers";

const EPOLL_CLOEXEC = 0o2000000;
const EPOLL_CTL_ADD = 1;
const EPOLL_CTL_DEL = 2;
const EPOLL_CTL_MOD = 3;
const EPOLLIN = 0x001;
const EPOLLOUT = 0x004;
const EPOLLERR = 0x008;
const EPOLLHUP = 0x010;
const EPOLLRDHUP = 0x2000;
const EPOLLET = 1 << 31;

/** What a watch wants to hear about. */
export interface Interest {
  readable?: boolean;
  writable?: boolean;
  /** Edge-triggered (EPOLLET). */
  edge?: boolean;
}

/** What epoll reported for an fd. */
export interface Readiness {
  readable: boolean;
  writable: boolean;
  /** The peer hung up (EPOLLHUP or EPOLLRDHUP). */
  hangup: boolean;
  /** EPOLLERR. */
  error: boolean;
}

/** A registered fd. Remove it before closing the fd. */
export interface Watch {
  /** Changes what the callback hears about. */
  modify(interest: Interest): void;
  /** Unregisters; the callback is not called again, even for events already collected. */
  remove(): void;
  readonly active: boolean;
}

type Callback = (r: Readiness) => void;

interface Entry {
  fd: OwnedFd;
  cb: Callback;
  active: boolean;
}

/** Signals the reactor can route to callbacks. */
export type ReactorSignal = "SIGTERM" | "SIGINT" | "SIGHUP" | "SIGUSR1" | "SIGUSR2";

/** Options for a Reactor. */
export interface ReactorOptions {
  /** Events collected per epoll_wait (default 256). */
  maxEvents?: number;
  /**
   * Called when a callback throws. Default: the reactor stops and run() rejects with the error.
   * Servers that must keep serving pass a handler that drops the offending peer.
   */
  onError?: (error: unknown) => void;
  /**
   * How to sleep when nothing is ready: "socket" (io_uring-linked wake-up through a socket the
   * runtime watches), "thread" (a nonblocking epoll_wait on a worker thread), "auto" (default:
   * socket where io_uring works; MPQ_REACTOR_WAKE=thread forces the thread), or "block": this
   * thread sleeps in a synchronous epoll_wait, so an fd event runs its callback with no event-loop
   * hop in between (what a C daemon's thread does; for a thread that serves nothing but its fds),
   * yielding to timers, signals and promises at least every BLOCK_SLICE_MS.
   */
  wake?: "auto" | "socket" | "thread" | "block";
}

/**
 * "block" mode: longest synchronous epoll_wait (ms); then timers, signals, messages and promise
 * continuations get their turn. Also the latency of a timer or a signal in that mode.
 */
export const BLOCK_SLICE_MS = 20;

/**
 * How the reactor sleeps when no fd is ready. A nonblocking FFI epoll_wait costs a worker-thread
 * round trip per wake-up (~34 µs measured on the build VM). The socket waker is ~5x cheaper: an
 * io_uring POLL_ADD on the epoll fd, linked to a 1-byte WRITE into a socketpair whose other end is a
 * `node:net` socket the runtime's own event loop watches. When epoll has events, the kernel writes
 * the byte and the runtime wakes us directly. Falls back to the thread when io_uring is refused.
 */
class SocketWaker {
  readonly #ring: IoUring;
  readonly #writer: UnixSocket;
  readonly #reader: net.Socket;
  readonly #ep: OwnedFd;
  readonly #byte = new Uint8Array([1]);
  #armed = false;
  #resolve: (() => void) | null = null;

  constructor(ep: OwnedFd) {
    this.#ep = ep;
    this.#ring = IoUring.create(4);
    const [w, r] = socketPair();
    this.#writer = w;
    try {
      // The runtime's socket owns the reader's fd from here on (closed by destroy()).
      this.#reader = new net.Socket({ fd: r.fd.unsafeRelease(), readable: true, writable: false });
    } catch (e) {
      r.close();
      w.close();
      this.#ring.close();
      throw e;
    }
    this.#reader.on("data", () => this.#woken());
    this.#reader.on("error", () => this.#woken());
    this.#reader.unref();
  }

  #woken(): void {
    this.#armed = false;
    this.#ring.reap(() => {});
    const r = this.#resolve;
    this.#resolve = null;
    this.#reader.unref();
    r?.();
  }

  /** Resolves once the epoll fd is readable (at once if it already is). */
  wait(): Promise<void> {
    if (!this.#armed) {
      this.#ring.prepPollAdd(this.#ep, 1, /* POLLIN */ 1, { link: true });
      this.#ring.prepWrite(this.#writer.fd, this.#byte, 2);
      this.#ring.submit();
      this.#armed = true;
    }
    this.#reader.ref();
    return new Promise((r) => (this.#resolve = r));
  }

  close(): void {
    this.#ring.close(); // cancels a pending poll
    this.#reader.destroy();
    this.#writer.close();
  }
}

function makeWaker(ep: OwnedFd, wake: "auto" | "socket" | "thread"): SocketWaker | null {
  if (wake === "thread" || Deno.env.get("MPQ_REACTOR_WAKE") === "thread") return null;
  if (!probeIoUring().ok) {
    if (wake === "socket") throw new ErrnoError("io_uring_setup", 38, "the socket waker needs io_uring");
    return null;
  }
  try {
    return new SocketWaker(ep);
  } catch (e) {
    if (wake === "socket") throw e;
    return null;
  }
}

function mask(i: Interest): number {
  return (i.readable ? EPOLLIN | EPOLLRDHUP : 0) | (i.writable ? EPOLLOUT : 0) | (i.edge ? EPOLLET : 0);
}

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { EventFd } from "./eventfd.ts";
 *
 * const reactor = new Reactor();
 * using kick = new EventFd();
 * const seen: bigint[] = [];
 * const watch = reactor.add(kick.fd, { readable: true }, () => {
 *   seen.push(kick.drain());
 *   watch.remove();
 *   reactor.stop();
 * });
 * reactor.onSignal("SIGTERM", () => reactor.stop());
 * setTimeout(() => kick.signal(), 10); // a peer, a timer, another component
 * await reactor.run(); // until stop(): the event loop keeps turning meanwhile
 * reactor.close();
 * assert.deepEqual(seen, [1n]);
 * ```
 */
export class Reactor {
  readonly #ep: OwnedFd;
  readonly #wake: EventFd;
  readonly #entries = new Map<number, Entry>();
  readonly #max: number;
  readonly #events: Uint8Array<ArrayBuffer>;
  readonly #view: DataView;
  readonly #ctl = new Uint8Array(EPOLL_EVENT.size);
  readonly #ctlView = new DataView(this.#ctl.buffer);
  readonly #signals: Array<[ReactorSignal, () => void]> = [];
  readonly #onError?: (error: unknown) => void;
  readonly #pollers = new Set<() => boolean>();
  #waker: SocketWaker | null | undefined;
  readonly #wakeMode: "auto" | "socket" | "thread" | "block";
  #nextToken = 1;
  #stopping = false;
  #running = false;
  #failure: unknown = undefined;

  constructor(options: ReactorOptions = {}) {
    this.#max = options.maxEvents ?? 256;
    this.#events = new Uint8Array(EPOLL_EVENT.size * this.#max);
    this.#view = new DataView(this.#events.buffer);
    this.#onError = options.onError;
    this.#wakeMode = options.wake ?? "auto";
    this.#ep = OwnedFd.unsafeAdopt(check("epoll_create1", libc.epoll_create1(EPOLL_CLOEXEC)), "epoll");
    this.#wake = new EventFd({ label: "reactor wake" });
    this.#register(this.#wake.fd, { readable: true }, () => this.#wake.drain());
  }

  #ctlOp(op: number, fd: OwnedFd, events: number, token: number): void {
    this.#ctlView.setUint32(EPOLL_EVENT.events, events >>> 0, true);
    this.#ctlView.setBigUint64(EPOLL_EVENT.data, BigInt(token), true);
    const name = op === EPOLL_CTL_ADD
      ? "epoll_ctl(ADD)"
      : op === EPOLL_CTL_MOD
      ? "epoll_ctl(MOD)"
      : "epoll_ctl(DEL)";
    check(name, libc.epoll_ctl(this.#ep.unsafeFd, op, fd.unsafeFd, this.#ctl), fd.label);
  }

  #register(fd: OwnedFd, interest: Interest, cb: Callback): Watch {
    let token = this.#nextToken;
    while (this.#entries.has(token)) token = (token % 0xffffffff) + 1;
    this.#nextToken = (token % 0xffffffff) + 1;
    this.#ctlOp(EPOLL_CTL_ADD, fd, mask(interest), token);
    const entry: Entry = { fd, cb, active: true };
    this.#entries.set(token, entry);
    const modify = (i: Interest) => {
      if (entry.active) this.#ctlOp(EPOLL_CTL_MOD, fd, mask(i), token);
    };
    const remove = () => {
      if (!entry.active) return;
      entry.active = false;
      this.#entries.delete(token);
      // A closed fd has already left the epoll set; only a live one needs DEL.
      if (!fd.closed && libc.epoll_ctl(this.#ep.unsafeFd, EPOLL_CTL_DEL, fd.unsafeFd, this.#ctl) === -1) {
        const e = lastErrno();
        if (e !== 2 /* ENOENT */ && e !== 9 /* EBADF */) throw new ErrnoError("epoll_ctl(DEL)", e, fd.label);
      }
    };
    return {
      modify,
      remove,
      get active() {
        return entry.active;
      },
    };
  }

  /** Registers `fd`; `cb` runs on the reactor's turn whenever epoll reports it. */
  add(fd: OwnedFd, interest: Interest, cb: Callback): Watch {
    return this.#register(fd, interest, cb);
  }

  /**
   * Adds a poller: called every turn; while any poller reports work done, the reactor keeps
   * polling epoll without sleeping (busy-poll mode). Returns a function that removes it.
   */
  addPoller(poll: () => boolean): () => void {
    this.#pollers.add(poll);
    return () => this.#pollers.delete(poll);
  }

  /** Routes a signal to `cb` while the reactor runs (listeners are removed when it stops). */
  onSignal(signal: ReactorSignal, cb: () => void): void {
    Deno.addSignalListener(signal, cb);
    this.#signals.push([signal, cb]);
  }

  /** How many fds are registered (the wake eventfd not counted). */
  get size(): number {
    return this.#entries.size - 1;
  }

  /** Asks run() to return after the current turn. Safe to call from callbacks and signal handlers. */
  stop(): void {
    if (this.#stopping) return;
    this.#stopping = true;
    if (!this.#wake.fd.closed) this.#wake.signal();
  }

  #dispatch(n: number): void {
    for (let i = 0; i < n; i++) {
      const off = i * EPOLL_EVENT.size;
      const ev = this.#view.getUint32(off + EPOLL_EVENT.events, true);
      const token = this.#view.getUint32(off + EPOLL_EVENT.data, true);
      const entry = this.#entries.get(token);
      if (!entry || !entry.active) continue;
      try {
        entry.cb({
          readable: (ev & EPOLLIN) !== 0,
          writable: (ev & EPOLLOUT) !== 0,
          hangup: (ev & (EPOLLHUP | EPOLLRDHUP)) !== 0,
          error: (ev & EPOLLERR) !== 0,
        });
      } catch (e) {
        if (this.#onError) {
          this.#onError(e);
        } else {
          this.#failure = e;
          this.stop();
          return;
        }
      }
    }
  }

  #runPollers(): boolean {
    let busy = false;
    for (const p of this.#pollers) {
      try {
        if (p()) busy = true;
      } catch (e) {
        if (this.#onError) this.#onError(e);
        else {
          this.#failure = e;
          this.stop();
        }
      }
    }
    return busy;
  }

  /**
   * Runs until stop(). Resolves once no epoll_wait is in flight; rejects with the first error a
   * callback threw when no onError was given.
   */
  async run(): Promise<void> {
    if (this.#running) throw new Error("Reactor.run() is already running");
    this.#running = true;
    try {
      if (this.#wakeMode === "block") await this.#loopBlocking();
      else await this.#loopAsync();
    } finally {
      this.#running = false;
      for (const [sig, cb] of this.#signals.splice(0)) Deno.removeSignalListener(sig, cb);
    }
    if (this.#failure !== undefined) {
      const f = this.#failure;
      this.#failure = undefined;
      throw f;
    }
  }

  /** The default loop: synchronous looks while events come, then sleeps through a waker. */
  async #loopAsync(): Promise<void> {
    // Up to SYNC_TURNS cheap synchronous looks in a row (under load events are usually waiting
    // already), then one nonblocking wait, which also lets timers, signals and promises run.
    const SYNC_TURNS = 64;
    let turns = 0;
    let lastYield = performance.now();
    while (!this.#stopping) {
      const busy = this.#pollers.size > 0 && this.#runPollers();
      if (turns < SYNC_TURNS) {
        const n = this.#waitSync(0);
        if (n > 0 || busy) {
          turns++;
          if (n > 0) this.#dispatch(n);
          continue;
        }
      }
      if (busy) {
        // Busy-polling: keep turning without sleeping, but let timers, signals and promises run
        // once a millisecond (a setImmediate hop costs ~6 µs; a worker-thread epoll_wait ~35).
        const now = performance.now();
        if (now - lastYield < 1) {
          turns = 0;
          continue;
        }
        await new Promise((r) => setImmediate(r));
        lastYield = performance.now();
        turns = 0;
        continue;
      }
      this.#waker ??= makeWaker(this.#ep, this.#wakeMode as "auto" | "socket" | "thread");
      if (this.#waker) {
        // Sleep on the runtime's own event loop until epoll has events (at once if it has some:
        // after SYNC_TURNS busy turns this is also the yield that lets timers and signals run),
        // then look again synchronously.
        await this.#waker.wait();
        lastYield = performance.now();
        turns = 0;
        continue;
      }
      const n = await libc.epoll_wait_nb(
        this.#ep.unsafeFd,
        this.#events,
        this.#max,
        turns >= SYNC_TURNS ? 0 : -1,
      );
      turns = 0;
      if (n > 0) this.#dispatch(n); // n < 0 is EINTR (errno is not readable from the worker thread)
    }
  }

  /**
   * The "block" loop: callbacks run straight from a synchronous epoll_wait. Before the thread
   * sleeps (up to BLOCK_SLICE_MS) it makes one event-loop hop, so promise continuations, timers,
   * signals and messages run first; while busy, it makes one hop a millisecond. The hop is never on
   * the path from an fd event to its callback.
   */
  async #loopBlocking(): Promise<void> {
    let lastHop = performance.now();
    const hop = () => new Promise((r) => setImmediate(r));
    while (!this.#stopping) {
      let busy = this.#pollers.size > 0 && this.#runPollers();
      let n = this.#waitSync(0);
      if (n === 0 && !busy) {
        await hop();
        lastHop = performance.now();
        if (this.#stopping) break;
        busy = this.#pollers.size > 0 && this.#runPollers();
        n = this.#waitSync(busy ? 0 : BLOCK_SLICE_MS);
      }
      if (n > 0) this.#dispatch(n);
      if (performance.now() - lastHop >= 1) {
        await hop();
        lastHop = performance.now();
      }
    }
  }

  /** A synchronous epoll_wait (blocks this thread up to `timeoutMs`); EINTR counts as no event. */
  #waitSync(timeoutMs: number): number {
    const n = libc.epoll_wait(this.#ep.unsafeFd, this.#events, this.#max, timeoutMs);
    if (n >= 0) return n;
    const e = lastErrno();
    if (e !== Errno.EINTR) throw new ErrnoError("epoll_wait", e);
    return 0;
  }

  /** Whether stop() was called. */
  get stopping(): boolean {
    return this.#stopping;
  }

  /** Closes the epoll fd and the wake eventfd. Call after run() has resolved. */
  close(): void {
    if (this.#running) throw new Error("Reactor.close() while run() is in flight: stop() and await it first");
    this.#entries.clear();
    this.#waker?.close();
    this.#waker = undefined;
    this.#wake.close();
    this.#ep.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

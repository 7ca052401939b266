/**
 * Queue threads: Deno Workers that serve some queues of a multi-queue device whose connection
 * (vhost-user messages, memory table, the other queues) another thread serves. Each sleeps in a
 * synchronous epoll_wait ("block" wake mode) on the kick eventfds of the queues it owns, processes
 * those rings, does their I/O and signals their call eventfds itself, so one device's queues run on
 * several cores at once. The thread that owns the connection forwards every message that concerns
 * a queue it handed over, and every message that changes device-wide state (features, memory
 * table, inflight area, config), to a *mirror* of the device on the queue thread: a second
 * instance of the device (its own file descriptor and engine; the allocation map and the metrics
 * are shared memory) with a handler of its own. The reply of a forwarded message comes back before
 * the connection reads the next one, so a ring stop (GET_VRING_BASE) still answers only after the
 * queue thread's in-flight requests completed, and a memory table is mapped everywhere before QEMU
 * hears it was.
 *
 * {@link queueThreadMain} is the worker side; {@link QueueThread} the control side;
 * {@link QueuePool} the process's (lazily started) set of them.
 * @module
 */
import { EventFd, OwnedFd, Reactor, type Watch } from "../../ffi/mod.ts";
import { VhostUserDaemon } from "./daemon.ts";
import { createDevice } from "./device_factory.ts";
import { Mailbox, mailboxMemory } from "./mailbox.ts";
import type { Message, Outcome, VhostUserHandler } from "./handler.ts";
import type { MirrorOutcome, MirrorSpec, QueueHost, QueuePlacer } from "./split_handler.ts";
import { QUEUE_THREAD_NAME } from "./thread_name.ts";

/** Requests through the mailbox (attach, which carries shared memory, goes by postMessage). */
type Request =
  | { op: "connect"; key: number }
  | { op: "message"; key: number; request: number; flags: number; payload: number[]; fds: number[] }
  | { op: "disconnect"; key: number }
  | { op: "detach"; key: number }
  | { op: "stop" };

/** Sent with postMessage: the thread's channels, then each device it mirrors. */
type Setup =
  | { op: "init"; requests: SharedArrayBuffer; replies: SharedArrayBuffer; wakeFd: number; repliedFd: number }
  | { op: "attach"; key: number; mirror: MirrorSpec };

/** A forwarded message's outcome in the mailbox. */
interface WireOutcome {
  reply?: number[];
  close?: string;
  failure?: string;
}

type Reply = { seq: number; ok: true; result?: WireOutcome } | { seq: number; ok: false; error: string };

interface Channel {
  requests: Mailbox;
  replies: Mailbox;
  wake: EventFd;
  replied: EventFd;
}

interface Mirror {
  daemon: VhostUserDaemon;
  handler: VhostUserHandler | null;
}

/** The worker side (main.ts runs it in a Worker named QUEUE_THREAD_NAME) until "stop". */
export async function queueThreadMain(): Promise<void> {
  const scope = globalThis as unknown as { onmessage: ((e: MessageEvent) => void) | null };
  const log = (l: string) => console.error(l);
  const reactor = new Reactor({
    wake: "block",
    onError: (e) => log(`mpq vhost: queue thread: ${(e as Error).message ?? e}`),
  });
  const mirrors = new Map<number, Mirror>();
  /** Devices that could not be opened here: every request for them fails with this. */
  const failed = new Map<number, string>();
  const at: { channel: Channel | null } = { channel: null };

  const handle = async (r: Request): Promise<WireOutcome | undefined> => {
    if (r.op === "stop") {
      reactor.stop();
      return undefined;
    }
    const why = failed.get(r.key);
    const m = mirrors.get(r.key);
    if (why !== undefined || !m) {
      for (const n of r.op === "message" ? r.fds : []) OwnedFd.unsafeAdopt(n).close();
      throw new Error(why ?? `no device ${r.key}`);
    }
    switch (r.op) {
      case "connect":
        m.handler = m.daemon.attachMirror();
        return undefined;
      case "disconnect":
        m.handler = null;
        await m.daemon.detachMirror();
        return undefined;
      case "detach":
        mirrors.delete(r.key);
        await m.daemon.detachMirror();
        await m.daemon.shutdown("device removed");
        return undefined;
      case "message": {
        const fds = r.fds.map((n) => OwnedFd.unsafeAdopt(n, `fd ${n} (forwarded)`));
        if (!m.handler) {
          for (const f of fds) f.close();
          throw new Error(`device ${r.key} has no connection`);
        }
        const msg: Message = { request: r.request, flags: r.flags, payload: new Uint8Array(r.payload), fds };
        const out: Outcome = await m.handler.handle(msg);
        for (const f of out.fds ?? []) f.close();
        return { reply: out.reply ? [...out.reply] : undefined, close: out.close, failure: out.failure };
      }
    }
  };
  // Requests run in order of arrival, one after another (a ring stop's drain included), as the
  // connection that forwards them reads them; one whose device has not been attached yet (its
  // postMessage still on the way) waits for it.
  let busy = false;
  const pump = async (): Promise<void> => {
    const c = at.channel;
    if (busy || !c) return;
    busy = true;
    try {
      for (;;) {
        const next = c.requests.peek() as ({ seq: number } & Request) | undefined;
        if (!next) break;
        if (next.op !== "stop" && !mirrors.has(next.key) && !failed.has(next.key)) break;
        c.requests.take();
        let reply: Reply;
        try {
          reply = { seq: next.seq, ok: true, result: await handle(next) };
        } catch (e) {
          reply = { seq: next.seq, ok: false, error: (e as Error).message ?? String(e) };
        }
        c.replies.send(reply);
        c.replied.signal();
      }
    } finally {
      busy = false;
    }
  };
  scope.onmessage = (e: MessageEvent) => {
    const s = e.data as Setup;
    if (s.op === "init") {
      const wake = new EventFd(OwnedFd.unsafeAdopt(s.wakeFd, "queue thread wake"));
      const replied = new EventFd(OwnedFd.unsafeAdopt(s.repliedFd, "queue thread replied"));
      at.channel = { requests: new Mailbox(s.requests), replies: new Mailbox(s.replies), wake, replied };
      reactor.add(wake.fd, { readable: true }, () => {
        wake.drain();
        pump();
      });
    } else {
      const m = s.mirror;
      try {
        const { device } = createDevice(m.spec, m.shared);
        const daemon = new VhostUserDaemon(device, null, {
          reactor,
          label: m.label,
          pollUs: m.pollUs,
          trace: m.trace,
          sharedMetrics: m.metrics,
          log: (l) => log(l.replace(/^mpq vhost: /, `mpq vhost ${m.label}: `)),
        });
        mirrors.set(s.key, { daemon, handler: null });
      } catch (e) {
        failed.set(s.key, `queue thread: ${(e as Error).message}`);
      }
    }
    pump();
  };
  try {
    await reactor.run();
  } finally {
    for (const m of mirrors.values()) {
      await m.daemon.detachMirror();
      m.daemon.close();
    }
    mirrors.clear();
    scope.onmessage = null;
    reactor.close();
    const c = at.channel;
    if (c) {
      c.replies.send({ seq: -1, ok: true } satisfies Reply);
      c.replied.signal();
      c.wake.close();
      c.replied.close();
    }
  }
}

/**
 * The control side of one queue thread.
 * @example
 * ```ts ignore
 * const t = QueueThread.start(0, reactor);
 * const key = t.attach({ spec, label: "blk0", metrics: metrics.shared });
 * t.connect(key);
 * const out = await t.message(key, message); // its fds now belong to the thread
 * await t.stop();
 * ```
 */
export class QueueThread implements QueueHost {
  readonly index: number;
  readonly #worker: Worker;
  readonly #requests: Mailbox;
  readonly #replies: Mailbox;
  readonly #wake: EventFd;
  readonly #replied: EventFd;
  readonly #repliedWatch: Watch;
  #seq = 0;
  #keys = 0;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  readonly #stopped: Promise<void>;
  #stoppedResolve!: () => void;
  #dead: Error | null = null;

  private constructor(index: number, reactor: Reactor, entry: string) {
    this.index = index;
    this.#worker = new Worker(entry, { type: "module", name: QUEUE_THREAD_NAME });
    const requests = mailboxMemory(), replies = mailboxMemory();
    this.#requests = new Mailbox(requests);
    this.#replies = new Mailbox(replies);
    this.#wake = new EventFd({ nonBlocking: true, label: `queue thread ${index} wake` });
    this.#replied = new EventFd({ nonBlocking: true, label: `queue thread ${index} replied` });
    this.#stopped = new Promise((r) => this.#stoppedResolve = r);
    this.#repliedWatch = reactor.add(this.#replied.fd, { readable: true }, () => this.#onReplies());
    this.#worker.onerror = (e: ErrorEvent) => {
      e.preventDefault();
      this.#fail(new Error(`queue thread ${index} failed: ${e.message}`));
    };
    this.#worker.postMessage(
      {
        op: "init",
        requests,
        replies,
        wakeFd: this.#wake.fd.dup().unsafeRelease(),
        repliedFd: this.#replied.fd.dup().unsafeRelease(),
      } satisfies Setup,
    );
  }

  /**
   * Starts a thread running this program's entry module (`entry`: Deno.mainModule of the main
   * thread) as a queue thread; its replies are read by `reactor` (the caller's), woken by an
   * eventfd even in a blocking epoll_wait.
   */
  static start(index: number, reactor: Reactor, entry: string): QueueThread {
    return new QueueThread(index, reactor, entry);
  }

  #onReplies(): void {
    this.#replied.drain();
    for (;;) {
      const r = this.#replies.peek() as Reply | undefined;
      if (!r) return;
      this.#replies.take();
      if (r.seq === -1) {
        this.#stoppedResolve();
        continue;
      }
      const p = this.#pending.get(r.seq);
      if (!p) continue;
      this.#pending.delete(r.seq);
      if (r.ok) p.resolve(r.result);
      else p.reject(new Error(r.error));
    }
  }

  #fail(e: Error): void {
    this.#dead = e;
    for (const p of this.#pending.values()) p.reject(e);
    this.#pending.clear();
    this.#stoppedResolve();
  }

  #call(request: Request): Promise<unknown> {
    if (this.#dead) return Promise.reject(this.#dead);
    try {
      return this.#post(request);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Puts a request in the mailbox and wakes the thread; throws when the mailbox refuses it. */
  #post(request: Request): Promise<unknown> {
    const seq = ++this.#seq;
    this.#requests.send({ seq, ...request });
    const p = new Promise((resolve, reject) => this.#pending.set(seq, { resolve, reject }));
    this.#wake.signal();
    return p;
  }

  /**
   * Makes a mirror of a device on the thread and returns its key at once: requests for it may
   * follow straight away (the thread holds them until the mirror exists); when the device cannot
   * be opened there, they fail saying why.
   */
  attach(mirror: MirrorSpec): number {
    const key = ++this.#keys;
    this.#worker.postMessage({ op: "attach", key, mirror } satisfies Setup);
    return key;
  }

  /** A front-end connected: the mirror gets a fresh handler for its messages. */
  connect(key: number): Promise<void> {
    return this.#call({ op: "connect", key }).then(() => {});
  }

  /** Forwards one message; its fds move to the thread (closed here when that fails). */
  message(key: number, m: Message): Promise<MirrorOutcome> {
    const owned = m.fds.filter((f): f is OwnedFd => f !== null);
    for (let i = 0; i < m.fds.length; i++) m.fds[i] = null;
    if (this.#dead) {
      for (const f of owned) f.close();
      return Promise.reject(this.#dead);
    }
    const request: Request = {
      op: "message",
      key,
      request: m.request,
      flags: m.flags,
      payload: [...m.payload],
      fds: owned.map((f) => f.unsafeFd),
    };
    let reply: Promise<unknown>;
    try {
      reply = this.#post(request);
    } catch (e) {
      // The thread never got it: the fds are still ours.
      for (const f of owned) f.close();
      return Promise.reject(e);
    }
    // In the mailbox: the thread adopts them now.
    for (const f of owned) f.unsafeRelease();
    return reply.then((r) => {
      const out = r as WireOutcome;
      return {
        reply: out.reply ? new Uint8Array(out.reply) : undefined,
        close: out.close,
        failure: out.failure,
      };
    });
  }

  /** The front-end went away: the mirror's rings stop (after their in-flight requests completed). */
  disconnect(key: number): Promise<void> {
    return this.#call({ op: "disconnect", key }).then(() => {});
  }

  /** The device goes away: its mirror is closed. */
  detach(key: number): Promise<void> {
    return this.#call({ op: "detach", key }).then(() => {});
  }

  /**
   * Ends the thread, closing its mirrors (waits at most `ms`, then terminates it). Reads the
   * replies itself: the reactor may have stopped already.
   */
  async stop(ms = 10_000): Promise<void> {
    if (!this.#dead) {
      let stopped = false;
      this.#stopped.then(() => stopped = true);
      this.#call({ op: "stop" }).catch(() => {});
      const until = performance.now() + ms;
      while (!stopped && performance.now() < until) {
        this.#onReplies();
        await new Promise((r) => setTimeout(r, 2));
      }
    }
    this.#worker.terminate();
    this.#repliedWatch.remove();
    this.#wake.close();
    this.#replied.close();
  }
}

/** Default threads per multi-queue device (the CLIs' --queue-threads): one per CPU, at most 64. */
export function defaultQueueThreads(): number {
  return Math.min(64, Math.max(1, navigator.hardwareConcurrency || 1));
}

/**
 * The queue threads of this thread's devices, started on first use. With `size` threads in all
 * (the device's own thread counts as one), queue k >= 1 of the n-th multi-queue device runs on
 * queue thread (k - 1 + n) mod (size - 1); queue 0 stays with the connection.
 */
export class QueuePool implements QueuePlacer {
  readonly size: number;
  readonly #entry: string;
  readonly #threads: (QueueThread | undefined)[] = [];
  #devices = 0;

  /**
   * `size`: threads per device's queues in all, the device's own included (1: no queue threads);
   * `entry`: the program's entry module (a Worker's own Deno.mainModule is not usable: a device
   * thread passes the main thread's).
   */
  constructor(size: number, entry: string = Deno.mainModule) {
    this.#entry = entry;
    if (!Number.isSafeInteger(size) || size < 1 || size > 64) {
      throw new RangeError(`queue threads must be 1..64: got ${size}`);
    }
    this.size = size;
  }

  /**
   * Where each of a device's queues runs: null for the device's own thread, else a queue thread
   * (started now if it was not running; its replies wake `reactor`, this thread's).
   */
  place(numQueues: number, reactor: Reactor): (QueueThread | null)[] {
    const workers = this.size - 1;
    const out: (QueueThread | null)[] = [null];
    if (workers === 0 || numQueues < 2) return new Array(numQueues).fill(null);
    const n = this.#devices++;
    for (let k = 1; k < numQueues; k++) {
      const j = (k - 1 + n) % workers;
      this.#threads[j] ??= QueueThread.start(j, reactor, this.#entry);
      out.push(this.#threads[j]!);
    }
    return out;
  }

  /** Queue threads running. */
  get running(): number {
    return this.#threads.filter((t) => t !== undefined).length;
  }

  /** Stops every queue thread. */
  async stop(): Promise<void> {
    const ts = this.#threads.splice(0).filter((t): t is QueueThread => t !== undefined);
    await Promise.all(ts.map((t) => t.stop()));
  }
}

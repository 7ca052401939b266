/**
 * The connection side of a device whose queues several threads serve (see queue_thread.ts):
 * routes each vhost-user message to the thread that must see it.
 * - A message about one ring (SET_VRING_*, GET_VRING_BASE) goes to the thread that owns that ring;
 *   its answer is that thread's.
 * - A message that changes device-wide state (features, owner, reset, memory table, inflight
 *   area, config, dirty log) is handled here first; when it succeeded, every queue thread gets it too (with
 *   duplicates of its fds) and the answer waits until they all have it, so QEMU never uses a
 *   memory region a queue thread has not mapped.
 * - Everything else (GET_FEATURES, GET_CONFIG, ...) is answered here.
 * @module
 */
import type { OwnedFd } from "../../ffi/mod.ts";
import type { Message, MessageHandler, Outcome, VhostUserHandler } from "./handler.ts";
import { HEADER_SIZE, Request, requestName } from "./message.ts";
import type { Reactor } from "../../ffi/mod.ts";
import type { DeviceSpec } from "./device_spec.ts";

/** Messages about one ring: the payload starts with its index. */
const RING_MESSAGES: ReadonlySet<number> = new Set([
  Request.SET_VRING_NUM,
  Request.SET_VRING_ADDR,
  Request.SET_VRING_BASE,
  Request.GET_VRING_BASE,
  Request.SET_VRING_KICK,
  Request.SET_VRING_CALL,
  Request.SET_VRING_ERR,
  Request.SET_VRING_ENABLE,
]);

/** Messages that change what every thread serving the device must know. */
const DEVICE_MESSAGES: ReadonlySet<number> = new Set([
  Request.SET_FEATURES,
  Request.SET_PROTOCOL_FEATURES,
  Request.SET_OWNER,
  Request.RESET_OWNER,
  Request.RESET_DEVICE,
  Request.SET_MEM_TABLE,
  Request.ADD_MEM_REG,
  Request.REM_MEM_REG,
  Request.SET_INFLIGHT_FD,
  Request.SET_CONFIG,
  Request.SET_LOG_BASE,
  Request.SET_LOG_FD,
]);

/**
 * The ring a message is about (-1: none). SET_VRING_KICK/CALL/ERR carry it in the low byte of a
 * u64, the others in a u32; a payload too short for either goes to the local handler, which says
 * what is wrong with it.
 */
export function ringOf(m: Message): number {
  if (!RING_MESSAGES.has(m.request) || m.payload.byteLength < 4) return -1;
  const v = new DataView(m.payload.buffer, m.payload.byteOffset, m.payload.byteLength);
  const isFile = m.request === Request.SET_VRING_KICK || m.request === Request.SET_VRING_CALL ||
    m.request === Request.SET_VRING_ERR;
  return isFile ? v.getUint8(0) : v.getUint32(0, true);
}

/** What a mirror needs to be the same device as the one on the control side. */
export interface MirrorSpec {
  spec: DeviceSpec;
  /** The metrics label (the device id). */
  label: string;
  /** The control side's Metrics.shared: queue counters land where they are rendered. */
  metrics: SharedArrayBuffer;
  /** The control side's BlkDevice.shared (blk only). */
  shared?: Record<string, SharedArrayBuffer | undefined>;
  pollUs?: number;
  trace?: boolean;
}

/** A forwarded message's outcome as it crosses back (no fds: no forwarded message returns any). */
export interface MirrorOutcome {
  reply?: Uint8Array<ArrayBuffer>;
  close?: string;
  failure?: string;
}

/** The control side of a queue thread, as the connection sees it (QueueThread implements it). */
export interface QueueHost {
  readonly index: number;
  /** Makes a mirror of a device on the thread; returns its key at once. */
  attach(mirror: MirrorSpec): number;
  /** A front-end connected: the mirror gets a fresh handler. */
  connect(key: number): Promise<void>;
  /** Forwards one message (its fds move to the thread). */
  message(key: number, m: Message): Promise<MirrorOutcome>;
  /** The front-end went away: the mirror's rings stop and drain. */
  disconnect(key: number): Promise<void>;
  /** The device goes away. */
  detach(key: number): Promise<void>;
}

/** Where a device's queues run (QueuePool implements it). */
export interface QueuePlacer {
  /** Threads per device's queues in all, the device's own included. */
  readonly size: number;
  /** Per queue: null for the device's own thread, else the queue thread serving it. */
  place(numQueues: number, reactor: Reactor): (QueueHost | null)[];
}

/** One queue thread's mirror of the device. */
export interface MirrorLink {
  thread: QueueHost;
  key: number;
}

/**
 * @example
 * ```ts ignore
 * const owners = pool.place(device.numQueues); // null: this thread
 * const handler = new SplitHandler(local, owners.map((t) => t && links.get(t)));
 * new VhostUserConnection(sock, handler, { reactor });
 * ```
 */
export class SplitHandler implements MessageHandler {
  readonly local: VhostUserHandler;
  /** Per ring: the queue thread's mirror that serves it, or null (this thread). */
  readonly #owners: (MirrorLink | null)[];
  readonly #links: MirrorLink[];
  readonly #log: (line: string) => void;

  constructor(local: VhostUserHandler, owners: (MirrorLink | null)[], log: (line: string) => void) {
    this.local = local;
    this.#owners = owners;
    this.#links = [...new Set(owners.filter((l): l is MirrorLink => l !== null))];
    this.#log = log;
  }

  handle(m: Message): Outcome | Promise<Outcome> {
    const ring = ringOf(m);
    const owner = ring >= 0 ? this.#owners[ring] : null;
    if (owner) return this.#forward(owner, m);
    if (m.request === Request.GET_INFLIGHT_FD) return this.#inflight(m);
    if (!DEVICE_MESSAGES.has(m.request) || this.#links.length === 0) return this.local.handle(m);
    const copies = this.#links.map(() => m.fds.map((f) => f?.dup() ?? null));
    let out: Outcome | Promise<Outcome>;
    try {
      out = this.local.handle(m);
    } catch (e) {
      for (const c of copies) closeAll(c);
      throw e;
    }
    const then = (o: Outcome): Outcome | Promise<Outcome> => {
      if (o.failure !== undefined) {
        for (const c of copies) closeAll(c);
        return o;
      }
      return this.#broadcast(m, copies).then(() => o);
    };
    return out instanceof Promise ? out.then(then) : then(out);
  }

  /** GET_INFLIGHT_FD: answered here; the queue threads get the area as a SET_INFLIGHT_FD. */
  #inflight(m: Message): Outcome | Promise<Outcome> {
    const out = this.local.handle(m) as Outcome;
    if (out.failure !== undefined || !out.reply || !out.fds?.[0] || this.#links.length === 0) return out;
    const set = (fd: OwnedFd): Message => ({
      request: Request.SET_INFLIGHT_FD,
      flags: m.flags,
      payload: out.reply!.slice(HEADER_SIZE),
      fds: [fd],
    });
    const copies = this.#links.map(() => [out.fds![0].dup()]);
    return this.#broadcast(set(out.fds[0]), copies).then(() => out);
  }

  async #broadcast(m: Message, copies: (OwnedFd | null)[][]): Promise<void> {
    const outs = await Promise.allSettled(
      this.#links.map((l, i) =>
        l.thread.message(l.key, { request: m.request, flags: m.flags, payload: m.payload, fds: copies[i] })
      ),
    );
    outs.forEach((o, i) => {
      const what = o.status === "rejected" ? (o.reason as Error).message : o.value.failure;
      if (what !== undefined) {
        this.#log(
          `mpq vhost: queue thread ${this.#links[i].thread.index}: ${requestName(m.request)}: ${what}`,
        );
      }
    });
  }

  async #forward(link: MirrorLink, m: Message): Promise<Outcome> {
    let out: MirrorOutcome;
    try {
      out = await link.thread.message(link.key, m);
    } catch (e) {
      return { close: `${requestName(m.request)}: ${(e as Error).message}`, failure: (e as Error).message };
    }
    return { reply: out.reply, close: out.close, failure: out.failure };
  }

  close(): Promise<void> | void {
    const local = this.local.close();
    if (this.#links.length === 0) return local;
    return Promise.all([
      local,
      ...this.#links.map((l) =>
        l.thread.disconnect(l.key).catch((e) =>
          this.#log(`mpq vhost: queue thread ${l.thread.index}: disconnect: ${(e as Error).message}`)
        )
      ),
    ]).then(() => {});
  }
}

function closeAll(fds: (OwnedFd | null)[]): void {
  for (const f of fds) f?.close();
}

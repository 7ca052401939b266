/**
 * The vhost-user protocol state machine of one connection: a dispatch table keyed by request
 * code, features and protocol features, the memory table, the rings' life cycle (started by
 * SET_VRING_KICK, enabled by SET_VRING_ENABLE when PROTOCOL_FEATURES is negotiated, stopped by
 * GET_VRING_BASE) and inflight tracking. Only {@link VhostUserHandler.handle} produces replies:
 * a handler that throws never gets a success ack.
 * @module
 */
import {
  EventFd,
  fdKind,
  ftruncate,
  type MappedRegion,
  mapShared,
  memfdCreate,
  type OwnedFd,
  sealSize,
  type Watch,
} from "../../ffi/mod.ts";
import type { DeviceContext, VhostUserDevice } from "./backend.ts";
import { DirtyLog } from "./dirty_log.ts";
import { GuestMemory, GuestMemoryError, memoryFdProblem } from "./guest_memory.ts";
import { InflightQueue, inflightQueueSize } from "./inflight.ts";
import {
  bit,
  decodeConfig,
  decodeInflight,
  decodeLog,
  decodeMemTable,
  decodeSingleRegion,
  decodeU64,
  decodeVringAddr,
  decodeVringFile,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeReply,
  encodeU64,
  encodeVringState,
  Flags,
  type MemoryRegion,
  ProtocolFeature,
  Request,
  requestName,
  VhostMessageError,
  VirtioFeature,
} from "./message.ts";
import { MAX_QUEUE_SIZE, VirtQueue, VirtqueueError } from "./virtqueue.ts";

/** Protocol features we offer (LOG_SHMFD: the dirty log of live migration; never STATUS). */
export const OFFERED_PROTOCOL_FEATURES = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.LOG_SHMFD) |
  bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.INFLIGHT_SHMFD) |
  bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) | bit(ProtocolFeature.RESET_DEVICE);

/** Transport features every device gets (LOG_ALL: dirty logging while QEMU migrates the guest). */
export const TRANSPORT_FEATURES = bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.RING_EVENT_IDX) |
  bit(VirtioFeature.RING_INDIRECT_DESC) | bit(VirtioFeature.NOTIFY_ON_EMPTY) |
  bit(VirtioFeature.PROTOCOL_FEATURES) | bit(VirtioFeature.LOG_ALL);

/** SET_VRING_ADDR flag: log used-ring writes at log_guest_addr. */
export const VRING_F_LOG = 1;

/** The largest dirty log accepted (1 bit per 4 KiB: 16 GiB of log covers 512 TiB of guest). */
export const MAX_LOG_BYTES = 16n << 30n;

/** Memory slots offered with CONFIGURE_MEM_SLOTS. */
export const MAX_MEM_SLOTS = 32;
/**
 * How long stopping a ring (GET_VRING_BASE, reset, disconnect) waits for the device's in-flight
 * requests, with the event loop running, before the device is told to drop them.
 */
export const STOP_TIMEOUT_MS = 5000;

/** One received message; fds are owned by the message until a handler takes them. */
export interface Message {
  request: number;
  flags: number;
  payload: Uint8Array;
  fds: (OwnedFd | null)[];
}

/**
 * What the connection must do after a message. A message whose handling waits for I/O (a ring
 * stop) yields a Promise of it: the connection reads no further message until it settles.
 */
export interface Outcome {
  /** An encoded reply to send (flags 0x5). */
  reply?: Uint8Array<ArrayBuffer>;
  /** Fds to send with the reply; the connection closes them after sending. */
  fds?: OwnedFd[];
  /** Close the connection (a message that needed an answer we cannot give). */
  close?: string;
  /** The message failed (whether or not the front-end hears it): why. */
  failure?: string;
}

/**
 * What a connection hands its messages to: a {@link VhostUserHandler}, or a SplitHandler that
 * shares a device's queues with queue threads.
 */
export interface MessageHandler {
  /** Handles one message (a Promise when the answer waits for I/O or another thread). */
  handle(m: Message): Outcome | Promise<Outcome>;
  /** The front-end went away: stop every ring (a Promise while requests drain) and release all. */
  close(): Promise<void> | void;
}

interface Result {
  payload: Uint8Array;
  fds?: OwnedFd[];
}

type Handler = (m: Message) => Result | void | Promise<Result | void>;

interface Entry {
  fn: Handler;
  /** The request has a defined reply (GET_*). */
  replies: boolean;
}

/** Options for a handler. */
export interface HandlerOptions {
  /** Diagnostics (default: console.error). */
  log?: (line: string) => void;
  /** Called on every kick before the queue is processed (busy-polling takes over from here). */
  onKick?: (q: VirtQueue) => void;
}

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Reactor } from "../../ffi/mod.ts";
 * import { RngDevice } from "./devices/rng.ts";
 * import { bit, decodeU64, Flags, HEADER_SIZE, Request, VirtioFeature } from "./message.ts";
 * import { Metrics } from "./metrics.ts";
 *
 * const reactor = new Reactor();
 * const device = new RngDevice();
 * const h = new VhostUserHandler(device, { reactor, metrics: new Metrics("rng", 1) });
 * const empty = new Uint8Array(0);
 * const out = h.handle({ request: Request.GET_FEATURES, flags: Flags.VERSION, payload: empty, fds: [] });
 * assert.ok(!(out instanceof Promise)); // only a ring stop waits for I/O
 * const features = decodeU64(Request.GET_FEATURES, out.reply!.subarray(HEADER_SIZE));
 * assert.equal(features & bit(VirtioFeature.VERSION_1), bit(VirtioFeature.VERSION_1));
 * await h.close(); // the front-end went away
 * device.close();
 * reactor.close();
 * ```
 */
export class VhostUserHandler implements MessageHandler {
  readonly device: VhostUserDevice;
  readonly ctx: DeviceContext;
  readonly queues: VirtQueue[] = [];
  features = 0n;
  protocolFeatures = 0n;
  owner = false;
  memory: GuestMemory | null = null;
  readonly #kickWatches: (Watch | null)[] = [];
  readonly #table = new Map<number, Entry>();
  readonly #log: (line: string) => void;
  readonly #onKick: ((q: VirtQueue) => void) | undefined;
  #inflightMap: MappedRegion | null = null;
  /** The dirty log (SET_LOG_BASE): rings mark it while LOG_ALL is negotiated. */
  #dirtyLog: DirtyLog | null = null;
  /** SET_LOG_FD's eventfd (kept; closed with the connection). */
  #logFd: OwnedFd | null = null;
  /**
   * Mappings replaced while I/O may still point into them, each with every queue's retire mark
   * at the time: unmapped as soon as everything popped before it has completed.
   */
  #retired: { what: { close(): void }; marks: number[] }[] = [];
  #releaseScheduled = false;
  readonly #onComplete = (): void => {
    if (this.#releaseScheduled) return;
    this.#releaseScheduled = true;
    queueMicrotask(() => {
      this.#releaseScheduled = false;
      this.#releaseRetired();
    });
  };
  #closing: Promise<void> | null = null;
  #closed = false;

  constructor(device: VhostUserDevice, ctx: DeviceContext, options: HandlerOptions = {}) {
    this.device = device;
    this.ctx = ctx;
    this.#log = options.log ?? ((l) => console.error(l));
    this.#onKick = options.onKick;
    for (let i = 0; i < device.numQueues; i++) {
      this.queues.push(new VirtQueue(i));
      this.#kickWatches.push(null);
    }
    const t = this.#table;
    const on = (req: number, fn: Handler, replies = false) => t.set(req, { fn: fn.bind(this), replies });
    on(Request.GET_FEATURES, this.#getFeatures, true);
    on(Request.SET_FEATURES, this.#setFeatures);
    on(Request.GET_PROTOCOL_FEATURES, this.#getProtocolFeatures, true);
    on(Request.SET_PROTOCOL_FEATURES, this.#setProtocolFeatures);
    on(Request.SET_OWNER, this.#setOwner);
    on(Request.RESET_OWNER, this.#resetDevice);
    on(Request.RESET_DEVICE, this.#resetDevice);
    on(Request.SET_MEM_TABLE, this.#setMemTable);
    on(Request.GET_MAX_MEM_SLOTS, this.#getMaxMemSlots, true);
    on(Request.ADD_MEM_REG, this.#addMemReg);
    on(Request.REM_MEM_REG, this.#remMemReg);
    on(Request.SET_VRING_NUM, this.#setVringNum);
    on(Request.SET_VRING_ADDR, this.#setVringAddr);
    on(Request.SET_VRING_BASE, this.#setVringBase);
    on(Request.GET_VRING_BASE, this.#getVringBase, true);
    on(Request.SET_VRING_KICK, this.#setVringKick);
    on(Request.SET_VRING_CALL, this.#setVringCall);
    on(Request.SET_VRING_ERR, this.#setVringErr);
    on(Request.SET_VRING_ENABLE, this.#setVringEnable);
    on(Request.GET_QUEUE_NUM, this.#getQueueNum, true);
    on(Request.GET_CONFIG, this.#getConfig, true);
    on(Request.SET_CONFIG, this.#setConfig);
    on(Request.GET_INFLIGHT_FD, this.#getInflightFd, true);
    on(Request.SET_INFLIGHT_FD, this.#setInflightFd);
    on(Request.SET_LOG_BASE, this.#setLogBase, true);
    on(Request.SET_LOG_FD, this.#setLogFd);
  }

  /** Request codes this handler knows. */
  get supportedRequests(): number[] {
    return [...this.#table.keys()];
  }

  /** Every feature we offer in GET_FEATURES. */
  get offeredFeatures(): bigint {
    return this.device.features | TRANSPORT_FEATURES;
  }

  /**
   * The dispatcher: runs the request's handler, closes fds it did not take, and builds the reply
   * (its own reply, a REPLY_ACK ack with 0 on success and non-zero on failure, or nothing).
   */
  handle(m: Message): Outcome | Promise<Outcome> {
    const entry = this.#table.get(m.request);
    let result: Result | void | Promise<Result | void> = undefined;
    let failure: string | null = null;
    if (!entry) {
      failure = `${requestName(m.request)} is not supported`;
    } else {
      try {
        result = entry.fn(m);
      } catch (e) {
        failure = this.#failureText(m, e);
      }
    }
    for (let i = 0; i < m.fds.length; i++) {
      m.fds[i]?.close();
      m.fds[i] = null;
    }
    if (result instanceof Promise) {
      return result.then(
        (r) => this.#outcome(m, entry, r, null),
        (e) => this.#outcome(m, entry, undefined, this.#failureText(m, e)),
      );
    }
    return this.#outcome(m, entry, result, failure);
  }

  #failureText(m: Message, e: unknown): string {
    if (!(e instanceof Error)) throw e;
    const name = requestName(m.request);
    return e.message.startsWith(`${name}:`) ? e.message : `${name}: ${e.message}`;
  }

  #outcome(m: Message, entry: Entry | undefined, result: Result | void, failure: string | null): Outcome {
    const ackWanted = (m.flags & Flags.NEED_REPLY) !== 0;
    if (failure !== null) {
      this.#log(`mpq vhost: ${failure}`);
      if (entry?.replies) return { close: failure, failure };
      const ackOk = (this.protocolFeatures & bit(ProtocolFeature.REPLY_ACK)) !== 0n;
      if (ackWanted && ackOk) return { reply: encodeReply(m.request, encodeU64(1n)), failure };
      return { failure };
    }
    if (entry!.replies) {
      const r = result as Result;
      return { reply: encodeReply(m.request, r.payload), fds: r.fds };
    }
    if (ackWanted && (this.protocolFeatures & bit(ProtocolFeature.REPLY_ACK)) !== 0n) {
      return { reply: encodeReply(m.request, encodeU64(0n)) };
    }
    return {};
  }

  /**
   * The front-end went away: stop every ring (the device finishes what it popped, with the event
   * loop running), then drop every mapping and fd. Returns a Promise when requests were in flight;
   * the next front-end must not be served before it settles (the device is shared).
   */
  close(): Promise<void> | void {
    if (this.#closing) return this.#closing;
    if (this.#closed) return;
    const release = () => {
      this.#closed = true;
      this.#closing = null;
      this.memory?.close();
      this.memory = null;
      this.#inflightMap?.close();
      this.#inflightMap = null;
      for (const q of this.queues) q.dirtyLog = null;
      this.#dirtyLog?.close();
      this.#dirtyLog = null;
      this.#logFd?.close();
      this.#logFd = null;
      for (const r of this.#retired.splice(0)) r.what.close();
    };
    const wait = this.#resetQueues();
    if (!wait) return release();
    this.#closing = wait.then(release, release);
    return this.#closing;
  }

  // ---- helpers ----

  #queue(index: number): VirtQueue {
    const q = this.queues[index];
    if (!q) throw new VhostMessageError(`queue index ${index} out of range 0..${this.queues.length - 1}`);
    return q;
  }

  #take(m: Message, count: number): OwnedFd[] {
    const got = m.fds.filter((f) => f !== null).length;
    if (got !== count) throw new VhostMessageError(`expected ${count} fd(s) with the message, got ${got}`);
    const out: OwnedFd[] = [];
    for (let i = 0; i < m.fds.length; i++) {
      if (m.fds[i]) out.push(m.fds[i]!);
      m.fds[i] = null;
    }
    return out;
  }

  #unwatchKick(q: VirtQueue): void {
    this.#kickWatches[q.index]?.remove();
    this.#kickWatches[q.index] = null;
  }

  /**
   * Stops a ring and returns its next avail index (GET_VRING_BASE's answer): the device pops
   * nothing more and finishes what it popped (pending writethrough flushes included) while the
   * event loop runs; then the used ring is published and the queue's views dropped. A Promise when
   * requests were in flight; after STOP_TIMEOUT_MS the device is told to drop them.
   */
  #stopQueue(q: VirtQueue): number | Promise<number> {
    this.#unwatchKick(q);
    if (!q.started) return q.stop();
    q.stopping = true;
    try {
      this.device.stopQueue(q);
    } catch (e) {
      this.#log(`mpq vhost: queue ${q.index} stop: ${(e as Error).message}`);
    }
    if (q.inFlight === 0) return this.#finishStop(q);
    return this.#drain(q).then(() => this.#finishStop(q));
  }

  async #drain(q: VirtQueue): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<boolean>((r) => timer = setTimeout(() => r(true), STOP_TIMEOUT_MS));
    const late = await Promise.race([q.whenIdle().then(() => false), timedOut]);
    clearTimeout(timer);
    if (!late) return;
    this.#log(
      `mpq vhost: queue ${q.index}: ${q.inFlight} request(s) still in flight after ${STOP_TIMEOUT_MS} ms: dropped`,
    );
    try {
      this.device.cancelQueue(q);
    } catch (e) {
      this.#log(`mpq vhost: queue ${q.index} cancel: ${(e as Error).message}`);
    }
  }

  #finishStop(q: VirtQueue): number {
    try {
      q.flush();
    } catch (e) {
      this.#log(`mpq vhost: queue ${q.index} stop: ${(e as Error).message}`);
    }
    return q.stop();
  }

  /** Stops and forgets every ring (RESET_DEVICE, disconnect); a Promise while requests drain. */
  #resetQueues(): Promise<void> | void {
    const waits: Promise<void>[] = [];
    for (const q of this.queues) {
      const r = this.#stopQueue(q);
      if (typeof r === "number") q.reset();
      else waits.push(r.then(() => q.reset()));
    }
    if (waits.length > 0) return Promise.all(waits).then(() => {});
  }

  /** Runs the device on a queue; a broken ring or bad address marks the queue broken. */
  process(q: VirtQueue): void {
    if (!q.ready) return;
    try {
      this.device.processQueue(q);
    } catch (e) {
      q.fail();
      this.ctx.metrics.countBroken();
      const what = e instanceof VirtqueueError || e instanceof GuestMemoryError
        ? "broken ring"
        : "device error";
      this.#log(`mpq vhost: queue ${q.index} stopped (${what}): ${(e as Error).message}`);
    }
  }

  #startQueue(q: VirtQueue): void {
    if (!this.memory) throw new VhostMessageError(`queue ${q.index}: kick before SET_MEM_TABLE`);
    if (q.inflight && q.inflight.size < q.size) {
      this.#log(
        `mpq vhost: queue ${q.index}: inflight area for ${q.inflight.size} < queue size ${q.size}; ignored`,
      );
      q.inflight = null;
    }
    q.eventIdx = (this.features & bit(VirtioFeature.RING_EVENT_IDX)) !== 0n;
    if ((this.features & bit(VirtioFeature.PROTOCOL_FEATURES)) === 0n) q.enabled = true;
    q.start(this.memory);
    this.device.startQueue(q, { ...this.ctx, process: (vq) => this.process(vq) });
    if (q.resubmitPending > 0) {
      this.#log(`mpq vhost: queue ${q.index}: resubmitting ${q.resubmitPending} inflight request(s)`);
    }
  }

  /**
   * After a memory-table change: every started ring is translated through the new table. A ring
   * that no longer translates drops its views (before anything is unmapped) and is broken.
   */
  #remapQueues(): void {
    for (const q of this.queues) {
      if (!q.started) continue;
      try {
        if (!this.memory) throw new VhostMessageError("no memory table");
        q.map(this.memory);
      } catch (e) {
        q.unmap();
        if (!q.broken) this.ctx.metrics.countBroken();
        q.fail();
        this.#log(`mpq vhost: queue ${q.index} stopped: ${(e as Error).message}`);
      }
    }
  }

  // ---- the handlers ----

  #getFeatures(): Result {
    return { payload: encodeU64(this.offeredFeatures) };
  }

  #setFeatures(m: Message): void {
    const f = decodeU64(m.request, m.payload);
    const extra = f & ~this.offeredFeatures;
    if (extra) throw new VhostMessageError(`features 0x${extra.toString(16)} were not offered`);
    this.features = f;
    const eventIdx = (f & bit(VirtioFeature.RING_EVENT_IDX)) !== 0n;
    for (const q of this.queues) q.eventIdx = eventIdx;
    this.#applyLog();
    this.device.setFeatures(f);
  }

  /** Whether the rings log their writes: LOG_ALL negotiated and a log given. */
  get logging(): boolean {
    return (this.features & bit(VirtioFeature.LOG_ALL)) !== 0n && this.#dirtyLog !== null;
  }

  #applyLog(): void {
    const log = this.logging ? this.#dirtyLog : null;
    for (const q of this.queues) q.dirtyLog = log;
  }

  /**
   * SET_LOG_BASE: maps the dirty log (checked against the fd's real size) and answers (QEMU waits
   * for the reply with LOG_SHMFD). A new log replaces the old at once: marking is synchronous, so
   * nothing still points into the old one.
   */
  #setLogBase(m: Message): Result {
    const p = decodeLog(m.request, m.payload);
    const [fd] = this.#take(m, 1);
    try {
      if (p.mmapSize === 0n || p.mmapSize > MAX_LOG_BYTES) {
        throw new VhostMessageError(`dirty log of ${p.mmapSize} bytes: expected 1..${MAX_LOG_BYTES}`);
      }
      if (p.mmapOffset > 1n << 48n) {
        throw new VhostMessageError(`dirty log offset ${p.mmapOffset} out of range`);
      }
      const problem = memoryFdProblem(fd, p.mmapOffset + p.mmapSize, {
        fd: "the log fd",
        kinds: "memfd or shm",
        need: "mmap_offset + mmap_size",
      });
      if (problem) throw new VhostMessageError(problem);
      // Mapped from 0 (an offset need not be page aligned), the log at its offset in the mapping.
      const map = mapShared(fd, Number(p.mmapOffset + p.mmapSize));
      const log = new DirtyLog(map, Number(p.mmapOffset), Number(p.mmapSize));
      const old = this.#dirtyLog;
      this.#dirtyLog = log;
      this.#applyLog();
      old?.close();
    } finally {
      fd.close();
    }
    return { payload: encodeU64(0n) };
  }

  /** SET_LOG_FD: the eventfd to signal when the log was written (kept; QEMU 7.2 never reads it). */
  #setLogFd(m: Message): void {
    const [fd] = this.#take(m, 1);
    const kind = fdKind(fd);
    if (kind !== "eventfd") {
      fd.close();
      throw new VhostMessageError(`the log fd is a ${kind}, expected an eventfd`);
    }
    this.#logFd?.close();
    this.#logFd = fd;
  }

  #getProtocolFeatures(): Result {
    return { payload: encodeU64(OFFERED_PROTOCOL_FEATURES) };
  }

  #setProtocolFeatures(m: Message): void {
    const f = decodeU64(m.request, m.payload);
    const extra = f & ~OFFERED_PROTOCOL_FEATURES;
    if (extra) throw new VhostMessageError(`protocol features 0x${extra.toString(16)} were not offered`);
    this.protocolFeatures = f;
  }

  #setOwner(m: Message): void {
    if (m.payload.byteLength !== 0) {
      throw new VhostMessageError(`payload of ${m.payload.byteLength} bytes, expected 0`);
    }
    this.owner = true;
  }

  #resetDevice(m: Message): Promise<void> | void {
    if (m.payload.byteLength !== 0) {
      throw new VhostMessageError(`payload of ${m.payload.byteLength} bytes, expected 0`);
    }
    const wait = this.#resetQueues();
    if (!wait) {
      this.features = 0n;
      return;
    }
    return wait.then(() => {
      this.features = 0n;
    });
  }

  #setMemTable(m: Message): void {
    const regions = decodeMemTable(m.request, m.payload);
    const fds = this.#take(m, regions.length);
    const mem = new GuestMemory();
    try {
      regions.forEach((r, i) => mem.add(r, fds[i]));
    } catch (e) {
      mem.close();
      throw e;
    } finally {
      for (const f of fds) f.close();
    }
    const old = this.memory;
    this.memory = mem;
    this.#remapQueues();
    if (old) this.#retire(old);
  }

  /**
   * Unmaps a replaced mapping as soon as every request popped before now has completed (at once
   * when none is in flight). Queue views never point into it: they were remapped or dropped.
   */
  #retire(what: { close(): void }): void {
    this.#retired.push({ what, marks: this.queues.map((q) => q.retireMark()) });
    this.#releaseRetired();
  }

  #releaseRetired(): void {
    const keep = this.#retired.filter((r) => {
      if (!this.queues.every((q, i) => q.completedBefore(r.marks[i]))) return true;
      r.what.close();
      return false;
    });
    this.#retired = keep;
    const hook = keep.length > 0 ? this.#onComplete : null;
    for (const q of this.queues) q.onComplete = hook;
  }

  #getMaxMemSlots(m: Message): Result {
    if (m.payload.byteLength !== 0 && m.payload.byteLength !== 8) {
      throw new VhostMessageError(`payload of ${m.payload.byteLength} bytes, expected 0 or 8`);
    }
    return { payload: encodeU64(BigInt(MAX_MEM_SLOTS)) };
  }

  #addMemReg(m: Message): void {
    const r = decodeSingleRegion(m.request, m.payload);
    const [fd] = this.#take(m, 1);
    try {
      this.memory ??= new GuestMemory();
      if (this.memory.regions.length >= MAX_MEM_SLOTS) {
        throw new VhostMessageError(`all ${MAX_MEM_SLOTS} memory slots are in use`);
      }
      this.memory.add(r, fd);
    } finally {
      fd.close();
    }
    this.#remapQueues();
  }

  #remMemReg(m: Message): void {
    const r: MemoryRegion = decodeSingleRegion(m.request, m.payload);
    // QEMU may attach the region's fd; it is not needed (closed by the dispatcher).
    const mem = this.memory;
    const found = mem?.regions.find((x) => x.matches(r));
    if (!mem || !found) {
      throw new VhostMessageError(
        `no region at gpa 0x${r.guestAddr.toString(16)} size 0x${r.size.toString(16)}`,
      );
    }
    // Detach without unmapping; the mapping is retired like a replaced table.
    mem.detach(found);
    this.#remapQueues();
    this.#retire(found.map);
  }

  #setVringNum(m: Message): void {
    const s = decodeVringState(m.request, m.payload);
    const q = this.#queue(s.index);
    if (q.started) throw new VhostMessageError(`queue ${s.index} is running`);
    if (s.num === 0 || (s.num & (s.num - 1)) !== 0 || s.num > MAX_QUEUE_SIZE) {
      throw new VhostMessageError(`queue size ${s.num} is not a power of 2 in 1..${MAX_QUEUE_SIZE}`);
    }
    q.size = s.num;
  }

  #setVringAddr(m: Message): void {
    const a = decodeVringAddr(m.request, m.payload);
    const q = this.#queue(a.index);
    q.setAddresses(a.desc, a.avail, a.used);
    q.logUsedGpa = (a.flags & VRING_F_LOG) !== 0 ? Number(a.log) : -1;
  }

  #setVringBase(m: Message): void {
    const s = decodeVringState(m.request, m.payload);
    const q = this.#queue(s.index);
    if (q.started) throw new VhostMessageError(`queue ${s.index} is running`);
    if (s.num > 0xffff) throw new VhostMessageError(`split ring base ${s.num} exceeds 65535`);
    q.lastAvail = s.num;
  }

  #getVringBase(m: Message): Result | Promise<Result> {
    const s = decodeVringState(m.request, m.payload);
    const q = this.#queue(s.index);
    const reply = (num: number): Result => {
      q.kick?.close();
      q.kick = null;
      return { payload: encodeVringState({ index: s.index, num }) };
    };
    const num = this.#stopQueue(q);
    return typeof num === "number" ? reply(num) : num.then(reply);
  }

  /**
   * The queue and the eventfd of SET_VRING_KICK/CALL/ERR. The fd must really be an eventfd (a
   * pipe or socket would be read and written as one); it is made non-blocking, so a counter or
   * peer that cannot take a signal never blocks the daemon.
   */
  #vringFile(m: Message, what: string): { q: VirtQueue; fd: OwnedFd | null } {
    const f = decodeVringFile(m.request, m.payload);
    const q = this.#queue(f.index);
    const fd = f.noFd ? (this.#take(m, 0), null) : this.#take(m, 1)[0];
    if (fd) {
      try {
        const kind = fdKind(fd);
        if (kind !== "eventfd") {
          throw new VhostMessageError(`queue ${q.index}: the ${what} fd is a ${kind}, expected an eventfd`);
        }
        fd.setNonBlocking(true);
      } catch (e) {
        fd.close();
        throw e;
      }
    }
    return { q, fd };
  }

  #setVringKick(m: Message): void {
    const { q, fd } = this.#vringFile(m, "kick");
    this.#unwatchKick(q);
    q.kick?.close();
    q.kick = null;
    if (!fd) throw new VhostMessageError(`queue ${q.index}: polling mode (no kick fd) is not supported`);
    const kick = new EventFd(fd);
    q.kick = kick;
    try {
      if (!q.started) this.#startQueue(q);
    } catch (e) {
      q.fail();
      throw e;
    }
    // Edge-triggered: every kick (eventfd write) is an edge, so the counter need not be read back
    // (it cannot reach its 2^64-2 limit): one system call less per kick.
    this.#kickWatches[q.index] = this.ctx.reactor.add(kick.fd, { readable: true, edge: true }, () => {
      this.#onKick?.(q);
      this.process(q);
    });
    if (q.ready && q.hasWork()) this.process(q);
  }

  #setVringCall(m: Message): void {
    const { q, fd } = this.#vringFile(m, "call");
    q.call?.close();
    q.call = fd ? new EventFd(fd) : null;
  }

  #setVringErr(m: Message): void {
    const { q, fd } = this.#vringFile(m, "err");
    q.err?.close();
    q.err = fd ? new EventFd(fd) : null;
  }

  #setVringEnable(m: Message): void {
    const s = decodeVringState(m.request, m.payload);
    const q = this.#queue(s.index);
    if (s.num > 1) throw new VhostMessageError(`enable must be 0 or 1: got ${s.num}`);
    q.enabled = s.num === 1;
    if (q.ready && q.hasWork()) this.process(q);
  }

  #getQueueNum(m: Message): Result {
    if (m.payload.byteLength !== 0 && m.payload.byteLength !== 8) {
      throw new VhostMessageError(`payload of ${m.payload.byteLength} bytes, expected 0 or 8`);
    }
    return { payload: encodeU64(BigInt(this.device.numQueues)) };
  }

  #getConfig(m: Message): Result {
    const c = decodeConfig(m.request, m.payload);
    const data = this.device.readConfig(c.offset, c.data.byteLength);
    return { payload: encodeConfig({ offset: c.offset, flags: c.flags, data }) };
  }

  #setConfig(m: Message): void {
    const c = decodeConfig(m.request, m.payload);
    this.device.writeConfig(c.offset, c.data);
  }

  #getInflightFd(m: Message): Result {
    const p = decodeInflight(m.request, m.payload);
    if (p.numQueues < 1 || p.numQueues > this.queues.length) {
      throw new VhostMessageError(
        `inflight for ${p.numQueues} queues, this device has ${this.queues.length}`,
      );
    }
    if (p.queueSize < 1 || p.queueSize > MAX_QUEUE_SIZE) {
      throw new VhostMessageError(`inflight queue size ${p.queueSize} not in 1..${MAX_QUEUE_SIZE}`);
    }
    const size = p.numQueues * inflightQueueSize(p.queueSize);
    const fd = memfdCreate("mpq-vhost-inflight", { sealing: true });
    try {
      ftruncate(fd, size);
      sealSize(fd); // the front-end cannot shrink it under our mapping
    } catch (e) {
      fd.close();
      throw e;
    }
    return {
      payload: encodeInflight({
        mmapSize: BigInt(size),
        mmapOffset: 0n,
        numQueues: p.numQueues,
        queueSize: p.queueSize,
      }),
      fds: [fd],
    };
  }

  #setInflightFd(m: Message): void {
    const p = decodeInflight(m.request, m.payload);
    const [fd] = this.#take(m, 1);
    try {
      const per = inflightQueueSize(p.queueSize);
      if (
        p.numQueues < 1 || p.numQueues > this.queues.length || p.queueSize < 1 || p.queueSize > MAX_QUEUE_SIZE
      ) {
        throw new VhostMessageError(`inflight for ${p.numQueues} queues of ${p.queueSize}: out of range`);
      }
      if (p.mmapSize < BigInt(per * p.numQueues) || p.mmapSize > 1n << 32n) {
        throw new VhostMessageError(
          `inflight area of ${p.mmapSize} bytes, expected ${
            per * p.numQueues
          } for ${p.numQueues} x ${p.queueSize}`,
        );
      }
      const problem = memoryFdProblem(fd, p.mmapOffset + p.mmapSize, {
        fd: "the inflight fd",
        kinds: "memfd",
        need: "mmap_offset + mmap_size",
      });
      if (problem) throw new VhostMessageError(problem);
      if (p.mmapOffset % 4096n !== 0n) {
        throw new VhostMessageError(
          `inflight mmap_offset 0x${p.mmapOffset.toString(16)} is not page aligned`,
        );
      }
      const map = mapShared(fd, Number(p.mmapSize), { offset: p.mmapOffset });
      const old = this.#inflightMap;
      this.#inflightMap = map;
      const view = new DataView(map.bytes.buffer);
      for (let i = 0; i < this.queues.length; i++) {
        this.queues[i].inflight = i < p.numQueues
          ? new InflightQueue(view, { offset: i * per, queueSize: p.queueSize })
          : null;
      }
      if (old) this.#retire(old);
    } finally {
      fd.close();
    }
  }
}

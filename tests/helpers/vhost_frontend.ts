/**
 * A vhost-user front-end for tests and benchmarks: it plays QEMU 7.2 plus the guest driver over a
 * real UNIX socket. Guest RAM is a memfd (tests/helpers/virtio_ring.ts), kick/call/err are
 * eventfds, completions arrive through the ffi Reactor. It keeps its own small message encoder
 * on purpose: as a test peer it must not share code with the back-end it checks.
 *
 * Handshake, in the order QEMU 7.2's vhost-user-blk sends it (traced against qemu-storage-daemon):
 * GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (MQ),
 * GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_OWNER, GET_FEATURES, per queue SET_VRING_CALL +
 * SET_VRING_ERR, GET_CONFIG (blk); then on start SET_FEATURES, GET_INFLIGHT_FD + SET_INFLIGHT_FD
 * (INFLIGHT_SHMFD), SET_FEATURES, SET_VRING_CALL per queue, SET_MEM_TABLE (or one ADD_MEM_REG per
 * region with CONFIGURE_MEM_SLOTS), per queue SET_VRING_NUM/BASE/ADDR/KICK, then SET_VRING_ENABLE 1
 * per queue. Stop is SET_VRING_ENABLE 0 per queue, then GET_VRING_BASE per queue. With REPLY_ACK,
 * need_reply goes on ADD_MEM_REG/SET_MEM_TABLE/SET_CONFIG as QEMU does (every SET_* with `ackAll`).
 * @module
 */
import {
  connectUnix,
  EventFd,
  ftruncate,
  type MappedRegion,
  mapShared,
  memfdCreate,
  type OwnedFd,
  Reactor,
  type UnixSocket,
  type Watch,
} from "../../ffi/mod.ts";
import { GuestRam, type Segment, SplitQueue } from "./virtio_ring.ts";

/** The dirty log a front-end shared with startDirtyLog(). */
export interface FrontendDirtyLog {
  /** The bitmap: bit page % 8 of byte page / 8. */
  bits: Uint8Array;
  /** The guest-physical page numbers marked. */
  pages(): number[];
  /** Clears every bit (as QEMU does when it syncs). */
  clear(): void;
  /** Ends logging (SET_FEATURES without LOG_ALL, rings without VRING_F_LOG); the bitmap stays. */
  stop(): Promise<void>;
  /** Unmaps the bitmap. */
  close(): void;
}

/** vhost-user request codes (front-end to back-end). */
export const Req = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_SLAVE_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  RESET_DEVICE: 34,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

const REQ_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Req).map(([k, v]) => [v, k]));

/** "SET_VRING_ADDR" for 9. */
export function reqName(req: number): string {
  return REQ_NAMES[req] ?? `request ${req}`;
}

/** waitReply() code that accepts any message. */
const ANY_REPLY = -1;

/** Header flags. */
export const MsgFlags = { VERSION: 0x1, REPLY: 0x4, NEED_REPLY: 0x8 } as const;
/** Bytes in a message header. */
export const HEADER_SIZE = 12;

/** Virtio feature bits (as bigint masks). */
export const Feature = {
  BLK_SIZE_MAX: 1n << 1n,
  BLK_SEG_MAX: 1n << 2n,
  BLK_GEOMETRY: 1n << 4n,
  BLK_RO: 1n << 5n,
  BLK_BLK_SIZE: 1n << 6n,
  BLK_FLUSH: 1n << 9n,
  BLK_TOPOLOGY: 1n << 10n,
  BLK_CONFIG_WCE: 1n << 11n,
  BLK_MQ: 1n << 12n,
  BLK_DISCARD: 1n << 13n,
  BLK_WRITE_ZEROES: 1n << 14n,
  NOTIFY_ON_EMPTY: 1n << 24n,
  LOG_ALL: 1n << 26n,
  ANY_LAYOUT: 1n << 27n,
  RING_INDIRECT_DESC: 1n << 28n,
  RING_EVENT_IDX: 1n << 29n,
  PROTOCOL_FEATURES: 1n << 30n,
  VERSION_1: 1n << 32n,
  RING_PACKED: 1n << 34n,
} as const;

/** vhost-user protocol feature bits (as bigint masks). */
export const Proto = {
  MQ: 1n << 0n,
  LOG_SHMFD: 1n << 1n,
  REPLY_ACK: 1n << 3n,
  SLAVE_REQ: 1n << 5n,
  CONFIG: 1n << 9n,
  INFLIGHT_SHMFD: 1n << 12n,
  RESET_DEVICE: 1n << 13n,
  CONFIGURE_MEM_SLOTS: 1n << 15n,
  STATUS: 1n << 16n,
} as const;

/** virtio-blk request types and status values. */
export const Blk = {
  T_IN: 0,
  T_OUT: 1,
  T_FLUSH: 4,
  T_GET_ID: 8,
  T_DISCARD: 11,
  T_WRITE_ZEROES: 13,
  S_OK: 0,
  S_IOERR: 1,
  S_UNSUPP: 2,
} as const;

/** A message as it travels: request code, flags, payload and fds. */
export interface Message {
  request: number;
  flags: number;
  payload: Uint8Array<ArrayBuffer>;
  fds: OwnedFd[];
}

/** Encodes header + payload (little-endian). `size` overrides the header's size field (fuzzing). */
export function encodeMessage(
  request: number,
  flags: number,
  payload: Uint8Array = new Uint8Array(0),
  size = payload.byteLength,
): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(HEADER_SIZE + payload.byteLength);
  const v = new DataView(out.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, flags, true);
  v.setUint32(8, size, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

/** A u64 payload. */
export function u64Payload(value: bigint | number): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(value), true);
  return b;
}

/** A vring state payload {u32 index, u32 num}. */
export function statePayload(index: number, num: number): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, index, true);
  v.setUint32(4, num, true);
  return b;
}

/** Reads the u64 at the start of a payload, checking its size. */
export function payloadU64(m: Message): bigint {
  if (m.payload.byteLength !== 8) {
    throw new Error(`${reqName(m.request)} reply: payload of ${m.payload.byteLength} bytes, expected 8`);
  }
  return new DataView(m.payload.buffer, m.payload.byteOffset).getBigUint64(0, true);
}

/** Which virtio device the front-end drives. */
export type DeviceKind = "blk" | "rng";

/** Options for a front-end. */
export interface FrontendOptions {
  /** Device type (default "blk"). */
  device?: DeviceKind;
  /** Virtqueues to start (default 1). */
  queues?: number;
  /** Ring size (default 128). */
  queueSize?: number;
  /** Guest RAM bytes (default 64 MiB). */
  memSize?: number;
  /** Two RAM regions (GPA 0 and GPA 4 GiB). */
  splitMemory?: boolean;
  /** Offset in each RAM region where rings and buffers start (default 0; see GuestRam). */
  allocFrom?: number;
  /** Negotiate VIRTIO_RING_F_EVENT_IDX (must be offered). */
  eventIdx?: boolean;
  /** Negotiate VIRTIO_RING_F_INDIRECT_DESC and send every request as one indirect descriptor. */
  indirect?: boolean;
  /** Negotiate INFLIGHT_SHMFD when offered (QEMU does). Default true. */
  inflight?: boolean;
  /** Use ADD_MEM_REG when CONFIGURE_MEM_SLOTS is offered (QEMU does). Default true. */
  memSlots?: boolean;
  /** need_reply on every SET_* message when REPLY_ACK is negotiated. Default false (as QEMU). */
  ackAll?: boolean;
  /** Negotiate LOG_SHMFD when offered (QEMU does, to migrate). Default true. */
  logShmfd?: boolean;
  /** Bytes GET_CONFIG asks for (default 57, as QEMU 7.2 for a blk device with discard+write-zeroes). */
  configSize?: number;
  /** Data bytes per request slot (default 128 KiB). */
  maxRequestBytes?: number;
  /** Request slots per queue (default: as many as the ring holds, queueSize/4 with indirect). */
  depth?: number;
  /** Split every data buffer into this many descriptors (default 1). */
  dataSegments?: number;
  /** Milliseconds to wait for a reply or a completion (default 10000). */
  timeoutMs?: number;
  /** Log every message to stderr. */
  verbose?: boolean;
}

/** What the handshake learned. */
export interface DeviceInfo {
  features: bigint;
  protocolFeatures: bigint;
  /** Features acked with SET_FEATURES. */
  acked: bigint;
  /** Protocol features sent with SET_PROTOCOL_FEATURES. */
  ackedProtocol: bigint;
  queueNum: number;
  maxMemSlots: number;
  /** Raw config bytes (blk), empty when CONFIG is not offered. */
  config: Uint8Array<ArrayBuffer>;
}

/** virtio-blk config fields. */
export interface BlkConfig {
  capacity: bigint;
  sizeMax: number;
  segMax: number;
  blkSize: number;
  writeback: number;
  numQueues: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardSectorAlignment: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: number;
}

/** Decodes virtio-blk config space (fields beyond the bytes given read as 0). */
export function decodeBlkConfig(bytes: Uint8Array): BlkConfig {
  const b = new Uint8Array(64);
  b.set(bytes.subarray(0, 64));
  const v = new DataView(b.buffer);
  return {
    capacity: v.getBigUint64(0, true),
    sizeMax: v.getUint32(8, true),
    segMax: v.getUint32(12, true),
    blkSize: v.getUint32(20, true),
    writeback: v.getUint8(32),
    numQueues: v.getUint16(34, true),
    maxDiscardSectors: v.getUint32(36, true),
    maxDiscardSeg: v.getUint32(40, true),
    discardSectorAlignment: v.getUint32(44, true),
    maxWriteZeroesSectors: v.getUint32(48, true),
    maxWriteZeroesSeg: v.getUint32(52, true),
    writeZeroesMayUnmap: v.getUint8(56),
  };
}

/** The result of one device request. */
export interface Completion {
  /** used.len reported by the device. */
  len: number;
}

/** A blk request's outcome. */
export interface BlkResult {
  /** Status byte (0xff: the device never wrote it). */
  status: number;
  /** used.len. */
  len: number;
  /** Device-written data (IN, GET_ID), copied out of guest RAM. */
  data: Uint8Array<ArrayBuffer>;
}

interface Pending {
  resolve: (c: Completion) => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

interface Slot {
  ctl: number; // GPA: 16-byte header at +0, status byte at +16
  data: number; // GPA of the data buffer
}

/** Per-queue state. */
export class FrontendQueue {
  readonly index: number;
  readonly ring: SplitQueue;
  readonly kick: EventFd;
  readonly call: EventFd;
  readonly err: EventFd;
  /** Calls received (eventfd counts). */
  calls = 0n;
  /** Error eventfd signals received (the back-end marked the ring broken). */
  errors = 0n;
  /** Kicks sent. */
  kicks = 0;
  readonly pending = new Map<number, Pending>();
  readonly slots: Slot[] = [];
  readonly freeSlots: number[] = [];
  readonly slotWaiters: Array<() => void> = [];
  /** Set when the device corrupted the used ring (see VhostUserFrontend.poll). */
  ringError: Error | null = null;
  /** Hook for load generators: called with every completion instead of the pending map. */
  onComplete: ((id: number, len: number) => void) | null = null;

  constructor(index: number, ring: SplitQueue) {
    this.index = index;
    this.ring = ring;
    this.kick = new EventFd({ label: `kick ${index}` });
    this.call = new EventFd({ label: `call ${index}` });
    this.err = new EventFd({ label: `err ${index}` });
  }

  close(): void {
    this.kick.close();
    this.call.close();
    this.err.close();
  }
}

/** Thrown when the back-end closes the connection or stops answering. */
export class FrontendError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "FrontendError";
  }
}

/** The inflight region the back-end handed out (kept across reconnects, as QEMU does). */
export interface InflightRegion {
  fd: OwnedFd;
  map: MappedRegion;
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

/**
 * The front-end. `connect()` then `handshake()` then `start()`; requests; `stop()`; `close()`.
 * @example
 * await using fe = await VhostUserFrontend.connect("/tmp/vhost.sock");
 * await fe.handshake();
 * await fe.start();
 * const r = await fe.blkWrite(0, new Uint8Array(4096).fill(7));
 * assert.equal(r.status, Blk.S_OK);
 */
export class VhostUserFrontend {
  readonly path: string;
  readonly options: Required<Omit<FrontendOptions, "depth">> & { depth: number };
  readonly ram: GuestRam;
  readonly queues: FrontendQueue[] = [];
  readonly reactor: Reactor;
  #running: Promise<void>;
  #sock: UnixSocket | null = null;
  #sockWatch: Watch | null = null;
  #rx = new Uint8Array(0);
  #rxFds: OwnedFd[] = [];
  readonly #recvBuf = new Uint8Array(65536);
  #replyWaiters: Array<{ resolve: (m: Message) => void; reject: (e: Error) => void; request: number }> = [];
  #closedReason: string | null = null;
  #watches: Watch[] = [];
  info: DeviceInfo | null = null;
  inflight: InflightRegion | null = null;
  /** Messages that arrived while nothing waited; the next waitReply()/waitAny() takes them first. */
  readonly unsolicited: Message[] = [];
  #started = false;
  #closing = false;
  #regionsSent = false;
  /** An error a reactor callback threw (the front-end stops serving completions after it). */
  reactorError: Error | null = null;

  private constructor(path: string, options: FrontendOptions) {
    const queueSize = options.queueSize ?? 128;
    this.path = path;
    this.options = {
      device: options.device ?? "blk",
      queues: options.queues ?? 1,
      queueSize,
      memSize: options.memSize ?? 64 << 20,
      splitMemory: options.splitMemory ?? false,
      allocFrom: options.allocFrom ?? 0,
      eventIdx: options.eventIdx ?? false,
      indirect: options.indirect ?? false,
      inflight: options.inflight ?? true,
      memSlots: options.memSlots ?? true,
      logShmfd: options.logShmfd ?? true,
      ackAll: options.ackAll ?? false,
      configSize: options.configSize ?? 57,
      maxRequestBytes: options.maxRequestBytes ?? 128 << 10,
      // Enough slots to fill the ring, never more than it holds (chained requests use 2 + segments).
      depth: options.depth ??
        Math.max(1, Math.floor(queueSize / (options.indirect ? 4 : (options.dataSegments ?? 1) + 2))),
      dataSegments: options.dataSegments ?? 1,
      timeoutMs: options.timeoutMs ?? 10_000,
      verbose: options.verbose ?? false,
    };
    this.ram = new GuestRam({
      size: this.options.memSize,
      split: this.options.splitMemory,
      allocFrom: this.options.allocFrom,
    });
    this.reactor = new Reactor();
    this.#running = this.reactor.run().catch((e) => {
      this.reactorError = e instanceof Error ? e : new Error(String(e));
    });
    const o = this.options;
    for (let i = 0; i < o.queues; i++) {
      const ring = new SplitQueue(this.ram, {
        size: o.queueSize,
        eventIdx: o.eventIdx,
        indirectMax: o.indirect ? o.dataSegments + 2 : 0,
      });
      const q = new FrontendQueue(i, ring);
      for (let s = 0; s < o.depth; s++) {
        q.slots.push({ ctl: this.ram.alloc(64, 64, 0), data: this.ram.alloc(o.maxRequestBytes, 4096) });
        q.freeSlots.push(s);
      }
      this.queues.push(q);
      this.#watches.push(this.reactor.add(q.call.fd, { readable: true }, () => this.#onCall(q)));
      this.#watches.push(this.reactor.add(q.err.fd, { readable: true }, () => {
        q.errors += q.err.drain();
      }));
    }
  }

  /**
   * Connects to `path` (retrying ENOENT/ECONNREFUSED until `timeoutMs`), ready for handshake().
   */
  static async connect(path: string, options: FrontendOptions = {}): Promise<VhostUserFrontend> {
    const fe = new VhostUserFrontend(path, options);
    try {
      await fe.reconnect();
    } catch (e) {
      await fe.close();
      throw e;
    }
    return fe;
  }

  /** Opens a new connection (dropping the old one); rings, RAM and the inflight region stay. */
  async reconnect(): Promise<void> {
    this.#dropSocket("reconnecting");
    const deadline = Date.now() + this.options.timeoutMs;
    while (true) {
      try {
        this.#sock = connectUnix(this.path, { maxFds: 8 });
        break;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    this.#closedReason = null;
    this.#regionsSent = false;
    this.#rx = new Uint8Array(0);
    this.#sockWatch = this.reactor.add(this.#sock.fd, { readable: true }, (r) => this.#onReadable(r.hangup));
  }

  /** Whether the back-end closed the connection (and why). */
  get closedReason(): string | null {
    return this.#closedReason;
  }

  #log(dir: string, req: number, flags: number, size: number, nfds: number): void {
    if (this.options.verbose) {
      console.error(
        `vhost-frontend ${dir} ${reqName(req)} flags=0x${flags.toString(16)} size=${size} fds=${nfds}`,
      );
    }
  }

  #onReadable(hangup: boolean): void {
    const sock = this.#sock;
    if (!sock) return;
    while (true) {
      let got;
      try {
        got = sock.recvMsg(this.#recvBuf);
      } catch (e) {
        this.#fail(`recvmsg failed: ${(e as Error).message}`);
        return;
      }
      if (got === null) break;
      if (got.bytes === 0) {
        for (const f of got.fds) f.close();
        this.#fail("the back-end closed the connection");
        return;
      }
      const merged = new Uint8Array(this.#rx.byteLength + got.bytes);
      merged.set(this.#rx);
      merged.set(this.#recvBuf.subarray(0, got.bytes), this.#rx.byteLength);
      this.#rx = merged;
      this.#rxFds.push(...got.fds);
      this.#parse();
    }
    if (hangup && this.#sock) {
      this.#fail("the back-end hung up");
    }
  }

  #parse(): void {
    while (this.#rx.byteLength >= HEADER_SIZE) {
      const v = new DataView(this.#rx.buffer, this.#rx.byteOffset);
      const request = v.getUint32(0, true);
      const flags = v.getUint32(4, true);
      const size = v.getUint32(8, true);
      if (size > 4096 + 64) {
        this.#fail(`reply to ${reqName(request)} claims ${size} payload bytes`);
        return;
      }
      if (this.#rx.byteLength < HEADER_SIZE + size) return;
      const payload = this.#rx.slice(HEADER_SIZE, HEADER_SIZE + size);
      this.#rx = this.#rx.slice(HEADER_SIZE + size);
      const m: Message = { request, flags, payload, fds: this.#rxFds };
      this.#rxFds = [];
      this.#log("<-", request, flags, size, m.fds.length);
      const w = this.#replyWaiters.shift();
      if (!w) {
        this.unsolicited.push(m);
        continue;
      }
      this.#deliver(w, m);
    }
  }

  #deliver(
    w: { resolve: (m: Message) => void; reject: (e: Error) => void; request: number },
    m: Message,
  ): void {
    if (w.request === ANY_REPLY) return w.resolve(m);
    if (m.request !== w.request) {
      for (const f of m.fds) f.close();
      return w.reject(
        new FrontendError(`waiting for the reply to ${reqName(w.request)}, got ${reqName(m.request)}`),
      );
    }
    if ((m.flags & 0x3) !== MsgFlags.VERSION || !(m.flags & MsgFlags.REPLY)) {
      for (const f of m.fds) f.close();
      return w.reject(
        new FrontendError(`${reqName(m.request)} reply: flags 0x${m.flags.toString(16)}, expected 0x5`),
      );
    }
    w.resolve(m);
  }

  #fail(reason: string): void {
    this.#closedReason = reason;
    this.#dropSocket(reason);
  }

  #dropSocket(reason: string): void {
    this.#sockWatch?.remove();
    this.#sockWatch = null;
    this.#sock?.close();
    this.#sock = null;
    for (const f of this.#rxFds) f.close();
    this.#rxFds = [];
    for (const m of this.unsolicited.splice(0)) for (const f of m.fds) f.close();
    for (const w of this.#replyWaiters.splice(0)) {
      w.reject(new FrontendError(`${reqName(w.request)}: ${reason}`));
    }
  }

  /**
   * Sends raw bytes (a whole message or garbage) with optional fds. Throws FrontendError when the
   * connection is gone.
   */
  sendRaw(bytes: Uint8Array<ArrayBuffer>, fds: readonly OwnedFd[] = []): void {
    if (!this.#sock) throw new FrontendError(`send: ${this.#closedReason ?? "not connected"}`);
    let off = 0;
    let first = true;
    while (off < bytes.byteLength) {
      let n: number | null;
      try {
        n = this.#sock.sendMsg(bytes.subarray(off) as Uint8Array<ArrayBuffer>, first ? fds : []);
      } catch (e) {
        const reason = `sendmsg failed: ${(e as Error).message}`;
        this.#fail(reason);
        throw new FrontendError(reason);
      }
      if (n === null) throw new FrontendError("send: socket buffer full");
      off += n;
      first = false;
    }
  }

  /**
   * Waits for the next message of any kind from the back-end (flags unchecked), for fuzzing.
   * Resolves null when the connection closes first; rejects after `timeoutMs`.
   */
  async waitAny(timeoutMs = this.options.timeoutMs): Promise<Message | null> {
    if (!this.#sock) return null;
    try {
      return await this.waitReply(ANY_REPLY, timeoutMs);
    } catch (e) {
      if (e instanceof FrontendError && !this.#sock && !/ within /.test(e.message)) return null;
      throw e;
    }
  }

  /** Whether the connection is open. */
  get connected(): boolean {
    return this.#sock !== null;
  }

  /** Waits for the next reply, which must answer `request`. */
  waitReply(request: number, timeoutMs = this.options.timeoutMs): Promise<Message> {
    // A message that arrived while nobody waited (e.g. two replies in one read) goes first.
    const early = this.unsolicited.shift();
    if (early) {
      return new Promise<Message>((resolve, reject) => this.#deliver({ request, resolve, reject }, early));
    }
    if (!this.#sock) {
      return Promise.reject(
        new FrontendError(`${reqName(request)}: ${this.#closedReason ?? "not connected"}`),
      );
    }
    return new Promise<Message>((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.#replyWaiters.indexOf(entry);
        if (i >= 0) this.#replyWaiters.splice(i, 1);
        reject(new FrontendError(`no reply to ${reqName(request)} within ${timeoutMs} ms`));
      }, timeoutMs);
      const entry = {
        request,
        resolve: (m: Message) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e: Error) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.#replyWaiters.push(entry);
    });
  }

  /**
   * Sends one message. `reply`: "none", "ack" (need_reply flag, checks the u64 ack is 0 — only
   * when REPLY_ACK was negotiated, else nothing is awaited), or "payload" (a reply is expected).
   */
  async send(
    request: number,
    payload: Uint8Array = new Uint8Array(0),
    options: { fds?: readonly OwnedFd[]; reply?: "none" | "ack" | "payload" } = {},
  ): Promise<Message | null> {
    const reply = options.reply ?? "none";
    const replyAck = this.info !== null && (this.info.ackedProtocol & Proto.REPLY_ACK) !== 0n;
    const wantAck = reply === "ack" && replyAck;
    const flags = MsgFlags.VERSION | (wantAck ? MsgFlags.NEED_REPLY : 0);
    const fds = options.fds ?? [];
    this.#log("->", request, flags, payload.byteLength, fds.length);
    const waiting = reply === "payload" || wantAck ? this.waitReply(request) : null;
    try {
      this.sendRaw(encodeMessage(request, flags, payload), fds);
    } catch (e) {
      waiting?.catch(() => {});
      throw e;
    }
    if (!waiting) return null;
    const m = await waiting;
    if (wantAck) {
      const status = payloadU64(m);
      for (const f of m.fds) f.close();
      if (status !== 0n) throw new FrontendError(`${reqName(request)}: back-end NACKed (status ${status})`);
    }
    return m;
  }

  async #getU64(request: number): Promise<bigint> {
    const m = (await this.send(request, undefined, { reply: "payload" }))!;
    for (const f of m.fds) f.close();
    return payloadU64(m);
  }

  #setAck(): "ack" | "none" {
    return this.options.ackAll ? "ack" : "none";
  }

  /** The initialization half of QEMU's sequence (vhost_dev_init + GET_CONFIG). */
  async handshake(): Promise<DeviceInfo> {
    const o = this.options;
    const features = await this.#getU64(Req.GET_FEATURES);
    if (!(features & Feature.PROTOCOL_FEATURES)) {
      throw new FrontendError(
        `GET_FEATURES 0x${features.toString(16)}: PROTOCOL_FEATURES (bit 30) not offered`,
      );
    }
    const protocolFeatures = await this.#getU64(Req.GET_PROTOCOL_FEATURES);
    let want = Proto.MQ | Proto.REPLY_ACK | Proto.CONFIG | Proto.RESET_DEVICE;
    if (o.inflight) want |= Proto.INFLIGHT_SHMFD;
    if (o.memSlots) want |= Proto.CONFIGURE_MEM_SLOTS;
    if (o.logShmfd) want |= Proto.LOG_SHMFD;
    if (o.device !== "blk") want &= ~Proto.CONFIG;
    const ackedProtocol = protocolFeatures & want;
    await this.send(Req.SET_PROTOCOL_FEATURES, u64Payload(ackedProtocol));
    const info: DeviceInfo = {
      features,
      protocolFeatures,
      acked: 0n,
      ackedProtocol,
      queueNum: 1,
      maxMemSlots: 8,
      config: new Uint8Array(0),
    };
    this.info = info;
    if (ackedProtocol & Proto.MQ) info.queueNum = Number(await this.#getU64(Req.GET_QUEUE_NUM));
    if (o.queues > info.queueNum) {
      throw new FrontendError(`GET_QUEUE_NUM: back-end has ${info.queueNum} queue(s), ${o.queues} wanted`);
    }
    if (ackedProtocol & Proto.CONFIGURE_MEM_SLOTS) {
      info.maxMemSlots = Number(await this.#getU64(Req.GET_MAX_MEM_SLOTS));
    }
    await this.send(Req.SET_OWNER, undefined, { reply: this.#setAck() });
    const again = await this.#getU64(Req.GET_FEATURES);
    if (again !== features) {
      throw new FrontendError(
        `GET_FEATURES changed: 0x${features.toString(16)} then 0x${again.toString(16)}`,
      );
    }
    for (const q of this.queues) {
      await this.send(Req.SET_VRING_CALL, u64Payload(q.index), { fds: [q.call.fd], reply: this.#setAck() });
      await this.send(Req.SET_VRING_ERR, u64Payload(q.index), { fds: [q.err.fd], reply: this.#setAck() });
    }
    if (ackedProtocol & Proto.CONFIG) info.config = await this.getConfig(0, o.configSize);
    return info;
  }

  /** GET_CONFIG(offset, size): the config bytes the back-end returned (throws on an empty reply). */
  async getConfig(offset: number, size: number): Promise<Uint8Array<ArrayBuffer>> {
    const p = new Uint8Array(12 + size);
    const v = new DataView(p.buffer);
    v.setUint32(0, offset, true);
    v.setUint32(4, size, true);
    const m = (await this.send(Req.GET_CONFIG, p, { reply: "payload" }))!;
    for (const f of m.fds) f.close();
    if (m.payload.byteLength !== 12 + size) {
      throw new FrontendError(`GET_CONFIG reply: ${m.payload.byteLength} bytes, expected ${12 + size}`);
    }
    return m.payload.slice(12);
  }

  /** The features this front-end acks for the device offer. */
  #chooseFeatures(offered: bigint): bigint {
    const o = this.options;
    let f = Feature.VERSION_1 | Feature.PROTOCOL_FEATURES;
    if (o.device === "blk") {
      f |= offered & (Feature.BLK_SIZE_MAX | Feature.BLK_SEG_MAX | Feature.BLK_RO | Feature.BLK_BLK_SIZE |
        Feature.BLK_FLUSH | Feature.BLK_DISCARD | Feature.BLK_WRITE_ZEROES | Feature.BLK_TOPOLOGY |
        Feature.BLK_CONFIG_WCE);
      if (o.queues > 1) f |= offered & Feature.BLK_MQ;
    }
    if (o.eventIdx) f |= Feature.RING_EVENT_IDX;
    if (o.indirect) f |= Feature.RING_INDIRECT_DESC;
    const missing = f & ~offered;
    if (missing) throw new FrontendError(`back-end does not offer feature bits 0x${missing.toString(16)}`);
    return f;
  }

  /**
   * The start half of QEMU's sequence (vhost_user_blk_start + vhost_dev_start). `bases` gives each
   * queue's SET_VRING_BASE (default: the ring's current avail index for a fresh start; after a
   * back-end crash QEMU sends used->idx, see resume()).
   */
  async start(bases?: number[]): Promise<void> {
    const info = this.info;
    if (!info) throw new FrontendError("start() before handshake()");
    const acked = this.#chooseFeatures(info.features);
    info.acked = acked;
    const ack = this.#setAck();
    await this.send(Req.SET_FEATURES, u64Payload(acked), { reply: ack });
    if (info.ackedProtocol & Proto.INFLIGHT_SHMFD) {
      if (!this.inflight) await this.#getInflight();
      if (this.inflight) {
        const p = this.#inflightPayload(this.inflight);
        await this.send(Req.SET_INFLIGHT_FD, p, { fds: [this.inflight.fd], reply: ack });
      }
    }
    await this.send(Req.SET_FEATURES, u64Payload(acked), { reply: ack });
    for (const q of this.queues) {
      await this.send(Req.SET_VRING_CALL, u64Payload(q.index), { fds: [q.call.fd], reply: ack });
    }
    await this.#sendMemTable();
    for (const q of this.queues) {
      const base = bases?.[q.index] ?? q.ring.publishedIdx;
      await this.send(Req.SET_VRING_NUM, statePayload(q.index, q.ring.size), { reply: ack });
      await this.send(Req.SET_VRING_BASE, statePayload(q.index, base), { reply: ack });
      await this.#sendVringAddr(q, false, ack);
      await this.send(Req.SET_VRING_KICK, u64Payload(q.index), { fds: [q.kick.fd], reply: ack });
    }
    for (const q of this.queues) {
      await this.send(Req.SET_VRING_ENABLE, statePayload(q.index, 1), { reply: ack });
    }
    // Like QEMU, make sure the back-end looks at rings that already hold work (resume).
    for (const q of this.queues) {
      if (q.ring.inFlight > 0) this.kickQueue(q);
    }
    this.#started = true;
  }

  /**
   * What QEMU does when a migration starts (vhost_dev_set_log): a log memfd covering all guest RAM
   * (one bit per 4 KiB page) with SET_LOG_BASE (the back-end answers), SET_FEATURES with LOG_ALL,
   * then SET_VRING_ADDR with VRING_F_LOG and the used ring's guest address for every ring.
   */
  async startDirtyLog(): Promise<FrontendDirtyLog> {
    const info = this.info;
    if (!info || !this.#started) throw new FrontendError("startDirtyLog() before start()");
    if (!(info.ackedProtocol & Proto.LOG_SHMFD)) throw new FrontendError("LOG_SHMFD was not negotiated");
    const top = Math.max(...this.ram.regions.map((r) => r.gpa + r.size));
    const bytes = Math.ceil(top / 4096 / 64) * 8;
    const fd = memfdCreate("vhost-frontend-log");
    ftruncate(fd, bytes);
    const map = mapShared(fd, bytes);
    try {
      const p = new Uint8Array(16);
      new DataView(p.buffer).setBigUint64(0, BigInt(bytes), true);
      const m = (await this.send(Req.SET_LOG_BASE, p, { fds: [fd], reply: "payload" }))!;
      for (const f of m.fds) f.close();
    } finally {
      fd.close();
    }
    // QEMU waits for these acks (with REPLY_ACK) so the back-end is logging before the guest goes on.
    const ack = "ack";
    await this.send(Req.SET_FEATURES, u64Payload(info.acked | Feature.LOG_ALL), { reply: ack });
    for (const q of this.queues) await this.#sendVringAddr(q, true, ack);
    const log: FrontendDirtyLog = {
      bits: map.bytes,
      pages: () => {
        const out: number[] = [];
        map.bytes.forEach((b, i) => {
          for (let k = 0; k < 8; k++) if (b & (1 << k)) out.push(i * 8 + k);
        });
        return out;
      },
      clear: () => map.bytes.fill(0),
      stop: async () => {
        await this.send(Req.SET_FEATURES, u64Payload(info.acked), { reply: ack });
        for (const q of this.queues) await this.#sendVringAddr(q, false, ack);
      },
      close: () => map.close(),
    };
    return log;
  }

  async #sendVringAddr(q: FrontendQueue, log: boolean, ack: "ack" | "none"): Promise<void> {
    const a = new Uint8Array(40);
    const v = new DataView(a.buffer);
    v.setUint32(0, q.index, true);
    v.setUint32(4, log ? 1 : 0, true);
    v.setBigUint64(8, BigInt(this.ram.uaddr(q.ring.descGpa)), true);
    v.setBigUint64(16, BigInt(this.ram.uaddr(q.ring.usedGpa)), true);
    v.setBigUint64(24, BigInt(this.ram.uaddr(q.ring.availGpa)), true);
    v.setBigUint64(32, log ? BigInt(q.ring.usedGpa) : 0n, true);
    await this.send(Req.SET_VRING_ADDR, a, { reply: ack });
  }

  #inflightPayload(r: InflightRegion): Uint8Array<ArrayBuffer> {
    const p = new Uint8Array(24);
    const v = new DataView(p.buffer);
    v.setBigUint64(0, r.mmapSize, true);
    v.setBigUint64(8, r.mmapOffset, true);
    v.setUint16(16, r.numQueues, true);
    v.setUint16(18, r.queueSize, true);
    return p;
  }

  async #getInflight(): Promise<void> {
    const o = this.options;
    const p = new Uint8Array(24);
    const v = new DataView(p.buffer);
    v.setUint16(16, o.queues, true);
    v.setUint16(18, o.queueSize, true);
    const m = (await this.send(Req.GET_INFLIGHT_FD, p, { reply: "payload" }))!;
    if (m.payload.byteLength !== 24) {
      for (const f of m.fds) f.close();
      throw new FrontendError(`GET_INFLIGHT_FD reply: ${m.payload.byteLength} bytes, expected 24`);
    }
    const rv = new DataView(m.payload.buffer);
    const mmapSize = rv.getBigUint64(0, true);
    const mmapOffset = rv.getBigUint64(8, true);
    if (mmapSize === 0n) {
      for (const f of m.fds) f.close();
      return;
    }
    if (m.fds.length !== 1) {
      for (const f of m.fds) f.close();
      throw new FrontendError(`GET_INFLIGHT_FD reply carried ${m.fds.length} fds, expected 1`);
    }
    const fd = m.fds[0];
    try {
      const map = mapShared(fd, Number(mmapSize), { offset: mmapOffset });
      this.inflight = { fd, map, mmapSize, mmapOffset, numQueues: o.queues, queueSize: o.queueSize };
    } catch (e) {
      fd.close();
      throw e;
    }
  }

  async #sendMemTable(): Promise<void> {
    const info = this.info!;
    const regions = this.ram.regions;
    const region = (r: (typeof regions)[number]) => {
      const b = new Uint8Array(32);
      const v = new DataView(b.buffer);
      v.setBigUint64(0, BigInt(r.gpa), true);
      v.setBigUint64(8, BigInt(r.size), true);
      v.setBigUint64(16, BigInt(r.uaddr), true);
      v.setBigUint64(24, BigInt(r.mmapOffset), true);
      return b;
    };
    if (info.ackedProtocol & Proto.CONFIGURE_MEM_SLOTS) {
      // Like QEMU's shadow table: within one connection, only regions the back-end lacks are added.
      if (this.#regionsSent) return;
      this.#regionsSent = true;
      for (const r of regions) {
        const p = new Uint8Array(40);
        p.set(region(r), 8);
        await this.send(Req.ADD_MEM_REG, p, { fds: [this.ram.memfd], reply: "ack" });
      }
      return;
    }
    const p = new Uint8Array(8 + 32 * regions.length);
    new DataView(p.buffer).setUint32(0, regions.length, true);
    regions.forEach((r, i) => p.set(region(r), 8 + 32 * i));
    await this.send(Req.SET_MEM_TABLE, p, { fds: regions.map(() => this.ram.memfd), reply: "ack" });
  }

  /**
   * QEMU's vhost_dev_stop: SET_VRING_ENABLE 0 for every queue, then GET_VRING_BASE for each.
   * Returns the bases (the back-end's next avail index per queue).
   */
  async stop(): Promise<number[]> {
    const ack = this.#setAck();
    for (const q of this.queues) {
      await this.send(Req.SET_VRING_ENABLE, statePayload(q.index, 0), { reply: ack });
    }
    const bases: number[] = [];
    for (const q of this.queues) {
      const m = (await this.send(Req.GET_VRING_BASE, statePayload(q.index, 0), { reply: "payload" }))!;
      for (const f of m.fds) f.close();
      if (m.payload.byteLength !== 8) {
        throw new FrontendError(`GET_VRING_BASE reply: ${m.payload.byteLength} bytes, expected 8`);
      }
      const v = new DataView(m.payload.buffer);
      if (v.getUint32(0, true) !== q.index) {
        throw new FrontendError(`GET_VRING_BASE reply for queue ${v.getUint32(0, true)}, asked ${q.index}`);
      }
      bases.push(v.getUint32(4, true));
    }
    this.#started = false;
    return bases;
  }

  /**
   * After the back-end died: reconnect, handshake and start again with SET_VRING_BASE = used->idx
   * per queue (what QEMU 7.2 restores when GET_VRING_BASE fails) and the same inflight region.
   */
  async resume(): Promise<void> {
    await this.reconnect();
    await this.handshake();
    await this.start(this.queues.map((q) => q.ring.usedIdx()));
  }

  /** Signals the queue's kick eventfd. */
  kickQueue(q: FrontendQueue): void {
    q.kick.signal();
    q.kicks++;
  }

  #onCall(q: FrontendQueue): void {
    q.calls += q.call.drain();
    this.poll(q);
  }

  /**
   * Processes completions on `q` (called on every call, and usable for busy polling). A used ring
   * the driver cannot accept (unknown id, index jump) is recorded in `q.ringError` and fails every
   * pending request on that queue.
   */
  poll(q: FrontendQueue): number {
    if (q.ringError) return 0;
    let total = 0;
    try {
      while (true) {
        const n = q.ring.collect((id, len) => {
          if (q.onComplete) return q.onComplete(id, len);
          const p = q.pending.get(id);
          if (!p) return;
          q.pending.delete(id);
          clearTimeout(p.timer);
          p.resolve({ len });
        });
        total += n;
        // Re-arm the call and look again, so a completion racing with the arm is not missed.
        if (!q.ring.armCall()) break;
      }
    } catch (e) {
      q.ringError = e instanceof Error ? e : new Error(String(e));
      for (const [, p] of q.pending) {
        clearTimeout(p.timer);
        p.reject(new FrontendError(`queue ${q.index}: ${q.ringError.message}`));
      }
      q.pending.clear();
    }
    return total;
  }

  /**
   * Submits one descriptor chain on queue `q` and kicks when the device wants it. Resolves with
   * used.len when the device completes it; rejects after `timeoutMs`.
   */
  submit(q: FrontendQueue, segments: readonly Segment[]): Promise<Completion> {
    if (this.#closing) return Promise.reject(new FrontendError("front-end closed"));
    const head = q.ring.add(segments, { indirect: this.options.indirect });
    if (head === null) return Promise.reject(new FrontendError(`queue ${q.index}: no free descriptors`));
    const done = new Promise<Completion>((resolve, reject) => {
      const timer = setTimeout(() => {
        q.pending.delete(head);
        reject(
          new FrontendError(
            `queue ${q.index}: request with head ${head} not completed within ${this.options.timeoutMs} ms`,
          ),
        );
      }, this.options.timeoutMs);
      q.pending.set(head, { resolve, reject, timer });
    });
    q.ring.armCall();
    if (q.ring.publish()) this.kickQueue(q);
    return done;
  }

  async #slot(q: FrontendQueue): Promise<number> {
    while (q.freeSlots.length === 0 && !this.#closing) await new Promise<void>((r) => q.slotWaiters.push(r));
    if (this.#closing) throw new FrontendError("front-end closed");
    return q.freeSlots.pop()!;
  }

  #release(q: FrontendQueue, s: number): void {
    q.freeSlots.push(s);
    q.slotWaiters.shift()?.();
  }

  #dataSegments(gpa: number, len: number, write: boolean): Segment[] {
    const n = Math.min(this.options.dataSegments, len);
    const out: Segment[] = [];
    let off = 0;
    for (let i = 0; i < n; i++) {
      const part = i === n - 1 ? len - off : Math.floor(len / n);
      out.push({ gpa: gpa + off, len: part, write });
      off += part;
    }
    return out;
  }

  /**
   * One virtio-blk request: header {type, 0, sector}, then `out` bytes (device-readable) or an
   * `inLen`-byte device-writable buffer, then the status byte. Returns status, used.len, and the
   * device-written bytes.
   */
  async blkRequest(
    type: number,
    sector: bigint | number,
    body: { out?: Uint8Array; inLen?: number; queue?: number } = {},
  ): Promise<BlkResult> {
    const q = this.queues[body.queue ?? 0];
    if (!q) throw new RangeError(`queue ${body.queue} does not exist (${this.queues.length} started)`);
    const outLen = body.out?.byteLength ?? 0;
    const inLen = body.inLen ?? 0;
    if (outLen > this.options.maxRequestBytes || inLen > this.options.maxRequestBytes) {
      throw new RangeError(
        `request of ${Math.max(outLen, inLen)} bytes exceeds maxRequestBytes ${this.options.maxRequestBytes}`,
      );
    }
    const s = await this.#slot(q);
    const slot = q.slots[s];
    try {
      const hdr = this.ram.offset(slot.ctl, 17);
      const v = this.ram.view;
      v.setUint32(hdr, type, true);
      v.setUint32(hdr + 4, 0, true);
      v.setBigUint64(hdr + 8, BigInt(sector), true);
      v.setUint8(hdr + 16, 0xff);
      const segs: Segment[] = [{ gpa: slot.ctl, len: 16, write: false }];
      if (outLen) {
        this.ram.bytes(slot.data, outLen).set(body.out!);
        segs.push(...this.#dataSegments(slot.data, outLen, false));
      } else if (inLen) {
        this.ram.bytes(slot.data, inLen).fill(0xdb);
        segs.push(...this.#dataSegments(slot.data, inLen, true));
      }
      segs.push({ gpa: slot.ctl + 16, len: 1, write: true });
      const c = await this.submit(q, segs);
      return {
        status: v.getUint8(hdr + 16),
        len: c.len,
        data: inLen ? this.ram.bytes(slot.data, inLen).slice() : new Uint8Array(0),
      };
    } finally {
      this.#release(q, s);
    }
  }

  /** Reads `len` bytes at `sector`. */
  blkRead(sector: bigint | number, len: number, queue = 0): Promise<BlkResult> {
    return this.blkRequest(Blk.T_IN, sector, { inLen: len, queue });
  }

  /** Writes `data` at `sector`. */
  blkWrite(sector: bigint | number, data: Uint8Array, queue = 0): Promise<BlkResult> {
    return this.blkRequest(Blk.T_OUT, sector, { out: data, queue });
  }

  /** FLUSH. */
  blkFlush(queue = 0): Promise<BlkResult> {
    return this.blkRequest(Blk.T_FLUSH, 0, { queue });
  }

  /** GET_ID: the 20-byte serial buffer. */
  blkGetId(queue = 0): Promise<BlkResult> {
    return this.blkRequest(Blk.T_GET_ID, 0, { inLen: 20, queue });
  }

  /** DISCARD or WRITE_ZEROES of ranges {sector, sectors, unmap}. */
  blkRanges(
    type: typeof Blk.T_DISCARD | typeof Blk.T_WRITE_ZEROES,
    ranges: ReadonlyArray<{ sector: bigint | number; sectors: number; unmap?: boolean; flags?: number }>,
    queue = 0,
  ): Promise<BlkResult> {
    const p = new Uint8Array(16 * ranges.length);
    const v = new DataView(p.buffer);
    ranges.forEach((r, i) => {
      v.setBigUint64(16 * i, BigInt(r.sector), true);
      v.setUint32(16 * i + 8, r.sectors, true);
      v.setUint32(16 * i + 12, r.flags ?? (r.unmap ? 1 : 0), true);
    });
    return this.blkRequest(type, 0, { out: p, queue });
  }

  /** The decoded blk config from the handshake. */
  get blkConfig(): BlkConfig {
    if (!this.info) throw new FrontendError("blkConfig before handshake()");
    return decodeBlkConfig(this.info.config);
  }

  /** One entropy request: a device-writable buffer of `len` bytes. Returns used.len and the bytes. */
  async rngRead(len: number, queue = 0): Promise<{ len: number; data: Uint8Array<ArrayBuffer> }> {
    const q = this.queues[queue];
    const s = await this.#slot(q);
    try {
      const slot = q.slots[s];
      this.ram.bytes(slot.data, len).fill(0);
      const c = await this.submit(q, this.#dataSegments(slot.data, len, true));
      return { len: c.len, data: this.ram.bytes(slot.data, Math.min(c.len, len)).slice() };
    } finally {
      this.#release(q, s);
    }
  }

  /** Whether start() ran and stop() did not. */
  get started(): boolean {
    return this.#started;
  }

  /** Closes the connection and every fd, unmaps RAM and stops the reactor. Idempotent. */
  async close(): Promise<void> {
    this.#closing = true;
    this.#dropSocket("front-end closed");
    const failPending = () => {
      for (const q of this.queues) {
        for (const [, p] of q.pending) {
          clearTimeout(p.timer);
          p.reject(new FrontendError("front-end closed"));
        }
        q.pending.clear();
        for (const w of q.slotWaiters.splice(0)) w();
      }
    };
    failPending();
    for (const w of this.#watches.splice(0)) w.remove();
    this.reactor.stop();
    await this.#running;
    failPending();
    if (!this.ram.map.closed) {
      this.reactor.close();
      for (const q of this.queues) q.close();
      if (this.inflight) {
        this.inflight.map.close();
        this.inflight.fd.close();
        this.inflight = null;
      }
      this.ram.close();
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

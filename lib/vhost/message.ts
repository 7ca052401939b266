/**
 * The vhost-user message codec (QEMU docs/interop/vhost-user.rst): a 12-byte header (request u32,
 * flags u32, size u32) and typed little-endian payloads. Pure: no I/O, no fds beyond counting them.
 * Every decoder checks the payload size exactly and throws a {@link VhostMessageError} naming the
 * request, the size it got and the size it expected.
 * @module
 */

/** Header size in bytes. */
export const HEADER_SIZE = 12;
/** Largest payload we accept (a memory table with 8 regions is 264 bytes, a config 268). */
export const MAX_PAYLOAD = 4096;
/** Most fds one vhost-user message carries. */
export const MAX_FDS = 8;
/** Most regions in a SET_MEM_TABLE message (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_TABLE_REGIONS = 8;
/** Largest config space a GET/SET_CONFIG may address. */
export const MAX_CONFIG_SIZE = 256;

/** Header flag bits. */
export const Flags = {
  VERSION: 0x1,
  REPLY: 0x4,
  NEED_REPLY: 0x8,
  VERSION_MASK: 0x3,
} as const;

/** Front-end request codes (vhost-user.rst "Front-end message types"). */
export const Request = {
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
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

const REQUEST_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Request).map(([k, v]) => [v, k]),
);

/** The name of a request code ("SET_MEM_TABLE"), or "request N" for an unknown one. */
export function requestName(code: number): string {
  return REQUEST_NAMES[code] ?? `request ${code}`;
}

/** Protocol feature bits (vhost-user.rst "Protocol features"). */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** Virtio feature bits common to every device. */
export const VirtioFeature = {
  NOTIFY_ON_EMPTY: 24,
  ANY_LAYOUT: 27,
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  /** VHOST_USER_F_PROTOCOL_FEATURES. */
  PROTOCOL_FEATURES: 30,
  VERSION_1: 32,
  ACCESS_PLATFORM: 33,
  RING_PACKED: 34,
  LOG_ALL: 26,
} as const;

/** 1n << bit. */
export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

/** A malformed message: the connection answers with an error or closes, never crashes. */
export class VhostMessageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "VhostMessageError";
  }
}

/** A decoded header. */
export interface Header {
  request: number;
  flags: number;
  size: number;
}

/** Decodes and validates the 12-byte header at the start of `bytes`. */
export function decodeHeader(bytes: Uint8Array): Header {
  if (bytes.byteLength < HEADER_SIZE) {
    throw new VhostMessageError(`header needs ${HEADER_SIZE} bytes: got ${bytes.byteLength}`);
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  const h = { request: v.getUint32(0, true), flags: v.getUint32(4, true), size: v.getUint32(8, true) };
  if ((h.flags & Flags.VERSION_MASK) !== Flags.VERSION) {
    throw new VhostMessageError(
      `${requestName(h.request)}: protocol version ${h.flags & Flags.VERSION_MASK}, expected 1`,
    );
  }
  if (h.size > MAX_PAYLOAD) {
    throw new VhostMessageError(
      `${requestName(h.request)}: payload of ${h.size} bytes exceeds ${MAX_PAYLOAD}`,
    );
  }
  return h;
}

/** Encodes a header plus payload into one buffer. */
export function encodeMessage(request: number, flags: number, payload: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(HEADER_SIZE + payload.byteLength);
  const v = new DataView(out.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, flags, true);
  v.setUint32(8, payload.byteLength, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

/** Encodes a reply (flags VERSION|REPLY = 0x5). */
export function encodeReply(request: number, payload: Uint8Array): Uint8Array<ArrayBuffer> {
  return encodeMessage(request, Flags.VERSION | Flags.REPLY, payload);
}

function view(p: Uint8Array): DataView {
  return new DataView(p.buffer, p.byteOffset, p.byteLength);
}

function expectSize(request: number, p: Uint8Array, size: number): DataView {
  if (p.byteLength !== size) {
    throw new VhostMessageError(
      `${requestName(request)}: payload of ${p.byteLength} bytes, expected ${size}`,
    );
  }
  return view(p);
}

// ---- u64 ----

/** Decodes a u64 payload. */
export function decodeU64(request: number, p: Uint8Array): bigint {
  return expectSize(request, p, 8).getBigUint64(0, true);
}

/** Encodes a u64 payload. */
export function encodeU64(value: bigint): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(8);
  view(out).setBigUint64(0, BigInt.asUintN(64, value), true);
  return out;
}

// ---- vring state ----

/** struct vhost_vring_state: index and num. */
export interface VringState {
  index: number;
  num: number;
}

/** Decodes a vring state payload (8 bytes). */
export function decodeVringState(request: number, p: Uint8Array): VringState {
  const v = expectSize(request, p, 8);
  return { index: v.getUint32(0, true), num: v.getUint32(4, true) };
}

/** Encodes a vring state payload. */
export function encodeVringState(s: VringState): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(8);
  const v = view(out);
  v.setUint32(0, s.index, true);
  v.setUint32(4, s.num, true);
  return out;
}

// ---- vring address ----

/** struct vhost_vring_addr: front-end virtual addresses of the three ring parts. */
export interface VringAddr {
  index: number;
  flags: number;
  desc: bigint;
  used: bigint;
  avail: bigint;
  log: bigint;
}

/** Size of a vring address payload. */
export const VRING_ADDR_SIZE = 40;

/** Decodes a vring address payload (40 bytes: index, flags, desc, used, avail, log). */
export function decodeVringAddr(request: number, p: Uint8Array): VringAddr {
  const v = expectSize(request, p, VRING_ADDR_SIZE);
  return {
    index: v.getUint32(0, true),
    flags: v.getUint32(4, true),
    desc: v.getBigUint64(8, true),
    used: v.getBigUint64(16, true),
    avail: v.getBigUint64(24, true),
    log: v.getBigUint64(32, true),
  };
}

/** Encodes a vring address payload. */
export function encodeVringAddr(a: VringAddr): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(VRING_ADDR_SIZE);
  const v = view(out);
  v.setUint32(0, a.index, true);
  v.setUint32(4, a.flags, true);
  v.setBigUint64(8, a.desc, true);
  v.setBigUint64(16, a.used, true);
  v.setBigUint64(24, a.avail, true);
  v.setBigUint64(32, a.log, true);
  return out;
}

// ---- memory regions ----

/** One memory region: guest-physical address, size, front-end virtual address, offset in the fd. */
export interface MemoryRegion {
  guestAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}

const REGION_SIZE = 32;

function readRegion(v: DataView, off: number): MemoryRegion {
  return {
    guestAddr: v.getBigUint64(off, true),
    size: v.getBigUint64(off + 8, true),
    userAddr: v.getBigUint64(off + 16, true),
    mmapOffset: v.getBigUint64(off + 24, true),
  };
}

function writeRegion(v: DataView, off: number, r: MemoryRegion): void {
  v.setBigUint64(off, r.guestAddr, true);
  v.setBigUint64(off + 8, r.size, true);
  v.setBigUint64(off + 16, r.userAddr, true);
  v.setBigUint64(off + 24, r.mmapOffset, true);
}

/** Decodes SET_MEM_TABLE (u32 count, u32 padding, count regions); the count must match the size. */
export function decodeMemTable(request: number, p: Uint8Array): MemoryRegion[] {
  if (p.byteLength < 8) {
    throw new VhostMessageError(`${requestName(request)}: payload of ${p.byteLength} bytes, expected >= 8`);
  }
  const n = view(p).getUint32(0, true);
  if (n < 1 || n > MAX_MEM_TABLE_REGIONS) {
    throw new VhostMessageError(
      `${requestName(request)}: ${n} regions, expected 1..${MAX_MEM_TABLE_REGIONS}`,
    );
  }
  const v = expectSize(request, p, 8 + REGION_SIZE * n);
  const out: MemoryRegion[] = [];
  for (let i = 0; i < n; i++) out.push(readRegion(v, 8 + REGION_SIZE * i));
  return out;
}

/** Encodes a SET_MEM_TABLE payload. */
export function encodeMemTable(regions: readonly MemoryRegion[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(8 + REGION_SIZE * regions.length);
  const v = view(out);
  v.setUint32(0, regions.length, true);
  regions.forEach((r, i) => writeRegion(v, 8 + REGION_SIZE * i, r));
  return out;
}

/** Size of a single-region payload (u64 padding + region). */
export const SINGLE_REGION_SIZE = 40;

/** Decodes ADD_MEM_REG / REM_MEM_REG (u64 padding, one region). */
export function decodeSingleRegion(request: number, p: Uint8Array): MemoryRegion {
  return readRegion(expectSize(request, p, SINGLE_REGION_SIZE), 8);
}

/** Encodes a single-region payload. */
export function encodeSingleRegion(r: MemoryRegion): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(SINGLE_REGION_SIZE);
  writeRegion(view(out), 8, r);
  return out;
}

// ---- config ----

/** GET/SET_CONFIG payload: offset, size, flags and `size` bytes of config space. */
export interface ConfigPayload {
  offset: number;
  flags: number;
  data: Uint8Array;
}

/** Decodes a config payload; `size` must equal the bytes that follow and be <= 256. */
export function decodeConfig(request: number, p: Uint8Array): ConfigPayload {
  if (p.byteLength < 12) {
    throw new VhostMessageError(`${requestName(request)}: payload of ${p.byteLength} bytes, expected >= 12`);
  }
  const v = view(p);
  const offset = v.getUint32(0, true);
  const size = v.getUint32(4, true);
  const flags = v.getUint32(8, true);
  if (size > MAX_CONFIG_SIZE || offset > MAX_CONFIG_SIZE || offset + size > MAX_CONFIG_SIZE) {
    throw new VhostMessageError(
      `${requestName(request)}: config range [${offset}, +${size}) outside 0..${MAX_CONFIG_SIZE}`,
    );
  }
  expectSize(request, p, 12 + size);
  return { offset, flags, data: p.slice(12, 12 + size) };
}

/** Encodes a config payload. */
export function encodeConfig(c: ConfigPayload): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(12 + c.data.byteLength);
  const v = view(out);
  v.setUint32(0, c.offset, true);
  v.setUint32(4, c.data.byteLength, true);
  v.setUint32(8, c.flags, true);
  out.set(c.data, 12);
  return out;
}

// ---- dirty log ----

/** SET_LOG_BASE payload (VhostUserLog): the log's size and its offset in the fd. */
export interface LogPayload {
  mmapSize: bigint;
  mmapOffset: bigint;
}

/** Size of the SET_LOG_BASE payload. */
export const LOG_SIZE = 16;

/** Decodes a SET_LOG_BASE payload. */
export function decodeLog(request: number, p: Uint8Array): LogPayload {
  const v = expectSize(request, p, LOG_SIZE);
  return { mmapSize: v.getBigUint64(0, true), mmapOffset: v.getBigUint64(8, true) };
}

/** Encodes a SET_LOG_BASE payload. */
export function encodeLog(l: LogPayload): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(LOG_SIZE);
  const v = view(out);
  v.setBigUint64(0, l.mmapSize, true);
  v.setBigUint64(8, l.mmapOffset, true);
  return out;
}

// ---- inflight ----

/** GET/SET_INFLIGHT_FD payload. */
export interface InflightPayload {
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

/** Size of the inflight payload as QEMU sends it (the C struct with its tail padding). */
export const INFLIGHT_SIZE = 24;

/** Decodes an inflight payload: 24 bytes (QEMU's sizeof) or the unpadded 20. */
export function decodeInflight(request: number, p: Uint8Array): InflightPayload {
  const v = expectSize(request, p, p.byteLength === 20 ? 20 : INFLIGHT_SIZE);
  return {
    mmapSize: v.getBigUint64(0, true),
    mmapOffset: v.getBigUint64(8, true),
    numQueues: v.getUint16(16, true),
    queueSize: v.getUint16(18, true),
  };
}

/** Encodes an inflight payload (24 bytes). */
export function encodeInflight(i: InflightPayload): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(INFLIGHT_SIZE);
  const v = view(out);
  v.setBigUint64(0, i.mmapSize, true);
  v.setBigUint64(8, i.mmapOffset, true);
  v.setUint16(16, i.numQueues, true);
  v.setUint16(18, i.queueSize, true);
  return out;
}

// ---- vring file (SET_VRING_KICK/CALL/ERR) ----

/** Bit 8 of a vring-file u64: no fd attached (polling mode / disable). */
export const VRING_NOFD_MASK = 0x100n;
/** Bits 0..7 of a vring-file u64: the queue index. */
export const VRING_IDX_MASK = 0xffn;

/** Decodes a vring-file u64: queue index and whether an fd must accompany it. */
export function decodeVringFile(request: number, p: Uint8Array): { index: number; noFd: boolean } {
  const u = decodeU64(request, p);
  if (u & ~(VRING_IDX_MASK | VRING_NOFD_MASK)) {
    throw new VhostMessageError(`${requestName(request)}: reserved bits set in 0x${u.toString(16)}`);
  }
  return { index: Number(u & VRING_IDX_MASK), noFd: (u & VRING_NOFD_MASK) !== 0n };
}

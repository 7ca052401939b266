/**
 * A fuzz case is a plan: a list of steps on one connection (send a message, write a ring state
 * into guest memory, kick, submit a well-behaved request, wait for the back-end). Plans are plain
 * data made by plan.ts from a seed, printed exactly as they are run (so a failure report names
 * the very bytes that were sent) and run by session.ts. This module has the step types, the
 * payload builders and the printer.
 * @module
 */
import { encodeMessage, MsgFlags, reqName } from "../../tests/helpers/vhost_frontend.ts";
import type { FdRole } from "./fd_pool.ts";
import { describeRingState, type RingState } from "./ring_state.ts";

/** One vhost-user message, possibly malformed. */
export interface SendStep {
  op: "send";
  request: number;
  flags: number;
  payload: Uint8Array<ArrayBuffer>;
  /** The header's size field (not the payload length when the header lies). */
  size: number;
  /** Send only the first `cut` bytes of header + payload (a message cut short). */
  cut?: number;
  /** The fds attached, by role (fd_pool.ts). */
  fds: FdRole[];
  /** What the generator did to this message. */
  note?: string;
}

/** Writes a ring state into guest memory (ring_state.ts). */
export interface RingStep {
  op: "ring";
  queue: number;
  state: RingState;
  note: string;
}

/** Signals a queue's kick eventfd. */
export interface KickStep {
  op: "kick";
  queue: number;
}

/** What a well-behaved request does. */
export type IoKind = "write" | "read" | "flush" | "rng";

/**
 * A well-behaved request through the front-end's own ring. `expect: "ok"` requests must complete
 * with status OK (and a read must return pattern `expectSeed`) once an "await" step comes; "any"
 * requests may fail or never complete (the memory under them was taken away).
 */
export interface IoStep {
  op: "io";
  queue: number;
  kind: IoKind;
  sector: number;
  len: number;
  /** Pattern of a write; pattern a read must return. */
  seed: number;
  /** Data buffer in the front-end's RAM or in the hot-added region. */
  where: "ram" | "hot";
  expect: "ok" | "any";
}

/** Waits for every "ok" request so far and checks its outcome. */
export interface AwaitStep {
  op: "await";
}

/** A GET_FEATURES probe whose reply (or a close) must come within the timeout. */
export interface SyncStep {
  op: "sync";
}

/** One step of a case. */
export type Step = SendStep | RingStep | KickStep | IoStep | AwaitStep | SyncStep;

/** Case families. */
export const CASE_KINDS = ["replay", "random", "fds", "memtable", "ring"] as const;
/** A case family. */
export type CaseKind = typeof CASE_KINDS[number];

/** One case: what the runner runs on one connection. */
export interface CasePlan {
  device: "blk" | "rng";
  seed: number;
  caseNo: number;
  kind: CaseKind;
  /** The recorded handshake it starts from. */
  template: string;
  /** One line naming what the case is about (groups failures). */
  tag: string;
  steps: Step[];
}

/** Header flags: VERSION. */
export const V = MsgFlags.VERSION;
/** Header flags: VERSION | NEED_REPLY. */
export const VNR = MsgFlags.VERSION | MsgFlags.NEED_REPLY;

/** A message step with an honest header. */
export function send(
  request: number,
  payload: Uint8Array<ArrayBuffer> = new Uint8Array(0),
  fds: FdRole[] = [],
  options: { flags?: number; note?: string } = {},
): SendStep {
  return {
    op: "send",
    request,
    flags: options.flags ?? V,
    payload,
    size: payload.byteLength,
    fds,
    ...(options.note ? { note: options.note } : {}),
  };
}

/** The bytes a send step puts on the wire. */
export function wireBytes(s: SendStep): Uint8Array<ArrayBuffer> {
  const b = encodeMessage(s.request, s.flags, s.payload, s.size);
  return s.cut !== undefined ? b.slice(0, Math.max(1, Math.min(s.cut, b.byteLength))) : b;
}

// ---- payloads (little-endian, as vhost-user.rst lays them out) ----

/** A u64. */
export function u64(v: bigint | number): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, BigInt(v)), true);
  return b;
}

/** A vring state {u32 index, u32 num}. */
export function vringState(index: number, num: number): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, index >>> 0, true);
  v.setUint32(4, num >>> 0, true);
  return b;
}

/** A vring address {index, flags, desc, used, avail, log} (front-end addresses). */
export function vringAddr(
  index: number,
  a: { desc: bigint | number; used: bigint | number; avail: bigint | number; flags?: number; log?: bigint },
): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(40);
  const v = new DataView(b.buffer);
  v.setUint32(0, index >>> 0, true);
  v.setUint32(4, (a.flags ?? 0) >>> 0, true);
  v.setBigUint64(8, BigInt.asUintN(64, BigInt(a.desc)), true);
  v.setBigUint64(16, BigInt.asUintN(64, BigInt(a.used)), true);
  v.setBigUint64(24, BigInt.asUintN(64, BigInt(a.avail)), true);
  v.setBigUint64(32, a.log ?? 0n, true);
  return b;
}

/** A vring file payload: the queue index, bit 8 = no fd. */
export function vringFile(index: number, noFd = false): Uint8Array<ArrayBuffer> {
  return u64(BigInt(index >>> 0) | (noFd ? 0x100n : 0n));
}

/** A memory region as vhost-user describes it. */
export interface RegionDesc {
  gpa: bigint | number;
  size: bigint | number;
  uaddr: bigint | number;
  mmapOffset: bigint | number;
}

function putRegion(v: DataView, at: number, r: RegionDesc): void {
  v.setBigUint64(at, BigInt.asUintN(64, BigInt(r.gpa)), true);
  v.setBigUint64(at + 8, BigInt.asUintN(64, BigInt(r.size)), true);
  v.setBigUint64(at + 16, BigInt.asUintN(64, BigInt(r.uaddr)), true);
  v.setBigUint64(at + 24, BigInt.asUintN(64, BigInt(r.mmapOffset)), true);
}

/** SET_MEM_TABLE: {u32 nregions, u32 padding, regions[]}; `count` may lie about the number. */
export function memTable(regions: readonly RegionDesc[], count = regions.length): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(8 + 32 * regions.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, count >>> 0, true);
  regions.forEach((r, i) => putRegion(v, 8 + 32 * i, r));
  return b;
}

/** ADD_MEM_REG / REM_MEM_REG: {u64 padding, region}. */
export function singleRegion(r: RegionDesc): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(40);
  putRegion(new DataView(b.buffer), 8, r);
  return b;
}

/** GET/SET_INFLIGHT_FD: {u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size}. */
export function inflight(
  p: { mmapSize: bigint | number; mmapOffset?: bigint | number; numQueues: number; queueSize: number },
): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(24);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt.asUintN(64, BigInt(p.mmapSize)), true);
  v.setBigUint64(8, BigInt.asUintN(64, BigInt(p.mmapOffset ?? 0)), true);
  v.setUint16(16, p.numQueues & 0xffff, true);
  v.setUint16(18, p.queueSize & 0xffff, true);
  return b;
}

/** GET/SET_CONFIG: {u32 offset, u32 size, u32 flags, data[]}; `size` may lie about data's length. */
export function config(offset: number, size: number, data: Uint8Array, flags = 0): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(12 + data.byteLength);
  const v = new DataView(b.buffer);
  v.setUint32(0, offset >>> 0, true);
  v.setUint32(4, size >>> 0, true);
  v.setUint32(8, flags >>> 0, true);
  b.set(data, 12);
  return b;
}

// ---- printing ----

function hex(b: Uint8Array): string {
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** One line per step, exactly what was (or would be) sent or written. */
export function describeStep(s: Step, index: number): string[] {
  const n = `#${String(index).padStart(3, "0")}`;
  switch (s.op) {
    case "send": {
      const lie = s.size !== s.payload.byteLength ? ` (header says ${s.size})` : "";
      const cut = s.cut !== undefined ? ` cut after ${s.cut} bytes` : "";
      const fds = s.fds.length ? ` fds [${s.fds.join(", ")}]` : "";
      const note = s.note ? `  <- ${s.note}` : "";
      return [
        `${n} -> ${reqName(s.request)} (${s.request}) flags 0x${
          s.flags.toString(16)
        } payload ${s.payload.byteLength}${lie}${cut}${fds}${
          s.payload.byteLength ? ` ${hex(s.payload)}` : ""
        }${note}`,
      ];
    }
    case "ring":
      return [`${n} ring q${s.queue}: ${s.note}`, ...describeRingState(s.state).map((l) => `       ${l}`)];
    case "kick":
      return [`${n} kick q${s.queue}`];
    case "io":
      return [
        `${n} request q${s.queue} ${s.kind} sector ${s.sector} len ${s.len} pattern ${s.seed} data in ${s.where}, expect ${s.expect}`,
      ];
    case "await":
      return [`${n} await the "ok" requests`];
    case "sync":
      return [`${n} sync: GET_FEATURES probe, wait for its reply`];
  }
}

/** The whole plan, one step per line (ring states over several). */
export function describePlan(p: CasePlan): string[] {
  const out = [
    `case ${p.caseNo} (${p.device}, seed ${p.seed}): ${p.kind}, from template ${p.template}: ${p.tag}`,
  ];
  p.steps.forEach((s, i) => out.push(...describeStep(s, i)));
  return out;
}

// ---- plan files (a minimized case, replayable with --plan-file) ----

/** A plan as JSON: byte arrays as {"hex": ...}, bigints as {"big": ...}. */
export function planToJson(p: CasePlan): string {
  return JSON.stringify(
    p,
    (_k, v) => {
      if (v instanceof Uint8Array) {
        return { hex: Array.from(v, (x) => x.toString(16).padStart(2, "0")).join("") };
      }
      if (typeof v === "bigint") return { big: v.toString() };
      return v;
    },
    1,
  );
}

/** The inverse of planToJson. */
export function planFromJson(text: string): CasePlan {
  return JSON.parse(text, (_k, v) => {
    if (v && typeof v === "object" && !Array.isArray(v)) {
      const keys = Object.keys(v);
      if (keys.length === 1 && keys[0] === "hex" && typeof v.hex === "string") {
        const out = new Uint8Array(v.hex.length / 2);
        for (let i = 0; i < out.length; i++) out[i] = parseInt(v.hex.slice(2 * i, 2 * i + 2), 16);
        return out;
      }
      if (keys.length === 1 && keys[0] === "big" && typeof v.big === "string") return BigInt(v.big);
    }
    return v;
  }) as CasePlan;
}

/**
 * Ring states for fuzzing a virtqueue from the driver side: descriptor tables, indirect tables,
 * avail entries and indexes, written raw into guest memory. A state is plain data (printable and
 * replayable); {@link randomRingState} makes well-formed blk/rng requests and then breaks them in
 * the ways a hostile or buggy guest can: descriptor loops, next indexes beyond the table, wild
 * addresses and lengths (past 2^52, across a region's end, in the gap between regions, onto the
 * rings themselves), bad indirect tables (nested, empty, not a multiple of 16, too long, loops),
 * avail heads beyond the ring, heads reused while in flight, avail index jumps, odd flags and
 * event indexes, request headers with wild sectors, types and layouts.
 * @module
 */
import { Blk } from "../../tests/helpers/vhost_frontend.ts";
import { DescFlags, type GuestRam } from "../../tests/helpers/virtio_ring.ts";
import type { Prng } from "../prng.ts";
import type { FuzzDevice, Layout, RingLayout } from "./layout.ts";

/** A descriptor as the driver writes it. */
export interface RawDescriptor {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

/** What a state writes, in this order; `availIdx` last (it publishes the entries). */
export interface RingState {
  /** The ring size the indexes are laid out for (SET_VRING_NUM). */
  size: number;
  /** Zero the three ring areas first. */
  clear: boolean;
  /** Bytes put into guest memory (request headers, discard ranges, indirect tables). */
  memory: { gpa: number; bytes: Uint8Array<ArrayBuffer>; what: string }[];
  descs: { i: number; d: RawDescriptor }[];
  avail: { slot: number; head: number }[];
  availFlags?: number;
  usedEvent?: number;
  usedIdx?: number;
  usedFlags?: number;
  availEvent?: number;
  availIdx?: number;
}

/**
 * Writes `s` into guest memory at `ring` (whose areas were laid out for `capacity` entries).
 * @example
 * writeRingState(fe.ram, layout.rings[0], state, layout.queueSize);
 */
export function writeRingState(ram: GuestRam, ring: RingLayout, s: RingState, capacity: number): void {
  const v = ram.view;
  if (s.clear) {
    const n = capacity;
    ram.bytes(ring.desc, 16 * n).fill(0);
    ram.bytes(ring.avail, 6 + 2 * n).fill(0);
    ram.bytes(ring.used, 6 + 8 * n).fill(0);
  }
  for (const m of s.memory) ram.bytes(m.gpa, m.bytes.byteLength).set(m.bytes);
  for (const { i, d } of s.descs) {
    const at = ram.offset(ring.desc + 16 * i, 16);
    v.setBigUint64(at, BigInt.asUintN(64, d.addr), true);
    v.setUint32(at + 8, d.len >>> 0, true);
    v.setUint16(at + 12, d.flags & 0xffff, true);
    v.setUint16(at + 14, d.next & 0xffff, true);
  }
  const u16 = (gpa: number, value: number) => v.setUint16(ram.offset(gpa, 2), value & 0xffff, true);
  for (const a of s.avail) u16(ring.avail + 4 + 2 * (a.slot % s.size), a.head);
  if (s.availFlags !== undefined) u16(ring.avail, s.availFlags);
  if (s.usedEvent !== undefined) u16(ring.avail + 4 + 2 * s.size, s.usedEvent);
  if (s.usedFlags !== undefined) u16(ring.used, s.usedFlags);
  if (s.usedIdx !== undefined) u16(ring.used + 2, s.usedIdx);
  if (s.availEvent !== undefined) u16(ring.used + 4 + 8 * s.size, s.availEvent);
  if (s.availIdx !== undefined) {
    // One atomic store publishes the entries (a full fence on x86), as a driver does.
    Atomics.store(new Uint16Array(ram.mem.buffer), ram.offset(ring.avail + 2, 2) / 2, s.availIdx & 0xffff);
  }
}

function flagNames(f: number): string {
  const names = [];
  if (f & DescFlags.NEXT) names.push("N");
  if (f & DescFlags.WRITE) names.push("W");
  if (f & DescFlags.INDIRECT) names.push("I");
  const rest = f & ~7;
  if (rest) names.push(`0x${rest.toString(16)}`);
  return names.length ? names.join("|") : "0";
}

/** Printable lines of a state (every byte it writes). */
export function describeRingState(s: RingState): string[] {
  const hex = (b: Uint8Array) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  const out = [`size ${s.size}${s.clear ? ", ring areas zeroed first" : ""}`];
  for (const m of s.memory) out.push(`mem 0x${m.gpa.toString(16)} (${m.what}): ${hex(m.bytes)}`);
  for (const { i, d } of s.descs) {
    out.push(
      `desc[${i}] = addr 0x${BigInt.asUintN(64, d.addr).toString(16)} len ${d.len >>> 0} flags ${
        flagNames(d.flags)
      } next ${d.next}`,
    );
  }
  if (s.avail.length) {
    out.push(`avail ring ${s.avail.map((a) => `[${a.slot % s.size}]=${a.head}`).join(" ")}`);
  }
  const idx = [
    s.availFlags !== undefined ? `avail flags ${s.availFlags}` : "",
    s.usedEvent !== undefined ? `used_event ${s.usedEvent}` : "",
    s.usedFlags !== undefined ? `used flags ${s.usedFlags}` : "",
    s.usedIdx !== undefined ? `used idx ${s.usedIdx}` : "",
    s.availEvent !== undefined ? `avail_event ${s.availEvent}` : "",
    s.availIdx !== undefined ? `avail idx ${s.availIdx}` : "",
  ].filter((x) => x);
  if (idx.length) out.push(idx.join(", "));
  return out;
}

/** What a ring state is made for. */
export interface RingContext {
  device: FuzzDevice;
  layout: Layout;
  queue: number;
  /** SET_VRING_NUM of this state. */
  size: number;
  /** SET_VRING_BASE of this state (the device's first avail index). */
  base: number;
  /** Whether the hot region is in the back-end's table (descriptors may point into it). */
  hot: boolean;
}

/** What the driver published so far (for states written while the ring runs). */
export interface Published {
  availIdx: number;
  heads: number[];
}

interface Seg {
  addr: bigint;
  len: number;
  write: boolean;
}

class Builder {
  readonly state: RingState;
  readonly notes: string[] = [];
  readonly #rng: Prng;
  readonly #ctx: RingContext;
  #scratch = 0;
  #high = 0;
  readonly #ids: number[];

  constructor(rng: Prng, ctx: RingContext, clear: boolean) {
    this.#rng = rng;
    this.#ctx = ctx;
    this.state = { size: ctx.size, clear, memory: [], descs: [], avail: [] };
    const n = Math.min(ctx.size, 1024);
    const ids = Array.from({ length: n }, (_, i) => i);
    this.#ids = rng.chance(0.5) ? ids : rng.shuffle(ids);
  }

  /**
   * A buffer in this queue's slice of the scratch areas (reused from the start once it is full);
   * `high`: above 4 GiB (default: one time in five).
   */
  buf(len: number, high = this.#rng.chance(0.2)): number {
    const L = this.#ctx.layout;
    const q = Math.min(this.#ctx.queue, L.queues - 1);
    const rounded = Math.ceil(Math.max(len, 1) / 16) * 16;
    const highSlice = Math.floor(L.scratchHigh.size / L.queues);
    if (high && rounded <= highSlice) {
      if (this.#high + rounded > highSlice) this.#high = 0;
      const g = L.scratchHigh.gpa + q * highSlice + this.#high;
      this.#high += rounded;
      return g;
    }
    const slice = Math.floor(L.scratch.size / L.queues);
    if (rounded > slice) return L.scratch.gpa; // a huge buffer: the whole scratch area
    if (this.#scratch + rounded > slice) this.#scratch = 0;
    const g = L.scratch.gpa + q * slice + this.#scratch;
    this.#scratch += rounded;
    return g;
  }

  put(gpa: number, bytes: Uint8Array<ArrayBuffer>, what: string): void {
    this.state.memory.push({ gpa, bytes, what });
  }

  /** A free descriptor id (when the table is used up: any id, so chains overlap). */
  id(): number {
    return this.#ids.pop() ?? this.#rng.int(Math.min(this.#ctx.size, 1024));
  }

  desc(i: number, d: RawDescriptor): void {
    this.state.descs.push({ i, d });
  }
}

const NEXT = DescFlags.NEXT;
const WRITE = DescFlags.WRITE;
const INDIRECT = DescFlags.INDIRECT;

/** Addresses a hostile driver likes. */
function wildAddress(rng: Prng, ctx: RingContext, len: number): { addr: bigint; what: string } {
  const L = ctx.layout;
  const [r0, r1] = L.regions;
  const ring = L.rings[ctx.queue];
  const choices: [number, () => { addr: bigint; what: string }][] = [
    [
      2,
      () => ({
        addr: BigInt(r0.gpa + r0.size - Math.max(1, Math.floor(len / 2))),
        what: "across region 0's end",
      }),
    ],
    [
      2,
      () => ({
        addr: BigInt(r1.gpa + r1.size - Math.max(1, Math.floor(len / 2))),
        what: "across region 1's end",
      }),
    ],
    [2, () => ({ addr: BigInt(r0.gpa + r0.size + rng.int(1 << 20)), what: "in the gap between regions" })],
    [1, () => ({ addr: (1n << 52n) - 8n, what: "just below 2^52" })],
    [1, () => ({ addr: 1n << 52n, what: "at 2^52" })],
    [1, () => ({ addr: 1n << 63n, what: "at 2^63" })],
    [1, () => ({ addr: (1n << 64n) - BigInt(Math.max(1, len)), what: "at the top of the address space" })],
    [1, () => ({ addr: rng.u64(), what: "random" })],
    [1, () => ({ addr: BigInt(ring.used), what: "onto the used ring" })],
    [1, () => ({ addr: BigInt(ring.desc), what: "onto the descriptor table" })],
    [1, () => ({ addr: BigInt(ring.avail), what: "onto the avail ring" })],
    [
      1,
      () => ({
        addr: BigInt(L.hot.gpa + rng.int(L.hot.size)),
        what: ctx.hot ? "into the hot region" : "where the hot region would be",
      }),
    ],
    [1, () => ({ addr: BigInt(L.hot.uaddr), what: "a front-end address, not a guest one" })],
  ];
  return rng.weighted(choices)();
}

function wildLength(rng: Prng): number {
  return rng.pick([0, 1, 15, 17, 0xffffffff, 0x80000000, 1 << 24, 1 << 20, 4097]);
}

function sectorValue(rng: Prng, ctx: RingContext): bigint {
  const sectors = ctx.layout.diskSectors;
  return rng.weighted<bigint>([
    [8, BigInt(rng.int(sectors - 256))],
    [1, BigInt(sectors - 1)],
    [1, BigInt(sectors)],
    [1, BigInt(sectors - 8)],
    [1, 1n << 32n],
    [1, (1n << 63n) - 1n],
    [1, (1n << 64n) - 1n],
    [1, rng.u64()],
  ]);
}

/** A blk request's segments (header, data, status), well-formed or not. */
function blkRequest(rng: Prng, b: Builder, ctx: RingContext): Seg[] {
  const type = rng.weighted<number>([
    [4, Blk.T_IN],
    [4, Blk.T_OUT],
    [1, Blk.T_FLUSH],
    [1, Blk.T_GET_ID],
    [1, Blk.T_DISCARD],
    [1, Blk.T_WRITE_ZEROES],
    [1, rng.pick([2, 3, 5, 7, 12, 0x7fffffff, 0xffffffff])],
  ]);
  const sector = sectorValue(rng, ctx);
  const hdr = new Uint8Array(16);
  const hv = new DataView(hdr.buffer);
  hv.setUint32(0, type >>> 0, true);
  hv.setUint32(4, rng.chance(0.1) ? rng.u32() : 0, true);
  hv.setBigUint64(8, sector, true);
  const hg = b.buf(16);
  b.put(hg, hdr, `blk header type ${type} sector ${sector}`);
  b.notes.push(`blk type ${type} sector ${sector}`);
  const segs: Seg[] = [];
  const layoutChoice = rng.weighted<string>([[8, "whole"], [1, "split"], [1, "short"], [1, "writable"]]);
  if (layoutChoice === "whole") segs.push({ addr: BigInt(hg), len: 16, write: false });
  else if (layoutChoice === "split") {
    segs.push({ addr: BigInt(hg), len: 8, write: false }, { addr: BigInt(hg + 8), len: 8, write: false });
    b.notes.push("header split in two descriptors");
  } else if (layoutChoice === "short") {
    segs.push({ addr: BigInt(hg), len: rng.pick([0, 1, 8, 15]), write: false });
    b.notes.push("short header");
  } else {
    segs.push({ addr: BigInt(hg), len: 16, write: true });
    b.notes.push("device-writable header");
  }
  let dataLen = 0;
  let write = type === Blk.T_IN || type === Blk.T_GET_ID;
  if (type === Blk.T_IN || type === Blk.T_OUT) {
    dataLen = rng.weighted<number>([
      [4, 512 * rng.range(1, 8)],
      [2, 4096],
      [1, 512 * rng.range(1, 32)],
      [1, 0],
      [1, rng.pick([1, 511, 513, 4097])],
      [1, 65536],
    ]);
  } else if (type === Blk.T_GET_ID) {
    dataLen = rng.pick([20, 20, 20, 0, 1, 19, 512]);
  } else if (type === Blk.T_DISCARD || type === Blk.T_WRITE_ZEROES) {
    const n = rng.weighted<number>([[4, 1], [2, 2], [1, 0], [1, 8]]);
    const ranges = new Uint8Array(16 * n + (rng.chance(0.1) ? rng.range(1, 15) : 0));
    const rv = new DataView(ranges.buffer);
    for (let i = 0; i < n; i++) {
      rv.setBigUint64(
        16 * i,
        rng.chance(0.7) ? BigInt(rng.int(ctx.layout.diskSectors)) : sectorValue(rng, ctx),
        true,
      );
      rv.setUint32(
        16 * i + 8,
        rng.weighted<number>([[4, rng.range(1, 64)], [1, 0], [1, 0xffffffff], [1, rng.u32()]]),
        true,
      );
      rv.setUint32(16 * i + 12, rng.weighted<number>([[4, 0], [2, 1], [1, rng.u32()]]), true);
    }
    dataLen = ranges.byteLength;
    if (dataLen > 0) {
      const g = b.buf(dataLen);
      b.put(g, ranges, `${n} discard/write-zeroes range(s)`);
      segs.push({ addr: BigInt(g), len: dataLen, write: false });
      dataLen = 0;
    }
    write = false;
  } else if (rng.chance(0.3)) {
    dataLen = 512;
  }
  if (rng.chance(0.05)) {
    write = !write;
    b.notes.push("data direction flipped");
  }
  if (dataLen > 0) {
    const parts = rng.weighted<number>([[6, 1], [2, 2], [1, 3]]);
    const g = b.buf(dataLen);
    let off = 0;
    for (let i = 0; i < parts; i++) {
      const len = i === parts - 1 ? dataLen - off : Math.floor(dataLen / parts);
      if (len > 0) segs.push({ addr: BigInt(g + off), len, write });
      off += len;
    }
  }
  const status = rng.weighted<string>([[12, "ok"], [1, "missing"], [1, "readonly"], [1, "empty"], [
    1,
    "long",
  ]]);
  const sg = b.buf(16);
  if (status === "ok") segs.push({ addr: BigInt(sg), len: 1, write: true });
  else {
    b.notes.push(`status ${status}`);
    if (status === "readonly") segs.push({ addr: BigInt(sg), len: 1, write: false });
    if (status === "empty") segs.push({ addr: BigInt(sg), len: 0, write: true });
    if (status === "long") segs.push({ addr: BigInt(sg), len: 3, write: true });
  }
  return segs;
}

/** An entropy request's segments. */
function rngRequest(rng: Prng, b: Builder): Seg[] {
  const n = rng.weighted<number>([[6, 1], [2, 2], [1, 3], [1, 0]]);
  const segs: Seg[] = [];
  for (let i = 0; i < n; i++) {
    const len = rng.weighted<number>([[4, 64], [2, rng.range(1, 4096)], [1, 65536], [1, 0], [1, 1 << 20]]);
    const write = !rng.chance(0.08);
    if (!write) b.notes.push("device-readable entropy buffer");
    segs.push({ addr: BigInt(len >= 1 << 20 ? b.buf(0) : b.buf(len)), len, write });
  }
  if (n === 0) b.notes.push("empty chain");
  return segs;
}

/** Breaks some segments' addresses, lengths or directions. */
function corruptSegments(rng: Prng, b: Builder, ctx: RingContext, segs: Seg[]): void {
  for (const s of segs) {
    if (rng.chance(0.06)) {
      const w = wildAddress(rng, ctx, s.len);
      s.addr = w.addr;
      b.notes.push(`buffer ${w.what}`);
    }
    if (rng.chance(0.04)) {
      s.len = wildLength(rng);
      b.notes.push(`buffer length ${s.len}`);
    }
  }
}

/** Writes one chain (direct or indirect, maybe broken) and returns its head. */
function writeChain(rng: Prng, b: Builder, ctx: RingContext, segs: Seg[]): number {
  const size = ctx.size;
  if (segs.length === 0) segs = [{ addr: 0n, len: 0, write: false }];
  if (rng.chance(0.25)) return writeIndirect(rng, b, ctx, segs);
  const ids = segs.map(() => b.id());
  segs.forEach((s, i) => {
    const last = i === segs.length - 1;
    b.desc(ids[i], {
      addr: s.addr,
      len: s.len,
      flags: (last ? 0 : NEXT) | (s.write ? WRITE : 0),
      next: last ? 0 : ids[i + 1],
    });
  });
  const link = rng.weighted<string>([[20, "none"], [1, "loop"], [1, "self"], [1, "beyond"], [1, "flags"], [
    1,
    "indirect-next",
  ]]);
  const lastId = ids[ids.length - 1];
  const lastSeg = segs[segs.length - 1];
  if (link === "loop") {
    b.desc(lastId, {
      addr: lastSeg.addr,
      len: lastSeg.len,
      flags: NEXT | (lastSeg.write ? WRITE : 0),
      next: ids[0],
    });
    b.notes.push("descriptor loop");
  } else if (link === "self") {
    b.desc(lastId, { addr: lastSeg.addr, len: lastSeg.len, flags: NEXT, next: lastId });
    b.notes.push("descriptor pointing at itself");
  } else if (link === "beyond") {
    const next = rng.pick([size, size + 1, 0xffff, size + rng.int(1000)]) & 0xffff;
    b.desc(lastId, { addr: lastSeg.addr, len: lastSeg.len, flags: NEXT, next });
    b.notes.push(`next ${next} beyond the table`);
  } else if (link === "flags") {
    const flags = rng.u32() & 0xffff;
    b.desc(lastId, { addr: lastSeg.addr, len: lastSeg.len, flags, next: rng.int(size) });
    b.notes.push(`descriptor flags 0x${flags.toString(16)}`);
  } else if (link === "indirect-next") {
    b.desc(ids[0], { addr: segs[0].addr, len: 16 * segs.length, flags: INDIRECT | NEXT, next: ids[1] ?? 0 });
    b.notes.push("INDIRECT together with NEXT");
  }
  return ids[0];
}

function writeIndirect(rng: Prng, b: Builder, ctx: RingContext, segs: Seg[]): number {
  const n = segs.length;
  const table = new Uint8Array(16 * n);
  const tv = new DataView(table.buffer);
  segs.forEach((s, i) => {
    const last = i === n - 1;
    tv.setBigUint64(16 * i, BigInt.asUintN(64, s.addr), true);
    tv.setUint32(16 * i + 8, s.len >>> 0, true);
    tv.setUint16(16 * i + 12, (last ? 0 : NEXT) | (s.write ? WRITE : 0), true);
    tv.setUint16(16 * i + 14, last ? 0 : i + 1, true);
  });
  let len = 16 * n;
  const bad = rng.weighted<string>([
    [12, "none"],
    [1, "nested"],
    [1, "loop"],
    [1, "beyond"],
    [1, "len0"],
    [1, "len-odd"],
    [1, "len-huge"],
    [1, "wild"],
  ]);
  const tg = b.buf(16 * n);
  let addr = BigInt(tg);
  if (bad === "nested") {
    tv.setUint16(12, INDIRECT, true);
    tv.setUint32(8, 16, true);
    b.notes.push("indirect table inside an indirect table");
  } else if (bad === "loop") {
    tv.setUint16(16 * (n - 1) + 12, NEXT, true);
    tv.setUint16(16 * (n - 1) + 14, 0, true);
    b.notes.push("loop inside an indirect table");
  } else if (bad === "beyond") {
    tv.setUint16(16 * (n - 1) + 12, NEXT, true);
    tv.setUint16(16 * (n - 1) + 14, n + rng.int(100), true);
    b.notes.push("next beyond the indirect table");
  } else if (bad === "len0") {
    len = 0;
    b.notes.push("indirect table of 0 bytes");
  } else if (bad === "len-odd") {
    len = 16 * n + rng.range(1, 15);
    b.notes.push(`indirect table of ${len} bytes`);
  } else if (bad === "len-huge") {
    len = rng.pick([16 * 1025, 16 * 65536, 0xfffffff0]);
    b.notes.push(`indirect table of ${len} bytes`);
  } else if (bad === "wild") {
    const w = wildAddress(rng, ctx, len);
    addr = w.addr;
    b.notes.push(`indirect table ${w.what}`);
  }
  b.put(tg, table, `indirect table of ${n}`);
  const head = b.id();
  b.desc(head, { addr, len, flags: INDIRECT, next: 0 });
  if (bad === "none") b.notes.push("indirect");
  return head;
}

function makeRequests(rng: Prng, b: Builder, ctx: RingContext, count: number): number[] {
  const heads: number[] = [];
  for (let k = 0; k < count; k++) {
    const segs = ctx.device === "blk" ? blkRequest(rng, b, ctx) : rngRequest(rng, b);
    corruptSegments(rng, b, ctx, segs);
    heads.push(writeChain(rng, b, ctx, segs));
  }
  return heads;
}

function publish(
  rng: Prng,
  b: Builder,
  ctx: RingContext,
  from: number,
  heads: number[],
  reusable: number[],
): number {
  const size = ctx.size;
  let slot = from;
  for (const h0 of heads) {
    let h = h0;
    const r = rng.u32() % 100;
    if (r < 4) {
      h = rng.pick([size, size + 1, 0xffff, rng.int(0x10000)]);
      b.notes.push(`avail head ${h}`);
    } else if (r < 12 && reusable.length > 0) {
      h = rng.pick(reusable);
      b.notes.push(`head ${h} reused while in flight`);
    }
    b.state.avail.push({ slot: slot & 0xffff, head: h });
    slot = (slot + 1) & 0xffff;
    if (rng.chance(0.05)) {
      b.state.avail.push({ slot: slot & 0xffff, head: h });
      slot = (slot + 1) & 0xffff;
      b.notes.push(`head ${h} published twice`);
    }
  }
  let idx = slot;
  const jump = rng.weighted<string>([[40, "none"], [2, "ahead"], [1, "behind"], [1, "half"], [
    1,
    "none-published",
  ]]);
  if (jump === "ahead") idx = (from + size + 1 + rng.int(100)) & 0xffff;
  if (jump === "behind") idx = (from - 1) & 0xffff;
  if (jump === "half") idx = (from + 0x8000) & 0xffff;
  if (jump === "none-published") idx = from;
  if (jump !== "none") b.notes.push(`avail idx ${idx} (from ${from}: ${jump})`);
  return idx;
}

/**
 * A fresh ring state (the ring areas zeroed, then 1..8 requests published from `ctx.base`).
 * @example
 * const { state, note, published } = randomRingState(rng, { device: "blk", layout, queue: 0, size: 256, base: 0, hot: false });
 */
export function randomRingState(
  rng: Prng,
  ctx: RingContext,
): { state: RingState; note: string; published: Published } {
  const b = new Builder(rng, ctx, true);
  const count = rng.weighted<number>([[3, 1], [3, rng.range(2, 4)], [2, rng.range(5, 8)], [1, 0]]);
  const heads = makeRequests(rng, b, ctx, count);
  const idx = publish(rng, b, ctx, ctx.base, heads, heads);
  b.state.availIdx = idx;
  if (rng.chance(0.15)) {
    b.state.availFlags = rng.pick([1, rng.u32() & 0xffff]);
    b.notes.push(`avail flags ${b.state.availFlags}`);
  }
  if (rng.chance(0.3)) b.state.usedEvent = rng.pick([ctx.base, (ctx.base - 1) & 0xffff, rng.u32() & 0xffff]);
  if (rng.chance(0.12)) {
    b.state.usedIdx = rng.pick([(ctx.base + 1) & 0xffff, (ctx.base - 1) & 0xffff, rng.u32() & 0xffff]);
    b.notes.push(`used idx ${b.state.usedIdx} at start`);
  }
  if (rng.chance(0.05)) b.state.usedFlags = rng.u32() & 0xffff;
  return {
    state: b.state,
    note: `${count} request(s)${b.notes.length ? ": " + b.notes.join("; ") : ""}`,
    published: { availIdx: idx, heads },
  };
}

/**
 * A change written while the ring runs: more requests (reusing in-flight heads and descriptors),
 * descriptors of published requests rewritten (checked once, used twice?), or an index jump.
 */
export function runningRingState(
  rng: Prng,
  ctx: RingContext,
  prev: Published,
): { state: RingState; note: string; published: Published } {
  const b = new Builder(rng, ctx, false);
  const what = rng.weighted<string>([[5, "more"], [2, "rewrite"], [2, "reuse"], [1, "jump"]]);
  let idx = prev.availIdx;
  let heads = prev.heads;
  if (what === "more") {
    const fresh = makeRequests(rng, b, ctx, rng.range(1, 4));
    idx = publish(rng, b, ctx, prev.availIdx, fresh, prev.heads);
    heads = [...prev.heads, ...fresh];
  } else if (what === "rewrite" && prev.heads.length > 0) {
    const h = rng.pick(prev.heads) % Math.min(ctx.size, 1024);
    const segs = ctx.device === "blk" ? blkRequest(rng, b, ctx) : rngRequest(rng, b);
    corruptSegments(rng, b, ctx, segs);
    b.desc(h, {
      addr: segs[0]?.addr ?? 0n,
      len: segs[0]?.len ?? 0,
      flags: rng.pick([0, NEXT, WRITE, NEXT | WRITE, INDIRECT]),
      next: rng.int(ctx.size),
    });
    b.notes.push(`descriptor ${h} of a published request rewritten`);
  } else if (what === "reuse" && prev.heads.length > 0) {
    const again = Array.from({ length: rng.range(1, 3) }, () => rng.pick(prev.heads));
    for (const h of again) {
      b.state.avail.push({ slot: idx, head: h });
      idx = (idx + 1) & 0xffff;
    }
    b.notes.push(`heads ${again.join(", ")} published again while in flight`);
  } else {
    idx = (idx + rng.pick([ctx.size, ctx.size + 1, 0x8000, 0xffff, rng.int(0x10000)])) & 0xffff;
    b.notes.push(`avail idx jumps to ${idx}`);
  }
  b.state.availIdx = idx;
  return { state: b.state, note: b.notes.join("; ") || what, published: { availIdx: idx, heads } };
}

/** A well-formed ring state: `count` valid requests from `base` (for exercising a set-up queue). */
export function validRingState(
  rng: Prng,
  ctx: RingContext,
  count: number,
): { state: RingState; note: string } {
  const b = new Builder(rng, ctx, true);
  const heads: number[] = [];
  for (let k = 0; k < count; k++) {
    let segs: Seg[];
    if (ctx.device === "blk") {
      const type = rng.pick([Blk.T_IN, Blk.T_OUT]);
      const sector = rng.int(ctx.layout.diskSectors - 64);
      const hdr = new Uint8Array(16);
      const hv = new DataView(hdr.buffer);
      hv.setUint32(0, type, true);
      hv.setBigUint64(8, BigInt(sector), true);
      const hg = b.buf(16);
      b.put(hg, hdr, `blk header type ${type} sector ${sector}`);
      // Data in both regions: a request that touches all of guest memory.
      const data = b.buf(4096, k % 2 === 1);
      segs = [
        { addr: BigInt(hg), len: 16, write: false },
        { addr: BigInt(data), len: 4096, write: type === Blk.T_IN },
        { addr: BigInt(b.buf(16)), len: 1, write: true },
      ];
    } else {
      segs = [{
        addr: BigInt(b.buf(64, k % 2 === 1)),
        len: 64,
        write: true,
      }];
    }
    const ids = segs.map(() => b.id());
    segs.forEach((s, i) => {
      const last = i === segs.length - 1;
      b.desc(ids[i], {
        addr: s.addr,
        len: s.len,
        flags: (last ? 0 : NEXT) | (s.write ? WRITE : 0),
        next: last ? 0 : ids[i + 1],
      });
    });
    heads.push(ids[0]);
  }
  heads.forEach((h, i) => b.state.avail.push({ slot: (ctx.base + i) & 0xffff, head: h }));
  b.state.availIdx = (ctx.base + heads.length) & 0xffff;
  return { state: b.state, note: `${count} well-formed request(s)` };
}

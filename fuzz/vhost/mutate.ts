/**
 * Message-level fuzzing: mutations of a recorded sequence (drop, duplicate, swap, move, shuffle,
 * insert; a payload field set to an interesting value; flags, request code, payload size changed;
 * a header lying about its size; a message cut short; fds removed, added or swapped for the wrong
 * kind) and structure-aware random messages (payloads shaped like the request's, with values near
 * the limits a back-end checks).
 * @module
 */
import { Feature, Proto, Req } from "../../tests/helpers/vhost_frontend.ts";
import type { Prng } from "../prng.ts";
import { WRONG_FOR_EVENT, WRONG_FOR_INFLIGHT, WRONG_FOR_MEMORY } from "./fd_pool.ts";
import type { Layout } from "./layout.ts";
import {
  config,
  inflight,
  memTable,
  type RegionDesc,
  send,
  type SendStep,
  singleRegion,
  u64,
  V,
  VNR,
  vringAddr,
  vringFile,
  vringState,
} from "./steps.ts";

/** Every request code a front-end may send (and a few it may not). */
export const KNOWN_REQUESTS: readonly number[] = [...Object.values(Req), 26, 27, 28, 29, 30, 33, 35];

/** Values near the limits. */
function interesting(rng: Prng, bytes: 1 | 2 | 4 | 8, current: bigint): bigint {
  const max = (1n << BigInt(8 * bytes)) - 1n;
  const v = rng.weighted<bigint>([
    [3, 0n],
    [3, 1n],
    [2, max],
    [2, max >> 1n],
    [2, (max >> 1n) + 1n],
    [3, current + 1n],
    [3, current - 1n],
    [2, current ^ (1n << BigInt(rng.int(8 * bytes)))],
    [2, BigInt(rng.pick([2, 3, 7, 8, 16, 63, 64, 255, 256, 1023, 1024, 1025, 4095, 4096, 65535, 65536]))],
    [1, 1n << 32n],
    [1, 1n << 52n],
    [2, rng.u64()],
  ]);
  return BigInt.asUintN(8 * bytes, v);
}

/** Sets a random field of a payload to an interesting value; returns what it did. */
export function mutateField(rng: Prng, payload: Uint8Array<ArrayBuffer>): string {
  const width = rng.pick([1, 2, 4, 8, 8, 4] as const);
  if (payload.byteLength < width) return "payload too short to mutate";
  const slots = Math.floor(payload.byteLength / width);
  const at = rng.int(slots) * width;
  const v = new DataView(payload.buffer, payload.byteOffset);
  const cur = width === 1
    ? BigInt(v.getUint8(at))
    : width === 2
    ? BigInt(v.getUint16(at, true))
    : width === 4
    ? BigInt(v.getUint32(at, true))
    : v.getBigUint64(at, true);
  const nv = interesting(rng, width, cur);
  if (width === 1) v.setUint8(at, Number(nv));
  else if (width === 2) v.setUint16(at, Number(nv), true);
  else if (width === 4) v.setUint32(at, Number(nv), true);
  else v.setBigUint64(at, nv, true);
  return `u${8 * width} at ${at}: 0x${cur.toString(16)} -> 0x${nv.toString(16)}`;
}

function expectedFdKinds(request: number): readonly string[] {
  switch (request) {
    case Req.SET_MEM_TABLE:
    case Req.ADD_MEM_REG:
      return WRONG_FOR_MEMORY;
    case Req.SET_INFLIGHT_FD:
      return WRONG_FOR_INFLIGHT;
    default:
      return WRONG_FOR_EVENT;
  }
}

function copy(s: SendStep): SendStep {
  return { ...s, payload: s.payload.slice(), fds: [...s.fds] };
}

/** Applies one random mutation to `seq` (in place); returns what it did. */
export function mutateSequence(rng: Prng, ctx: { layout: Layout }, seq: SendStep[]): string {
  if (seq.length === 0) {
    seq.push(randomMessage(rng, ctx));
    return "inserted a random message";
  }
  const i = rng.int(seq.length);
  const s = seq[i];
  const name = `#${i}`;
  const op = rng.weighted<string>([
    [3, "drop"],
    [2, "dup"],
    [2, "swap"],
    [1, "move"],
    [1, "shuffle"],
    [2, "insert"],
    [5, "field"],
    [2, "flags"],
    [1, "request"],
    [2, "resize"],
    [2, "lie"],
    [1, "cut"],
    [3, "fds"],
  ]);
  switch (op) {
    case "drop":
      seq.splice(i, 1);
      return `dropped ${name}`;
    case "dup": {
      const j = rng.chance(0.5) ? i + 1 : rng.int(seq.length + 1);
      seq.splice(j, 0, copy(s));
      return `duplicated ${name} at ${j}`;
    }
    case "swap": {
      const j = Math.min(seq.length - 1, i + 1);
      [seq[i], seq[j]] = [seq[j], seq[i]];
      return `swapped ${name} and #${j}`;
    }
    case "move": {
      seq.splice(i, 1);
      const j = rng.int(seq.length + 1);
      seq.splice(j, 0, s);
      return `moved ${name} to ${j}`;
    }
    case "shuffle": {
      const n = Math.min(seq.length - i, rng.range(2, 6));
      const part = rng.shuffle(seq.slice(i, i + n));
      seq.splice(i, n, ...part);
      return `shuffled ${n} messages from ${name}`;
    }
    case "insert":
      seq.splice(i, 0, randomMessage(rng, ctx));
      return `inserted a random message at ${name}`;
  }
  const m = copy(s);
  seq[i] = m;
  let what: string;
  switch (op) {
    case "field":
      what = m.payload.byteLength ? mutateField(rng, m.payload) : "(empty payload)";
      break;
    case "flags": {
      const f = rng.pick([0, 2, 3, 5, VNR, 0x9 | 0x4, 0xd, 0x1 | 0x100, rng.u32()]);
      what = `flags 0x${m.flags.toString(16)} -> 0x${f.toString(16)}`;
      m.flags = f >>> 0;
      break;
    }
    case "request": {
      const r = rng.chance(0.7)
        ? rng.pick(KNOWN_REQUESTS)
        : rng.pick([0, 41, 42, 64, 100, 0xffff, 0xffffffff, rng.u32()]);
      what = `request ${m.request} -> ${r}`;
      m.request = r >>> 0;
      break;
    }
    case "resize": {
      const n = m.payload.byteLength;
      const to = rng.chance(0.5)
        ? rng.int(Math.max(1, n))
        : n + rng.pick([1, 4, 8, 16, 32, rng.range(1, 300)]);
      const p = new Uint8Array(to);
      p.set(m.payload.subarray(0, Math.min(n, to)));
      if (to > n) p.set(rng.bytes(to - n), n);
      m.payload = p;
      m.size = to;
      what = `payload ${n} -> ${to} bytes`;
      break;
    }
    case "lie": {
      const n = m.payload.byteLength;
      const to = rng.weighted<number>([
        [3, n + rng.range(1, 64)],
        [3, Math.max(0, n - rng.range(1, Math.max(1, n)))],
        [1, 4096],
        [1, 4097],
        [1, 0xffffffff],
        [1, rng.u32()],
      ]);
      m.size = to >>> 0;
      what = `header size ${n} -> ${m.size}`;
      break;
    }
    case "cut": {
      const full = 12 + m.payload.byteLength;
      m.cut = rng.range(1, Math.max(1, full - 1));
      what = `cut after ${m.cut} of ${full} bytes`;
      break;
    }
    default: { // fds
      const choice = rng.weighted<string>([[3, "wrong"], [2, "none"], [2, "extra"], [1, "many"]]);
      if (choice === "wrong" && m.fds.length > 0) {
        const k = rng.int(m.fds.length);
        const r = rng.pick(expectedFdKinds(m.request));
        what = `fd ${k} ${m.fds[k]} -> ${r}`;
        m.fds[k] = r;
      } else if (choice === "none" && m.fds.length > 0) {
        what = `fds [${m.fds.join(", ")}] removed`;
        m.fds = [];
      } else if (choice === "many") {
        const n = rng.range(2, 8 - m.fds.length > 1 ? 8 - m.fds.length : 2);
        for (let k = 0; k < n && m.fds.length < 8; k++) {
          m.fds.push(rng.pick([...expectedFdKinds(m.request), "mem", "call0"]));
        }
        what = `fds now [${m.fds.join(", ")}]`;
      } else {
        if (m.fds.length < 8) m.fds.push(rng.pick(["eventfd", "mem", "memfd-page", "socket", "kick0"]));
        what = `fds now [${m.fds.join(", ")}]`;
      }
    }
  }
  m.note = m.note ? `${m.note}; ${what}` : what;
  return `${name} ${what}`;
}

/** A region description: one of the RAM regions, the hot one, or something made up. */
export function randomRegion(rng: Prng, layout: Layout): RegionDesc {
  const r = rng.pick(layout.regions);
  const base: RegionDesc = rng.chance(0.7)
    ? { gpa: r.gpa, size: r.size, uaddr: r.uaddr, mmapOffset: r.mmapOffset }
    : { gpa: layout.hot.gpa, size: layout.hot.size, uaddr: layout.hot.uaddr, mmapOffset: 0 };
  const field = rng.weighted<string>([[6, "none"], [1, "gpa"], [1, "size"], [1, "uaddr"], [1, "offset"]]);
  const odd = () => rng.pick([0n, 1n, 4095n, 1n << 40n, 1n << 52n, (1n << 64n) - 4096n, rng.u64()]);
  if (field === "gpa") base.gpa = odd();
  if (field === "size") {
    base.size = rng.pick([0n, 4096n, BigInt(layout.ramSize) * 2n, 1n << 52n, (1n << 64n) - 1n]);
  }
  if (field === "uaddr") base.uaddr = odd();
  if (field === "offset") {
    base.mmapOffset = rng.pick([BigInt(layout.ramSize), 4097n, 1n << 44n, (1n << 64n) - 4096n]);
  }
  return base;
}

function queueIndex(rng: Prng, layout: Layout): number {
  return rng.weighted<number>([[8, rng.int(layout.queues)], [1, layout.queues], [
    1,
    rng.pick([64, 0xffff, 0xffffffff]),
  ]]);
}

/** A structure-aware random message. */
export function randomMessage(rng: Prng, ctx: { layout: Layout }): SendStep {
  const L = ctx.layout;
  const request = rng.chance(0.88) ? rng.pick(KNOWN_REQUESTS) : rng.pick([0, 41, 50, 0xffffffff, rng.u32()]);
  const flags = rng.weighted<number>([[14, V], [5, VNR], [1, rng.u32()]]);
  const q = queueIndex(rng, L);
  let payload: Uint8Array<ArrayBuffer>;
  let fds: string[] = [];
  const ring = L.rings[Math.min(q, L.queues - 1)] ?? L.rings[0];
  switch (request) {
    case Req.SET_FEATURES:
      payload = u64(
        rng.chance(0.7)
          ? Feature.VERSION_1 | Feature.PROTOCOL_FEATURES | (rng.chance(0.5) ? Feature.RING_EVENT_IDX : 0n) |
            (rng.chance(0.5) ? Feature.RING_INDIRECT_DESC : 0n)
          : rng.u64(),
      );
      break;
    case Req.SET_PROTOCOL_FEATURES:
      payload = u64(
        rng.chance(0.7)
          ? (Proto.MQ | Proto.REPLY_ACK | Proto.CONFIG | Proto.INFLIGHT_SHMFD | Proto.CONFIGURE_MEM_SLOTS) &
            rng.u64()
          : rng.u64(),
      );
      break;
    case Req.SET_VRING_NUM:
    case Req.SET_VRING_BASE:
    case Req.GET_VRING_BASE:
    case Req.SET_VRING_ENABLE:
      payload = vringState(
        q,
        rng.weighted<number>([[4, rng.pick([0, 1, 2, 64, 128, 256, 1024])], [2, rng.int(0x10000)], [
          1,
          rng.u32(),
        ], [1, 0xffffffff]]),
      );
      break;
    case Req.SET_VRING_ADDR: {
      const shift = () => rng.weighted<number>([[6, 0], [1, 1], [1, 2], [1, 8], [1, -16], [1, 1 << 30]]);
      payload = vringAddr(q, {
        desc: rng.chance(0.9) ? ring.descUaddr + shift() : rng.u64(),
        used: rng.chance(0.9) ? ring.usedUaddr + shift() : rng.u64(),
        avail: rng.chance(0.9) ? ring.availUaddr + shift() : rng.u64(),
        flags: rng.chance(0.9) ? 0 : rng.u32(),
      });
      break;
    }
    case Req.SET_VRING_KICK:
    case Req.SET_VRING_CALL:
    case Req.SET_VRING_ERR: {
      const noFd = rng.chance(0.15);
      payload = rng.chance(0.95) ? vringFile(q, noFd) : u64(rng.u64());
      const right = request === Req.SET_VRING_KICK ? "kick" : request === Req.SET_VRING_CALL ? "call" : "err";
      if (!noFd || rng.chance(0.3)) {
        fds = [
          rng.chance(0.7)
            ? `${right}${Math.min(q, L.queues - 1)}`
            : rng.pick([...WRONG_FOR_EVENT, "eventfd"]),
        ];
      }
      break;
    }
    case Req.SET_MEM_TABLE: {
      const n = rng.weighted<number>([[4, L.regions.length], [2, 1], [1, 0], [1, rng.range(3, 8)], [1, 9]]);
      const regions = Array.from(
        { length: Math.min(n, 9) },
        (_, k) => k < L.regions.length && rng.chance(0.8) ? { ...L.regions[k] } : randomRegion(rng, L),
      );
      payload = memTable(regions, rng.chance(0.9) ? regions.length : rng.pick([0, 8, 9, 0xffffffff]));
      fds = regions.map(() => rng.chance(0.85) ? "mem" : rng.pick(WRONG_FOR_MEMORY));
      // One message carries at most 8 fds (SCM_RIGHTS on our socket; vhost-user's limit too).
      fds = fds.slice(0, rng.chance(0.1) ? rng.int(fds.length + 1) : 8);
      break;
    }
    case Req.ADD_MEM_REG:
    case Req.REM_MEM_REG: {
      const r = randomRegion(rng, L);
      payload = singleRegion(r);
      const hot = BigInt(r.gpa) === BigInt(L.hot.gpa);
      if (request === Req.ADD_MEM_REG || rng.chance(0.3)) {
        fds = [rng.chance(0.8) ? (hot ? "hot" : "mem") : rng.pick(WRONG_FOR_MEMORY)];
      }
      break;
    }
    case Req.GET_INFLIGHT_FD:
    case Req.SET_INFLIGHT_FD: {
      const size = rng.weighted<bigint>([
        [5, BigInt(L.inflightSize)],
        [1, 0n],
        [1, 64n],
        [1, BigInt(L.inflightSize) * 16n],
        [1, 1n << 40n],
        [1, rng.u64()],
      ]);
      payload = inflight({
        mmapSize: size,
        mmapOffset: rng.chance(0.85) ? 0 : rng.pick([4096n, 4097n, 1n << 40n, rng.u64()]),
        numQueues: rng.weighted<number>([[6, L.queues], [1, 0], [1, L.queues + 1], [1, 0xffff]]),
        queueSize: rng.weighted<number>([[6, L.queueSize], [1, 0], [1, 1], [1, 1025], [1, 0xffff]]),
      });
      if (request === Req.SET_INFLIGHT_FD) {
        fds = [rng.chance(0.7) ? "inflight" : rng.pick(WRONG_FOR_INFLIGHT)];
      }
      break;
    }
    case Req.GET_CONFIG:
    case Req.SET_CONFIG: {
      const size = rng.weighted<number>([[4, rng.pick([1, 4, 8, 57, 60])], [1, 0], [1, 256], [1, 257], [
        1,
        0xffffffff,
      ]]);
      const dataLen = rng.chance(0.85) ? Math.min(size, 300) : rng.int(300);
      payload = config(
        rng.weighted<number>([[5, rng.pick([0, 8, 20, 32, 34])], [1, 255], [1, 256], [1, 0xffffffff]]),
        size,
        rng.bytes(dataLen),
        rng.chance(0.9) ? 0 : rng.u32(),
      );
      break;
    }
    case Req.GET_FEATURES:
    case Req.GET_PROTOCOL_FEATURES:
    case Req.GET_QUEUE_NUM:
    case Req.GET_MAX_MEM_SLOTS:
    case Req.SET_OWNER:
    case Req.RESET_OWNER:
    case Req.RESET_DEVICE:
      payload = rng.chance(0.8) ? new Uint8Array(0) : rng.bytes(rng.pick([1, 8, 40]));
      break;
    default:
      payload = rng.bytes(rng.weighted<number>([[3, 8], [2, 0], [2, rng.int(300)], [1, 40]]));
  }
  if (rng.chance(0.05)) {
    // Noise instead of a well-shaped payload.
    payload = rng.bytes(rng.pick([0, 1, 7, 8, 12, 24, 39, 40, 41, 264, rng.int(600)]));
  }
  if (rng.chance(0.05) && fds.length < 8) fds.push(rng.pick(["eventfd", "mem", "socket", "memfd-page"]));
  return send(request, payload, fds, { flags, note: "random" });
}

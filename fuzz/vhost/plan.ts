/**
 * Case plans: from (seed, case number) to the exact steps of one case, independent of every other
 * case, so `--seed S --case N` replays case N alone. Five families:
 *
 * - `replay`: a recorded handshake + start with 1..8 mutations, then well-formed requests;
 * - `random`: structure-aware random messages after no, a partial or a full handshake;
 * - `fds`: fds of the wrong kind or size where memory, inflight or eventfds are expected (a memfd
 *   smaller than its region, a socket/FIFO/file/eventfd for memory, a memfd/socket/FIFO for a
 *   kick), too many or too few fds, regions mapped past their fd's end; then requests that touch it;
 * - `memtable`: the memory table changed under running queues with requests in flight (same
 *   table, split regions, hot-added and removed regions, shrunk, shifted, overlapping); where the
 *   change keeps every buffer mapped the requests must complete correctly;
 * - `ring`: many random and corrupted ring states, each started with SET_VRING_NUM/BASE/ADDR/KICK/
 *   ENABLE (which processes the ring at once), maybe changed while running, stopped with
 *   GET_VRING_BASE and synchronized, so each state is tried on its own.
 * @module
 */
import { Feature, Req } from "../../tests/helpers/vhost_frontend.ts";
import { caseSeed, Prng } from "../prng.ts";
import { WRONG_FOR_EVENT, WRONG_FOR_INFLIGHT, WRONG_FOR_MEMORY } from "./fd_pool.ts";
import type { Layout } from "./layout.ts";
import { mutateSequence, randomMessage } from "./mutate.ts";
import { randomRingState, type RingContext, runningRingState, validRingState } from "./ring_state.ts";
import {
  type CaseKind,
  type CasePlan,
  inflight,
  memTable,
  type RegionDesc,
  send,
  type SendStep,
  singleRegion,
  type Step,
  V,
  VNR,
  vringAddr,
  vringFile,
  vringState,
} from "./steps.ts";
import type { Template, TemplateMsg } from "./template.ts";

/** What plans are made from. */
export interface PlanContext {
  device: "blk" | "rng";
  layout: Layout;
  templates: readonly Template[];
  /** Families to draw from (all by default). */
  kinds: readonly CaseKind[];
}

const WEIGHTS: Record<CaseKind, number> = { replay: 3, random: 2, fds: 2, memtable: 1.5, ring: 2.5 };

/**
 * The plan of case `caseNo` of a run seeded with `seed`.
 * @example
 * const plan = planCase(42, 7, { device: "blk", layout, templates, kinds: CASE_KINDS });
 */
export function planCase(seed: number, caseNo: number, ctx: PlanContext): CasePlan {
  const rng = new Prng(caseSeed(seed, caseNo, ctx.device));
  const kind = rng.weighted(ctx.kinds.map((k) => [WEIGHTS[k], k] as const));
  const template = rng.pick(ctx.templates);
  const make =
    { replay: planReplay, random: planRandom, fds: planFds, memtable: planMemtable, ring: planRing }[kind];
  const { steps, tag } = make(rng, ctx, template);
  return { device: ctx.device, seed, caseNo, kind, template: template.name, tag, steps };
}

// ---- helpers ----

function fromTemplate(msgs: readonly TemplateMsg[]): SendStep[] {
  return msgs.map((m) => send(m.request, m.payload.slice(), [...m.fds], { flags: m.flags }));
}

function ringCtx(ctx: PlanContext, queue: number, extra: Partial<RingContext> = {}): RingContext {
  return {
    device: ctx.device,
    layout: ctx.layout,
    queue,
    size: ctx.layout.queueSize,
    base: 0,
    hot: false,
    ...extra,
  };
}

/** Well-formed requests on every queue, kicked (exercises whatever state the messages left). */
function exercise(rng: Prng, ctx: PlanContext, base = 0): Step[] {
  const steps: Step[] = [];
  for (let q = 0; q < ctx.layout.queues; q++) {
    const { state, note } = validRingState(rng, ringCtx(ctx, q, { base }), rng.range(1, 6));
    steps.push({ op: "ring", queue: q, state, note }, { op: "kick", queue: q });
  }
  return steps;
}

/** A request whose data buffer is at `gpa` (to make the back-end touch that memory). */
function touch(ctx: PlanContext, queue: number, gpa: number, write: boolean): Step[] {
  const L = ctx.layout;
  const hdr = new Uint8Array(16);
  new DataView(hdr.buffer).setUint32(0, write ? 0 : 1, true); // IN writes guest memory, OUT reads it
  const segs = ctx.device === "blk"
    ? [
      { addr: BigInt(L.scratch.gpa), len: 16, flags: 1, next: 1 },
      { addr: BigInt(gpa), len: 4096, flags: 1 | (write ? 2 : 0), next: 2 },
      { addr: BigInt(L.scratch.gpa + 64), len: 1, flags: 2, next: 0 },
    ]
    : [{ addr: BigInt(gpa), len: 64, flags: 2, next: 0 }];
  return [
    {
      op: "ring",
      queue,
      note: `a request with data at 0x${gpa.toString(16)}`,
      state: {
        size: L.queueSize,
        clear: true,
        memory: ctx.device === "blk"
          ? [{ gpa: L.scratch.gpa, bytes: hdr, what: write ? "blk IN header" : "blk OUT header" }]
          : [],
        descs: segs.map((d, i) => ({ i, d })),
        avail: [{ slot: 0, head: 0 }],
        availIdx: 1,
      },
    },
    { op: "kick", queue },
  ];
}

function regionsOf(L: Layout): RegionDesc[] {
  return L.regions.map((r) => ({ gpa: r.gpa, size: r.size, uaddr: r.uaddr, mmapOffset: r.mmapOffset }));
}

function hotRegion(L: Layout): RegionDesc {
  return { gpa: L.hot.gpa, size: L.hot.size, uaddr: L.hot.uaddr, mmapOffset: 0 };
}

/** Sets or clears EVENT_IDX and INDIRECT_DESC in every SET_FEATURES of `seq`. */
function withRingFeatures(seq: SendStep[], eventIdx: boolean, indirect: boolean): void {
  for (const s of seq) {
    if (s.request !== Req.SET_FEATURES || s.payload.byteLength !== 8) continue;
    const v = new DataView(s.payload.buffer);
    let f = v.getBigUint64(0, true) & ~(Feature.RING_EVENT_IDX | Feature.RING_INDIRECT_DESC);
    if (eventIdx) f |= Feature.RING_EVENT_IDX;
    if (indirect) f |= Feature.RING_INDIRECT_DESC;
    v.setBigUint64(0, f, true);
  }
}

// ---- families ----

type Family = (rng: Prng, ctx: PlanContext, t: Template) => { steps: Step[]; tag: string };

const planReplay: Family = (rng, ctx, t) => {
  const seq = [...fromTemplate(t.handshake), ...fromTemplate(t.start)];
  if (rng.chance(0.25)) seq.push(...fromTemplate(t.stop));
  if (rng.chance(0.1)) seq.push(...fromTemplate(t.start));
  const n = rng.weighted<number>([[4, 1], [3, 2], [2, 3], [1, rng.range(4, 8)]]);
  const notes: string[] = [];
  for (let k = 0; k < n; k++) notes.push(mutateSequence(rng, ctx, seq));
  const steps: Step[] = [...seq];
  if (rng.chance(0.7)) steps.push(...exercise(rng, ctx));
  return { steps, tag: `replay with ${n} mutation(s): ${notes.join("; ")}` };
};

const planRandom: Family = (rng, ctx, t) => {
  const prefix = rng.weighted<string>([[2, "nothing"], [2, "a handshake"], [3, "a handshake and start"], [
    1,
    "half a handshake",
  ]]);
  const steps: Step[] = [];
  if (prefix === "a handshake") steps.push(...fromTemplate(t.handshake));
  if (prefix === "a handshake and start") steps.push(...fromTemplate(t.handshake), ...fromTemplate(t.start));
  if (prefix === "half a handshake") {
    steps.push(...fromTemplate(t.handshake).slice(0, rng.int(t.handshake.length)));
  }
  const n = rng.range(10, 60);
  for (let k = 0; k < n; k++) steps.push(randomMessage(rng, ctx));
  if (rng.chance(0.5)) steps.push(...exercise(rng, ctx));
  return { steps, tag: `${n} random messages after ${prefix}` };
};

const planFds: Family = (rng, ctx, t) => {
  const L = ctx.layout;
  const hs = fromTemplate(t.handshake);
  let start = fromTemplate(t.start);
  const target = rng.weighted<string>([
    [3, "table"],
    [2, "add"],
    [2, "hot"],
    [2, "inflight"],
    [3, "event"],
    [2, "count"],
    [2, "beyond"],
  ]);
  let tag = "";
  const after: Step[] = [];
  const flags = rng.chance(0.5) ? VNR : V;
  // Where the back-end must touch memory to notice: the last page of region 1, a page in region 0.
  const r1 = L.regions[1];
  const touchHigh = () => touch(ctx, 0, r1.gpa + r1.size - 4096, rng.chance(0.5));
  const replaceMemory = (msgs: SendStep[]) => {
    const i = start.findIndex((s) => s.request === Req.SET_MEM_TABLE || s.request === Req.ADD_MEM_REG);
    start = start.filter((s) => s.request !== Req.SET_MEM_TABLE && s.request !== Req.ADD_MEM_REG);
    start.splice(i < 0 ? 0 : i, 0, ...msgs);
  };
  if (target === "table" || target === "beyond") {
    const regions = regionsOf(L);
    const fds = regions.map(() => "mem");
    if (target === "table") {
      const k = rng.int(regions.length);
      fds[k] = rng.weighted<string>([[
        4,
        rng.pick(["memfd-empty", "memfd-page", "memfd-half", "memfd-short", "file-page"]),
      ], [3, rng.pick(WRONG_FOR_MEMORY)]]);
      tag = `SET_MEM_TABLE region ${k} <- ${fds[k]}`;
    } else {
      const k = rng.int(regions.length);
      const how = rng.pick(["size", "offset", "offset-huge"]);
      if (how === "size") regions[k].size = BigInt(regions[k].size) * 2n;
      if (how === "offset") {
        regions[k].mmapOffset = BigInt(L.ramSize) - BigInt(rng.pick([0, 4096, L.regions[k].size / 2]));
      }
      if (how === "offset-huge") regions[k].mmapOffset = rng.pick([1n << 40n, (1n << 63n) - 4096n]);
      tag = `SET_MEM_TABLE region ${k} past the memfd's end (${how})`;
    }
    const msg = send(Req.SET_MEM_TABLE, memTable(regions), fds, { flags, note: tag });
    const running = rng.chance(0.4);
    if (running) after.push(msg);
    else replaceMemory([msg]);
    after.push(...touchHigh(), ...touch(ctx, 0, L.scratch.gpa, true));
    tag = `fds: ${tag}${running ? " (while running)" : ""}`;
  } else if (target === "add") {
    const regions = regionsOf(L);
    const k = rng.int(regions.length);
    const role = rng.weighted<string>([[
      4,
      rng.pick(["memfd-empty", "memfd-page", "memfd-half", "memfd-short"]),
    ], [3, rng.pick(WRONG_FOR_MEMORY)]]);
    replaceMemory(
      regions.map((r, i) => send(Req.ADD_MEM_REG, singleRegion(r), [i === k ? role : "mem"], { flags })),
    );
    after.push(...touchHigh());
    tag = `fds: ADD_MEM_REG region ${k} <- ${role}`;
  } else if (target === "hot") {
    const role = rng.weighted<string>([[3, rng.pick(["memfd-empty", "memfd-page"])], [
      3,
      rng.pick(WRONG_FOR_MEMORY),
    ], [1, "hot"]]);
    const r = hotRegion(L);
    if (role === "hot") r.size = BigInt(L.hot.size) * 4n;
    after.push(send(Req.ADD_MEM_REG, singleRegion(r), [role], { flags }));
    after.push(...touch(ctx, 0, L.hot.gpa + L.hot.size - 4096, rng.chance(0.5)));
    if (rng.chance(0.5)) after.push(send(Req.REM_MEM_REG, singleRegion(r), [], { flags }));
    tag = `fds: hot-added region <- ${role}${role === "hot" ? " declared 4x its size" : ""} (while running)`;
  } else if (target === "inflight") {
    const role = rng.weighted<string>([[3, "inflight-short"], [4, rng.pick(WRONG_FOR_INFLIGHT)], [
      2,
      "inflight",
    ]]);
    const declared = role === "inflight"
      ? rng.pick([BigInt(L.inflightSize) * 4n, BigInt(L.inflightSize) + 4096n])
      : BigInt(L.inflightSize);
    const msg = send(
      Req.SET_INFLIGHT_FD,
      inflight({ mmapSize: declared, numQueues: L.queues, queueSize: L.queueSize }),
      [role],
      {
        flags,
      },
    );
    const i = start.findIndex((s) => s.request === Req.SET_INFLIGHT_FD);
    if (i >= 0) start[i] = msg;
    else {
      const f = start.findIndex((s) => s.request === Req.SET_FEATURES);
      start.splice(f + 1, 0, msg);
    }
    tag = `fds: SET_INFLIGHT_FD <- ${role}${
      role === "inflight" ? ` declared ${declared} bytes (the memfd has ${L.inflightSize})` : ""
    }`;
  } else if (target === "event") {
    const which = rng.pick(["kick", "call", "err"]);
    const q = rng.int(L.queues);
    const role = rng.pick(WRONG_FOR_EVENT);
    const req = which === "kick"
      ? Req.SET_VRING_KICK
      : which === "call"
      ? Req.SET_VRING_CALL
      : Req.SET_VRING_ERR;
    let replaced = false;
    for (const seq of [hs, start]) {
      for (const s of seq) {
        if (s.request === req && s.fds[0] === `${which}${q}` && rng.chance(0.7)) {
          s.fds = [role];
          replaced = true;
        }
      }
    }
    if (!replaced) after.push(send(req, vringFile(q), [role], { flags }));
    tag = `fds: SET_VRING_${which.toUpperCase()} queue ${q} <- ${role}${replaced ? "" : " (while running)"}`;
  } else { // count
    const all = [...hs, ...start];
    const withFds = all.filter((s) => s.fds.length > 0);
    const s = rng.chance(0.8) && withFds.length ? rng.pick(withFds) : rng.pick(all);
    const how = s.fds.length === 0 ? "extra" : rng.pick(["none", "extra", "fewer"]);
    if (how === "none") s.fds = [];
    else if (how === "fewer") s.fds = s.fds.slice(0, s.fds.length - 1);
    else {
      const n = rng.range(1, 8 - s.fds.length);
      for (let k = 0; k < n; k++) {
        s.fds.push(rng.pick(["mem", "eventfd", "kick0", "memfd-page", "socket", "fifo"]));
      }
    }
    s.note = `fds now [${s.fds.join(", ")}]`;
    tag = `fds: ${how} fds on ${
      Object.entries(Req).find(([, v]) => v === s.request)?.[0] ?? s.request
    } (${s.fds.length} now)`;
  }
  const steps: Step[] = [...hs, ...start, ...after];
  if (rng.chance(0.8)) steps.push(...exercise(rng, ctx));
  return { steps, tag };
};

const planMemtable: Family = (rng, ctx, t) => {
  const L = ctx.layout;
  const blk = ctx.device === "blk";
  const variant = rng.weighted<string>([
    [2, "same table"],
    [2, "split table"],
    [2, "hot add"],
    [2, "hot add and remove"],
    [1, "shrink"],
    [1, "shift"],
    [1, "remove ring region"],
    [1, "remove data region"],
    [1, "remove and re-add data region"],
    [1, "overlapping add"],
    [1, "remove unknown"],
  ]);
  // Changes that keep every buffer mapped: the requests in flight and after must all succeed.
  const keeps = [
    "same table",
    "split table",
    "hot add",
    "hot add and remove",
    "overlapping add",
    "remove unknown",
  ]
    .includes(variant);
  const steps: Step[] = [...fromTemplate(t.handshake), ...fromTemplate(t.start)];
  const flags = rng.chance(0.5) ? VNR : V;
  let sector = rng.int(64) * 8;
  const written: { sector: number; len: number; seed: number; queue: number }[] = [];
  // With two queues the hot-region requests go to queue 1, so removing the region can only
  // break queue 1; the requests on queue 0 must still complete.
  const hotQueue = L.queues > 1 ? 1 : 0;
  const io = (n: number, expect: "ok" | "any", where: "ram" | "hot" = "ram") => {
    for (let k = 0; k < n; k++) {
      const queue = where === "hot" ? hotQueue : 0;
      if (!blk) {
        steps.push({
          op: "io",
          queue,
          kind: "rng",
          sector: 0,
          len: rng.pick([16, 64, 512, 4096]),
          seed: 0,
          where,
          expect,
        });
        continue;
      }
      const len = 4096 * rng.range(1, 4);
      const seed = rng.u32();
      steps.push({ op: "io", queue, kind: "write", sector, len, seed, where, expect });
      written.push({ sector, len, seed, queue });
      sector += len / 512 + 8;
    }
  };
  io(rng.range(2, 6), keeps ? "ok" : "any");
  const change: Step[] = [];
  const regions = regionsOf(L);
  const hot = hotRegion(L);
  switch (variant) {
    case "same table":
      change.push(send(Req.SET_MEM_TABLE, memTable(regions), ["mem", "mem"], { flags }));
      break;
    case "split table": {
      const parts: RegionDesc[] = [];
      for (const r of L.regions) {
        parts.push({ gpa: r.gpa, size: 6 << 20, uaddr: r.uaddr, mmapOffset: r.mmapOffset });
        parts.push({
          gpa: r.gpa + (6 << 20),
          size: r.size - (6 << 20),
          uaddr: r.uaddr + (6 << 20),
          mmapOffset: r.mmapOffset + (6 << 20),
        });
      }
      change.push(send(Req.SET_MEM_TABLE, memTable(parts), parts.map(() => "mem"), { flags }));
      break;
    }
    case "hot add":
      change.push(send(Req.ADD_MEM_REG, singleRegion(hot), ["hot"], { flags }));
      break;
    case "hot add and remove":
      change.push(send(Req.ADD_MEM_REG, singleRegion(hot), ["hot"], { flags }));
      break;
    case "shrink":
      change.push(send(Req.SET_MEM_TABLE, memTable(regions.slice(0, 1)), ["mem"], { flags }));
      break;
    case "shift": {
      const shifted = regions.map((r) => ({ ...r, uaddr: BigInt(r.uaddr) + (1n << 36n) }));
      change.push(send(Req.SET_MEM_TABLE, memTable(shifted), ["mem", "mem"], { flags }));
      L.rings.forEach((ring, q) =>
        change.push(send(
          Req.SET_VRING_ADDR,
          vringAddr(q, {
            desc: BigInt(ring.descUaddr) + (1n << 36n),
            used: BigInt(ring.usedUaddr) + (1n << 36n),
            avail: BigInt(ring.availUaddr) + (1n << 36n),
          }),
          [],
          { flags },
        ))
      );
      break;
    }
    case "remove ring region":
      change.push(send(Req.REM_MEM_REG, singleRegion(regions[0]), [], { flags }));
      if (rng.chance(0.5)) change.push(send(Req.ADD_MEM_REG, singleRegion(regions[0]), ["mem"], { flags }));
      break;
    case "remove data region":
      change.push(send(Req.REM_MEM_REG, singleRegion(regions[1]), [], { flags }));
      break;
    case "remove and re-add data region":
      change.push(send(Req.REM_MEM_REG, singleRegion(regions[1]), [], { flags }));
      change.push(send(Req.ADD_MEM_REG, singleRegion(regions[1]), ["mem"], { flags }));
      break;
    case "overlapping add":
      change.push(
        send(Req.ADD_MEM_REG, singleRegion({ ...hot, gpa: BigInt(L.regions[0].gpa) + 4096n }), ["hot"], {
          flags,
        }),
      );
      break;
    case "remove unknown":
      change.push(send(Req.REM_MEM_REG, singleRegion(hot), [], { flags }));
      break;
  }
  // A driver uses new memory only once the front-end has it acknowledged: sync before requests.
  steps.push(...change, { op: "sync" });
  if (variant === "hot add" || variant === "hot add and remove") {
    io(rng.range(1, 3), variant === "hot add" ? "ok" : "any", "hot");
    if (variant === "hot add and remove") {
      steps.push(send(Req.REM_MEM_REG, singleRegion(hot), [], { flags }));
    }
  }
  io(rng.range(1, 4), keeps ? "ok" : "any");
  steps.push({ op: "await" });
  if (keeps && blk) {
    // Everything written must read back (into RAM, whichever buffer it came from).
    for (const w of written) {
      if (w.queue === hotQueue && variant === "hot add and remove" && hotQueue !== 0) continue;
      steps.push({
        op: "io",
        queue: 0,
        kind: "read",
        sector: w.sector,
        len: w.len,
        seed: w.seed,
        where: "ram",
        expect: "ok",
      });
    }
    steps.push({ op: "await" });
  }
  return { steps, tag: `memtable: ${variant} with requests in flight${keeps ? " (must complete)" : ""}` };
};

const planRing: Family = (rng, ctx, t) => {
  const L = ctx.layout;
  const eventIdx = rng.chance(0.4);
  const indirect = rng.chance(0.7);
  const hs = fromTemplate(t.handshake);
  const start = fromTemplate(t.start);
  withRingFeatures(start, eventIdx, indirect);
  const steps: Step[] = [...hs, ...start];
  for (let q = 0; q < L.queues; q++) steps.push(send(Req.GET_VRING_BASE, vringState(q, 0)));
  steps.push({ op: "sync" });
  let hot = false;
  if (rng.chance(0.15)) {
    steps.push(send(Req.ADD_MEM_REG, singleRegion(hotRegion(L)), ["hot"], { flags: VNR }));
    hot = true;
  }
  const states = rng.range(8, 40);
  let tried = 0;
  for (let j = 0; j < states; j++) {
    const q = rng.int(L.queues);
    const size = rng.weighted<number>([
      [10, L.queueSize],
      [3, rng.pick([1, 2, 4, 8, 16, 32, 64, 128])],
      [1, rng.pick([512, 1024])],
      [1, rng.pick([0, 3, 100, 2048, 32768])],
    ]);
    const valid = size > 0 && (size & (size - 1)) === 0 && size <= 1024;
    const base = rng.weighted<number>([[6, 0], [2, rng.int(0x10000)], [1, 0xffff], [1, 0xfff0]]);
    const rc = ringCtx(ctx, q, { size: valid ? size : L.queueSize, base, hot });
    const first = randomRingState(rng, rc);
    steps.push({ op: "ring", queue: q, state: first.state, note: first.note });
    tried++;
    const ring = L.rings[q];
    const addr = rng.chance(0.95)
      ? { desc: ring.descUaddr, used: ring.usedUaddr, avail: ring.availUaddr }
      : rng.pick([
        { desc: ring.descUaddr + 8, used: ring.usedUaddr, avail: ring.availUaddr },
        { desc: ring.descUaddr, used: ring.usedUaddr + 2, avail: ring.availUaddr + 1 },
        { desc: L.regions[0].uaddr + L.regions[0].size - 16, used: ring.usedUaddr, avail: ring.availUaddr },
        { desc: ring.descUaddr, used: ring.descUaddr, avail: ring.descUaddr },
      ]);
    steps.push(
      send(Req.SET_VRING_NUM, vringState(q, size)),
      send(Req.SET_VRING_BASE, vringState(q, base)),
      send(Req.SET_VRING_ADDR, vringAddr(q, addr)),
      send(Req.SET_VRING_KICK, vringFile(q), [`kick${q}`]),
      send(Req.SET_VRING_ENABLE, vringState(q, rng.chance(0.95) ? 1 : rng.pick([0, 2]))),
    );
    let published = first.published;
    const running = rng.weighted<number>([[5, 0], [3, 1], [1, 2], [1, 3]]);
    for (let k = 0; k < running; k++) {
      const more = runningRingState(rng, rc, published);
      published = more.published;
      steps.push({ op: "ring", queue: q, state: more.state, note: `while running: ${more.note}` }, {
        op: "kick",
        queue: q,
      });
      tried++;
    }
    if (rng.chance(0.05)) {
      // The memory table changes under the running ring.
      const change = rng.pick(["same", "hot-add", "hot-rem"]);
      if (change === "same") {
        steps.push(send(Req.SET_MEM_TABLE, memTable(regionsOf(L)), ["mem", "mem"], { flags: VNR }));
      }
      if (change === "hot-add" && !hot) {
        steps.push(send(Req.ADD_MEM_REG, singleRegion(hotRegion(L)), ["hot"], { flags: VNR }));
        hot = true;
      }
      if (change === "hot-rem" && hot) {
        steps.push(send(Req.REM_MEM_REG, singleRegion(hotRegion(L)), [], { flags: VNR }));
        hot = false;
      }
    }
    steps.push(send(Req.GET_VRING_BASE, vringState(q, 0)), { op: "sync" });
  }
  return {
    steps,
    tag: `ring: ${tried} states${eventIdx ? ", EVENT_IDX" : ""}${indirect ? ", INDIRECT_DESC" : ""}${
      hot ? ", hot region" : ""
    }`,
  };
};

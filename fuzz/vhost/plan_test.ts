import assert from "node:assert/strict";
import { Req } from "../../tests/helpers/vhost_frontend.ts";
import { UADDR_BASE } from "../../tests/helpers/virtio_ring.ts";
import type { Layout } from "./layout.ts";
import { planCase, type PlanContext } from "./plan.ts";
import {
  CASE_KINDS,
  describePlan,
  memTable,
  planFromJson,
  planToJson,
  u64,
  vringAddr,
  vringFile,
  vringState,
} from "./steps.ts";
import type { Template, TemplateMsg } from "./template.ts";

const MiB = 1 << 20;
const layout: Layout = {
  device: "blk",
  queues: 2,
  queueSize: 256,
  ramSize: 16 * MiB,
  regions: [
    { gpa: 0, size: 8 * MiB, mmapOffset: 0, uaddr: UADDR_BASE },
    { gpa: 0x1_0000_0000, size: 8 * MiB, mmapOffset: 8 * MiB, uaddr: UADDR_BASE + 0x1_0000_0000 },
  ],
  rings: [0, 1].map((q) => ({
    desc: 0x10000 * q,
    avail: 0x10000 * q + 0x1000,
    used: 0x10000 * q + 0x2000,
    descUaddr: UADDR_BASE + 0x10000 * q,
    availUaddr: UADDR_BASE + 0x10000 * q + 0x1000,
    usedUaddr: UADDR_BASE + 0x10000 * q + 0x2000,
  })),
  scratch: { gpa: 0x100000, size: MiB },
  scratchHigh: { gpa: 0x1_0010_0000, size: 256 << 10 },
  ctl: 0x200000,
  hot: { gpa: 0x2_0000_0000, uaddr: UADDR_BASE + 0x2_0000_0000, size: 2 * MiB },
  inflightSize: 2 * 4160,
  diskSectors: 16384,
};

const m = (request: number, payload = new Uint8Array(0), fds: string[] = []): TemplateMsg => ({
  request,
  flags: 1,
  payload,
  fds,
});
const template: Template = {
  name: "synthetic",
  handshake: [
    m(Req.GET_FEATURES),
    m(Req.SET_OWNER),
    m(Req.SET_VRING_CALL, vringFile(0), ["call0"]),
    m(Req.SET_VRING_CALL, vringFile(1), ["call1"]),
  ],
  start: [
    m(Req.SET_FEATURES, u64(1n << 32n)),
    m(Req.SET_MEM_TABLE, memTable(layout.regions), ["mem", "mem"]),
    ...[0, 1].flatMap((q) => [
      m(Req.SET_VRING_NUM, vringState(q, 256)),
      m(Req.SET_VRING_BASE, vringState(q, 0)),
      m(
        Req.SET_VRING_ADDR,
        vringAddr(q, {
          desc: layout.rings[q].descUaddr,
          used: layout.rings[q].usedUaddr,
          avail: layout.rings[q].availUaddr,
        }),
      ),
      m(Req.SET_VRING_KICK, vringFile(q), [`kick${q}`]),
    ]),
  ],
  stop: [m(Req.GET_VRING_BASE, vringState(0, 0)), m(Req.GET_VRING_BASE, vringState(1, 0))],
};
const ctx: PlanContext = { device: "blk", layout, templates: [template], kinds: CASE_KINDS };
const KNOWN_ROLES =
  /^(mem|inflight|hot|(kick|call|err)[01]|memfd-(empty|page|half|short)|inflight-short|socket|fifo|file|file-page|file-ro|eventfd|devnull|devzero|dir)$/;

Deno.test("planCase is a function of (seed, case): the same plan twice, another for the next case", () => {
  const a = planToJson(planCase(9, 3, ctx));
  assert.equal(planToJson(planCase(9, 3, ctx)), a);
  assert.notEqual(planToJson(planCase(9, 4, ctx)), a);
  assert.notEqual(planToJson(planCase(10, 3, ctx)), a);
});

Deno.test("planCase draws every family, only from --kinds, with known fd roles and ring writes inside RAM", () => {
  const seen = new Set<string>();
  for (let n = 0; n < 300; n++) {
    const p = planCase(1, n, ctx);
    seen.add(p.kind);
    for (const s of p.steps) {
      if (s.op === "send") { for (const r of s.fds) assert.match(r, KNOWN_ROLES, `case ${n}: fd role ${r}`); }
      if (s.op === "send") assert.ok(s.fds.length <= 8, `case ${n}: ${s.fds.length} fds`);
      if (s.op === "ring") {
        for (const w of s.state.memory) {
          const inside = layout.regions.some((r) =>
            w.gpa >= r.gpa && w.gpa + w.bytes.byteLength <= r.gpa + r.size
          );
          assert.ok(inside, `case ${n}: memory write at 0x${w.gpa.toString(16)} outside RAM`);
        }
      }
    }
    assert.ok(describePlan(p).length > p.steps.length);
  }
  assert.deepEqual([...seen].sort(), [...CASE_KINDS].sort());
  for (let n = 0; n < 50; n++) assert.equal(planCase(1, n, { ...ctx, kinds: ["ring"] }).kind, "ring");
});

Deno.test("a plan file reads back as the same plan (bytes and bigints included)", () => {
  for (let n = 0; n < 40; n++) {
    const p = planCase(5, n, ctx);
    const again = planFromJson(planToJson(p));
    assert.deepEqual(again, p);
  }
});

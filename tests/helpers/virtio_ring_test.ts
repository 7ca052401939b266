import assert from "node:assert/strict";
import { DescFlags, GuestRam, SplitQueue, UADDR_BASE, USED_F_NO_NOTIFY } from "./virtio_ring.ts";
import {
  decodeBlkConfig,
  encodeMessage,
  HEADER_SIZE,
  MsgFlags,
  Req,
  statePayload,
} from "./vhost_frontend.ts";

function desc(ram: GuestRam, q: SplitQueue, i: number) {
  const o = ram.offset(q.descGpa + 16 * i, 16);
  const v = ram.view;
  return {
    addr: Number(v.getBigUint64(o, true)),
    len: v.getUint32(o + 8, true),
    flags: v.getUint16(o + 12, true),
    next: v.getUint16(o + 14, true),
  };
}

Deno.test("GuestRam split layout maps GPA 4 GiB to the second half of the memfd", () => {
  using ram = new GuestRam({ size: 4 << 20, split: true });
  assert.equal(ram.regions.length, 2);
  assert.equal(ram.offset(0x1_0000_0000), 2 << 20);
  assert.equal(ram.uaddr(0x1_0000_0010), UADDR_BASE + 0x1_0000_0010);
  assert.throws(() => ram.offset((2 << 20) - 8, 16), /outside guest RAM/);
  assert.throws(() => ram.offset(0x2_0000_0000), /outside guest RAM/);
  const a = ram.alloc(4096, 4096);
  assert.equal(a, 0x1_0000_0000, "default allocations come from the last region");
  assert.throws(() => ram.alloc(4 << 20), /region 1 exhausted: 4194304 bytes wanted/);
  assert.throws(() => new GuestRam({ size: 3 << 20 }), /multiple of 2 MiB: got 3145728/);
});

Deno.test("SplitQueue add writes a linked chain and publish asks for a kick unless NO_NOTIFY", () => {
  using ram = new GuestRam({ size: 2 << 20 });
  const q = new SplitQueue(ram, { size: 8 });
  const head = q.add([
    { gpa: 0x1000, len: 16, write: false },
    { gpa: 0x2000, len: 512, write: true },
    { gpa: 0x3000, len: 1, write: true },
  ])!;
  const d0 = desc(ram, q, head);
  assert.deepEqual(d0, { addr: 0x1000, len: 16, flags: DescFlags.NEXT, next: d0.next });
  const d1 = desc(ram, q, d0.next);
  assert.deepEqual(d1, { addr: 0x2000, len: 512, flags: DescFlags.NEXT | DescFlags.WRITE, next: d1.next });
  assert.deepEqual(desc(ram, q, d1.next), { addr: 0x3000, len: 1, flags: DescFlags.WRITE, next: 0 });
  assert.equal(q.freeCount, 5);
  const availIdx = ram.offset(q.availGpa + 2);
  assert.equal(ram.view.getUint16(availIdx, true), 0, "not visible before publish");
  assert.equal(q.publish(), true);
  assert.equal(ram.view.getUint16(availIdx, true), 1);
  assert.equal(ram.view.getUint16(ram.offset(q.availGpa + 4), true), head);
  ram.view.setUint16(ram.offset(q.usedGpa), USED_F_NO_NOTIFY, true);
  q.add([{ gpa: 0x1000, len: 1, write: true }]);
  assert.equal(q.publish(), false, "NO_NOTIFY suppresses the kick");
  assert.equal(
    q.add([1, 2, 3, 4, 5].map(() => ({ gpa: 0, len: 1, write: false }))),
    null,
    "4 free, 5 needed",
  );
});

Deno.test("SplitQueue with EVENT_IDX kicks only when avail_event falls inside the new batch", () => {
  using ram = new GuestRam({ size: 2 << 20 });
  const q = new SplitQueue(ram, { size: 8, eventIdx: true });
  const availEvent = ram.offset(q.usedGpa + 4 + 8 * 8);
  ram.view.setUint16(availEvent, 0, true);
  q.add([{ gpa: 0x1000, len: 1, write: true }]);
  assert.equal(q.publish(), true, "device waits for index 0");
  ram.view.setUint16(availEvent, 5, true);
  q.add([{ gpa: 0x1000, len: 1, write: true }]);
  assert.equal(q.publish(), false, "device waits for index 5; 1 was published");
  for (let i = 0; i < 4; i++) q.add([{ gpa: 0x1000, len: 1, write: true }]);
  assert.equal(q.publish(), true, "batch 2..5 crosses avail_event 5");
  q.armCall();
  assert.equal(
    ram.view.getUint16(ram.offset(q.availGpa + 4 + 2 * 8), true),
    q.lastUsed,
    "used_event = last used",
  );
});

Deno.test("SplitQueue collect returns completions, frees descriptors and rejects bad used entries", () => {
  using ram = new GuestRam({ size: 2 << 20 });
  const q = new SplitQueue(ram, { size: 8 });
  const a = q.add([{ gpa: 0x1000, len: 16, write: false }, { gpa: 0x3000, len: 1, write: true }])!;
  const b = q.add([{ gpa: 0x1000, len: 16, write: false }, { gpa: 0x3000, len: 1, write: true }])!;
  q.publish();
  q.rawUsed(b, 1);
  q.rawUsed(a, 7);
  const seen: Array<[number, number]> = [];
  assert.equal(q.collect((id, len) => seen.push([id, len])), 2);
  assert.deepEqual(seen, [[b, 1], [a, 7]]);
  assert.equal(q.freeCount, 8);
  assert.equal(q.inFlight, 0);
  q.rawUsed(a, 1);
  assert.throws(() => q.collect(() => {}), /advanced used->idx by 1 .* with 0 in flight/);
  using ram2 = new GuestRam({ size: 2 << 20 });
  const r = new SplitQueue(ram2, { size: 8 });
  r.add([{ gpa: 0x1000, len: 1, write: true }]);
  r.publish();
  r.rawUsed(5, 1);
  assert.throws(() => r.collect(() => {}), /used.id 5 .* not an in-flight head/);
});

Deno.test("SplitQueue indirect chains use one ring descriptor pointing at a table", () => {
  using ram = new GuestRam({ size: 2 << 20 });
  const q = new SplitQueue(ram, { size: 8, indirectMax: 4 });
  const head = q.add([
    { gpa: 0x1000, len: 16, write: false },
    { gpa: 0x3000, len: 1, write: true },
  ], { indirect: true })!;
  const d = desc(ram, q, head);
  assert.equal(d.flags, DescFlags.INDIRECT);
  assert.equal(d.len, 32);
  const t = ram.offset(d.addr, 32);
  assert.equal(Number(ram.view.getBigUint64(t, true)), 0x1000);
  assert.equal(ram.view.getUint16(t + 12, true), DescFlags.NEXT);
  assert.equal(ram.view.getUint16(t + 14, true), 1);
  assert.equal(ram.view.getUint16(t + 16 + 12, true), DescFlags.WRITE);
  assert.equal(q.freeCount, 7);
  assert.throws(
    () => q.add(new Array(5).fill({ gpa: 0, len: 1, write: false }), { indirect: true }),
    /exceeds indirectMax 4/,
  );
});

Deno.test("vhost frontend encodeMessage lays out the 12-byte header little-endian", () => {
  const m = encodeMessage(Req.SET_VRING_NUM, MsgFlags.VERSION | MsgFlags.NEED_REPLY, statePayload(1, 256));
  assert.equal(m.byteLength, HEADER_SIZE + 8);
  assert.deepEqual([...m.subarray(0, 12)], [8, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0]);
  assert.deepEqual([...m.subarray(12)], [1, 0, 0, 0, 0, 1, 0, 0]);
  const lying = encodeMessage(Req.GET_FEATURES, MsgFlags.VERSION, new Uint8Array(0), 0x10000);
  assert.equal(new DataView(lying.buffer).getUint32(8, true), 0x10000);
});

Deno.test("vhost frontend decodeBlkConfig reads the virtio-blk fields and zero-fills short configs", () => {
  const b = new Uint8Array(60);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, 32768n, true);
  v.setUint32(12, 126, true);
  v.setUint32(20, 4096, true);
  v.setUint16(34, 4, true);
  v.setUint32(36, 1000, true);
  v.setUint8(56, 1);
  const c = decodeBlkConfig(b);
  assert.equal(c.capacity, 32768n);
  assert.equal(c.segMax, 126);
  assert.equal(c.blkSize, 4096);
  assert.equal(c.numQueues, 4);
  assert.equal(c.maxDiscardSectors, 1000);
  assert.equal(c.writeZeroesMayUnmap, 1);
  assert.equal(decodeBlkConfig(b.subarray(0, 36)).maxDiscardSectors, 0);
});

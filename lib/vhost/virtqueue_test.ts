import assert from "node:assert/strict";
import { EventFd, IoVecs } from "../../ffi/mod.ts";
import { GuestMemory } from "./guest_memory.ts";
import { InflightQueue, inflightQueueSize } from "./inflight.ts";
import { DescFlags, DescriptorChain, VirtQueue, VirtqueueError } from "./virtqueue.ts";
import { TestGuest, TestRing } from "./_testing.ts";

const { NEXT, WRITE, INDIRECT } = DescFlags;

function setup(size = 8): { g: TestGuest; mem: GuestMemory; ring: TestRing; vq: VirtQueue; done(): void } {
  const g = new TestGuest(1 << 20);
  const mem = new GuestMemory();
  mem.add(g.region, g.fd);
  const ring = new TestRing(g, size);
  const vq = new VirtQueue(0);
  vq.size = size;
  const a = ring.userAddrs;
  vq.setAddresses(a.desc, a.avail, a.used);
  vq.enabled = true;
  vq.start(mem);
  return {
    g,
    mem,
    ring,
    vq,
    done() {
      vq.reset();
      mem.close();
      g.close();
    },
  };
}

Deno.test("virtqueue walks a NEXT chain with readable then writable buffers", () => {
  const t = setup();
  try {
    t.ring.setDesc(0, 0x10000, 16, NEXT, 5);
    t.ring.setDesc(5, 0x20000, 4096, NEXT | WRITE, 2);
    t.ring.setDesc(2, 0x30000, 1, WRITE);
    t.ring.publish(0);
    const c = new DescriptorChain();
    assert.ok(t.vq.pop(c));
    assert.equal(c.head, 0);
    assert.equal(c.count, 3);
    assert.deepEqual([...c.lengths.subarray(0, 3)], [16, 4096, 1]);
    assert.deepEqual([...c.writes.subarray(0, 3)], [0, 1, 1]);
    assert.deepEqual([...c.offsets.subarray(0, 3)], [0x10000, 0x20000, 0x30000]);
    assert.equal(c.readable, 16);
    assert.equal(c.writable, 4097);
    assert.equal(t.vq.pop(c), false);
  } finally {
    t.done();
  }
});

Deno.test("virtqueue follows an indirect table", () => {
  const t = setup();
  try {
    const table = 0x40000;
    t.ring.setDesc(0, 0x10000, 16, NEXT, 1, table);
    t.ring.setDesc(1, 0x20000, 512, NEXT | WRITE, 2, table);
    t.ring.setDesc(2, 0x30000, 1, WRITE, 0, table);
    t.ring.setDesc(3, table, 48, INDIRECT);
    t.ring.publish(3);
    const c = new DescriptorChain();
    assert.ok(t.vq.pop(c));
    assert.equal(c.head, 3);
    assert.equal(c.count, 3);
    assert.equal(c.writable, 513);
  } finally {
    t.done();
  }
});

Deno.test("virtqueue rejects a descriptor loop", () => {
  const t = setup();
  try {
    t.ring.setDesc(0, 0x10000, 16, NEXT, 1);
    t.ring.setDesc(1, 0x10000, 16, NEXT, 0);
    t.ring.publish(0);
    assert.throws(() => t.vq.pop(new DescriptorChain()), /longer than 8 descriptors/);
  } finally {
    t.done();
  }
});

Deno.test("virtqueue rejects a loop inside an indirect table", () => {
  const t = setup();
  try {
    const table = 0x40000;
    t.ring.setDesc(0, 0x10000, 16, NEXT, 0, table);
    t.ring.setDesc(0, table, 32, INDIRECT);
    t.ring.publish(0);
    assert.throws(() => t.vq.pop(new DescriptorChain()), /longer than 2 descriptors/);
  } finally {
    t.done();
  }
});

Deno.test("virtqueue rejects out-of-range buffers, heads and next indices", () => {
  const t = setup();
  const c = new DescriptorChain();
  try {
    t.ring.setDesc(0, 0x100000 - 8, 16, 0); // crosses the end of guest RAM
    t.ring.publish(0);
    assert.throws(() => t.vq.pop(c), /outside guest memory/);
    t.ring.setDesc(1, 0xffff_ffff_0000_0000n, 16, 0);
    t.ring.publish(1);
    assert.throws(() => t.vq.pop(c), /outside guest memory/);
    t.ring.publish(9); // head >= size
    assert.throws(() => t.vq.pop(c), /head 9 >= size 8/);
    t.ring.setDesc(2, 0x10000, 16, NEXT, 8);
    t.ring.publish(2);
    assert.throws(() => t.vq.pop(c), /index 8 >= table length 8/);
  } finally {
    t.done();
  }
});

Deno.test("virtqueue rejects indirect-in-indirect, INDIRECT with NEXT and bad table sizes", () => {
  const t = setup();
  const c = new DescriptorChain();
  try {
    const table = 0x40000;
    t.ring.setDesc(0, 0x50000, 16, INDIRECT, 0, table);
    t.ring.setDesc(0, table, 16, INDIRECT);
    t.ring.publish(0);
    assert.throws(() => t.vq.pop(c), /indirect descriptor inside an indirect table/);
    t.ring.setDesc(1, table, 16, INDIRECT | NEXT, 2);
    t.ring.publish(1);
    assert.throws(() => t.vq.pop(c), /both INDIRECT and NEXT/);
    t.ring.setDesc(2, table, 24, INDIRECT);
    t.ring.publish(2);
    assert.throws(() => t.vq.pop(c), /indirect table of 24 bytes/);
    t.ring.setDesc(3, 0xfff00, 0x200, INDIRECT);
    t.ring.publish(3);
    assert.throws(() => t.vq.pop(c), /indirect table .* outside guest memory/);
  } finally {
    t.done();
  }
});

Deno.test("virtqueue rejects a chain longer than the queue in an indirect table", () => {
  const t = setup(8);
  try {
    const table = 0x40000;
    // 16 entries chained 0 -> 1 -> ... -> 15 -> 0: a loop the table length bounds.
    for (let i = 0; i < 16; i++) t.ring.setDesc(i, 0x10000, 16, NEXT, (i + 1) % 16, table);
    t.ring.setDesc(0, table, 256, INDIRECT);
    t.ring.publish(0);
    assert.throws(() => t.vq.pop(new DescriptorChain()), VirtqueueError);
  } finally {
    t.done();
  }
});

Deno.test("virtqueue rejects an avail index more than the queue size ahead", () => {
  const t = setup(8);
  try {
    t.g.view.setUint16(t.ring.avail + 2, 9, true);
    assert.throws(() => t.vq.pop(new DescriptorChain()), /9 ahead of 0, more than size 8/);
  } finally {
    t.done();
  }
});

Deno.test("virtqueue publishes used entries with their lengths once per flush", () => {
  const t = setup();
  try {
    const c = new DescriptorChain();
    for (const h of [4, 6]) {
      t.ring.setDesc(h, 0x10000 + h * 0x1000, 100, WRITE);
      t.ring.publish(h);
    }
    assert.ok(t.vq.pop(c));
    t.vq.pushUsed(c.head, 100);
    assert.ok(t.vq.pop(c));
    t.vq.pushUsed(c.head, 7);
    assert.equal(t.ring.usedIdx, 0, "nothing visible before flush");
    t.vq.flush();
    assert.equal(t.ring.usedIdx, 2);
    assert.deepEqual(t.ring.usedElem(0), { id: 4, len: 100 });
    assert.deepEqual(t.ring.usedElem(1), { id: 6, len: 7 });
  } finally {
    t.done();
  }
});

Deno.test("virtqueue without EVENT_IDX signals unless the driver set NO_INTERRUPT", () => {
  const t = setup();
  const call = new EventFd();
  t.vq.call = call;
  try {
    const c = new DescriptorChain();
    t.ring.setDesc(0, 0x10000, 8, WRITE);
    t.ring.publish(0);
    t.vq.pop(c);
    t.vq.pushUsed(0, 8);
    assert.equal(t.vq.flush(), true);
    assert.equal(call.drain(), 1n);
    t.ring.setAvailFlags(1);
    t.ring.publish(0);
    t.vq.pop(c);
    t.vq.pushUsed(0, 8);
    assert.equal(t.vq.flush(), false);
    assert.equal(call.drain(), 0n);
  } finally {
    t.done(); // closes call too
  }
});

Deno.test("virtqueue with EVENT_IDX signals only when used_event is crossed and sets avail_event", () => {
  const t = setup();
  t.vq.eventIdx = true;
  const call = new EventFd();
  t.vq.call = call;
  try {
    const c = new DescriptorChain();
    t.ring.setDesc(0, 0x10000, 8, WRITE);
    t.ring.setUsedEvent(1); // the driver wants a call once used idx passes 1
    t.ring.publish(0);
    t.vq.pop(c);
    t.vq.pushUsed(0, 8);
    assert.equal(t.vq.flush(), false, "used idx 1 does not cross used_event 1");
    t.ring.publish(0);
    t.vq.pop(c);
    t.vq.pushUsed(0, 8);
    assert.equal(t.vq.flush(), true, "used idx 2 crosses used_event 1");
    assert.equal(call.drain(), 1n);
    assert.equal(t.vq.enableNotification(), false);
    assert.equal(t.ring.availEvent, 2, "avail_event = next avail index");
    t.ring.publish(0);
    assert.equal(t.vq.enableNotification(), true, "work that arrived meanwhile is reported");
  } finally {
    t.done();
  }
});

Deno.test("virtqueue refuses misaligned rings and sizes that are not powers of two", () => {
  const vq = new VirtQueue(0);
  assert.throws(() => vq.setAddresses(0x1008n, 0x2000n, 0x3000n), /misaligned/);
  assert.throws(() => vq.setAddresses(0x1000n, 0x2001n, 0x3000n), /misaligned/);
  assert.throws(() => vq.setAddresses(0x1000n, 0x2000n, 0x3002n), /misaligned/);
  const g = new TestGuest(1 << 16);
  const mem = new GuestMemory();
  try {
    mem.add(g.region, g.fd);
    vq.size = 6;
    assert.throws(() => vq.map(mem), /not a power of 2/);
    vq.size = 8;
    assert.throws(() => vq.map(mem), /addresses not set/);
    vq.setAddresses(0n, 0n, 0n); // guest-physical 0 is not a front-end address here
    assert.throws(() => vq.map(mem), /not inside guest memory/);
  } finally {
    mem.close();
    g.close();
  }
});

Deno.test("virtqueue with inflight tracking resubmits what was in flight after a restart", () => {
  const t = setup(8);
  const area = new Uint8Array(inflightQueueSize(8));
  const view = new DataView(area.buffer);
  try {
    t.vq.stop();
    t.vq.inflight = new InflightQueue(view, { offset: 0, queueSize: 8 });
    t.vq.start(t.mem);
    const c = new DescriptorChain();
    for (const h of [1, 2, 3]) {
      t.ring.setDesc(h, 0x10000, 8, WRITE);
      t.ring.publish(h);
    }
    for (let i = 0; i < 3; i++) assert.ok(t.vq.pop(c));
    t.vq.pushUsed(2, 8); // 2 completes; 1 and 3 are in flight when the "back-end dies"
    t.vq.flush();
    // A new back-end instance on the same ring and area.
    const vq2 = new VirtQueue(0);
    vq2.size = 8;
    const a = t.ring.userAddrs;
    vq2.setAddresses(a.desc, a.avail, a.used);
    vq2.inflight = new InflightQueue(view, { offset: 0, queueSize: 8 });
    vq2.start(t.mem);
    assert.equal(vq2.resubmitPending, 2);
    assert.equal(vq2.lastAvail, 3, "last_avail = used idx 1 + 2 in flight");
    const heads: number[] = [];
    while (vq2.pop(c)) heads.push(c.head);
    assert.deepEqual(heads, [1, 3], "resubmitted in submission order, nothing else popped");
    vq2.stop();
  } finally {
    t.done();
  }
});

Deno.test("virtqueue suppresses kicks while polling and asks for them again afterwards", () => {
  const t = setup();
  try {
    const usedFlags = () => t.g.view.getUint16(t.ring.used, true);
    t.vq.suppressNotification();
    assert.equal(usedFlags(), 1, "VRING_USED_F_NO_NOTIFY while polling");
    t.ring.publish(0);
    assert.equal(t.vq.resumeNotification(), true, "work that arrived while suppressed is reported");
    assert.equal(usedFlags(), 0);
    t.vq.eventIdx = true;
    t.vq.suppressNotification();
    assert.equal(t.vq.enableNotification(), true);
    assert.equal(t.ring.availEvent, 0, "avail_event left behind while suppressed");
    t.vq.pop(new DescriptorChain());
    t.ring.setDesc(0, 0x10000, 8, WRITE);
    assert.equal(t.vq.resumeNotification(), false);
    assert.equal(t.ring.availEvent, 1, "avail_event = last_avail again");
  } finally {
    t.done();
  }
});

Deno.test("virtqueue on a 6 GiB region with rings above 4 GiB: every ring access lands at its byte", () => {
  // A sparse memfd: only the pages touched here cost memory.
  const GiB = 2 ** 30;
  const g = new TestGuest(6 * GiB);
  const mem = new GuestMemory();
  const vq = new VirtQueue(0);
  const call = new EventFd();
  try {
    mem.add(g.region, g.fd);
    assert.equal(mem.regions[0].u16.length, 3 * GiB, "the u16 view covers the whole region");
    assert.equal(mem.regions[0].u32.length, 1.5 * GiB, "the u32 view covers the whole region");
    const base = 4.5 * GiB; // ring at 4.5 GiB: a 32-bit index would put it at 0.5 GiB
    const ring = new TestRing(g, 8, base);
    const a = ring.userAddrs;
    vq.size = 8;
    vq.setAddresses(a.desc, a.avail, a.used);
    vq.enabled = true;
    vq.eventIdx = true;
    vq.call = call;
    vq.start(mem);
    const buf = 5.5 * GiB + 0x123;
    ring.setDesc(0, buf, 16, NEXT, 1);
    ring.setDesc(1, 5 * GiB, 8, WRITE);
    ring.setUsedEvent(0);
    ring.publish(0);
    assert.equal(vq.hasWork(), true, "avail->idx is read at 4.5 GiB");
    const c = new DescriptorChain();
    assert.equal(vq.pop(c), true);
    assert.equal(c.head, 0);
    assert.deepEqual([c.offsets[0], c.offsets[1]], [buf, 5 * GiB], "buffers above 4 GiB");
    vq.pushUsed(0, 8);
    assert.equal(vq.flush(), true, "used_event read above 4 GiB");
    assert.equal(ring.usedIdx, 1, "used->idx written above 4 GiB");
    assert.deepEqual(ring.usedElem(0), { id: 0, len: 8 });
    vq.enableNotification();
    assert.equal(ring.availEvent, 1, "avail_event written above 4 GiB");
    vq.eventIdx = false;
    vq.suppressNotification();
    assert.equal(g.view.getUint16(ring.used, true), 1, "used->flags written above 4 GiB");
    vq.resumeNotification();
    // Nothing was written 4 GiB lower (where a 32-bit index would have put the ring).
    const low = base - 4 * GiB;
    assert.ok(g.bytes.subarray(low, low + 0x3000).every((b) => b === 0), "no write 4 GiB lower");
  } finally {
    vq.reset();
    call.close();
    mem.close();
    g.close();
  }
});

Deno.test("descriptor chain reads, writes and gathers by position across segments", () => {
  const t = setup();
  try {
    // readable: 3 + 5 bytes; writable: 4 + 2 bytes
    t.ring.setDesc(0, 0x10000, 3, NEXT, 1);
    t.ring.setDesc(1, 0x10100, 5, NEXT, 2);
    t.ring.setDesc(2, 0x10200, 4, NEXT | WRITE, 3);
    t.ring.setDesc(3, 0x10300, 2, WRITE);
    t.g.bytes.set([1, 2, 3], 0x10000);
    t.g.bytes.set([4, 5, 6, 7, 8], 0x10100);
    t.ring.publish(0);
    const c = new DescriptorChain();
    assert.equal(t.vq.pop(c), true);
    assert.equal(c.readable, 8);
    assert.equal(c.writable, 6);
    const dst = new Uint8Array(4);
    assert.equal(c.read(2, dst), 4, "a read crossing the segment boundary");
    assert.deepEqual([...dst], [3, 4, 5, 6]);
    assert.equal(c.read(6, new Uint8Array(10)), 2, "short at the end of the readable bytes");
    assert.equal(c.write(3, new Uint8Array([9, 9, 9])), 3);
    assert.deepEqual([...t.g.bytes.subarray(0x10203, 0x10204)], [9]);
    assert.deepEqual(
      [...t.g.bytes.subarray(0x10300, 0x10302)],
      [9, 9],
      "the write went on in the next segment",
    );
    const iov = new IoVecs(4);
    assert.equal(c.gather(iov, false, 1, 6), 6);
    assert.equal(iov.count, 2);
    assert.equal(iov.totalBytes, 6);
    const one = new IoVecs(1);
    assert.equal(c.gather(one, true, 0, 5), -1, "more segments than the iovec array holds");
    const status = c.lastWritable()!;
    assert.equal(status.offset, 0x10301);
    const seen: number[][] = [];
    c.segments(true, 1, 4, (_r, off, len) => void seen.push([off, len]));
    assert.deepEqual(seen, [[0x10201, 3], [0x10300, 1]]);
  } finally {
    t.done();
  }
});

Deno.test("descriptor chain without a device-writable tail has no status byte", () => {
  const t = setup();
  try {
    t.ring.setDesc(0, 0x10000, 16, 0);
    t.ring.publish(0);
    const c = new DescriptorChain();
    t.vq.pop(c);
    assert.equal(c.lastWritable(), null);
    assert.equal(c.write(0, new Uint8Array(4)), 0);
  } finally {
    t.done();
  }
});

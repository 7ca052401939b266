import assert from "node:assert/strict";
import { GuestMemory, GuestMemoryError } from "./guest_memory.ts";
import { TestGuest, USER_BASE } from "./_testing.ts";

Deno.test("guest memory translates guest-physical and front-end addresses into the same bytes", () => {
  const g = new TestGuest(1 << 16);
  const mem = new GuestMemory();
  try {
    mem.add({ guestAddr: 0x100000n, size: 1n << 16n, userAddr: USER_BASE, mmapOffset: 0n }, g.fd);
    g.bytes[0x123] = 0xab;
    const t = mem.translateGpa(0x100123n, 1);
    assert.equal(t.region.bytes[t.offset], 0xab);
    const u = mem.translateUser(USER_BASE + 0x123n, 1);
    assert.equal(u.offset, t.offset);
  } finally {
    mem.close();
    g.close();
  }
});

Deno.test("guest memory checks bounds at both ends and rejects overflowing addresses", () => {
  const g = new TestGuest(1 << 16);
  const mem = new GuestMemory();
  try {
    mem.add({ guestAddr: 0x10000n, size: 1n << 16n, userAddr: USER_BASE, mmapOffset: 0n }, g.fd);
    assert.equal(mem.translateGpa(0x10000n, 0x10000).offset, 0);
    assert.throws(() => mem.translateGpa(0x10000n, 0x10001), GuestMemoryError);
    assert.throws(() => mem.translateGpa(0xffffn, 2), /0xffff\+2 is not inside/);
    assert.throws(() => mem.translateGpa(0x1ffffn, 2), GuestMemoryError);
    assert.throws(() => mem.translateGpa(0xffff_ffff_ffff_fff0n, 0x20), GuestMemoryError);
    assert.throws(() => mem.translateGpa(-1n, 1), GuestMemoryError);
    assert.throws(() => mem.translateUser(USER_BASE - 1n, 1), GuestMemoryError);
    assert.throws(() => mem.translateUser(USER_BASE + 0x10000n, 1), GuestMemoryError);
    // The hot path: high half at or above 2^20 is refused before any arithmetic.
    assert.equal(mem.findGpa(0x10000, 0x100000, 1), null);
    assert.equal(mem.findGpa(0x10000, 0xffffffff, 1), null);
    assert.notEqual(mem.findGpa(0x10000, 0, 1), null);
  } finally {
    mem.close();
    g.close();
  }
});

Deno.test("guest memory honours mmap_offset that is not page aligned", () => {
  const g = new TestGuest(1 << 16);
  const mem = new GuestMemory();
  try {
    mem.add({ guestAddr: 0n, size: 0x1000n, userAddr: USER_BASE, mmapOffset: 0x1800n }, g.fd);
    g.bytes[0x1800 + 5] = 7;
    const t = mem.translateGpa(5n, 1);
    assert.equal(t.region.bytes[t.offset], 7);
  } finally {
    mem.close();
    g.close();
  }
});

Deno.test("guest memory rejects empty, overlapping and out-of-range regions", () => {
  const g = new TestGuest(1 << 16);
  const mem = new GuestMemory();
  try {
    assert.throws(
      () => mem.add({ guestAddr: 0n, size: 0n, userAddr: USER_BASE, mmapOffset: 0n }, g.fd),
      /size is 0/,
    );
    assert.throws(
      () =>
        mem.add(
          { guestAddr: 0xffff_ffff_ffff_0000n, size: 0x1000n, userAddr: USER_BASE, mmapOffset: 0n },
          g.fd,
        ),
      /beyond 2\^52/,
    );
    mem.add({ guestAddr: 0n, size: 0x8000n, userAddr: USER_BASE, mmapOffset: 0n }, g.fd);
    assert.throws(
      () =>
        mem.add({ guestAddr: 0x4000n, size: 0x8000n, userAddr: USER_BASE + 0x100000n, mmapOffset: 0n }, g.fd),
      /overlaps/,
    );
    assert.throws(
      () =>
        mem.add({ guestAddr: 0x100000n, size: 0x1000n, userAddr: USER_BASE + 0x7000n, mmapOffset: 0n }, g.fd),
      /uaddr .* overlaps/,
    );
    mem.add({ guestAddr: 0x8000n, size: 0x8000n, userAddr: USER_BASE + 0x8000n, mmapOffset: 0x8000n }, g.fd);
    assert.equal(mem.regions.length, 2);
    // A buffer crossing the boundary of two regions is not inside one region.
    assert.throws(() => mem.translateGpa(0x7ff0n, 0x20), GuestMemoryError);
    assert.ok(
      mem.remove({ guestAddr: 0x8000n, size: 0x8000n, userAddr: USER_BASE + 0x8000n, mmapOffset: 0n }),
    );
    assert.throws(() => mem.translateGpa(0x8000n, 1), GuestMemoryError);
  } finally {
    mem.close();
    g.close();
  }
});

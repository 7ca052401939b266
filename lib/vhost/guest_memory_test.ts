import assert from "node:assert/strict";
import { EventFd, ftruncate, listOpenFds, memfdCreate, pipe, sealSize, socketPair } from "../../ffi/mod.ts";
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

Deno.test("guest memory refuses an fd smaller than mmap_offset + size before mapping it (no SIGBUS later)", () => {
  const g = new TestGuest(1 << 16);
  const mem = new GuestMemory();
  const maps = () =>
    Deno.readTextFileSync("/proc/self/maps").split("\n").filter((l) => l.includes("test-guest")).length;
  const before = maps();
  try {
    assert.throws(
      () => mem.add({ guestAddr: 0n, size: 1n << 20n, userAddr: USER_BASE, mmapOffset: 0n }, g.fd),
      /the fd holds 65536 bytes, fewer than mmap_offset \+ size = 1048576/,
    );
    assert.throws(
      () => mem.add({ guestAddr: 0n, size: 0x8000n, userAddr: USER_BASE, mmapOffset: 0x9000n }, g.fd),
      /fewer than mmap_offset \+ size = 69632/,
    );
    assert.equal(mem.regions.length, 0);
    assert.equal(maps(), before, "nothing was mapped");
    mem.add({ guestAddr: 0n, size: 0x8000n, userAddr: USER_BASE, mmapOffset: 0x8000n }, g.fd); // exactly fits
  } finally {
    mem.close();
    g.close();
  }
});

Deno.test("guest memory refuses fds that are not memory files, naming what they are", () => {
  const mem = new GuestMemory();
  const ev = new EventFd();
  const [a, b] = socketPair();
  const [r, w] = pipe();
  const r0 = { guestAddr: 0n, size: 0x1000n, userAddr: USER_BASE, mmapOffset: 0n };
  try {
    assert.throws(() => mem.add(r0, ev.fd), /the fd is a eventfd, expected a memory file/);
    assert.throws(() => mem.add(r0, a.fd), /the fd is a socket, expected a memory file/);
    assert.throws(() => mem.add(r0, r), /the fd is a pipe, expected a memory file/);
    assert.equal(mem.regions.length, 0);
  } finally {
    for (const f of [ev.fd, a.fd, b.fd, r, w]) f.close();
    mem.close();
  }
});

Deno.test("guest memory refuses a region whose uaddr and mmap_offset disagree modulo 16", () => {
  const g = new TestGuest(1 << 16);
  const mem = new GuestMemory();
  try {
    assert.throws(
      () => mem.add({ guestAddr: 0n, size: 0x1000n, userAddr: USER_BASE, mmapOffset: 2n }, g.fd),
      /uaddr and mmap_offset differ modulo 16/,
    );
    mem.add({ guestAddr: 0n, size: 0x1000n, userAddr: USER_BASE + 0x10n, mmapOffset: 0x10n }, g.fd);
  } finally {
    mem.close();
    g.close();
  }
});

Deno.test("guest memory maps a 6 GiB region whole and translates addresses above 4 GiB", () => {
  const GiB = 2 ** 30;
  const g = new TestGuest(6 * GiB); // sparse: only touched pages cost memory
  const mem = new GuestMemory();
  try {
    const region = mem.add(
      { guestAddr: 1n << 32n, size: 6n << 30n, userAddr: USER_BASE, mmapOffset: 0n },
      g.fd,
    );
    assert.equal(region.size, 6 * GiB);
    assert.equal(region.bytes.length, 6 * GiB);
    g.bytes[5 * GiB + 7] = 0x5a;
    const t = mem.translateGpa((1n << 32n) + (5n << 30n) + 7n, 1);
    assert.equal(t.offset, 5 * GiB + 7);
    assert.equal(t.region.bytes[t.offset], 0x5a);
    assert.equal(t.region.view.getUint8(t.offset), 0x5a);
    t.region.u32[(5 * GiB + 1024) / 4] = 0xdeadbeef;
    assert.equal(g.view.getUint32(5 * GiB + 1024, true), 0xdeadbeef);
    assert.throws(() => mem.translateGpa((1n << 32n) + (6n << 30n) - 1n, 2), GuestMemoryError);
  } finally {
    mem.close();
    g.close();
  }
});

Deno.test("guest memory records whether a region's memfd is sealed against shrinking", () => {
  const sealed = memfdCreate("sealed-guest", { sealing: true });
  ftruncate(sealed, 0x10000);
  sealSize(sealed);
  const g = new TestGuest(0x10000);
  const mem = new GuestMemory();
  const fds = listOpenFds().length;
  try {
    const a = mem.add({ guestAddr: 0n, size: 0x10000n, userAddr: USER_BASE, mmapOffset: 0n }, sealed);
    const b = mem.add(
      { guestAddr: 0x10000n, size: 0x10000n, userAddr: USER_BASE + 0x10000n, mmapOffset: 0n },
      g.fd,
    );
    assert.equal(a.sealed, true);
    assert.equal(b.sealed, false);
    assert.equal(listOpenFds().length, fds, "the check opens no fd");
  } finally {
    mem.close();
    g.close();
    sealed.close();
  }
});

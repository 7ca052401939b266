import assert from "node:assert/strict";
import { pattern } from "../tests/helpers/pattern.ts";
import {
  CQE,
  IO_URING_PARAMS,
  IORING_FEAT_SINGLE_MMAP,
  IoUring,
  probeIoUring,
  SQE,
  supportsNowait,
} from "./io_uring.ts";
import { EventFd } from "./eventfd.ts";
import { IoVecs } from "./iovec.ts";
import { ftruncate, mapShared, memfdCreate, mkstempIn } from "./memory.ts";
import { OpenFlags, openPath, ownedFdCount } from "./fd.ts";
import { unlinkPath } from "./socket.ts";
import { ErrnoError } from "./errno.ts";

function reapAll(ring: IoUring): Map<number, number> {
  const out = new Map<number, number>();
  ring.reap((id, res) => out.set(id, res));
  return out;
}

Deno.test("io_uring struct layout matches linux/io_uring.h as compiled by gcc", {
  ignore: !gccAvailable(),
}, async () => {
  const src = `#include <linux/io_uring.h>
#include <stdio.h>
#include <stddef.h>
int main(void){printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\\n",
 sizeof(struct io_uring_params), offsetof(struct io_uring_params, sq_off), offsetof(struct io_uring_params, cq_off),
 offsetof(struct io_uring_params, features), sizeof(struct io_uring_sqe), offsetof(struct io_uring_sqe, off),
 offsetof(struct io_uring_sqe, addr), offsetof(struct io_uring_sqe, len), offsetof(struct io_uring_sqe, rw_flags),
 offsetof(struct io_uring_sqe, user_data), sizeof(struct io_uring_cqe), offsetof(struct io_uring_cqe, res),
 offsetof(struct io_uring_cqe, flags));return 0;}`;
  const dir = await Deno.makeTempDir({ prefix: "mpq-uring-layout-" });
  try {
    await Deno.writeTextFile(`${dir}/l.c`, src);
    const cc = await new Deno.Command("gcc", { args: [`${dir}/l.c`, "-o", `${dir}/l`] }).output();
    assert.equal(cc.code, 0, new TextDecoder().decode(cc.stderr));
    const run = await new Deno.Command(`${dir}/l`).output();
    const got = new TextDecoder().decode(run.stdout).trim().split(" ").map(Number);
    assert.deepEqual(got, [
      IO_URING_PARAMS.size,
      IO_URING_PARAMS.sqOff,
      IO_URING_PARAMS.cqOff,
      IO_URING_PARAMS.features,
      SQE.size,
      SQE.off,
      SQE.addr,
      SQE.len,
      SQE.rwFlags,
      SQE.userData,
      CQE.size,
      CQE.res,
      CQE.flags,
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

function gccAvailable(): boolean {
  try {
    return new Deno.Command("gcc", { args: ["--version"], stdout: "null", stderr: "null" }).outputSync()
      .success;
  } catch {
    return false;
  }
}

Deno.test("IoUring.create reports the sizes the kernel chose (params offsets read back)", () => {
  using ring = IoUring.create(8);
  assert.equal(ring.sqEntries, 8);
  assert.equal(ring.cqEntries, 16);
  assert.notEqual(ring.features & IORING_FEAT_SINGLE_MMAP, 0);
  assert.equal(ring.sqSpace, 8);
  assert.equal(ring.cqReady, 0);
  using big = IoUring.create(5, { cqEntries: 100 });
  assert.equal(big.sqEntries, 8, "entries are rounded up to a power of two");
  assert.equal(big.cqEntries, 128);
});

Deno.test("IoUring.create rejects bad sizes", () => {
  assert.throws(() => IoUring.create(0), /entries must be 1\.\.32768: got 0/);
  assert.throws(() => IoUring.create(1.5), RangeError);
  assert.throws(() => IoUring.create(8, { cqEntries: 4 }), /cqEntries must be an integer >= entries/);
});

Deno.test("IoUring readv fills mapped memory from a memfd", () => {
  const before = ownedFdCount();
  using file = memfdCreate("uring-src");
  ftruncate(file, 16384);
  using fileMap = mapShared(file, 16384);
  const data = pattern(16384, 42);
  fileMap.bytes.set(data);
  using guest = memfdCreate("uring-guest");
  ftruncate(guest, 65536);
  using mem = mapShared(guest, 65536);
  using ring = IoUring.create(8);
  const iov = new IoVecs(4);
  iov.push(mem, 4096, 1000); // split across three buffers
  iov.push(mem, 20000, 3000);
  iov.push(mem, 40000, 4192);
  assert.equal(ring.prepReadv(file, iov, 4096, 77), true);
  assert.equal(ring.sqSpace, 7);
  assert.equal(ring.submit(), 1);
  ring.wait(1);
  const got = reapAll(ring);
  assert.deepEqual([...got], [[77, 8192]]);
  assert.deepEqual(mem.bytes.subarray(4096, 5096), data.subarray(4096, 5096));
  assert.deepEqual(mem.bytes.subarray(20000, 23000), data.subarray(5096, 8096));
  assert.deepEqual(mem.bytes.subarray(40000, 44192), data.subarray(8096, 12288));
  assert.equal(mem.bytes[4095], 0);
  assert.equal(ring.cqReady, 0);
  ring.close();
  mem.close();
  fileMap.close();
  guest.close();
  file.close();
  assert.equal(ownedFdCount(), before);
});

Deno.test("IoUring writev, fsync and fdatasync on a real file", () => {
  const { fd: file, path } = mkstempIn("/tmp", "mpq-uring-");
  try {
    using guest = memfdCreate("uring-guest");
    ftruncate(guest, 8192);
    using mem = mapShared(guest, 8192);
    const data = pattern(8192, 7);
    mem.bytes.set(data);
    using ring = IoUring.create(4);
    const iov = new IoVecs(2);
    iov.push(mem, 4096, 4096);
    iov.push(mem, 0, 512);
    assert.equal(ring.prepWritev(file, iov, 1 << 20, 1), true);
    assert.equal(ring.prepFsync(file, 2), true);
    assert.equal(ring.prepFsync(file, 3, { datasync: true }), true);
    assert.equal(ring.prepNop(2 ** 40 + 5), true, "user_data above 32 bits");
    ring.submit();
    ring.wait(4);
    const got = reapAll(ring);
    assert.equal(got.get(1), 4608);
    assert.equal(got.get(3), 0);
    assert.equal(got.get(2 ** 40 + 5), 0);
    assert.equal(got.size, 4, `completions: ${JSON.stringify([...got])}`);
    const back = Deno.readFileSync(path);
    assert.equal(back.length, (1 << 20) + 4608);
    assert.deepEqual(back.subarray(1 << 20, (1 << 20) + 4096), data.subarray(4096));
    assert.deepEqual(back.subarray((1 << 20) + 4096), data.subarray(0, 512));
  } finally {
    file.close();
    unlinkPath(path);
  }
});

Deno.test("IoUring reports a failed operation as a negative errno in the CQE", () => {
  using ev = new EventFd();
  using guest = memfdCreate("uring-guest");
  ftruncate(guest, 4096);
  using mem = mapShared(guest, 4096);
  using ring = IoUring.create(4);
  const iov = new IoVecs(1);
  iov.push(mem, 0, 4); // an eventfd read needs 8 bytes: EINVAL
  ring.prepReadv(ev.fd, iov, 0, 9);
  ring.submit();
  ring.wait(1);
  assert.deepEqual([...reapAll(ring)], [[9, -22]]);
  assert.throws(() => ring.prepNop(-1), /user_data must be a non-negative safe integer: got -1/);
  assert.throws(
    () => ring.prepReadv(ev.fd, iov, -4, 1),
    /offset must be a non-negative safe integer: got -4/,
  );
});

Deno.test("IoUring keeps many reads in flight, bounded by the CQ size, with every result correct", () => {
  const blocks = 512;
  using file = memfdCreate("uring-many");
  ftruncate(file, blocks * 4096);
  using fileMap = mapShared(file, blocks * 4096);
  const data = pattern(blocks * 4096, 99);
  fileMap.bytes.set(data);
  using guest = memfdCreate("uring-guest");
  ftruncate(guest, blocks * 4096);
  using mem = mapShared(guest, blocks * 4096);
  using ring = IoUring.create(32);
  const iovs = Array.from({ length: blocks }, (_, i) => {
    const v = new IoVecs(1);
    // Reverse order: block i of the file lands at block (blocks-1-i) of memory.
    v.push(mem, (blocks - 1 - i) * 4096, 4096);
    return v;
  });
  let next = 0;
  let inFlight = 0;
  const results = new Array<number>(blocks).fill(-1);
  let maxInFlight = 0;
  while (next < blocks || inFlight > 0) {
    while (next < blocks && inFlight < ring.cqEntries && ring.sqSpace > 0) {
      assert.equal(ring.prepReadv(file, iovs[next], next * 4096, next), true);
      next++;
      inFlight++;
    }
    maxInFlight = Math.max(maxInFlight, inFlight);
    ring.submit();
    ring.wait(1);
    inFlight -= ring.reap((id, res) => {
      results[id] = res;
    });
  }
  assert.equal(ring.cqOverflow, 0);
  assert.ok(maxInFlight >= 32, `max in flight ${maxInFlight}`);
  assert.ok(results.every((r) => r === 4096), `results: ${results.filter((r) => r !== 4096).length} wrong`);
  for (let i = 0; i < blocks; i += 37) {
    assert.deepEqual(
      mem.bytes.subarray((blocks - 1 - i) * 4096, (blocks - i) * 4096),
      data.subarray(i * 4096, (i + 1) * 4096),
    );
  }
});

Deno.test("IoUring prep returns false when the SQ ring is full", () => {
  using ring = IoUring.create(4);
  for (let i = 0; i < 4; i++) assert.equal(ring.prepNop(i), true);
  assert.equal(ring.sqSpace, 0);
  assert.equal(ring.prepNop(4), false);
  assert.equal(ring.unsubmitted, 4);
  ring.submit();
  assert.equal(ring.unsubmitted, 0);
  assert.equal(ring.sqSpace, 4);
  ring.wait(4);
  assert.equal(ring.reap(() => {}, 2), 2, "reap honours max");
  assert.equal(ring.reap(() => {}), 2);
});

Deno.test("IoUring signals a registered eventfd on completion unless disabled", () => {
  using ev = new EventFd();
  using ring = IoUring.create(4);
  ring.registerEventFd(ev);
  ring.prepNop(1);
  ring.submit();
  ring.wait(1);
  assert.ok(ev.drain() >= 1n, "eventfd signalled");
  assert.equal(ring.reap(() => {}), 1);
  ring.eventFdEnabled = false;
  assert.equal(ring.eventFdEnabled, false);
  ring.prepNop(2);
  ring.submit();
  ring.wait(1);
  assert.equal(ev.drain(), 0n, "no signal while disabled");
  assert.equal(ring.reap(() => {}), 1);
  ring.eventFdEnabled = true;
  ring.unregisterEventFd();
  ring.prepNop(3);
  ring.submit();
  ring.wait(1);
  assert.equal(ev.drain(), 0n, "no signal after unregister");
});

Deno.test("probeIoUring reports io_uring working on this kernel", () => {
  const p = probeIoUring();
  assert.equal(p.ok, true, JSON.stringify(p));
  assert.equal(probeIoUring(), p, "cached");
});

Deno.test("IoUring.close is idempotent and releases the ring fd", () => {
  const before = ownedFdCount();
  const ring = IoUring.create(4);
  assert.equal(ownedFdCount(), before + 1);
  ring.close();
  ring.close();
  assert.equal(ring.closed, true);
  assert.equal(ownedFdCount(), before);
  assert.throws(() => ring.prepNop(1) && ring.submit(), ErrnoError);
});

Deno.test("supportsNowait agrees with preadv2(RWF_NOWAIT) from C on /dev/shm and /tmp files", {
  ignore: !gccAvailable(),
}, async () => {
  const src = `#define _GNU_SOURCE
#include <sys/uio.h>
#include <fcntl.h>
#include <stdio.h>
#include <errno.h>
int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    int fd = open(argv[i], O_RDWR); char b; struct iovec v = { &b, 1 };
    if (fd < 0) return 2;
    printf("%d\\n", !(preadv2(fd, &v, 1, 0, RWF_NOWAIT) < 0 && errno == EOPNOTSUPP));
  }
  return 0;
}`;
  const dir = await Deno.makeTempDir({ prefix: "mpq-nowait-" });
  const shm = `/dev/shm/mpq-nowait-${Deno.pid}`;
  try {
    await Deno.writeTextFile(`${dir}/n.c`, src);
    const cc = await new Deno.Command("gcc", { args: [`${dir}/n.c`, "-o", `${dir}/n`] }).output();
    assert.equal(cc.code, 0, new TextDecoder().decode(cc.stderr));
    const paths = [shm, `${dir}/disk`];
    for (const p of paths) await Deno.writeFile(p, new Uint8Array(4096));
    const run = await new Deno.Command(`${dir}/n`, { args: paths }).output();
    assert.equal(run.code, 0);
    const expected = new TextDecoder().decode(run.stdout).trim().split("\n").map((x) => x === "1");
    const got = paths.map((p) => {
      using fd = openPath(p, OpenFlags.O_RDWR);
      return supportsNowait(fd);
    });
    assert.deepEqual(got, expected);
  } finally {
    await Deno.remove(shm).catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});

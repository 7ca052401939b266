import assert from "node:assert/strict";
import { pattern } from "../tests/helpers/pattern.ts";
import {
  Errno,
  ErrnoError,
  ftruncate,
  IoVecs,
  isDirectIo,
  mapShared,
  memfdCreate,
  mkstempIn,
  OpenFlags,
  openPath,
  probeVmCopy,
  unlinkPath,
  vmReadSelf,
  vmWriteSelf,
} from "./mod.ts";

Deno.test("probeVmCopy reports that process_vm_readv of our own pid works here", () => {
  assert.deepEqual(probeVmCopy(), { ok: true });
});

Deno.test("vmReadSelf gathers remote ranges into scattered local buffers in order", () => {
  using fd = memfdCreate("vmcopy");
  ftruncate(fd, 16384);
  using map = mapShared(fd, 16384);
  map.bytes.set(pattern(8192, 3));
  const local = new IoVecs(4);
  local.push(map, 8192, 100);
  local.push(map, 12288, 3000);
  const remote = new IoVecs(2);
  remote.push(map, 0, 1000);
  remote.push(map, 5000, 2100);
  assert.equal(vmReadSelf(local, remote), 3100);
  const want = new Uint8Array([...map.bytes.subarray(0, 1000), ...map.bytes.subarray(5000, 7100)]);
  const got = new Uint8Array([...map.bytes.subarray(8192, 8292), ...map.bytes.subarray(12288, 15288)]);
  assert.deepEqual(got, want);
});

Deno.test("vmWriteSelf scatters local buffers into remote ranges, and IoVecs.append joins arrays", () => {
  using fd = memfdCreate("vmcopy");
  ftruncate(fd, 16384);
  using map = mapShared(fd, 16384);
  map.bytes.set(pattern(4096, 9));
  const a = new IoVecs(2);
  a.push(map, 0, 10);
  a.push(map, 100, 20);
  const b = new IoVecs(1);
  b.push(map, 1000, 30);
  const local = new IoVecs(3);
  local.append(a);
  local.append(b);
  assert.equal(local.count, 3);
  assert.equal(local.totalBytes, 60);
  const remote = new IoVecs(1);
  remote.push(map, 8192, 60);
  assert.equal(vmWriteSelf(local, remote), 60);
  const want = new Uint8Array([
    ...map.bytes.subarray(0, 10),
    ...map.bytes.subarray(100, 120),
    ...map.bytes.subarray(1000, 1030),
  ]);
  assert.deepEqual(map.bytes.slice(8192, 8252), want);
  assert.throws(() => local.append(b), /iovec array has room for 0 more entries: got 1/);
});

Deno.test("vmReadSelf stops short at a truncated file page and throws EFAULT when nothing was copied", () => {
  using fd = memfdCreate("vmcopy");
  ftruncate(fd, 8192);
  using map = mapShared(fd, 8192);
  using dstFd = memfdCreate("dst");
  ftruncate(dstFd, 8192);
  using dst = mapShared(dstFd, 8192);
  map.bytes.set(pattern(8192, 5));
  const first = map.bytes.slice(0, 4096);
  ftruncate(fd, 4096); // page 1 of the mapping is now past end of file: touching it would SIGBUS
  const local = new IoVecs(1);
  local.push(dst, 0, 8192);
  const remote = new IoVecs(1);
  remote.push(map, 0, 8192);
  assert.equal(vmReadSelf(local, remote), 4096);
  assert.deepEqual(dst.bytes.slice(0, 4096), first);
  const tail = new IoVecs(1);
  tail.push(map, 4096, 4096);
  assert.throws(
    () => vmReadSelf(local, tail),
    (e) => e instanceof ErrnoError && e.errno === Errno.EFAULT && e.syscall === "process_vm_readv",
  );
  assert.throws(
    () => vmWriteSelf(local, tail),
    (e) => e instanceof ErrnoError && e.errno === Errno.EFAULT && e.syscall === "process_vm_writev",
  );
});

Deno.test("isDirectIo tells O_DIRECT files apart", () => {
  using mem = memfdCreate("plain");
  assert.equal(isDirectIo(mem), false);
  const { fd, path } = mkstempIn("/tmp", "mpq-vmcopy-");
  try {
    assert.equal(isDirectIo(fd), false);
    let direct;
    try {
      direct = openPath(path, OpenFlags.O_RDWR | OpenFlags.O_DIRECT);
    } catch (e) {
      // A filesystem without O_DIRECT (tmpfs before 6.6) refuses the open: nothing to check then.
      if (!(e instanceof ErrnoError) || e.errno !== Errno.EINVAL) throw e;
      return;
    }
    assert.equal(isDirectIo(direct), true);
    direct.close();
  } finally {
    fd.close();
    unlinkPath(path);
  }
});

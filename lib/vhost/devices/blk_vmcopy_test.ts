import assert from "node:assert/strict";
import { pattern } from "../../../tests/helpers/pattern.ts";
import {
  ftruncate,
  IoVecs,
  type MappedRegion,
  mapShared,
  memfdCreate,
  mkstempIn,
  OpenFlags,
  openPath,
  type OwnedFd,
  Reactor,
  unlinkPath,
} from "../../../ffi/mod.ts";
import { type BlkIoRequest, createEngine, SyncEngine } from "./blk_io.ts";
import { VmCopyEngine, vmCopyUsable } from "./blk_vmcopy.ts";

/** A memfd backing file (tmpfs, like /dev/shm) and memfd "guest memory"; closed by close(). */
class Fixture {
  readonly file: OwnedFd;
  readonly fileMap: MappedRegion;
  readonly guestFd: OwnedFd;
  readonly mem: MappedRegion;

  constructor(fileSize: number, memSize: number) {
    this.file = memfdCreate("disk");
    ftruncate(this.file, fileSize);
    this.fileMap = mapShared(this.file, fileSize);
    this.guestFd = memfdCreate("guest");
    ftruncate(this.guestFd, memSize);
    this.mem = mapShared(this.guestFd, memSize);
  }

  iov(offset: number, len: number, pieces = 1): IoVecs {
    const v = new IoVecs(pieces);
    const step = Math.floor(len / pieces);
    for (let i = 0; i < pieces; i++) {
      v.push(this.mem, offset + i * step, i === pieces - 1 ? len - step * (pieces - 1) : step);
    }
    return v;
  }

  close(): void {
    this.mem.close();
    this.guestFd.close();
    this.fileMap.close();
    this.file.close();
  }
}

/** Queues every request, submits once (completions are inline), returns their results in order. */
function run(engine: VmCopyEngine | SyncEngine, reqs: Array<Omit<BlkIoRequest, "done">>): number[] {
  const results: number[] = new Array(reqs.length).fill(NaN);
  reqs.forEach((r, i) => engine.queue({ ...r, done: (n) => void (results[i] = n) }));
  assert.equal(engine.pending, reqs.length);
  engine.submit();
  assert.equal(engine.pending, 0);
  return results;
}

Deno.test("VmCopyEngine reads a batch of scattered requests from the file into guest memory", () => {
  const fx = new Fixture(1 << 20, 1 << 20);
  const engine = VmCopyEngine.open(fx.file);
  try {
    assert.equal(engine.name, "vmcopy");
    fx.fileMap.bytes.set(pattern(1 << 20, 11));
    const reqs: Array<Omit<BlkIoRequest, "done">> = [];
    for (let i = 0; i < 48; i++) {
      const len = 512 * (1 + (i * 5) % 9);
      reqs.push({ op: "read", offset: ((i * 61) % 200) * 4096, iov: fx.iov(i * 16384, len, 1 + (i % 4)) });
    }
    const results = run(engine, reqs);
    assert.deepEqual(results, reqs.map((r) => r.iov.totalBytes));
    reqs.forEach((r, i) => {
      const len = r.iov.totalBytes;
      assert.deepEqual(
        fx.mem.bytes.slice(i * 16384, i * 16384 + len),
        fx.fileMap.bytes.slice(r.offset, r.offset + len),
        `request ${i}`,
      );
    });
  } finally {
    engine.close();
    fx.close();
  }
});

Deno.test("VmCopyEngine writes, flushes and reads back like SyncEngine, over more than IOV_MAX iovecs", () => {
  const fx = new Fixture(1 << 20, 2 << 20);
  const other = memfdCreate("other");
  ftruncate(other, 1 << 20);
  const engine = VmCopyEngine.open(fx.file);
  const sync = new SyncEngine(other);
  try {
    fx.mem.bytes.set(pattern(2 << 20, 21));
    const reqs: Array<Omit<BlkIoRequest, "done">> = [];
    // 40 requests of 30 segments: 1200 local iovecs, so at least two system calls.
    for (let i = 0; i < 40; i++) {
      reqs.push({ op: "write", offset: i * 16384, iov: fx.iov(i * 32768, 15360, 30) });
      if (i === 20) reqs.push({ op: "flush", offset: 0, iov: new IoVecs(1) });
    }
    const a = run(engine, reqs);
    const b = run(sync, reqs);
    assert.deepEqual(a, b);
    assert.equal(a[21], 0, "the flush");
    const viaSync = mapShared(other, 1 << 20);
    assert.deepEqual(fx.fileMap.bytes.slice(), viaSync.bytes.slice());
    viaSync.close();
    // Read everything back into a fresh part of guest memory with the engine.
    const back = run(engine, [{ op: "read", offset: 0, iov: fx.iov(1 << 20, 1 << 20, 64) }]);
    assert.deepEqual(back, [1 << 20]);
    assert.deepEqual(fx.mem.bytes.slice(1 << 20), fx.fileMap.bytes.slice());
  } finally {
    engine.close();
    sync.close();
    other.close();
    fx.close();
  }
});

Deno.test("VmCopyEngine survives a file truncated under it: no SIGBUS, short reads from the end", () => {
  const fx = new Fixture(64 * 1024, 256 * 1024);
  const engine = VmCopyEngine.open(fx.file);
  try {
    fx.fileMap.bytes.set(pattern(64 * 1024, 31));
    const head = fx.fileMap.bytes.slice(0, 8192);
    ftruncate(fx.file, 16384); // the last 48 KiB of the mapping now fault
    const results = run(engine, [
      { op: "read", offset: 0, iov: fx.iov(0, 8192, 2) },
      { op: "read", offset: 12288, iov: fx.iov(16384, 8192) }, // straddles the new end of file
      { op: "read", offset: 32768, iov: fx.iov(32768, 4096) }, // wholly past it
      { op: "read", offset: 4096, iov: fx.iov(65536, 4096) }, // after the faults: still copied
    ]);
    assert.deepEqual(results, [8192, 4096, 0, 4096]);
    assert.deepEqual(fx.mem.bytes.slice(0, 8192), head);
    assert.deepEqual(fx.mem.bytes.slice(65536, 65536 + 4096), head.slice(4096));
  } finally {
    engine.close();
    fx.close();
  }
});

Deno.test("VmCopyEngine completes every request when a done() callback throws, then rethrows", () => {
  const fx = new Fixture(64 * 1024, 64 * 1024);
  const engine = VmCopyEngine.open(fx.file);
  try {
    const seen: number[] = [];
    engine.queue({ op: "read", offset: 0, iov: fx.iov(0, 4096), done: () => void seen.push(0) });
    engine.queue({
      op: "read",
      offset: 4096,
      iov: fx.iov(4096, 4096),
      done: () => {
        seen.push(1);
        throw new Error("callback failed");
      },
    });
    engine.queue({ op: "read", offset: 8192, iov: fx.iov(8192, 4096), done: () => void seen.push(2) });
    assert.throws(() => engine.submit(), /callback failed/);
    assert.deepEqual(seen, [0, 1, 2]);
    assert.equal(engine.pending, 0);
  } finally {
    engine.close();
    fx.close();
  }
});

Deno.test("vmCopyUsable and VmCopyEngine.open refuse sizes that are not whole pages and O_DIRECT files", () => {
  using odd = memfdCreate("odd");
  ftruncate(odd, 4096 + 512);
  assert.deepEqual(vmCopyUsable(odd), {
    ok: false,
    reason: `${odd.label} is 4608 bytes: expected a non-zero multiple of 4096`,
  });
  assert.throws(() => VmCopyEngine.open(odd), /vmcopy engine cannot serve .*4608 bytes/);
  const { fd, path } = mkstempIn("/tmp", "mpq-vmcopy-");
  try {
    ftruncate(fd, 8192);
    assert.deepEqual(vmCopyUsable(fd), { ok: true, size: 8192 });
    let direct: OwnedFd | undefined;
    try {
      direct = openPath(path, OpenFlags.O_RDWR | OpenFlags.O_DIRECT);
    } catch {
      // No O_DIRECT on this filesystem: nothing more to check.
    }
    if (direct) {
      const usable = vmCopyUsable(direct);
      assert.equal(usable.ok, false);
      assert.match((usable as { reason: string }).reason, /O_DIRECT/);
      direct.close();
    }
  } finally {
    fd.close();
    unlinkPath(path);
  }
});

Deno.test("createEngine builds vmcopy only on request; auto never picks it", () => {
  using reactor = new Reactor();
  using file = memfdCreate("x");
  ftruncate(file, 8192);
  const vm = createEngine(file, reactor, { engine: "vmcopy" });
  assert.ok(vm instanceof VmCopyEngine);
  vm.close();
  const auto = createEngine(file, reactor);
  assert.notEqual(auto.name, "vmcopy");
  auto.close();
  using empty = memfdCreate("empty");
  assert.throws(() => createEngine(empty, reactor, { engine: "vmcopy" }), /0 bytes: expected a non-zero/);
});

Deno.test("VmCopyEngine reads holes of a sparse file as zeros", () => {
  const fx = new Fixture(64 * 1024, 64 * 1024);
  const engine = VmCopyEngine.open(fx.file);
  try {
    fx.mem.bytes.fill(0xee);
    assert.deepEqual(run(engine, [{ op: "read", offset: 8192, iov: fx.iov(0, 16384, 3) }]), [16384]);
    assert.deepEqual(fx.mem.bytes.slice(0, 16384), new Uint8Array(16384));
    assert.equal(fx.mem.bytes[16384], 0xee, "nothing past the request");
  } finally {
    engine.close();
    fx.close();
  }
});

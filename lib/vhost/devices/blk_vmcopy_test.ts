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
import type { BlkIoRequest } from "./blk_engine.ts";
import { createEngine, resolveEngine } from "./blk_engines.ts";
import { PreadvEngine } from "./blk_preadv.ts";
import { VmCopyEngine, VmCopyFile, vmCopyUsable } from "./blk_vmcopy.ts";

/** st_blocks of `fd` in bytes. */
function fstatBlocks(fd: OwnedFd): number {
  return (Deno.statSync(`/proc/self/fd/${fd.unsafeFd}`).blocks ?? NaN) * 512;
}

/** A memfd backing file (tmpfs, like /dev/shm) and memfd "guest memory"; closed by close(). */
class Fixture {
  readonly file: OwnedFd;
  readonly fileMap: MappedRegion;
  readonly guestFd: OwnedFd;
  readonly mem: MappedRegion;

  /** `fill`: file contents written before any engine opens it (so its pages count as allocated). */
  constructor(fileSize: number, memSize: number, fill?: Uint8Array) {
    this.file = memfdCreate("disk");
    ftruncate(this.file, fileSize);
    this.fileMap = mapShared(this.file, fileSize);
    if (fill) this.fileMap.bytes.set(fill);
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
function run(engine: VmCopyEngine | PreadvEngine, reqs: Array<Omit<BlkIoRequest, "done">>): number[] {
  const results: number[] = new Array(reqs.length).fill(NaN);
  reqs.forEach((r, i) => engine.queue({ ...r, done: (n) => void (results[i] = n) }));
  assert.equal(engine.pending, reqs.length);
  engine.submit();
  assert.equal(engine.pending, 0);
  return results;
}

Deno.test("VmCopyEngine reads a batch of scattered requests from the file into guest memory", () => {
  const fx = new Fixture(1 << 20, 1 << 20, pattern(1 << 20, 11));
  const engine = VmCopyEngine.open(fx.file);
  try {
    assert.equal(engine.name, "vmcopy");
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
    assert.equal(engine.copyCalls, 1, "the whole batch in one process_vm_readv");
    assert.equal(engine.syncRequests, 0);
  } finally {
    engine.close();
    fx.close();
  }
});

Deno.test("VmCopyEngine writes, flushes and reads back like PreadvEngine, over more than IOV_MAX iovecs", () => {
  const fx = new Fixture(1 << 20, 2 << 20);
  const other = memfdCreate("other");
  ftruncate(other, 1 << 20);
  const engine = VmCopyEngine.open(fx.file);
  const sync = new PreadvEngine(other);
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
  const fx = new Fixture(64 * 1024, 256 * 1024, pattern(64 * 1024, 31));
  const engine = VmCopyEngine.open(fx.file);
  try {
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
    assert.ok(engine.copyCalls >= 2, `copies resumed after the fault (${engine.copyCalls} calls)`);
    assert.ok(engine.syncRequests >= 1, "the faulting request was redone with preadv");
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

Deno.test("resolveEngine: auto picks vmcopy for a tmpfs file (and says why); a forced vmcopy is checked", () => {
  using reactor = new Reactor();
  using file = memfdCreate("x");
  ftruncate(file, 8192);
  const choice = resolveEngine(file, "auto");
  assert.equal(choice.kind, "vmcopy");
  assert.match(choice.reason, /^tmpfs file, /);
  for (const [engine, name] of [["auto", "vmcopy"], ["vmcopy", "vmcopy"], ["preadv", "preadv"]] as const) {
    const e = createEngine(file, reactor, resolveEngine(file, engine).kind);
    assert.equal(e.name, name, engine);
    e.close();
  }
  using empty = memfdCreate("empty");
  assert.throws(() => resolveEngine(empty, "vmcopy"), /engine vmcopy: .*0 bytes: expected a non-zero/);
  assert.equal(
    resolveEngine(empty, "auto").kind,
    "preadv",
    "auto falls back when vmcopy cannot serve the file",
  );
  assert.match(resolveEngine(empty, "auto").reason, /vmcopy cannot serve it: .*0 bytes/);
});

Deno.test("VmCopyFile on tmpfs tracks allocation: reads of holes go through preadv and allocate nothing", () => {
  const fx = new Fixture(256 * 1024, 64 * 1024);
  fx.fileMap.bytes.fill(0x5a, 64 * 1024, 72 * 1024); // two pages of data before the engine opens
  const vm = VmCopyFile.open(fx.file);
  const engine = new VmCopyEngine(vm);
  const blocks = () => fstatBlocks(fx.file);
  try {
    assert.ok(vm.alloc, "tmpfs files get an allocation map");
    assert.equal(vm.alloc.unknownPages, 64 - 2, "seeded from SEEK_DATA/SEEK_HOLE");
    assert.equal(blocks(), 8192);
    fx.mem.bytes.fill(0xee);
    assert.deepEqual(
      run(engine, [
        { op: "read", offset: 0, iov: fx.iov(0, 16384, 2) },
        { op: "read", offset: 64 * 1024, iov: fx.iov(16384, 8192) },
        { op: "read", offset: 60 * 1024, iov: fx.iov(24576, 8192) },
      ]),
      [16384, 8192, 8192],
    );
    assert.deepEqual(fx.mem.bytes.slice(0, 16384), new Uint8Array(16384));
    assert.deepEqual(fx.mem.bytes.slice(16384, 24576), new Uint8Array(8192).fill(0x5a));
    assert.deepEqual(
      fx.mem.bytes.slice(24576, 28672),
      new Uint8Array(4096),
      "hole half of a straddling read",
    );
    assert.equal(blocks(), 8192, "no hole was allocated by reading it");
    // Writes mark their pages; discards (deallocated) unmark them.
    fx.mem.bytes.fill(0x11, 0, 4096);
    assert.deepEqual(run(engine, [{ op: "write", offset: 128 * 1024 + 100, iov: fx.iov(0, 512) }]), [512]);
    assert.equal(vm.alloc.allocated(128 * 1024, 4096), true, "the whole page of a partial write");
    vm.deallocated(64 * 1024, 4096);
    assert.equal(vm.alloc.allocated(64 * 1024, 4096), false);
    assert.equal(vm.alloc.allocated(68 * 1024, 4096), true);
  } finally {
    engine.close();
    vm.close();
    fx.close();
  }
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

Deno.test("VmCopyEngine shares big batches with the helper thread: every request lands where it belongs", async () => {
  const fx = new Fixture(4 << 20, 4 << 20, pattern(4 << 20, 41));
  const vm = VmCopyFile.open(fx.file);
  const engine = new VmCopyEngine(vm);
  try {
    const helper = vm.helper()!;
    const deadline = Date.now() + 10_000;
    while (!helper.ready) {
      if (Date.now() > deadline) throw new Error("helper thread did not start");
      await new Promise((r) => setTimeout(r, 5));
    }
    // Batches of 16 reads (2 segments each), then 16 writes, until the helper has done some.
    // (The helper takes a job only when it is awake and quick enough: on a loaded machine that
    // may take many rounds.)
    const until = Date.now() + 30_000;
    for (let round = 0; Date.now() < until && engine.helperCalls < 3; round++) {
      fx.mem.bytes.fill(0);
      const reqs: Array<Omit<BlkIoRequest, "done">> = [];
      for (let i = 0; i < 16; i++) {
        const off = (((round * 16 + i) * 97) % 1000) * 4096;
        reqs.push({ op: "read", offset: off, iov: fx.iov(i * 16384, 8192, 2) });
      }
      assert.deepEqual(run(engine, reqs), reqs.map(() => 8192));
      reqs.forEach((r, i) => {
        assert.deepEqual(
          fx.mem.bytes.slice(i * 16384, i * 16384 + 8192),
          fx.fileMap.bytes.slice(r.offset, r.offset + 8192),
          `round ${round} read ${i}`,
        );
      });
      fx.mem.bytes.set(pattern(16 * 16384, 1000 + round));
      const writes: Array<Omit<BlkIoRequest, "done">> = [];
      for (let i = 0; i < 16; i++) {
        writes.push({
          op: "write",
          offset: (2048 + ((round * 16 + i) % 400) * 8) * 512,
          iov: fx.iov(i * 16384, 4096),
        });
      }
      assert.deepEqual(run(engine, writes), writes.map(() => 4096));
      writes.forEach((w, i) => {
        assert.deepEqual(
          fx.fileMap.bytes.slice(w.offset, w.offset + 4096),
          fx.mem.bytes.slice(i * 16384, i * 16384 + 4096),
          `round ${round} write ${i}`,
        );
      });
    }
    assert.ok(engine.helperCalls >= 3, `the helper copied ${engine.helperCalls} half-batches`);
    assert.equal(engine.syncRequests, 0);
  } finally {
    engine.close();
    vm.close();
    fx.close();
  }
});

Deno.test("VmCopyFile: all devices of a process share one helper thread, closed with the last of them", () => {
  using a = memfdCreate("a");
  using b = memfdCreate("b");
  ftruncate(a, 8192);
  ftruncate(b, 8192);
  const va = VmCopyFile.open(a);
  const vb = VmCopyFile.open(b);
  const ha = va.helper();
  const hb = vb.helper();
  assert.ok(ha !== null && ha === hb, "one helper for both");
  va.close();
  const vc = VmCopyFile.open(b);
  assert.equal(vc.helper(), hb, "still the same helper while one user is left");
  vb.close();
  vc.close();
  const vd = VmCopyFile.open(a);
  const hd = vd.helper();
  assert.ok(hd !== null && hd !== ha, "a new helper once every user had closed");
  vd.close();
});

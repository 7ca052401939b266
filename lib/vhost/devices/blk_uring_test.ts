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
  ownedFdCount,
  Reactor,
  socketPair,
  supportsNowait,
  unlinkPath,
} from "../../../ffi/mod.ts";
import type { BlkIoEngine, BlkIoRequest } from "./blk_engine.ts";
import { parseEngineChoice } from "./blk_engine.ts";
import { createEngine, resolveEngine } from "./blk_engines.ts";
import { PreadvEngine } from "./blk_preadv.ts";
import { UringEngine } from "./blk_uring.ts";

/** A running reactor, a temp file and memfd "guest memory"; everything released by close(). */
class Fixture {
  readonly reactor = new Reactor();
  readonly running: Promise<void>;
  readonly file: OwnedFd;
  readonly path: string;
  readonly guestFd: OwnedFd;
  readonly mem: MappedRegion;

  constructor(fileSize: number, memSize: number) {
    const { fd, path } = mkstempIn("/tmp", "mpq-blk-uring-");
    this.file = fd;
    this.path = path;
    ftruncate(fd, fileSize);
    this.guestFd = memfdCreate("guest");
    ftruncate(this.guestFd, memSize);
    this.mem = mapShared(this.guestFd, memSize);
    this.running = this.reactor.run();
  }

  iov(offset: number, len: number, pieces = 1): IoVecs {
    const v = new IoVecs(pieces);
    const step = Math.floor(len / pieces);
    for (let i = 0; i < pieces; i++) {
      v.push(this.mem, offset + i * step, i === pieces - 1 ? len - step * (pieces - 1) : step);
    }
    return v;
  }

  async close(): Promise<void> {
    this.reactor.stop();
    await this.running;
    this.reactor.close();
    this.mem.close();
    this.guestFd.close();
    this.file.close();
    unlinkPath(this.path);
  }
}

/** Queues every request, submits once, resolves with their results in order. */
function run(engine: BlkIoEngine, reqs: Array<Omit<BlkIoRequest, "done">>): Promise<number[]> {
  const results = new Array<number>(reqs.length);
  let left = reqs.length;
  const { promise, resolve } = Promise.withResolvers<number[]>();
  reqs.forEach((r, i) =>
    engine.queue({
      ...r,
      done: (n) => {
        results[i] = n;
        if (--left === 0) resolve(results);
      },
    })
  );
  engine.submit();
  return promise;
}

Deno.test("UringEngine writes guest memory to a file and reads it back, with flush", async () => {
  const fx = new Fixture(1 << 20, 1 << 20);
  const engine = new UringEngine(fx.file, fx.reactor, { depth: 16 });
  try {
    const data = pattern(65536, 5);
    fx.mem.bytes.set(data, 0);
    const w = await run(engine, [
      { op: "write", offset: 8192, iov: fx.iov(0, 32768, 3) },
      { op: "write", offset: 131072, iov: fx.iov(32768, 32768) },
      { op: "flush", offset: 0, iov: new IoVecs(1) },
    ]);
    assert.deepEqual(w, [32768, 32768, 0]);
    assert.equal(engine.pending, 0);
    const onDisk = Deno.readFileSync(fx.path);
    assert.deepEqual(onDisk.subarray(8192, 8192 + 32768), data.subarray(0, 32768));
    assert.deepEqual(onDisk.subarray(131072, 131072 + 32768), data.subarray(32768));
    const r = await run(engine, [{ op: "read", offset: 8192, iov: fx.iov(500000, 32768, 4) }]);
    assert.deepEqual(r, [32768]);
    assert.deepEqual(fx.mem.bytes.subarray(500000, 500000 + 32768), data.subarray(0, 32768));
  } finally {
    engine.close();
    await fx.close();
  }
});

Deno.test("UringEngine holds requests beyond its depth and completes all of them correctly", async () => {
  const blocks = 300;
  const fx = new Fixture(blocks * 4096, blocks * 4096);
  const data = pattern(blocks * 4096, 11);
  Deno.writeFileSync(fx.path, data);
  const engine = new UringEngine(fx.file, fx.reactor, { depth: 8 });
  try {
    const reqs = Array.from({ length: blocks }, (_, i) => ({
      op: "read" as const,
      offset: i * 4096,
      iov: fx.iov((blocks - 1 - i) * 4096, 4096),
    }));
    const p = run(engine, reqs);
    const results = await p;
    assert.ok(results.every((n) => n === 4096), `short or failed: ${results.filter((n) => n !== 4096)}`);
    for (let i = 0; i < blocks; i++) {
      const got = fx.mem.bytes.subarray((blocks - 1 - i) * 4096, (blocks - i) * 4096);
      assert.deepEqual(got, data.subarray(i * 4096, (i + 1) * 4096), `block ${i}`);
    }
    assert.equal(engine.pending, 0);
  } finally {
    engine.close();
    await fx.close();
  }
});

Deno.test("UringEngine resubmits a short read for the rest and reports the bytes before end of file", async () => {
  const fx = new Fixture(6000, 65536);
  const data = pattern(6000, 3);
  Deno.writeFileSync(fx.path, data);
  const engine = new UringEngine(fx.file, fx.reactor, { depth: 4 });
  try {
    fx.mem.bytes.fill(0xee, 0, 8192);
    // 6000 bytes come back, the rest is asked for at offset 6000 (a wrong offset would read more).
    assert.deepEqual(await run(engine, [{ op: "read", offset: 0, iov: fx.iov(0, 8192, 2) }]), [6000]);
    assert.deepEqual(fx.mem.bytes.subarray(0, 6000), data);
    assert.ok(fx.mem.bytes.subarray(6000, 8192).every((x) => x === 0xee), "nothing written past end of file");
    assert.deepEqual(await run(engine, [{ op: "read", offset: 10000, iov: fx.iov(0, 512) }]), [0]);
  } finally {
    engine.close();
    await fx.close();
  }
});

Deno.test("UringEngine completes from the reactor when the kernel finishes later", async () => {
  const fx = new Fixture(4096, 65536);
  // A blocking stream socket: the read waits in the kernel (poll-armed) until data arrives.
  const [a, b] = socketPair({ nonBlocking: false });
  const engine = new UringEngine(a.fd, fx.reactor, { depth: 4 });
  try {
    const data = pattern(250, 1);
    let result: number | undefined;
    const { promise, resolve } = Promise.withResolvers<void>();
    engine.queue({
      op: "read",
      offset: 0,
      iov: fx.iov(1000, 250, 2),
      done: (n) => {
        result = n;
        resolve();
      },
    });
    engine.submit();
    assert.equal(result, undefined, "nothing to read yet: still in flight");
    assert.equal(engine.pending, 1);
    b.fd.write(new Uint8Array(data));
    await promise;
    assert.equal(result, 250);
    assert.equal(engine.pending, 0);
    assert.deepEqual(fx.mem.bytes.subarray(1000, 1250), data);
  } finally {
    engine.close();
    a.close();
    b.close();
    await fx.close();
  }
});

Deno.test("UringEngine keeps completing after a done() callback throws", async () => {
  const fx = new Fixture(65536, 65536);
  const engine = new UringEngine(fx.file, fx.reactor, { depth: 8 });
  try {
    const results: number[] = [];
    const { promise, resolve } = Promise.withResolvers<void>();
    engine.queue({
      op: "read",
      offset: 0,
      iov: fx.iov(0, 4096),
      done: () => {
        throw new Error("device bug");
      },
    });
    for (let i = 1; i <= 2; i++) {
      engine.queue({
        op: "read",
        offset: i * 4096,
        iov: fx.iov(i * 4096, 4096),
        done: (n) => {
          results.push(n);
          if (results.length === 2) resolve();
        },
      });
    }
    assert.throws(() => engine.submit(), /device bug/);
    await promise;
    assert.deepEqual(results, [4096, 4096]);
    assert.equal(engine.pending, 0);
  } finally {
    engine.close();
    await fx.close();
  }
});

Deno.test("UringEngine reports failures as negative errno", async () => {
  const fx = new Fixture(65536, 65536);
  const ro = openPath(fx.path, OpenFlags.O_RDONLY);
  const engine = new UringEngine(ro, fx.reactor, { depth: 4 });
  try {
    const res = await run(engine, [
      { op: "write", offset: 0, iov: fx.iov(0, 4096) },
      { op: "read", offset: 0, iov: fx.iov(0, 4096) },
    ]);
    assert.deepEqual(res, [-9, /* EBADF */ 4096]);
  } finally {
    engine.close();
    ro.close();
    await fx.close();
  }
});

Deno.test("UringEngine.close waits for I/O in the kernel, drops the rest, releases its fds", async () => {
  const fx = new Fixture(1 << 20, 1 << 20);
  const before = ownedFdCount();
  const [a, b] = socketPair({ nonBlocking: false });
  const engine = new UringEngine(a.fd, fx.reactor, { depth: 2 });
  let called = 0;
  // Two reads wait in the kernel for data that never comes; the peer's close ends them (0, end
  // of stream), which is what close() waits for. The third is held for a slot and dropped.
  engine.queue({ op: "read", offset: 0, iov: fx.iov(0, 64), done: () => called++ });
  engine.queue({ op: "read", offset: 0, iov: fx.iov(64, 64), done: () => called++ });
  engine.queue({ op: "read", offset: 0, iov: fx.iov(128, 64), done: () => called++ }); // held: depth 2
  engine.submit();
  assert.equal(engine.pending, 3);
  b.close();
  engine.close();
  engine.close();
  assert.equal(called, 0, "done() is not called after close()");
  assert.throws(() => engine.queue({ op: "flush", offset: 0, iov: new IoVecs(1), done: () => {} }), /closed/);
  a.close();
  assert.equal(ownedFdCount(), before);
  await fx.close();
});

Deno.test("UringEngine: a request it cannot prepare (no iovec) throws and keeps no slot, so close() returns", () => {
  using reactor = new Reactor();
  using file = memfdCreate("x");
  ftruncate(file, 8192);
  const engine = new UringEngine(file, reactor, { depth: 2 });
  for (let i = 0; i < 3; i++) {
    assert.throws(
      () => engine.queue({ op: "read", offset: 0, iov: new IoVecs(1), done: () => {} }),
      /needs at least one iovec/,
    );
  }
  assert.equal(engine.pending, 0, "no slot stays taken");
  engine.close(); // would wait for the kernel forever if a slot were leaked
});

Deno.test("UringEngine rejects a bad depth", () => {
  using reactor = new Reactor();
  using file = memfdCreate("x");
  assert.throws(() => new UringEngine(file, reactor, { depth: 0 }), /depth must be 1\.\.4096: got 0/);
  assert.throws(() => new UringEngine(file, reactor, { depth: 5000 }), /got 5000/);
});

Deno.test("resolveEngine picks io_uring for auto on nowait files; createEngine builds each kind; bad names refused", () => {
  using reactor = new Reactor();
  using file = memfdCreate("x");
  ftruncate(file, 8192);
  const auto = resolveEngine(file, "auto");
  assert.equal(auto.kind, supportsNowait(file) ? "uring" : "vmcopy", "a memfd is a tmpfs file");
  const { fd: disk, path } = mkstempIn("/tmp", "mpq-engine-");
  const autoDisk = resolveEngine(disk, "auto");
  assert.equal(autoDisk.kind, supportsNowait(disk) ? "uring" : "preadv");
  const built = createEngine(disk, reactor, autoDisk.kind);
  assert.equal(built.name, autoDisk.kind === "uring" ? "io_uring" : "preadv");
  built.close();
  disk.close();
  unlinkPath(path);
  assert.deepEqual(resolveEngine(file, "uring"), { kind: "uring", reason: "forced" });
  const uring = createEngine(file, reactor, "uring", { depth: 4 });
  assert.ok(uring instanceof UringEngine);
  assert.equal(uring.depth, 4);
  uring.close();
  const sync = createEngine(file, reactor, "preadv");
  assert.ok(sync instanceof PreadvEngine);
  sync.close();
  assert.throws(() => parseEngineChoice("aio"), /engine must be auto, uring, vmcopy, preadv: got "aio"/);
  assert.equal(parseEngineChoice("vmcopy"), "vmcopy");
});

Deno.test("UringEngine and PreadvEngine produce the same file contents for the same requests", async () => {
  const fx = new Fixture(256 * 1024, 512 * 1024);
  const other = mkstempIn("/tmp", "mpq-blk-sync-");
  ftruncate(other.fd, 256 * 1024);
  const uring = new UringEngine(fx.file, fx.reactor, { depth: 8 });
  const sync = new PreadvEngine(other.fd);
  try {
    fx.mem.bytes.set(pattern(512 * 1024, 77));
    const reqs: Array<Omit<BlkIoRequest, "done">> = [];
    for (let i = 0; i < 64; i++) {
      // Requests in flight at once may run in any order: keep the ranges disjoint.
      const len = 512 * (1 + (i * 7) % 8);
      reqs.push({ op: "write", offset: ((i * 37) % 64) * 4096, iov: fx.iov(i * 8192, len, 1 + (i % 3)) });
    }
    const a = await run(uring, reqs);
    const b = await run(sync, reqs);
    assert.deepEqual(a, b);
    assert.deepEqual(Deno.readFileSync(fx.path), Deno.readFileSync(other.path));
  } finally {
    uring.close();
    sync.close();
    other.fd.close();
    unlinkPath(other.path);
    await fx.close();
  }
});

/**
 * `mpq vhost` against a buggy or hostile front-end (issue 8): memory fds smaller than the regions
 * they back, fds of the wrong kind, memory tables that drop a running ring, tables replaced and
 * front-ends vanishing while writethrough writes wait for their flush, a blocking call eventfd with
 * a full counter, and an rng driver that never stops refilling. Each case checks the error reply
 * or log line, that the daemon is alive and answers, and then serves a good front-end with
 * verified I/O. Rings and buffers above 4 GiB inside one 6 GiB region are tested here too.
 */
import assert from "node:assert/strict";
import { assertSameBytes } from "../helpers/pattern.ts";
import {
  type ChildProcess,
  connectUnix,
  EventFd,
  ftruncate,
  memfdCreate,
  OpenFlags,
  openPath,
  type OwnedFd,
  pipe,
  Signal,
  socketPair,
  spawn,
} from "../../ffi/mod.ts";
import { selfCommand } from "../../lib/cli/self.ts";
import { inflightQueueSize } from "../../lib/vhost/inflight.ts";
import {
  Blk,
  encodeMessage,
  type FrontendOptions,
  MsgFlags,
  payloadU64,
  Req,
  statePayload,
  u64Payload,
  VhostUserFrontend,
} from "../helpers/vhost_frontend.ts";
import { DescFlags } from "../helpers/virtio_ring.ts";
import { makeDiskFile, patternBytes, readFileRange } from "../helpers/vhost_backends.ts";

const DISK = 16 << 20;

interface Daemon {
  child: ChildProcess;
  socket: string;
  file: string;
  metrics: string;
  /** Everything the daemon logged so far. */
  log(): string;
}

/**
 * Runs `fn` with `mpq vhost <device>` (blk on a `DISK`-byte file in `fileDir`, default a private
 * /dev/shm directory) logging to a file; stops it and removes everything afterwards.
 */
async function withDaemon(
  device: "blk" | "rng",
  args: string[],
  fn: (d: Daemon) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhost-hostile-" });
  const shm = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "vhost-hostile-" });
  const file = `${shm}/disk.img`;
  const logPath = `${dir}/daemon.log`;
  const socket = `${dir}/vhost.sock`;
  const metrics = `${dir}/metrics.sock`;
  if (device === "blk") await makeDiskFile(file, DISK, (off) => patternBytes(1 << 20, 3 + (off >> 20)));
  const log = openPath(logPath, OpenFlags.O_WRONLY | OpenFlags.O_CREAT | OpenFlags.O_TRUNC);
  const [exe, ...pre] = selfCommand();
  const argv = [exe, ...pre, "vhost", device, `--socket-path=${socket}`, `--metrics=${metrics}`];
  if (device === "blk") argv.push(`--blk-file=${file}`);
  const child = spawn(exe, [...argv, ...args], { fds: new Map([[1, log], [2, log]]), stdio: "null" });
  log.close();
  const d: Daemon = { child, socket, file, metrics, log: () => Deno.readTextFileSync(logPath) };
  try {
    const deadline = Date.now() + 15_000;
    while (!exists(socket)) {
      if (child.tryWait()) throw new Error(`mpq vhost exited at start: ${d.log()}`);
      if (Date.now() > deadline) throw new Error(`mpq vhost did not listen: ${d.log()}`);
      await sleep(20);
    }
    await fn(d);
    assert.equal(child.status, null, `the daemon exited (${child.status?.text}): ${d.log()}`);
  } finally {
    if (!child.status) child.kill(Signal.SIGTERM);
    // A daemon that hangs (the bug some of these cases catch) cannot act on SIGTERM.
    const killer = setTimeout(() => child.status || child.kill(Signal.SIGKILL), 5000);
    await child.wait();
    clearTimeout(killer);
    await Deno.remove(dir, { recursive: true });
    await Deno.remove(shm, { recursive: true });
  }
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function until(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting until ${what}`);
    await sleep(5);
  }
}

/** The daemon answers a GET_FEATURES probe on this connection. */
async function probe(fe: VhostUserFrontend, tag: string): Promise<void> {
  fe.sendRaw(encodeMessage(Req.GET_FEATURES, MsgFlags.VERSION));
  while (true) {
    const m = await fe.waitAny(10_000);
    assert.ok(m, `${tag}: the daemon closed the connection instead of answering`);
    for (const f of m.fds) f.close();
    if (m.request === Req.GET_FEATURES) return;
  }
}

/** A need_reply message; returns the u64 status of the ack (0 = applied). */
async function acked(
  fe: VhostUserFrontend,
  request: number,
  payload: Uint8Array,
  fds: OwnedFd[] = [],
): Promise<bigint> {
  const waiting = fe.waitReply(request);
  fe.sendRaw(encodeMessage(request, MsgFlags.VERSION | MsgFlags.NEED_REPLY, payload), fds);
  const m = await waiting;
  for (const f of m.fds) f.close();
  return payloadU64(m);
}

/** A good front-end writes, reads back and finds its data in the file (blk). */
async function expectGood(d: Daemon, tag: string, options: FrontendOptions = {}): Promise<void> {
  assert.equal(d.child.status, null, `${tag}: the daemon exited (${d.child.status?.text}): ${d.log()}`);
  await using fe = await VhostUserFrontend.connect(d.socket, options);
  await fe.handshake();
  await fe.start();
  const data = patternBytes(16384, 99);
  assert.equal((await fe.blkWrite(800, data)).status, Blk.S_OK, tag);
  assertSameBytes((await fe.blkRead(800, 16384)).data, data, tag);
  assertSameBytes(readFileRange(d.file, 800 * 512, 16384), data, tag);
  await fe.stop();
}

/** One region of the memory table as SET_MEM_TABLE / ADD_MEM_REG carry it. */
function region(gpa: number, size: number, uaddr: number, mmapOffset = 0): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(32);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(gpa), true);
  v.setBigUint64(8, BigInt(size), true);
  v.setBigUint64(16, BigInt(uaddr), true);
  v.setBigUint64(24, BigInt(mmapOffset), true);
  return b;
}

function memTable(...regions: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const p = new Uint8Array(8 + 32 * regions.length);
  new DataView(p.buffer).setUint32(0, regions.length, true);
  regions.forEach((r, i) => p.set(r, 8 + 32 * i));
  return p;
}

function addMemReg(r: Uint8Array): Uint8Array<ArrayBuffer> {
  const p = new Uint8Array(40);
  p.set(r, 8);
  return p;
}

/** Mappings of the front-end's RAM memfd in the daemon. */
function ramMappings(child: ChildProcess): number {
  return Deno.readTextFileSync(`/proc/${child.pid}/maps`).split("\n")
    .filter((l) => l.includes("memfd:vhost-frontend-ram")).length;
}

/**
 * The ring half of QEMU's start after the handshake (SET_FEATURES, call fds, then `memory`, then
 * every ring and its kick) with the memory message left to the test.
 */
async function startRings(fe: VhostUserFrontend, memory: () => Promise<void>): Promise<void> {
  const info = fe.info!;
  await fe.send(Req.SET_FEATURES, u64Payload(info.features & ~(1n << 29n))); // all offered but EVENT_IDX
  for (const q of fe.queues) await fe.send(Req.SET_VRING_CALL, u64Payload(q.index), { fds: [q.call.fd] });
  await memory();
  for (const q of fe.queues) {
    await fe.send(Req.SET_VRING_NUM, statePayload(q.index, q.ring.size));
    await fe.send(Req.SET_VRING_BASE, statePayload(q.index, 0));
    const a = new Uint8Array(40);
    const v = new DataView(a.buffer);
    v.setUint32(0, q.index, true);
    v.setBigUint64(8, BigInt(fe.ram.uaddr(q.ring.descGpa)), true);
    v.setBigUint64(16, BigInt(fe.ram.uaddr(q.ring.usedGpa)), true);
    v.setBigUint64(24, BigInt(fe.ram.uaddr(q.ring.availGpa)), true);
    await fe.send(Req.SET_VRING_ADDR, a);
    await fe.send(Req.SET_VRING_KICK, u64Payload(q.index), { fds: [q.kick.fd] });
    await fe.send(Req.SET_VRING_ENABLE, statePayload(q.index, 1));
  }
}

/** Queues a raw IN request (header, data, status) on queue 0 and kicks; returns the status GPA. */
function rawRead(fe: VhostUserFrontend): number {
  const hdr = fe.ram.alloc(64, 64);
  const data = fe.ram.alloc(4096, 4096);
  const o = fe.ram.offset(hdr, 17);
  fe.ram.view.setUint32(o, Blk.T_IN, true);
  fe.ram.view.setBigUint64(o + 8, 0n, true);
  fe.ram.view.setUint8(o + 16, 0xff);
  const ring = fe.queues[0].ring;
  ring.rawDesc(0, { addr: BigInt(hdr), len: 16, flags: DescFlags.NEXT, next: 1 });
  ring.rawDesc(1, { addr: BigInt(data), len: 4096, flags: DescFlags.NEXT | DescFlags.WRITE, next: 2 });
  ring.rawDesc(2, { addr: BigInt(hdr + 16), len: 1, flags: DescFlags.WRITE, next: 0 });
  ring.rawAvail(0);
  ring.publish();
  fe.kickQueue(fe.queues[0]);
  return hdr + 16;
}

// ---- memory smaller than declared ----------------------------------------------------------------

for (const via of ["SET_MEM_TABLE", "ADD_MEM_REG"] as const) {
  Deno.test(`vhost blk refuses a ${via} memfd smaller than its region (no SIGBUS), then serves`, async () => {
    await withDaemon("blk", ["--poll-us=0"], async (d) => {
      {
        await using fe = await VhostUserFrontend.connect(d.socket, { memSlots: via === "ADD_MEM_REG" });
        await fe.handshake();
        // A 4 KiB memfd declared as the whole 64 MiB of RAM: every ring access would be past its end.
        const small = memfdCreate("small-guest-ram");
        ftruncate(small, 4096);
        const r = fe.ram.regions[0];
        let status = -1n;
        try {
          await startRings(fe, async () => {
            const reg = region(r.gpa, r.size, r.uaddr);
            status = via === "SET_MEM_TABLE"
              ? await acked(fe, Req.SET_MEM_TABLE, memTable(reg), [small])
              : await acked(fe, Req.ADD_MEM_REG, addMemReg(reg), [small]);
          });
        } finally {
          small.close();
        }
        assert.notEqual(status, 0n, `${via} must be refused`);
        rawRead(fe);
        await probe(fe, via);
        assert.match(d.log(), new RegExp(`${via}: region .* the fd holds 4096 bytes, fewer than`));
        assert.match(
          d.log(),
          /SET_VRING_KICK: (queue 0: kick before SET_MEM_TABLE|.* is not inside guest memory)/,
        );
      }
      await expectGood(d, `after a short ${via} memfd`);
    });
  });
}

Deno.test("vhost blk refuses a SET_INFLIGHT_FD memfd smaller than the area it declares, then serves on", async () => {
  await withDaemon("blk", ["--poll-us=0"], async (d) => {
    {
      await using fe = await VhostUserFrontend.connect(d.socket, { inflight: false });
      await fe.handshake();
      const small = memfdCreate("small-inflight");
      ftruncate(small, 64);
      const p = new Uint8Array(24);
      const v = new DataView(p.buffer);
      v.setBigUint64(0, 1n << 20n, true); // mmap_size 1 MiB
      v.setUint16(16, 1, true);
      v.setUint16(18, 128, true);
      try {
        assert.notEqual(await acked(fe, Req.SET_INFLIGHT_FD, p, [small]), 0n);
      } finally {
        small.close();
      }
      assert.match(d.log(), /SET_INFLIGHT_FD: the inflight fd holds 64 bytes, fewer than/);
      // The same connection goes on without inflight tracking, with verified I/O.
      await fe.start();
      const data = patternBytes(8192, 5);
      assert.equal((await fe.blkWrite(64, data)).status, Blk.S_OK);
      assertSameBytes((await fe.blkRead(64, 8192)).data, data);
      await fe.stop();
    }
    await expectGood(d, "after a short inflight memfd");
  });
});

// ---- fds of the wrong kind -----------------------------------------------------------------------

Deno.test("vhost blk refuses kick/call/err fds that are not eventfds and memory fds that are not memory", async () => {
  await withDaemon("blk", ["--poll-us=0"], async (d) => {
    {
      await using fe = await VhostUserFrontend.connect(d.socket, { memSlots: false });
      await fe.handshake();
      await fe.start();
      const [r, w] = pipe();
      const [a, b] = socketPair();
      const mem = memfdCreate("not-an-eventfd");
      try {
        assert.notEqual(await acked(fe, Req.SET_VRING_KICK, u64Payload(0), [r]), 0n);
        assert.notEqual(await acked(fe, Req.SET_VRING_CALL, u64Payload(0), [a.fd]), 0n);
        assert.notEqual(await acked(fe, Req.SET_VRING_ERR, u64Payload(0), [mem]), 0n);
        const reg = region(0x1_0000_0000, 4096, 0x7f00_0000_0000);
        assert.notEqual(await acked(fe, Req.SET_MEM_TABLE, memTable(reg), [w]), 0n);
      } finally {
        for (const f of [r, w, a.fd, b.fd, mem]) f.close();
      }
      const log = d.log();
      assert.match(log, /SET_VRING_KICK: queue 0: the kick fd is a pipe, expected an eventfd/);
      assert.match(log, /SET_VRING_CALL: queue 0: the call fd is a socket, expected an eventfd/);
      assert.match(log, /SET_VRING_ERR: queue 0: the err fd is a regular file, expected an eventfd/);
      assert.match(log, /SET_MEM_TABLE: region .* the fd is a pipe, expected a memory file/);
      await probe(fe, "wrong fd kinds");
    }
    await expectGood(d, "after fds of the wrong kind");
  });
});

Deno.test("vhost blk makes the call eventfd non-blocking: a full counter on a blocking one cannot hang it", async () => {
  await withDaemon("blk", ["--poll-us=0"], async (d) => {
    {
      await using fe = await VhostUserFrontend.connect(d.socket, { memSlots: false });
      await fe.handshake();
      await fe.start();
      // A blocking eventfd whose counter is at its maximum: one more signal would block forever.
      const full = new EventFd({ nonBlocking: false });
      full.signal(0xfffffffffffffffen);
      try {
        assert.equal(await acked(fe, Req.SET_VRING_CALL, u64Payload(0), [full.fd]), 0n);
        fe.queues[0].ring.armCall(); // the driver wants a call for this request
        const status = rawRead(fe);
        await until("the request completed", () => fe.ram.view.getUint8(fe.ram.offset(status)) !== 0xff);
        assert.equal(fe.ram.view.getUint8(fe.ram.offset(status)), Blk.S_OK);
        await probe(fe, "after signalling a full call eventfd");
      } finally {
        full.close();
      }
    }
    await expectGood(d, "after a full call eventfd");
  });
});

// ---- memory tables that change under running rings -------------------------------------------

/** One thread, and a queue thread mirroring the device (each maps the guest RAM once). */
const THREADINGS = [
  { threads: 1, args: ["--num-queues=1"], queue: 0, queues: 1 },
  { threads: 2, args: ["--num-queues=2", "--queue-threads=2"], queue: 1, queues: 2 },
];

for (const { threads, args } of THREADINGS) {
  Deno.test(`vhost blk drops a ring's views when a new memory table no longer holds it (no use of unmapped memory; ${threads} thread(s))`, async () => {
    // A long poll window: the ring is being polled (kicks suppressed) when its memory goes away, and
    // the poller resumes notifications on it afterwards.
    await withDaemon("blk", ["--poll-us=200000", ...args], async (d) => {
      {
        await using fe = await VhostUserFrontend.connect(d.socket, { memSlots: false });
        await fe.handshake();
        await fe.start();
        // Requests after short sleeps grow the window (each kick after a sleep doubles it) to ~200 ms.
        for (let i = 0; i < 20; i++) {
          assert.equal((await fe.blkRead(i, 4096)).status, Blk.S_OK);
          await sleep(2);
        }
        assert.equal(ramMappings(d.child), threads);
        // A valid table that lacks the RAM holding the rings: the old mapping goes, the ring breaks.
        const other = memfdCreate("other-guest-ram");
        ftruncate(other, 1 << 20);
        try {
          const reg = region(0x2_0000_0000, 1 << 20, 0x7e00_0000_0000);
          assert.equal(await acked(fe, Req.SET_MEM_TABLE, memTable(reg), [other]), 0n);
        } finally {
          other.close();
        }
        assert.equal(ramMappings(d.child), 0, "the replaced mapping is gone at once (nothing in flight)");
        assert.match(
          d.log(),
          /queue 0 stopped: front-end address 0x[0-9a-f]+\+\d+ is not inside guest memory/,
        );
        // Kicks and polling must not touch the ring any more.
        fe.kickQueue(fe.queues[0]);
        await sleep(400); // the poll window runs out
        await probe(fe, "after the ring's memory went away");
      }
      await expectGood(d, "after a table without the rings");
    });
  });
}

/** Requests of queue 0 the daemon has taken: completed (used) plus marked in flight (inflight area). */
function taken(fe: VhostUserFrontend, queue = 0): number {
  const q = fe.queues[queue];
  const region = fe.inflight!;
  const v = new DataView(region.map.bytes.buffer);
  const at = queue * inflightQueueSize(q.ring.size);
  let marked = 0;
  for (let i = 0; i < q.ring.size; i++) if (v.getUint8(at + 16 + 16 * i) === 1) marked++;
  return q.ring.usedIdx() + marked;
}

/** 32 writes of 64 KiB in flight (io_uring on /dev/shm completes them outside the kick). */
function writes(
  fe: VhostUserFrontend,
  n = 32,
  seed = 40,
  queue = 0,
): { done: Promise<number[]>; data: Uint8Array[] } {
  const data: Uint8Array[] = [];
  const all: Promise<number>[] = [];
  for (let i = 0; i < n; i++) {
    data.push(patternBytes(65536, seed + i));
    all.push(fe.blkWrite(1024 + 128 * i, data[i], queue).then((r) => r.status, () => -1));
  }
  return { done: Promise.all(all), data };
}

for (const { threads, args, queue, queues } of THREADINGS) {
  Deno.test(`vhost blk writethrough: GET_VRING_BASE answers only after every write and its flush completed (queue ${queue} of ${threads} thread(s))`, async () => {
    await withDaemon("blk", ["--engine=uring", "--poll-us=0", ...args], async (d) => {
      // The stop arrives at varying moments of the writes' life: in flight, completed and waiting
      // for their flush, flushing.
      for (let round = 0; round < 12; round++) {
        await using fe = await VhostUserFrontend.connect(d.socket, {
          memSlots: false,
          queueSize: 128,
          queues,
        });
        await fe.handshake();
        await fe.start();
        const q = fe.queues[queue];
        const w = writes(fe, 32, 11 * round, queue);
        await sleep(0); // the slots are taken and the chains published
        const spin = performance.now() + (round % 4) * 0.05;
        while (performance.now() < spin) { /* let the kernel get that far */ }
        assert.equal(q.ring.publishedIdx, 32);
        const bases = await fe.stop();
        // The daemon may not have taken every request before SET_VRING_ENABLE 0 (the kick and the
        // message race); what it took must be complete when GET_VRING_BASE answers.
        assert.ok(bases[queue] <= 32, `round ${round}: base ${bases[queue]}`);
        assert.equal(
          q.ring.usedIdx(),
          bases[queue],
          `round ${round}: GET_VRING_BASE came after every write it took completed`,
        );
        // The rest is served after the next start, as QEMU's vm stop / cont would.
        if (bases[queue] < 32) await fe.start(bases);
        fe.poll(q);
        assert.deepEqual(await w.done, new Array(32).fill(Blk.S_OK));
        for (let i = 0; i < 32; i++) {
          assertSameBytes(readFileRange(d.file, (1024 + 128 * i) * 512, 65536), w.data[i], `write ${i}`);
        }
      }
      assert.doesNotMatch(d.log(), /still in flight/);
      await expectGood(d, "after stops with flushes pending");
    });
  });
}

for (const { threads, args, queue, queues } of THREADINGS) {
  Deno.test(`vhost blk writethrough: a front-end vanishing mid-write does not crash it; the writes land (queue ${queue} of ${threads} thread(s))`, async () => {
    await withDaemon("blk", ["--engine=uring", "--poll-us=0", ...args], async (d) => {
      const data: Uint8Array[] = [];
      for (let round = 0; round < 3; round++) {
        const fe = await VhostUserFrontend.connect(d.socket, { memSlots: false, queues });
        await fe.handshake();
        await fe.start();
        const w = writes(fe, 32, 100 + 32 * round, queue);
        await sleep(0);
        assert.equal(fe.queues[queue].ring.publishedIdx, 32);
        // The daemon has taken every write (completed, or marked in flight in the inflight area);
        // a front-end gone before the daemon even saw its kick leaves requests the next one resubmits.
        await until("the daemon took the 32 writes", () => taken(fe, queue) === 32);
        await fe.close(); // the socket goes away with the writes in flight
        w.done.catch(() => {});
        data.splice(0, data.length, ...w.data);
        // The next front-end is served only after the writes drained: they are all in the file.
        await expectGood(d, `after a front-end vanished mid-write (round ${round})`);
        for (let i = 0; i < 32; i++) {
          assertSameBytes(readFileRange(d.file, (1024 + 128 * i) * 512, 65536), data[i], `write ${i}`);
        }
      }
    });
  });
}

for (const { threads, args, queue, queues } of THREADINGS) {
  Deno.test(`vhost blk keeps a replaced mapping only until the I/O popped before the change drained (${threads} thread(s))`, async () => {
    await withDaemon("blk", ["--engine=uring", "--poll-us=0", ...args], async (d) => {
      {
        await using fe = await VhostUserFrontend.connect(d.socket, { memSlots: false, queues });
        await fe.handshake();
        await fe.start();
        const r = fe.ram.regions[0];
        let most = 0;
        for (let round = 0; round < 4; round++) {
          const w = writes(fe, 32, 7 * round, queue);
          await sleep(0);
          // The same RAM again: a new mapping; the old one is retired while the writes use it.
          const status = await acked(
            fe,
            Req.SET_MEM_TABLE,
            memTable(region(r.gpa, r.size, r.uaddr)),
            [fe.ram.memfd],
          );
          assert.equal(status, 0n);
          most = Math.max(most, ramMappings(d.child));
          assert.deepEqual(await w.done, new Array(32).fill(Blk.S_OK));
          await until("the retired mapping is released", () => ramMappings(d.child) === threads);
          for (let i = 0; i < 32; i++) {
            assertSameBytes(readFileRange(d.file, (1024 + 128 * i) * 512, 65536), w.data[i]);
          }
        }
        assert.ok(most <= threads + 1, `at most the current ones and one retired mapping: saw ${most}`);
        await fe.stop();
      }
      await expectGood(d, "after tables replaced under I/O");
    });
  });
}

// ---- fairness -------------------------------------------------------------------------------------

Deno.test("vhost rng serves other clients while a driver refills its ring without end", async () => {
  await withDaemon("rng", ["--poll-us=0"], async (d) => {
    await using fe = await VhostUserFrontend.connect(d.socket, { device: "rng", queueSize: 256 });
    await fe.handshake();
    await fe.start();
    const q = fe.queues[0];
    const ring = q.ring;
    const bufs: number[] = [];
    for (let i = 0; i < 256; i++) {
      bufs.push(fe.ram.alloc(64, 64));
      ring.rawDesc(i, { addr: BigInt(bufs[i]), len: 64, flags: DescFlags.WRITE, next: 0 });
      ring.rawAvail(i);
    }
    ring.publish();
    fe.kickQueue(q);
    // Refill every used buffer at once, synchronously (the daemon is another process), and ask the
    // daemon's metrics socket (served by the same event loop) for an answer meanwhile.
    const scrape = connectUnix(d.metrics);
    const buf = new Uint8Array(65536);
    let answered = false;
    let refills = 0;
    let seen = ring.usedIdx();
    const end = performance.now() + 5000;
    try {
      while (performance.now() < end && !(answered && refills >= 4096)) {
        const used = ring.usedIdx();
        while (seen !== used) {
          const id = fe.ram.view.getUint32(fe.ram.offset(ring.usedGpa) + 4 + 8 * (seen % 256), true);
          ring.rawAvail(id);
          seen = (seen + 1) & 0xffff;
          refills++;
        }
        if (ring.publish()) fe.kickQueue(q);
        if (!answered) {
          const got = scrape.recvMsg(buf);
          if (got !== null && got.bytes > 0) answered = true;
        }
      }
    } finally {
      scrape.close();
    }
    assert.ok(refills >= 4096, `the driver kept the ring full (${refills} refills)`);
    assert.ok(answered, `the metrics socket got no answer within 5 s while the ring was refilled`);
  });
});

// ---- guest memory above 4 GiB ---------------------------------------------------------------------

for (const engine of ["auto", "preadv"]) {
  Deno.test(`vhost blk with rings and buffers above 4 GiB in a 6 GiB region (engine ${engine})`, async () => {
    await withDaemon("blk", [`--engine=${engine}`], async (d) => {
      const options: FrontendOptions = {
        memSize: 6 * 2 ** 30,
        allocFrom: 4.5 * 2 ** 30,
        memSlots: false,
        eventIdx: true,
        indirect: true,
      };
      {
        await using fe = await VhostUserFrontend.connect(d.socket, options);
        await fe.handshake();
        await fe.start();
        assert.ok(fe.queues[0].ring.descGpa >= 4.5 * 2 ** 30, "the ring is above 4 GiB");
        for (let i = 0; i < 8; i++) {
          const data = patternBytes(65536, 500 + i);
          assert.equal((await fe.blkWrite(2048 + 128 * i, data)).status, Blk.S_OK);
          assertSameBytes((await fe.blkRead(2048 + 128 * i, 65536)).data, data);
          assertSameBytes(readFileRange(d.file, (2048 + 128 * i) * 512, 65536), data);
        }
        // Nothing was written 4 GiB below the ring (where a 32-bit index would land).
        const low = fe.ram.offset(fe.queues[0].ring.descGpa) - 4 * 2 ** 30;
        assert.ok(fe.ram.mem.subarray(low, low + 65536).every((b) => b === 0));
        await fe.stop();
      }
      await expectGood(d, "after the 6 GiB front-end");
    }).catch((e) => {
      throw e;
    });
  });
}

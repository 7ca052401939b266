/**
 * Dirty logging for live migration (issue 10 §1): with SET_LOG_BASE and LOG_ALL, the daemon marks
 * exactly the guest pages it wrote — the data of reads, status bytes, rng fills and the used ring —
 * and nothing else; with logging off it marks nothing. Real daemons over a real socket, a memfd log
 * as QEMU shares it, buffers placed on page edges, above 4 GiB, and on a queue thread.
 */
import assert from "node:assert/strict";
import { ftruncate, memfdCreate } from "../../ffi/mod.ts";
import {
  Blk,
  encodeMessage,
  type FrontendDirtyLog,
  type FrontendOptions,
  MsgFlags,
  Req,
  VhostUserFrontend,
} from "../helpers/vhost_frontend.ts";
import { patternBytes, readFileRange, startMpqVhost, withMpqBlk } from "../helpers/vhost_backends.ts";
import type { Segment } from "../helpers/virtio_ring.ts";

const PAGE = 4096;

/** The page numbers of guest-physical [gpa, gpa + len). */
function pagesOf(gpa: number, len: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(gpa / PAGE); p <= Math.floor((gpa + len - 1) / PAGE); p++) out.push(p);
  return out;
}

function sorted(pages: Iterable<number>): number[] {
  return [...new Set(pages)].sort((a, b) => a - b);
}

/** A blk request with its buffers where the test puts them; returns the status byte's address. */
async function blkAt(
  fe: VhostUserFrontend,
  queue: number,
  type: number,
  sector: number,
  data: { gpa: number; len: number },
): Promise<{ status: number; statusGpa: number }> {
  const hdr = fe.ram.alloc(32, 16, fe.ram.regions.length - 1);
  const v = fe.ram.view;
  const o = fe.ram.offset(hdr, 17);
  v.setUint32(o, type, true);
  v.setUint32(o + 4, 0, true);
  v.setBigUint64(o + 8, BigInt(sector), true);
  v.setUint8(o + 16, 0xff);
  const segs: Segment[] = [
    { gpa: hdr, len: 16, write: false },
    { gpa: data.gpa, len: data.len, write: type === Blk.T_IN },
    { gpa: hdr + 16, len: 1, write: true },
  ];
  await fe.submit(fe.queues[queue], segs);
  return { status: v.getUint8(o + 16), statusGpa: hdr + 16 };
}

function usedRingPages(fe: VhostUserFrontend, queue: number): number[] {
  const r = fe.queues[queue].ring;
  return pagesOf(r.usedGpa, 6 + 8 * r.size);
}

/**
 * Reads into a buffer that straddles pages, writes from another, and checks the log after each:
 * a read marks its data pages, its status byte's page and the used ring; a write only the status
 * byte and the used ring (the device never writes its data pages).
 */
async function checkReadsAndWrites(
  fe: VhostUserFrontend,
  log: FrontendDirtyLog,
  queue: number,
  file: string,
) {
  // 3 pages touched: starts 2 KiB into a page, 8 KiB long.
  const readBuf = fe.ram.alloc(3 * PAGE, PAGE) + 2048;
  log.clear();
  const r = await blkAt(fe, queue, Blk.T_IN, 16, { gpa: readBuf, len: 8192 });
  assert.equal(r.status, Blk.S_OK);
  assert.deepEqual(
    fe.ram.bytes(readBuf, 8192),
    readFileRange(file, 16 * 512, 8192),
    "the read landed in the buffer",
  );
  assert.deepEqual(
    log.pages(),
    sorted([...pagesOf(readBuf, 8192), ...pagesOf(r.statusGpa, 1), ...usedRingPages(fe, queue)]),
    "a read marks its data, its status byte and the used ring",
  );
  const writeBuf = fe.ram.alloc(2 * PAGE, PAGE);
  fe.ram.bytes(writeBuf, 8192).set(patternBytes(8192, 5));
  log.clear();
  const w = await blkAt(fe, queue, Blk.T_OUT, 64, { gpa: writeBuf, len: 8192 });
  assert.equal(w.status, Blk.S_OK);
  assert.deepEqual(
    log.pages(),
    sorted([...pagesOf(w.statusGpa, 1), ...usedRingPages(fe, queue)]),
    "a write marks only its status byte and the used ring, not the data the device read",
  );
}

Deno.test("vhost blk dirty log: reads mark their data, status and used ring pages; writes only status and used ring; off marks nothing", async () => {
  await withMpqBlk(["--num-queues=1", "--poll-us=0"], async (fe, file) => {
    const info = await fe.handshake();
    assert.ok(info.features & (1n << 26n), "LOG_ALL offered");
    assert.ok(info.ackedProtocol & (1n << 1n), "LOG_SHMFD negotiated");
    await fe.start();
    // Before logging starts, nothing is marked (there is no log yet): start it.
    const log = await fe.startDirtyLog();
    try {
      await checkReadsAndWrites(fe, log, 0, file);
      // LOG_ALL off again: the same I/O marks nothing.
      await log.stop();
      log.clear();
      const buf = fe.ram.alloc(PAGE, PAGE);
      assert.equal((await blkAt(fe, 0, Blk.T_IN, 0, { gpa: buf, len: PAGE })).status, Blk.S_OK);
      assert.deepEqual(log.pages(), [], "logging off marks nothing");
    } finally {
      log.close();
    }
  });
});

Deno.test("vhost blk dirty log: buffers above 4 GiB mark their own pages, not pages 4 GiB lower", async () => {
  const options: FrontendOptions = { memSize: 6 * 2 ** 30, allocFrom: 4.5 * 2 ** 30 };
  await withMpqBlk(["--num-queues=1", "--poll-us=0"], async (fe, file) => {
    await fe.handshake();
    await fe.start();
    const log = await fe.startDirtyLog();
    try {
      await checkReadsAndWrites(fe, log, 0, file);
      assert.ok(log.pages().every((p) => p * PAGE >= 4 * 2 ** 30), "every marked page is above 4 GiB");
    } finally {
      log.close();
    }
  }, options);
});

Deno.test("vhost blk dirty log: a ring served on a queue thread marks the same log", async () => {
  await withMpqBlk(["--num-queues=2", "--queue-threads=2", "--poll-us=0"], async (fe, file) => {
    await fe.handshake();
    await fe.start();
    const log = await fe.startDirtyLog();
    try {
      await checkReadsAndWrites(fe, log, 1, file);
      await checkReadsAndWrites(fe, log, 0, file);
    } finally {
      log.close();
    }
  }, { queues: 2 });
});

Deno.test("vhost rng dirty log: a fill marks exactly its buffer's pages and the used ring", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhost-log-rng-" });
  const be = await startMpqVhost("rng", `${dir}/rng.sock`, { args: ["--poll-us=0"] });
  try {
    await using fe = await VhostUserFrontend.connect(be.socketPath, { device: "rng" });
    await fe.handshake();
    await fe.start();
    const log = await fe.startDirtyLog();
    try {
      const a = fe.ram.alloc(3 * PAGE, PAGE) + 100, b = fe.ram.alloc(PAGE, PAGE) + 4000;
      log.clear();
      const c = await fe.submit(fe.queues[0], [{ gpa: a, len: 5000, write: true }, {
        gpa: b,
        len: 50,
        write: true,
      }]);
      assert.equal(c.len, 5050);
      assert.deepEqual(
        log.pages(),
        sorted([...pagesOf(a, 5000), ...pagesOf(b, 50), ...usedRingPages(fe, 0)]),
      );
    } finally {
      log.close();
    }
  } finally {
    await be.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vhost blk SET_LOG_BASE refuses a log fd smaller than the log and keeps serving", async () => {
  await withMpqBlk(["--num-queues=1"], async (fe) => {
    await fe.handshake();
    await fe.start();
    const small = memfdCreate("short-log");
    ftruncate(small, 4096);
    try {
      const p = new Uint8Array(16);
      new DataView(p.buffer).setBigUint64(0, 1n << 20n, true); // 1 MiB of log in a 4 KiB fd
      // A message with its own reply that fails: the daemon closes the connection (it cannot answer).
      fe.sendRaw(encodeMessage(Req.SET_LOG_BASE, MsgFlags.VERSION, p), [small]);
      const m = await fe.waitAny(5000);
      assert.equal(m, null, "the connection was closed instead of a success reply");
    } finally {
      small.close();
    }
  });
});

/**
 * `mpq vhost blk` over a real UNIX socket, driven by the test front-end playing QEMU 7.2 + guest:
 * handshake, every request type with checks of the file contents, GET_ID, read-only refusal,
 * multiqueue.
 */
import assert from "node:assert/strict";
import { Blk, Feature, type FrontendOptions, Proto, Req, statePayload } from "../helpers/vhost_frontend.ts";
import { MPQ_BLK_DISK, patternBytes, readFileRange, withMpqBlk } from "../helpers/vhost_backends.ts";

const DISK = MPQ_BLK_DISK;

const zeros = (n: number) => new Uint8Array(n);

Deno.test("vhost blk handshake offers the features of the issue and a correct config space", async () => {
  await withMpqBlk(["--num-queues=2", "--serial=disk-42"], async (fe) => {
    const info = await fe.handshake();
    for (
      const [name, bit] of Object.entries({
        VERSION_1: Feature.VERSION_1,
        EVENT_IDX: Feature.RING_EVENT_IDX,
        INDIRECT_DESC: Feature.RING_INDIRECT_DESC,
        NOTIFY_ON_EMPTY: Feature.NOTIFY_ON_EMPTY,
        PROTOCOL_FEATURES: Feature.PROTOCOL_FEATURES,
        FLUSH: Feature.BLK_FLUSH,
        DISCARD: Feature.BLK_DISCARD,
        WRITE_ZEROES: Feature.BLK_WRITE_ZEROES,
        MQ: Feature.BLK_MQ,
        LOG_ALL: Feature.LOG_ALL,
      })
    ) assert.ok(info.features & bit, `feature ${name} offered (got 0x${info.features.toString(16)})`);
    assert.equal(info.features & Feature.RING_PACKED, 0n, "no packed rings");
    assert.equal(info.features & (1n << 33n), 0n, "no IOMMU_PLATFORM");
    assert.equal(info.features & Feature.BLK_RO, 0n, "writable disk is not RO");
    for (
      const [name, bit] of Object.entries({
        MQ: Proto.MQ,
        REPLY_ACK: Proto.REPLY_ACK,
        CONFIG: Proto.CONFIG,
        INFLIGHT_SHMFD: Proto.INFLIGHT_SHMFD,
        CONFIGURE_MEM_SLOTS: Proto.CONFIGURE_MEM_SLOTS,
        RESET_DEVICE: Proto.RESET_DEVICE,
      })
    ) assert.ok(info.protocolFeatures & bit, `protocol feature ${name} offered`);
    assert.equal(info.protocolFeatures & Proto.STATUS, 0n, "no STATUS");
    assert.equal(info.protocolFeatures & Proto.LOG_SHMFD, Proto.LOG_SHMFD, "LOG_SHMFD: VMs can migrate");
    assert.equal(info.queueNum, 2);
    assert.ok(info.maxMemSlots >= 8, `GET_MAX_MEM_SLOTS ${info.maxMemSlots}`);
    const cfg = fe.blkConfig;
    assert.equal(cfg.capacity, BigInt(DISK / 512));
    assert.equal(cfg.numQueues, 2);
    assert.ok(cfg.segMax >= 1, `seg_max ${cfg.segMax}`);
    assert.ok(cfg.maxDiscardSectors > 0 && cfg.maxDiscardSeg > 0, "discard limits set");
    assert.ok(cfg.maxWriteZeroesSectors > 0 && cfg.maxWriteZeroesSeg > 0, "write-zeroes limits set");
    // A partial config read returns the same bytes (offset/size honoured).
    assert.deepEqual(await fe.getConfig(0, 8), fe.info!.config.subarray(0, 8));
    await fe.start();
    assert.deepEqual(await fe.stop(), [0]);
  });
});

for (
  const variant of [
    { name: "chained descriptors", opts: {} },
    { name: "indirect descriptors with EVENT_IDX", opts: { indirect: true, eventIdx: true } },
    {
      name: "two memory regions, 4 data segments, REPLY_ACK on every message",
      opts: { splitMemory: true, dataSegments: 4, ackAll: true },
    },
    { name: "SET_MEM_TABLE instead of ADD_MEM_REG, no inflight", opts: { memSlots: false, inflight: false } },
  ] satisfies Array<{ name: string; opts: FrontendOptions }>
) {
  Deno.test(`vhost blk read/write/flush with ${variant.name} match the file`, async () => {
    await withMpqBlk([], async (fe, file) => {
      await fe.handshake();
      await fe.start();
      const r = await fe.blkRead(4096 + 3, 12288);
      assert.equal(r.status, Blk.S_OK);
      assert.equal(r.len, 12288 + 1, "used.len = data + status byte");
      assert.deepEqual(r.data, readFileRange(file, (4096 + 3) * 512, 12288));
      const writes = [];
      for (let i = 0; i < 24; i++) writes.push(fe.blkWrite(512 + i * 40, patternBytes(4096 + 512 * i, i)));
      for (const w of await Promise.all(writes)) {
        assert.equal(w.status, Blk.S_OK);
        assert.equal(w.len, 1, "used.len of a write is the status byte");
      }
      const f = await fe.blkFlush();
      assert.equal(f.status, Blk.S_OK);
      for (let i = 0; i < 24; i++) {
        assert.deepEqual(
          readFileRange(file, (512 + i * 40) * 512, 4096 + 512 * i),
          patternBytes(4096 + 512 * i, i),
        );
        const back = await fe.blkRead(512 + i * 40, 4096 + 512 * i);
        assert.deepEqual(back.data, patternBytes(4096 + 512 * i, i));
      }
      // The last sector is readable; one past it is not.
      const last = readFileRange(file, DISK - 512, 512);
      assert.deepEqual((await fe.blkRead(DISK / 512 - 1, 512)).data, last);
      assert.equal((await fe.blkRead(DISK / 512, 512)).status, Blk.S_IOERR);
      assert.equal((await fe.blkWrite(DISK / 512 - 1, zeros(1024))).status, Blk.S_IOERR);
      assert.deepEqual(
        readFileRange(file, DISK - 512, 512),
        last,
        "a write crossing the end changed nothing",
      );
      assert.deepEqual(await fe.stop(), [fe.queues[0].ring.availIdx]);
    }, variant.opts);
  });
}

Deno.test("vhost blk discard punches a hole and write-zeroes zeroes, per range", async () => {
  await withMpqBlk([], async (fe, file) => {
    await fe.handshake();
    await fe.start();
    const d = await fe.blkRanges(Blk.T_DISCARD, [{ sector: 2048, sectors: 256 }]);
    assert.equal(d.status, Blk.S_OK);
    assert.deepEqual(readFileRange(file, 2048 * 512, 256 * 512), zeros(256 * 512));
    assert.deepEqual(
      readFileRange(file, 2304 * 512, 512),
      patternBytes(1 << 20, 78).subarray(256 * 512, 257 * 512),
    );
    const z = await fe.blkRanges(Blk.T_WRITE_ZEROES, [{ sector: 8192 + 8, sectors: 16 }]);
    assert.equal(z.status, Blk.S_OK);
    assert.deepEqual(readFileRange(file, (8192 + 8) * 512, 16 * 512), zeros(16 * 512));
    assert.deepEqual(
      readFileRange(file, 8192 * 512, 8 * 512),
      patternBytes(1 << 20, 81).subarray(0, 8 * 512),
    );
    const zu = await fe.blkRanges(Blk.T_WRITE_ZEROES, [{ sector: 10000, sectors: 64, unmap: true }]);
    assert.equal(zu.status, Blk.S_OK);
    assert.deepEqual(readFileRange(file, 10000 * 512, 64 * 512), zeros(64 * 512));
    // Ranges past the end fail without touching the file.
    const tail = readFileRange(file, DISK - 4096, 4096);
    const bad = await fe.blkRanges(Blk.T_WRITE_ZEROES, [{ sector: DISK / 512 - 8, sectors: 16 }]);
    assert.equal(bad.status, Blk.S_IOERR);
    assert.deepEqual(readFileRange(file, DISK - 4096, 4096), tail);
    // virtio 1.2 5.2.6.2: the unmap flag on a discard is UNSUPP.
    const du = await fe.blkRanges(Blk.T_DISCARD, [{ sector: 0, sectors: 8, unmap: true }]);
    assert.equal(du.status, Blk.S_UNSUPP);
    const wf = await fe.blkRanges(Blk.T_WRITE_ZEROES, [{ sector: 0, sectors: 8, flags: 2 }]);
    assert.equal(wf.status, Blk.S_UNSUPP, "unknown range flag");
    assert.deepEqual(readFileRange(file, 0, 4096), patternBytes(1 << 20, 77).subarray(0, 4096));
    await fe.stop();
  });
});

Deno.test("vhost blk GET_ID returns the --serial padded with zeros; unknown types are UNSUPP", async () => {
  await withMpqBlk(["--serial=mpq-serial-7"], async (fe) => {
    await fe.handshake();
    await fe.start();
    const id = await fe.blkGetId();
    assert.equal(id.status, Blk.S_OK);
    const want = new Uint8Array(20);
    want.set(new TextEncoder().encode("mpq-serial-7"));
    assert.deepEqual(id.data, want);
    const unknown = await fe.blkRequest(99, 0, { inLen: 512 });
    assert.equal(unknown.status, Blk.S_UNSUPP);
    await fe.stop();
  });
});

Deno.test("vhost blk --read-only offers RO, reads work, writes/discards/write-zeroes fail and leave the file", async () => {
  await withMpqBlk(["--read-only"], async (fe, file) => {
    const info = await fe.handshake();
    assert.ok(info.features & Feature.BLK_RO, "VIRTIO_BLK_F_RO offered");
    await fe.start();
    const before = await Deno.readFile(file);
    const r = await fe.blkRead(0, 4096);
    assert.equal(r.status, Blk.S_OK);
    assert.deepEqual(r.data, before.subarray(0, 4096));
    const w = await fe.blkWrite(0, zeros(4096));
    assert.equal(w.status, Blk.S_IOERR);
    const d = await fe.blkRanges(Blk.T_DISCARD, [{ sector: 0, sectors: 64 }]);
    assert.notEqual(d.status, Blk.S_OK);
    const z = await fe.blkRanges(Blk.T_WRITE_ZEROES, [{ sector: 64, sectors: 64 }]);
    assert.notEqual(z.status, Blk.S_OK);
    assert.deepEqual(await Deno.readFile(file), before, "file unchanged");
    await fe.stop();
  });
});

Deno.test("vhost blk serves four queues at once, each request landing where it was sent", async () => {
  await withMpqBlk(["--num-queues=4"], async (fe, file) => {
    const info = await fe.handshake();
    assert.equal(info.queueNum, 4);
    await fe.start();
    const ops = [];
    for (let q = 0; q < 4; q++) {
      for (let i = 0; i < 8; i++) {
        ops.push(fe.blkWrite(q * 4096 + i * 64, patternBytes(32768, q * 100 + i), q));
      }
    }
    for (const r of await Promise.all(ops)) assert.equal(r.status, Blk.S_OK);
    for (let q = 0; q < 4; q++) {
      assert.ok(fe.queues[q].kicks > 0, `queue ${q} was kicked`);
      for (let i = 0; i < 8; i++) {
        assert.deepEqual(
          readFileRange(file, (q * 4096 + i * 64) * 512, 32768),
          patternBytes(32768, q * 100 + i),
        );
      }
    }
    const reads = await Promise.all([0, 1, 2, 3].map((q) => fe.blkRead(q * 4096, 32768, 3 - q)));
    reads.forEach((r, q) => assert.deepEqual(r.data, patternBytes(32768, q * 100)));
    assert.deepEqual(await fe.stop(), fe.queues.map((q) => q.ring.availIdx));
  }, { queues: 4, eventIdx: true });
});

Deno.test("vhost blk --blk-size=4096 reports it in config", async () => {
  await withMpqBlk(["--blk-size=4096"], async (fe) => {
    const info = await fe.handshake();
    assert.ok(info.features & Feature.BLK_BLK_SIZE);
    assert.equal(fe.blkConfig.blkSize, 4096);
    assert.equal(fe.blkConfig.capacity, BigInt(DISK / 512), "capacity stays in 512-byte sectors");
  });
});

Deno.test("vhost blk with REPLY_ACK NACKs a SET_* it cannot apply and keeps serving", async () => {
  await withMpqBlk([], async (fe) => {
    await fe.handshake();
    await fe.start();
    // A ring size that is not a power of two, then ring addresses outside guest memory.
    await assert.rejects(
      fe.send(Req.SET_VRING_NUM, statePayload(0, 100), { reply: "ack" }),
      /SET_VRING_NUM: back-end NACKed/,
    );
    const addr = new Uint8Array(40);
    const v = new DataView(addr.buffer);
    v.setBigUint64(8, 0x7000_0000_0000n, true);
    v.setBigUint64(16, 0x7000_0000_1000n, true);
    v.setBigUint64(24, 0x7000_0000_2000n, true);
    await assert.rejects(
      fe.send(Req.SET_VRING_ADDR, addr, { reply: "ack" }),
      /SET_VRING_ADDR: back-end NACKed/,
    );
    // The same connection still answers and a fresh start() brings the queue back.
    const bases = await fe.stop();
    await fe.start(bases);
    assert.equal((await fe.blkWrite(0, patternBytes(4096, 1))).status, Blk.S_OK);
    await fe.stop();
  });
});

Deno.test("vhost blk stopped rings hold requests until the next start (vm stop / cont)", async () => {
  await withMpqBlk([], async (fe, file) => {
    await fe.handshake();
    await fe.start();
    assert.equal((await fe.blkWrite(0, patternBytes(4096, 1))).status, Blk.S_OK);
    const bases = await fe.stop();
    assert.deepEqual(bases, [1]);
    let done = false;
    const p = fe.blkWrite(64, patternBytes(4096, 2)).finally(() => (done = true));
    p.catch(() => {}); // if an assertion below fails first, close() rejects it: not unhandled
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(done, false, "a stopped ring does not process requests");
    assert.deepEqual(
      readFileRange(file, 64 * 512, 4096),
      patternBytes(1 << 20, 77).subarray(64 * 512, 64 * 512 + 4096),
    );
    await fe.start(bases);
    assert.equal((await p).status, Blk.S_OK);
    assert.deepEqual(readFileRange(file, 64 * 512, 4096), patternBytes(4096, 2));
    assert.deepEqual(await fe.stop(), [2]);
  });
});

for (const eventIdx of [true, false]) {
  Deno.test(`vhost blk busy-polls: once the window has grown, requests need no kick (${eventIdx ? "EVENT_IDX" : "NO_NOTIFY flag"})`, async () => {
    // A 2 s maximum: every kick comes well within it, so the window doubles from 4 µs on each
    // wake-up until it covers the driver's pace, after which the driver is told not to kick.
    await withMpqBlk(["--poll-us=2000000"], async (fe, file) => {
      await fe.handshake();
      await fe.start();
      const q = fe.queues[0];
      // Each kick that ends a sleep doubles the window (4 µs · 2^19 > 2 s), so at most ~20 kicks
      // are needed before a run of requests goes through with none.
      let quiet = 0;
      let n = 0;
      const kicks0 = q.kicks;
      for (; n < 200 && quiet < 30; n++) {
        const kicks = q.kicks;
        const r = await fe.blkRead(n * 8, 4096);
        assert.equal(r.status, Blk.S_OK);
        assert.deepEqual(r.data, readFileRange(file, n * 8 * 512, 4096));
        quiet = q.kicks === kicks ? quiet + 1 : 0;
      }
      assert.equal(quiet, 30, `30 requests in a row without a kick within 200 (${q.kicks - kicks0} kicks)`);
      assert.ok(q.kicks - kicks0 <= 21, `the window grew with each wake-up: ${q.kicks - kicks0} kicks`);
      assert.deepEqual(await fe.stop(), [q.ring.availIdx]);
    }, { eventIdx });
  });
}

Deno.test("vhost blk --poll-us=0 serves requests with kicks on: avail_event follows every request", async () => {
  await withMpqBlk(["--poll-us=0"], async (fe, file) => {
    await fe.handshake();
    await fe.start();
    const ring = fe.queues[0].ring;
    for (let i = 0; i < 30; i++) {
      const r = await fe.blkRead(i * 8, 4096);
      assert.equal(r.status, Blk.S_OK);
      assert.deepEqual(r.data, readFileRange(file, i * 8 * 512, 4096));
      // EVENT_IDX: avail_event = the next avail index, set once the request was served (the
      // device may still be finishing that when the completion arrives: give it a moment).
      const deadline = performance.now() + 2000;
      while (ring.availEvent() !== ring.availIdx && performance.now() < deadline) {
        await new Promise((r) => setTimeout(r, 1));
      }
      assert.equal(ring.availEvent(), ring.availIdx, `request ${i}: the device asks for a kick`);
    }
    assert.deepEqual(await fe.stop(), [ring.availIdx]);
  }, { eventIdx: true });
});

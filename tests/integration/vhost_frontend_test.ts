/**
 * The test front-end (tests/helpers/vhost_frontend.ts) against the reference back-end,
 * qemu-storage-daemon 7.2: if these pass, the driver is known-good, and failures elsewhere point
 * at the back-end under test.
 */
import assert from "node:assert/strict";
import { Blk, Feature, Proto, VhostUserFrontend } from "../helpers/vhost_frontend.ts";
import { haveTool, makeDiskFile, patternBytes, readFileRange, startQsd } from "../helpers/vhost_backends.ts";

const HAVE_QSD = haveTool("qemu-storage-daemon");
const DISK = 16 << 20;

async function withQsd(
  queues: number,
  fn: (sock: string, file: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhost-fe-" });
  const file = `${dir}/disk.img`;
  const sock = `${dir}/qsd.sock`;
  await makeDiskFile(file, DISK, (off) => patternBytes(1 << 20, off >> 20));
  const qsd = await startQsd(file, sock, { queues });
  try {
    await fn(sock, file);
  } finally {
    await qsd.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name: "vhost frontend handshake with qemu-storage-daemon reads features, queues and config",
  ignore: !HAVE_QSD,
  async fn() {
    await withQsd(2, async (sock) => {
      await using fe = await VhostUserFrontend.connect(sock, { queues: 2 });
      const info = await fe.handshake();
      assert.ok(info.features & Feature.VERSION_1, "VERSION_1 offered");
      assert.ok(info.protocolFeatures & Proto.CONFIG, "CONFIG offered");
      assert.equal(info.queueNum, 2);
      const cfg = fe.blkConfig;
      assert.equal(cfg.capacity, BigInt(DISK / 512));
      assert.equal(cfg.numQueues, 2);
      await fe.start();
      const bases = await fe.stop();
      assert.deepEqual(bases, [0, 0]);
    });
  },
});

for (
  const variant of [
    { name: "chained", opts: {} },
    { name: "indirect + EVENT_IDX", opts: { indirect: true, eventIdx: true } },
    {
      name: "split memory, 4 data segments, ack every message",
      opts: { splitMemory: true, dataSegments: 4, ackAll: true },
    },
  ]
) {
  Deno.test({
    name: `vhost frontend ${variant.name} reads and writes match the file under qemu-storage-daemon`,
    ignore: !HAVE_QSD,
    async fn() {
      await withQsd(1, async (sock, file) => {
        await using fe = await VhostUserFrontend.connect(sock, variant.opts);
        await fe.handshake();
        await fe.start();
        // A read returns exactly what the file holds.
        const r = await fe.blkRead(2048 + 8, 8192);
        assert.equal(r.status, Blk.S_OK);
        assert.deepEqual(r.data, readFileRange(file, (2048 + 8) * 512, 8192));
        // Writes land in the file; concurrent requests all complete.
        const writes = [];
        for (let i = 0; i < 16; i++) writes.push(fe.blkWrite(100 + i * 16, patternBytes(8192, 1000 + i)));
        for (const w of await Promise.all(writes)) assert.equal(w.status, Blk.S_OK);
        assert.equal((await fe.blkFlush()).status, Blk.S_OK);
        for (let i = 0; i < 16; i++) {
          assert.deepEqual(readFileRange(file, (100 + i * 16) * 512, 8192), patternBytes(8192, 1000 + i));
        }
        const back = await fe.blkRead(100, 16 * 16 * 512);
        for (let i = 0; i < 16; i++) {
          assert.deepEqual(back.data.subarray(i * 8192, (i + 1) * 8192), patternBytes(8192, 1000 + i));
        }
        // virtio 1.2 5.2.6.2: UNSUPP for a discard with the unmap flag and for unknown flags.
        const du = await fe.blkRanges(Blk.T_DISCARD, [{ sector: 0, sectors: 8, unmap: true }]);
        assert.equal(du.status, Blk.S_UNSUPP);
        const wf = await fe.blkRanges(Blk.T_WRITE_ZEROES, [{ sector: 0, sectors: 8, flags: 2 }]);
        assert.equal(wf.status, Blk.S_UNSUPP);
        // Reading past the end fails with IOERR.
        const bad = await fe.blkRead(DISK / 512, 512);
        assert.equal(bad.status, Blk.S_IOERR);
        const bases = await fe.stop();
        assert.equal(bases[0], fe.queues[0].ring.availIdx);
      });
    },
  });
}

Deno.test({
  name: "vhost frontend drives two queues of qemu-storage-daemon",
  ignore: !HAVE_QSD,
  async fn() {
    await withQsd(2, async (sock, file) => {
      await using fe = await VhostUserFrontend.connect(sock, { queues: 2 });
      await fe.handshake();
      await fe.start();
      const [a, b] = await Promise.all([
        fe.blkWrite(0, patternBytes(4096, 1), 0),
        fe.blkWrite(8, patternBytes(4096, 2), 1),
      ]);
      assert.equal(a.status, Blk.S_OK);
      assert.equal(b.status, Blk.S_OK);
      assert.deepEqual(
        readFileRange(file, 0, 8192),
        new Uint8Array([...patternBytes(4096, 1), ...patternBytes(4096, 2)]),
      );
      assert.ok(fe.queues[1].kicks > 0);
      await fe.stop();
    });
  },
});

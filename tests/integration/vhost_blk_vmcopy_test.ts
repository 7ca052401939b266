/**
 * `mpq vhost blk --engine=vmcopy` over a real UNIX socket, driven by the test front-end: batched
 * reads and writes through the file mapping land where they were sent, stay coherent with
 * pread/pwrite of the file and with discard (punched holes read back as zeros through the mapping).
 */
import assert from "node:assert/strict";
import { connectUnix } from "../../ffi/mod.ts";
import { Blk, VhostUserFrontend } from "../helpers/vhost_frontend.ts";
import {
  MPQ_BLK_DISK,
  patternBytes,
  readFileRange,
  startMpqVhost,
  withMpqBlk,
} from "../helpers/vhost_backends.ts";

const DISK = MPQ_BLK_DISK;

for (const mode of ["writethrough", "writeback"]) {
  Deno.test(`vhost blk --engine=vmcopy (${mode}) reads and writes a batch that matches the file`, async () => {
    const args = ["--engine=vmcopy", ...(mode === "writeback" ? ["--writeback"] : [])];
    await withMpqBlk(args, async (fe, file) => {
      await fe.handshake();
      await fe.start();
      // Many requests in flight at once: the daemon copies each kick's batch with one call.
      const reads = [];
      for (let i = 0; i < 24; i++) reads.push(fe.blkRead(i * 600 + 7, 4096 + 512 * (i % 5)));
      const got = await Promise.all(reads);
      got.forEach((r, i) => {
        assert.equal(r.status, Blk.S_OK, `read ${i}`);
        assert.deepEqual(r.data, readFileRange(file, (i * 600 + 7) * 512, 4096 + 512 * (i % 5)), `read ${i}`);
      });
      const writes = [];
      for (let i = 0; i < 24; i++) {
        writes.push(fe.blkWrite(1024 + i * 40, patternBytes(4096 + 512 * i, 300 + i)));
      }
      for (const w of await Promise.all(writes)) assert.equal(w.status, Blk.S_OK);
      assert.equal((await fe.blkFlush()).status, Blk.S_OK);
      for (let i = 0; i < 24; i++) {
        const want = patternBytes(4096 + 512 * i, 300 + i);
        assert.deepEqual(
          readFileRange(file, (1024 + i * 40) * 512, want.length),
          want,
          `write ${i} in the file`,
        );
        assert.deepEqual((await fe.blkRead(1024 + i * 40, want.length)).data, want, `write ${i} read back`);
      }
      // A discard punches a hole in the file; the mapping reads it back as zeros.
      assert.equal((await fe.blkRanges(Blk.T_DISCARD, [{ sector: 1024, sectors: 8 }])).status, Blk.S_OK);
      assert.deepEqual((await fe.blkRead(1024, 4096)).data, new Uint8Array(4096));
      // The end of the disk: the last sector reads, one past it fails.
      assert.deepEqual((await fe.blkRead(DISK / 512 - 1, 512)).data, readFileRange(file, DISK - 512, 512));
      assert.equal((await fe.blkRead(DISK / 512, 512)).status, Blk.S_IOERR);
      await fe.stop();
    });
  });
}

/** The Prometheus text a --metrics socket serves. */
function readMetrics(path: string): string {
  const s = connectUnix(path, { nonBlocking: false });
  try {
    const buf = new Uint8Array(65536);
    let text = "";
    for (;;) {
      const r = s.recvMsg(buf);
      if (!r || r.bytes === 0) return text;
      text += new TextDecoder().decode(buf.subarray(0, r.bytes));
    }
  } finally {
    s.close();
  }
}

/** st_blocks of `path` in bytes (what the file really occupies). */
function allocatedBytes(path: string): number {
  return (Deno.statSync(path).blocks ?? NaN) * 512;
}

Deno.test("vhost blk on a sparse /dev/shm file: auto picks vmcopy, holes stay unallocated through reads, writes and discards", async () => {
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "mpq-vmcopy-sparse-" });
  const file = `${dir}/disk.img`;
  const size = 16 << 20;
  const data = patternBytes(64 << 10, 9);
  {
    using f = await Deno.open(file, { create: true, write: true });
    await f.truncate(size);
    await f.seek(4 << 20, Deno.SeekMode.Start);
    await f.write(data); // one 64 KiB extent at 4 MiB, the rest holes
  }
  const be = await startMpqVhost("blk", `${dir}/blk.sock`, {
    args: [`--blk-file=${file}`, `--metrics=${dir}/metrics.sock`],
  });
  try {
    await using fe = await VhostUserFrontend.connect(be.socketPath, { eventIdx: true });
    await fe.handshake();
    await fe.start();
    assert.equal(allocatedBytes(file), 64 << 10);
    // Reads over holes, over the data, and straddling both: right bytes, nothing allocated.
    const reads = await Promise.all([
      fe.blkRead(0, 65536),
      fe.blkRead((4 << 20) / 512, 65536),
      fe.blkRead((4 << 20) / 512 - 8, 8192),
      fe.blkRead((8 << 20) / 512, 4096),
    ]);
    for (const r of reads) assert.equal(r.status, Blk.S_OK);
    assert.deepEqual(reads[0].data, new Uint8Array(65536));
    assert.deepEqual(reads[1].data, data);
    assert.deepEqual(reads[2].data.subarray(0, 4096), new Uint8Array(4096));
    assert.deepEqual(reads[2].data.subarray(4096), data.subarray(0, 4096));
    assert.equal(allocatedBytes(file), 64 << 10, "reading holes allocated nothing");
    // A write fills one page; reading it back (through the mapping now) allocates nothing more.
    const w = patternBytes(4096, 10);
    assert.equal((await fe.blkWrite((10 << 20) / 512, w)).status, Blk.S_OK);
    assert.equal(allocatedBytes(file), (64 << 10) + 4096);
    assert.deepEqual((await fe.blkRead((10 << 20) / 512, 4096)).data, w);
    assert.deepEqual(readFileRange(file, 10 << 20, 4096), w);
    // Discard the data extent: it is a hole again and reads of it allocate nothing.
    assert.equal(
      (await fe.blkRanges(Blk.T_DISCARD, [{ sector: (4 << 20) / 512, sectors: 128 }])).status,
      Blk.S_OK,
    );
    assert.equal(allocatedBytes(file), 4096);
    const again = await fe.blkRead((4 << 20) / 512, 65536);
    assert.deepEqual(again.data, new Uint8Array(65536));
    assert.equal(allocatedBytes(file), 4096, "reading a discarded range allocated nothing");
    // Operators can see the helper thread and the poll window.
    const metrics = readMetrics(`${dir}/metrics.sock`);
    assert.match(metrics, /^mpq_vhost_copy_helper_copies_total\{device="block",queue="0"\} \d+$/m);
    assert.match(metrics, /^mpq_vhost_copy_helper_sharing\{device="block",queue="0"\} [01]$/m);
    assert.match(metrics, /^mpq_vhost_poll_window_seconds\{device="block"\} [0-9.e-]+$/m);
    await fe.stop();
  } finally {
    await be.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

/**
 * `mpq vhost blk --engine=vmcopy` over a real UNIX socket, driven by the test front-end: batched
 * reads and writes through the file mapping land where they were sent, stay coherent with
 * pread/pwrite of the file and with discard (punched holes read back as zeros through the mapping).
 */
import assert from "node:assert/strict";
import { Blk } from "../helpers/vhost_frontend.ts";
import { MPQ_BLK_DISK, patternBytes, readFileRange, withMpqBlk } from "../helpers/vhost_backends.ts";

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

/**
 * `mpq vhost blk` against a malicious guest: corrupt rings mark the device broken (the error
 * eventfd is signalled) instead of crashing or hanging the daemon, and the daemon then serves a
 * new, well-behaved front-end.
 */
import assert from "node:assert/strict";
import { Blk, type FrontendQueue, VhostUserFrontend } from "../helpers/vhost_frontend.ts";
import { DescFlags, type SplitQueue } from "../helpers/virtio_ring.ts";
import { patternBytes, readFileRange, withMpqBlk } from "../helpers/vhost_backends.ts";

const QSIZE = 64;

async function until(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A request header (IN, sector 0) and a status byte in guest RAM; returns their GPAs. */
function header(fe: VhostUserFrontend, type: number = Blk.T_IN): { hdr: number; status: number } {
  const hdr = fe.ram.alloc(64, 64, 0);
  const o = fe.ram.offset(hdr, 17);
  fe.ram.view.setUint32(o, type, true);
  fe.ram.view.setBigUint64(o + 8, 0n, true);
  fe.ram.view.setUint8(o + 16, 0xff);
  return { hdr, status: hdr + 16 };
}

interface Case {
  name: string;
  /** When the corrupt() returns a status GPA: may the request complete instead, and how. */
  completes?: "error" | "any";
  /** Corrupts the ring and publishes; returns a status GPA when the request may complete with an error instead. */
  corrupt(fe: VhostUserFrontend, ring: SplitQueue): number | null;
}

const CASES: Case[] = [
  {
    name: "a descriptor loop",
    corrupt(fe, ring) {
      const { hdr } = header(fe);
      const data = fe.ram.alloc(4096, 4096);
      ring.rawDesc(60, { addr: BigInt(hdr), len: 16, flags: DescFlags.NEXT, next: 61 });
      ring.rawDesc(61, { addr: BigInt(data), len: 4096, flags: DescFlags.NEXT | DescFlags.WRITE, next: 60 });
      ring.rawAvail(60);
      return null;
    },
  },
  {
    name: "a next index beyond the table",
    corrupt(fe, ring) {
      const { hdr } = header(fe);
      ring.rawDesc(60, { addr: BigInt(hdr), len: 16, flags: DescFlags.NEXT, next: QSIZE + 7 });
      ring.rawAvail(60);
      return null;
    },
  },
  {
    name: "an avail head beyond the table",
    corrupt(_fe, ring) {
      ring.rawAvail(QSIZE + 3);
      return null;
    },
  },
  {
    name: "an avail index more than a ring ahead",
    corrupt(_fe, ring) {
      ring.rawAvailIdx(ring.availIdx + QSIZE + 5);
      return null;
    },
  },
  {
    name: "an indirect table inside an indirect table",
    corrupt(fe, ring) {
      const { hdr } = header(fe);
      const inner = fe.ram.alloc(64, 64, 0);
      const outer = fe.ram.alloc(64, 64, 0);
      const o = fe.ram.offset(outer, 32);
      const v = fe.ram.view;
      v.setBigUint64(o, BigInt(hdr), true);
      v.setUint32(o + 8, 16, true);
      v.setUint16(o + 12, DescFlags.NEXT, true);
      v.setUint16(o + 14, 1, true);
      v.setBigUint64(o + 16, BigInt(inner), true);
      v.setUint32(o + 24, 32, true);
      v.setUint16(o + 28, DescFlags.INDIRECT, true);
      ring.rawDesc(60, { addr: BigInt(outer), len: 32, flags: DescFlags.INDIRECT, next: 0 });
      ring.rawAvail(60);
      return null;
    },
  },
  {
    name: "an indirect table with more entries than the queue",
    completes: "any",
    corrupt(fe, ring) {
      const table = fe.ram.alloc(16 * QSIZE * 2, 4096);
      const t = fe.ram.offset(table, 16 * QSIZE * 2);
      const { hdr, status } = header(fe, Blk.T_OUT);
      const n = QSIZE * 2;
      for (let i = 0; i < n; i++) {
        const last = i === n - 1;
        fe.ram.view.setBigUint64(t + 16 * i, BigInt(last ? status : hdr), true);
        fe.ram.view.setUint32(t + 16 * i + 8, last ? 1 : 16, true);
        fe.ram.view.setUint16(t + 16 * i + 12, last ? DescFlags.WRITE : DescFlags.NEXT, true);
        fe.ram.view.setUint16(t + 16 * i + 14, i + 1, true);
      }
      ring.rawDesc(60, { addr: BigInt(table), len: 16 * n, flags: DescFlags.INDIRECT, next: 0 });
      ring.rawAvail(60);
      // The spec forbids drivers such chains but does not make devices reject them: a device
      // that walks the bounded table may complete the request (a write of 127 x 16 header bytes).
      return status;
    },
  },
  {
    name: "a data buffer outside guest memory (GPA 16 TiB)",
    completes: "error",
    corrupt(fe, ring) {
      const { hdr, status } = header(fe);
      ring.rawDesc(60, { addr: BigInt(hdr), len: 16, flags: DescFlags.NEXT, next: 61 });
      ring.rawDesc(61, { addr: 1n << 44n, len: 4096, flags: DescFlags.NEXT | DescFlags.WRITE, next: 62 });
      ring.rawDesc(62, { addr: BigInt(status), len: 1, flags: DescFlags.WRITE, next: 0 });
      ring.rawAvail(60);
      return status;
    },
  },
  {
    name: "a buffer that straddles the end of guest memory",
    completes: "error",
    corrupt(fe, ring) {
      const { hdr, status } = header(fe);
      const end = fe.ram.regions[0].gpa + fe.ram.regions[0].size;
      ring.rawDesc(60, { addr: BigInt(hdr), len: 16, flags: DescFlags.NEXT, next: 61 });
      ring.rawDesc(61, {
        addr: BigInt(end - 512),
        len: 4096,
        flags: DescFlags.NEXT | DescFlags.WRITE,
        next: 62,
      });
      ring.rawDesc(62, { addr: BigInt(status), len: 1, flags: DescFlags.WRITE, next: 0 });
      ring.rawAvail(60);
      return status;
    },
  },
];

for (const c of CASES) {
  Deno.test(`vhost blk survives ${c.name}: device broken or request failed, daemon serves the next front-end`, async () => {
    await withMpqBlk([], async (fe, file, be) => {
      await fe.handshake();
      await fe.start();
      assert.equal((await fe.blkWrite(8, patternBytes(4096, 5))).status, Blk.S_OK);
      const q: FrontendQueue = fe.queues[0];
      const statusGpa = c.corrupt(fe, q.ring);
      q.ring.publish();
      fe.kickQueue(q);
      if (statusGpa === null) {
        await until(`the error eventfd of queue 0 is signalled (${c.name})`, () => q.errors > 0n);
      } else {
        // Either the device is marked broken, or this request completes (with an error status
        // when its buffer is bad).
        const st = () => fe.ram.view.getUint8(fe.ram.offset(statusGpa));
        await until("the device reports the bad buffer", () => q.errors > 0n || q.ring.usedIdx() === 2);
        if (q.errors === 0n && c.completes === "error") {
          assert.notEqual(st(), Blk.S_OK, "a request with a bad buffer must not succeed");
        }
      }
      assert.equal(be.child.status, null, "the daemon still runs");
      await fe.close();

      await using good = await VhostUserFrontend.connect(be.socketPath);
      await good.handshake();
      await good.start();
      assert.deepEqual((await good.blkRead(8, 4096)).data, patternBytes(4096, 5));
      assert.equal((await good.blkWrite(16, patternBytes(4096, 6))).status, Blk.S_OK);
      assert.deepEqual(readFileRange(file, 16 * 512, 4096), patternBytes(4096, 6));
      await good.stop();
    }, { queueSize: QSIZE });
  });
}

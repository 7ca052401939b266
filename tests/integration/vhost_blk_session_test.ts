/**
 * `mpq vhost blk` across connections: a new front-end is served after the previous one left, and
 * with INFLIGHT_SHMFD requests in flight when the daemon died (kill -9) are resubmitted by the
 * next daemon, so no write is lost and none is executed twice.
 */
import assert from "node:assert/strict";
import { Signal } from "../../ffi/mod.ts";
import { Blk, VhostUserFrontend } from "../helpers/vhost_frontend.ts";
import {
  type Backend,
  makeDiskFile,
  patternBytes,
  readFileRange,
  startMpqVhost,
} from "../helpers/vhost_backends.ts";

const DISK = 16 << 20;

interface Env {
  dir: string;
  file: string;
  sock: string;
  /** Daemons started so far (all stopped at the end). */
  daemons: Backend[];
  start(): Promise<Backend>;
}

async function withEnv(fn: (env: Env) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhost-session-" });
  const file = `${dir}/disk.img`;
  await makeDiskFile(file, DISK, (off) => patternBytes(1 << 20, 500 + (off >> 20)));
  const env: Env = {
    dir,
    file,
    sock: `${dir}/blk.sock`,
    daemons: [],
    async start() {
      const be = await startMpqVhost("blk", env.sock, { args: [`--blk-file=${file}`] });
      env.daemons.push(be);
      return be;
    },
  };
  try {
    await fn(env);
  } finally {
    for (const d of env.daemons) await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

async function until(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function killHard(be: Backend): Promise<void> {
  be.child.kill(Signal.SIGKILL);
  const st = await be.child.wait();
  assert.equal(st.signal, Signal.SIGKILL);
}

Deno.test("vhost blk serves a new front-end after the previous one disconnected, even mid-request", async () => {
  await withEnv(async (env) => {
    const be = await env.start();
    {
      await using a = await VhostUserFrontend.connect(env.sock);
      await a.handshake();
      await a.start();
      assert.equal((await a.blkWrite(64, patternBytes(8192, 1))).status, Blk.S_OK);
      // Leave without stop(): requests still queued, socket closed under the daemon.
      const pending = Promise.allSettled([
        a.blkWrite(128, patternBytes(65536, 2)),
        a.blkWrite(256, patternBytes(65536, 3)),
      ]);
      await a.close();
      await pending;
    }
    for (let round = 0; round < 3; round++) {
      await using b = await VhostUserFrontend.connect(env.sock, {
        eventIdx: round === 1,
        indirect: round === 2,
      });
      await b.handshake();
      await b.start();
      const r = await b.blkRead(64, 8192);
      assert.equal(r.status, Blk.S_OK);
      assert.deepEqual(r.data, patternBytes(8192, 1), `round ${round}: the first front-end's write is there`);
      assert.equal((await b.blkWrite(1024 + round * 16, patternBytes(8192, 10 + round))).status, Blk.S_OK);
      assert.deepEqual(
        readFileRange(env.file, (1024 + round * 16) * 512, 8192),
        patternBytes(8192, 10 + round),
      );
      await b.stop();
    }
    assert.equal(be.child.status, null, "the daemon still runs");
  });
});

Deno.test("vhost blk inflight: after kill -9, the next daemon resubmits exactly the requests left in flight", async () => {
  await withEnv(async (env) => {
    const first = await env.start();
    await using fe = await VhostUserFrontend.connect(env.sock, { queueSize: 64 });
    await fe.handshake();
    await fe.start();
    assert.ok(fe.inflight, "GET_INFLIGHT_FD gave an inflight region");
    assert.equal((await fe.blkWrite(0, patternBytes(4096, 9))).status, Blk.S_OK);
    await killHard(first);
    await until("the front-end sees the daemon gone", () => !fe.connected);

    // Three writes A, B, C reach the ring while no daemon runs.
    const q = fe.queues[0];
    const at = { A: 2048, B: 4096, C: 6144 } as const;
    const pA = fe.blkWrite(at.A, patternBytes(16384, 1));
    const pB = fe.blkWrite(at.B, patternBytes(16384, 2));
    const pC = fe.blkWrite(at.C, patternBytes(16384, 3));
    await until("three requests are on the ring", () => q.ring.availIdx === 4);
    const [A, B, C] = [1, 2, 3].map((i) => q.ring.availEntry(i));
    // What a daemon that died mid-batch leaves behind: it had popped A, B and C, completed B only
    // (out of order, used->idx 2), and A and C are still marked in flight.
    q.ring.rawUsed(B, 1);
    fe.poll(q);
    await pB; // completed "by the dead daemon": it must not run again
    const region = fe.inflight!;
    const v = new DataView(region.map.bytes.buffer);
    assert.equal(v.getUint16(8, true), 1, "inflight version 1 written by the back-end");
    assert.equal(v.getUint16(10, true), 64, "desc_num = queue size");
    const desc = (i: number) => 16 + 16 * i;
    for (let i = 0; i < 64; i++) v.setUint8(desc(i), 0);
    v.setUint8(desc(A), 1);
    v.setBigUint64(desc(A) + 8, 1000n, true);
    v.setUint8(desc(C), 1);
    v.setBigUint64(desc(C) + 8, 1001n, true);
    v.setUint16(12, B, true); // last_batch_head
    v.setUint16(14, 2, true); // used_idx

    await env.start();
    await fe.resume();
    const [a, c] = await Promise.all([pA, pC]);
    assert.equal(a.status, Blk.S_OK);
    assert.equal(c.status, Blk.S_OK);
    assert.deepEqual(readFileRange(env.file, at.A * 512, 16384), patternBytes(16384, 1), "A resubmitted");
    assert.deepEqual(readFileRange(env.file, at.C * 512, 16384), patternBytes(16384, 3), "C resubmitted");
    assert.deepEqual(
      readFileRange(env.file, at.B * 512, 16384),
      patternBytes(1 << 20, 502).subarray(0, 16384),
      "B, already completed, was not executed again",
    );
    assert.equal(q.ring.usedIdx(), 4);
    // The device keeps working after the resubmission.
    assert.equal((await fe.blkWrite(8000, patternBytes(4096, 4))).status, Blk.S_OK);
    assert.deepEqual(await fe.stop(), [5]);
  });
});

Deno.test("vhost blk inflight: 64 writes racing a kill -9 all land after the daemon is restarted", async () => {
  await withEnv(async (env) => {
    const first = await env.start();
    await using fe = await VhostUserFrontend.connect(env.sock, { queueSize: 256, depth: 64 });
    await fe.handshake();
    await fe.start();
    const q = fe.queues[0];
    const writes = [];
    for (let i = 0; i < 64; i++) writes.push(fe.blkWrite(i * 256, patternBytes(65536, 100 + i)));
    await until("all 64 writes are on the ring", () => q.ring.availIdx === 64, 10_000);
    await killHard(first);
    const leftInFlight = q.ring.availIdx - q.ring.usedIdx();
    await env.start();
    await fe.resume();
    const results = await Promise.all(writes);
    results.forEach((r, i) =>
      assert.equal(r.status, Blk.S_OK, `write ${i} (${leftInFlight} left in flight)`)
    );
    for (let i = 0; i < 64; i++) {
      assert.deepEqual(
        readFileRange(env.file, i * 256 * 512, 65536),
        patternBytes(65536, 100 + i),
        `write ${i}`,
      );
    }
    assert.equal(q.ring.usedIdx(), 64, "every request completed exactly once");
    await fe.stop();
  });
});

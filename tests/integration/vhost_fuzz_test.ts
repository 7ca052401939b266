/**
 * Fuzzing `mpq vhost blk` (bounded, seeded): random and mutated vhost-user messages, then random
 * ring contents. After every message the daemon must answer a GET_FEATURES probe or close the
 * connection (never hang), it must never exit, and at the end a well-behaved front-end is served.
 * VHOST_FUZZ_SEED reproduces a run; VHOST_FUZZ_ROUNDS scales it.
 */
import assert from "node:assert/strict";
import { EventFd, ftruncate, memfdCreate, type OwnedFd } from "../../ffi/mod.ts";
import { Blk, encodeMessage, MsgFlags, Req, reqName, VhostUserFrontend } from "../helpers/vhost_frontend.ts";
import { DescFlags } from "../helpers/virtio_ring.ts";
import { type Backend, patternBytes, readFileRange, withMpqBlk } from "../helpers/vhost_backends.ts";

const SEED = Number(Deno.env.get("VHOST_FUZZ_SEED") ?? Math.floor(Math.random() * 2 ** 31));
const ROUNDS = Number(Deno.env.get("VHOST_FUZZ_ROUNDS") ?? 1000);

/** xorshift32, so a seed reproduces the run. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

const KNOWN = Object.values(Req);

async function expectGoodFrontend(be: Backend, file: string, tag: string): Promise<void> {
  assert.equal(be.child.status, null, `${tag}: the daemon exited (${be.child.status?.text})`);
  await using good = await VhostUserFrontend.connect(be.socketPath);
  await good.handshake();
  await good.start();
  const data = patternBytes(8192, 4242);
  assert.equal((await good.blkWrite(100, data)).status, Blk.S_OK, tag);
  assert.deepEqual((await good.blkRead(100, 8192)).data, data, tag);
  assert.deepEqual(readFileRange(file, 100 * 512, 8192), data, tag);
  await good.stop();
}

Deno.test(`vhost fuzz: ${ROUNDS} random and mutated messages never hang or kill the daemon (seed ${SEED})`, async () => {
  const rnd = prng(SEED);
  const pick = <T>(xs: readonly T[]): T => xs[rnd() % xs.length];
  const memfd: OwnedFd = memfdCreate("fuzz-mem");
  ftruncate(memfd, 1 << 20);
  const ev = new EventFd();
  try {
    await withMpqBlk([], async (fe, file, be) => {
      let closes = 0;
      let replies = 0;
      for (let i = 0; i < ROUNDS; i++) {
        if (!fe.connected) {
          await fe.reconnect();
          // Two times in three start from a proper handshake (and a started device), so later
          // messages hit set-up state.
          const setup = rnd() % 3;
          if (setup > 0) await fe.handshake().then(() => setup > 1 ? fe.start() : undefined).catch(() => {});
        }
        const request = rnd() % 4 === 0 ? rnd() % 64 : pick(KNOWN);
        const flags = pick([MsgFlags.VERSION, MsgFlags.VERSION | MsgFlags.NEED_REPLY, 0, 0x5, 0x2, rnd()]);
        const len = pick([0, 4, 8, 12, 20, 24, 40, 48, 72, 264, rnd() % 300]);
        const payload = new Uint8Array(len);
        for (let j = 0; j < len; j++) payload[j] = rnd() & 0xff;
        // Plausible values are more interesting than noise: small indices and sizes.
        if (len >= 8 && rnd() % 2) new DataView(payload.buffer).setUint32(0, rnd() % 3, true);
        if (len >= 8 && rnd() % 2) {
          new DataView(payload.buffer).setUint32(4, pick([0, 1, 64, 128, 256, 0xffff]), true);
        }
        const bigSize = rnd() % 16 === 0;
        const bytes = encodeMessage(request, flags, payload, bigSize ? 0x10000 + (rnd() % 0x100000) : len);
        const fds = rnd() % 3 === 0 ? [pick([memfd, ev.fd])] : [];
        const tag =
          `seed ${SEED} message ${i}: ${reqName(request)} flags 0x${flags.toString(16)} size ${len}` +
          `${bigSize ? " (header claims more)" : ""} fds ${fds.length}`;
        try {
          fe.sendRaw(bytes, fds);
          fe.sendRaw(encodeMessage(Req.GET_FEATURES, MsgFlags.VERSION));
        } catch {
          closes++;
          continue;
        }
        // Replies to the fuzz message may come first; the probe's reply must come, or a close.
        while (true) {
          const m = await fe.waitAny(10_000).catch((e) => {
            throw new Error(`${tag}: the daemon neither answered the probe nor closed: ${e.message}`);
          });
          if (m === null) {
            closes++;
            break;
          }
          for (const f of m.fds) f.close();
          replies++;
          if (m.request === Req.GET_FEATURES && (m.flags & MsgFlags.REPLY)) break;
        }
        assert.equal(be.child.status, null, `${tag}: the daemon exited (${be.child.status?.text})`);
      }
      assert.ok(replies > 0, "some probes were answered");
      assert.ok(closes + replies > 0);
      await fe.close();
      await expectGoodFrontend(be, file, `seed ${SEED} after message fuzzing (${closes} closes)`);
    }, { timeoutMs: 10_000 });
  } finally {
    ev.close();
    memfd.close();
  }
});

Deno.test(`vhost fuzz: random ring contents never hang or kill the daemon (seed ${SEED})`, async () => {
  const rnd = prng(SEED ^ 0x5bd1e995);
  const QSIZE = 64;
  await withMpqBlk([], async (first, file, be) => {
    await first.close(); // one front-end at a time: each session below connects anew
    const sessions = Math.max(2, Math.floor(ROUNDS / 30));
    for (let s = 0; s < sessions; s++) {
      const tag = `seed ${SEED} ring session ${s}`;
      await using fe = await VhostUserFrontend.connect(be.socketPath, {
        queueSize: QSIZE,
        eventIdx: (rnd() & 1) === 1,
        indirect: (rnd() & 1) === 1,
      });
      await fe.handshake();
      await fe.start();
      const q = fe.queues[0];
      const ram = fe.ram;
      // A pool of plausible buffers (headers with random types and sectors, data, status).
      const bufs: number[] = [];
      for (let i = 0; i < 16; i++) {
        const g = ram.alloc(4096, 4096);
        const o = ram.offset(g, 4096);
        for (let j = 0; j < 4096; j += 4) ram.view.setUint32(o + j, rnd(), true);
        ram.view.setUint32(
          o,
          [Blk.T_IN, Blk.T_OUT, Blk.T_FLUSH, Blk.T_GET_ID, Blk.T_DISCARD, 7][rnd() % 6],
          true,
        );
        ram.view.setBigUint64(o + 8, BigInt(rnd() % 40000), true);
        bufs.push(g);
      }
      for (let r = 0; r < 30; r++) {
        const n = 1 + (rnd() % 6);
        for (let k = 0; k < n; k++) {
          const id = rnd() % QSIZE;
          const wild = rnd() % 8 === 0;
          q.ring.rawDesc(id, {
            addr: wild
              ? BigInt(rnd()) * BigInt(rnd() % 0x10000)
              : BigInt(bufs[rnd() % bufs.length] + (rnd() % 64)),
            len: pick(rnd, [0, 1, 16, 512, 4096, 16 * (1 + (rnd() % 8)), rnd()]),
            flags: rnd() % 5 === 0
              ? DescFlags.INDIRECT
              : (rnd() % 2 ? DescFlags.NEXT : 0) | (rnd() % 2 ? DescFlags.WRITE : 0),
            next: rnd() % 3 === 0 ? rnd() % 0x10000 : rnd() % QSIZE,
          });
        }
        const heads = 1 + (rnd() % 4);
        for (let k = 0; k < heads; k++) q.ring.rawAvail(rnd() % 8 === 0 ? rnd() % 0x10000 : rnd() % QSIZE);
        q.ring.publish();
        fe.kickQueue(q);
        if (r % 10 === 9) {
          // Give the daemon a moment, then check it is alive and still talks to us.
          await new Promise((res) => setTimeout(res, 20));
          assert.equal(
            be.child.status,
            null,
            `${tag} round ${r}: the daemon exited (${be.child.status?.text})`,
          );
          if (fe.connected) {
            fe.sendRaw(encodeMessage(Req.GET_FEATURES, MsgFlags.VERSION));
            const m = await fe.waitAny(10_000).catch((e) => {
              throw new Error(`${tag} round ${r}: no answer and no close: ${e.message}`);
            });
            for (const f of m?.fds ?? []) f.close();
          }
        }
      }
    }
    await expectGoodFrontend(be, file, `seed ${SEED} after ring fuzzing`);
  });
});

function pick<T>(rnd: () => number, xs: readonly T[]): T {
  return xs[rnd() % xs.length];
}

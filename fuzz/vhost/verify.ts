/**
 * The well-behaved front-end check the runner makes after starting the daemon and every few cases:
 * a full QEMU-like handshake and start on every queue, then blk: a pattern written and read back on
 * each queue and found in the disk file; rng: entropy of the requested length that is not all
 * zeros and differs between two reads; then a burst of {@link BURST} requests per queue that the
 * daemon takes in one pass (submitted while the queue is disabled, then enabled), so whatever it
 * starts lazily for big batches (vmcopy's helper thread) is running before the baseline is taken;
 * then a proper stop. Whatever the fuzz cases did before, the daemon must still serve this.
 * @module
 */
import {
  Blk,
  type FrontendQueue,
  Req,
  statePayload,
  VhostUserFrontend,
} from "../../tests/helpers/vhost_frontend.ts";
import { patternBytes, readFileRange } from "../../tests/helpers/vhost_backends.ts";
import { DISK_SIZE, type FuzzDevice, queuesFor } from "./layout.ts";

/** Requests per queue in the burst. */
export const BURST = 16;

/** Runs `submit` while the queue is disabled, then enables it: the daemon sees them all at once. */
async function burst<T>(fe: VhostUserFrontend, q: FrontendQueue, submit: () => Promise<T>[]): Promise<T[]> {
  await fe.send(Req.SET_VRING_ENABLE, statePayload(q.index, 0), { reply: "ack" });
  const all = submit();
  await fe.send(Req.SET_VRING_ENABLE, statePayload(q.index, 1), { reply: "ack" });
  return await Promise.all(all);
}

/**
 * Runs the check; resolves with null when every request did what it should, else what failed.
 * @example
 * const err = await verifyFrontend(sock, "blk", { diskPath, round: 3, timeoutMs: 5000 });
 */
export async function verifyFrontend(
  socketPath: string,
  device: FuzzDevice,
  options: { diskPath?: string; round: number; timeoutMs: number },
): Promise<string | null> {
  let fe: VhostUserFrontend;
  try {
    fe = await VhostUserFrontend.connect(socketPath, {
      device,
      queues: queuesFor(device),
      queueSize: 128,
      memSize: 8 << 20,
      maxRequestBytes: 64 << 10,
      timeoutMs: options.timeoutMs,
    });
  } catch (e) {
    return `connect: ${(e as Error).message}`;
  }
  try {
    await fe.handshake();
    await fe.start();
    for (const q of fe.queues) {
      if (device === "rng") {
        const a = await fe.rngRead(64, q.index);
        const b = await fe.rngRead(64, q.index);
        if (a.len !== 64 || b.len !== 64) {
          return `queue ${q.index}: entropy reads returned ${a.len} and ${b.len} bytes, expected 64`;
        }
        if (a.data.every((x) => x === 0)) return `queue ${q.index}: 64 bytes of entropy were all zero`;
        if (a.data.every((x, i) => x === b.data[i])) {
          return `queue ${q.index}: two entropy reads returned the same bytes`;
        }
        const many = await burst(fe, q, () => Array.from({ length: BURST }, () => fe.rngRead(64, q.index)));
        const short = many.findIndex((r) => r.len !== 64);
        if (short >= 0) {
          return `queue ${q.index}: burst entropy read ${short} returned ${many[short].len} bytes`;
        }
        continue;
      }
      // The last MiB of the disk is the checks' own; each round and queue writes its own pattern.
      const sector = (DISK_SIZE - (1 << 20)) / 512 + 128 * q.index;
      const data = patternBytes(16384, options.round * 131 + q.index + 1);
      const w = await fe.blkWrite(sector, data, q.index);
      if (w.status !== Blk.S_OK) return `queue ${q.index}: write status ${w.status}`;
      const r = await fe.blkRead(sector, data.byteLength, q.index);
      if (r.status !== Blk.S_OK) return `queue ${q.index}: read status ${r.status}`;
      const bad = r.data.findIndex((x, i) => x !== data[i]);
      if (bad >= 0) return `queue ${q.index}: read back differs from what was written at byte ${bad}`;
      if (options.diskPath) {
        const onDisk = readFileRange(options.diskPath, sector * 512, data.byteLength);
        const d = onDisk.findIndex((x, i) => x !== data[i]);
        if (d >= 0) return `queue ${q.index}: the disk file differs from what was written at byte ${d}`;
      }
      // The burst: BURST 4 KiB writes in one pass, then BURST reads in one pass.
      const at = (k: number) => sector + 32 + 8 * k;
      const pat = (k: number) => patternBytes(4096, options.round * 977 + q.index * 31 + k + 7);
      const ws = await burst(
        fe,
        q,
        () => Array.from({ length: BURST }, (_, k) => fe.blkWrite(at(k), pat(k), q.index)),
      );
      const badW = ws.findIndex((r) => r.status !== Blk.S_OK);
      if (badW >= 0) return `queue ${q.index}: burst write ${badW} status ${ws[badW].status}`;
      const rs = await burst(
        fe,
        q,
        () => Array.from({ length: BURST }, (_, k) => fe.blkRead(at(k), 4096, q.index)),
      );
      for (let k = 0; k < BURST; k++) {
        const want = pat(k);
        if (rs[k].status !== Blk.S_OK) return `queue ${q.index}: burst read ${k} status ${rs[k].status}`;
        const b = rs[k].data.findIndex((x, i) => x !== want[i]);
        if (b >= 0) return `queue ${q.index}: burst read ${k} differs from what was written at byte ${b}`;
      }
    }
    await fe.stop();
    return null;
  } catch (e) {
    return (e as Error).message;
  } finally {
    await fe.close();
  }
}

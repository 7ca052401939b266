/**
 * The well-behaved front-end check the runner makes after starting the daemon and every few cases:
 * a full QEMU-like handshake and start on every queue, then blk: a pattern written and read back on
 * each queue and found in the disk file; rng: entropy of the requested length that is not all
 * zeros and differs between two reads; then a proper stop. Whatever the fuzz cases did before, the
 * daemon must still serve this.
 * @module
 */
import { Blk, VhostUserFrontend } from "../../tests/helpers/vhost_frontend.ts";
import { patternBytes, readFileRange } from "../../tests/helpers/vhost_backends.ts";
import { DISK_SIZE, type FuzzDevice, queuesFor } from "./layout.ts";

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
    }
    await fe.stop();
    return null;
  } catch (e) {
    return (e as Error).message;
  } finally {
    await fe.close();
  }
}

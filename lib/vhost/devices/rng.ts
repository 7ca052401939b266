/**
 * virtio-rng over vhost-user (virtio 1.2 §5.4): every device-writable buffer is filled from
 * getrandom(2), straight into mapped guest memory.
 * @module
 */
import { getRandom } from "../../../ffi/mod.ts";
import type { DeviceContext, VhostUserDevice } from "../backend.ts";
import type { Metrics } from "../metrics.ts";
import { DescriptorChain, type VirtQueue } from "../virtqueue.ts";

/** Most bytes handed out per request (a guest asks for 64 at a time; cap a greedy one). */
export const RNG_MAX_REQUEST = 64 * 1024;

/**
 * @example
 * const dev = new RngDevice();
 */
export class RngDevice implements VhostUserDevice {
  readonly type = "rng";
  readonly features = 0n;
  readonly numQueues = 1;
  readonly #chain = new DescriptorChain();
  #metrics: Metrics | null = null;

  readConfig(_offset: number, size: number): Uint8Array {
    return new Uint8Array(size);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    throw new RangeError(`virtio-rng has no config space: write of ${data.byteLength} bytes at ${offset}`);
  }

  setFeatures(_features: bigint): void {}

  startQueue(_vq: VirtQueue, ctx: DeviceContext): void {
    this.#metrics = ctx.metrics;
  }

  stopQueue(_vq: VirtQueue): void {}

  processQueue(vq: VirtQueue): void {
    const c = this.#chain;
    const m = this.#metrics?.queue(vq.index);
    do {
      while (vq.pop(c)) {
        const t0 = performance.now();
        let given = 0;
        for (let i = 0; i < c.count && given < RNG_MAX_REQUEST; i++) {
          if (!c.writes[i]) continue;
          const len = Math.min(c.lengths[i], RNG_MAX_REQUEST - given);
          getRandom(c.regions[i]!.bytes.subarray(c.offsets[i], c.offsets[i] + len));
          given += len;
        }
        vq.pushUsed(c.head, given);
        if (m) {
          m.requests++;
          m.readBytes += given;
          m.observe((performance.now() - t0) * 1000);
        }
      }
      vq.flush();
    } while (vq.enableNotification());
  }

  close(): void {}
}

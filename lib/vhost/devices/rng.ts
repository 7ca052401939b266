/**
 * virtio-rng over vhost-user (virtio 1.2 §5.4): every device-writable buffer is filled from
 * getrandom(2), straight into mapped guest memory.
 * @module
 */
import { getRandom } from "../../../ffi/mod.ts";
import type { DeviceContext, VhostUserDevice } from "../backend.ts";
import type { GuestRegion } from "../guest_memory.ts";
import type { Metrics } from "../metrics.ts";
import { DescriptorChain, type VirtQueue } from "../virtqueue.ts";

/** Most bytes handed out per request (a guest asks for 64 at a time; cap a greedy one). */
export const RNG_MAX_REQUEST = 64 * 1024;
/** Rings' worth of requests one call serves before letting the reactor run (as blk's MAX_PASSES). */
export const RNG_FAIR_SHARE = 4;
/** Random bytes one call hands out at most before letting the reactor run. */
export const RNG_TURN_BYTES = 1 << 20;

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const dev = new RngDevice(); // one queue, no config space, no state until a queue starts
 * assert.equal(dev.numQueues, 1);
 * assert.deepEqual(dev.readConfig(0, 4), new Uint8Array(4));
 * assert.throws(() => dev.writeConfig(0, new Uint8Array(1)), RangeError);
 * dev.close();
 * ```
 */
export class RngDevice implements VhostUserDevice {
  readonly type = "rng";
  readonly features = 0n;
  readonly numQueues = 1;
  readonly #chain = new DescriptorChain();
  readonly #fill = (r: GuestRegion, offset: number, len: number): void => {
    getRandom(r.bytes.subarray(offset, offset + len));
  };
  #metrics: Metrics | null = null;
  /** Per queue: a pass stopped at its fair share with buffers left (continued on the next turn). */
  readonly #resume: boolean[] = [];
  readonly #pollers: (() => void)[] = [];

  readConfig(_offset: number, size: number): Uint8Array {
    return new Uint8Array(size);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    throw new RangeError(`virtio-rng has no config space: write of ${data.byteLength} bytes at ${offset}`);
  }

  setFeatures(_features: bigint): void {}

  startQueue(vq: VirtQueue, ctx: DeviceContext): void {
    this.#metrics = ctx.metrics;
    this.#resume[vq.index] = false;
    this.#pollers[vq.index]?.();
    // Continues a ring left with buffers after a fair share, once the reactor has served the rest
    // (vhost-user messages, other queues).
    this.#pollers[vq.index] = ctx.reactor.addPoller(() => {
      if (!this.#resume[vq.index]) return false;
      this.#resume[vq.index] = false;
      ctx.process?.(vq);
      return this.#resume[vq.index];
    });
  }

  stopQueue(vq: VirtQueue): void {
    this.#resume[vq.index] = false;
  }

  /** Requests complete within processQueue: nothing can be left in flight. */
  cancelQueue(_vq: VirtQueue): void {}

  processQueue(vq: VirtQueue): void {
    const c = this.#chain;
    const m = this.#metrics?.queue(vq.index);
    // Fairness, as blk: at most RNG_FAIR_SHARE rings' worth (or RNG_TURN_BYTES) per call.
    const budget = RNG_FAIR_SHARE * vq.size;
    let served = 0;
    let bytes = 0;
    do {
      while (served < budget && bytes < RNG_TURN_BYTES && vq.pop(c)) {
        const t0 = performance.now();
        const given = c.segments(true, 0, Math.min(c.writable, RNG_MAX_REQUEST), this.#fill);
        vq.pushUsed(c.head, given);
        served++;
        bytes += given;
        if (m) {
          m.requests++;
          m.readBytes += given;
          m.observe((performance.now() - t0) * 1000);
        }
      }
      vq.flush();
      if ((served >= budget || bytes >= RNG_TURN_BYTES) && vq.hasWork()) {
        this.#resume[vq.index] = true;
        return;
      }
    } while (vq.enableNotification());
  }

  close(): void {
    for (const remove of this.#pollers) remove?.();
    this.#pollers.length = 0;
  }
}

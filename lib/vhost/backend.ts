/**
 * The device interface a vhost-user back-end implements (blk, rng): features, config space, and
 * queue processing. The protocol engine (handler.ts) owns the rings and calls these hooks.
 * @module
 */
import type { Reactor } from "../../ffi/mod.ts";
import type { Metrics } from "./metrics.ts";
import type { VirtQueue } from "./virtqueue.ts";

/** What a device gets from the engine when a queue starts. */
export interface DeviceContext {
  reactor: Reactor;
  metrics: Metrics;
  /**
   * Processes the queue again on a later reactor turn's behalf (a device that stops after a fair
   * share of work with buffers left calls this instead of waiting for a kick that will not come).
   */
  process?: (vq: VirtQueue) => void;
}

/**
 * A virtio device served over vhost-user.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Reactor } from "../../ffi/mod.ts";
 * import { VhostUserHandler } from "./handler.ts";
 * import { Metrics } from "./metrics.ts";
 * import { DescriptorChain, type VirtQueue } from "./virtqueue.ts";
 *
 * // Completes every buffer at once with nothing written.
 * class NullDevice implements VhostUserDevice {
 *   readonly type = "null";
 *   readonly features = 0n;
 *   readonly numQueues = 1;
 *   readonly #chain = new DescriptorChain();
 *   readConfig(_offset: number, size: number): Uint8Array {
 *     return new Uint8Array(size);
 *   }
 *   writeConfig(offset: number): void {
 *     throw new RangeError(`no config space: write at ${offset}`);
 *   }
 *   setFeatures(): void {}
 *   startQueue(): void {}
 *   processQueue(vq: VirtQueue): void {
 *     do {
 *       for (let n = 0; n < vq.size && vq.pop(this.#chain); n++) vq.pushUsed(this.#chain.head, 0);
 *       vq.flush();
 *     } while (vq.enableNotification()); // buffers that came meanwhile (a real device bounds this)
 *   }
 *   stopQueue(): void {} // nothing is ever in flight
 *   cancelQueue(): void {}
 *   close(): void {}
 * }
 *
 * const reactor = new Reactor();
 * const handler = new VhostUserHandler(new NullDevice(), { reactor, metrics: new Metrics("null", 1) });
 * assert.equal(handler.queues.length, 1);
 * await handler.close();
 * reactor.close();
 * ```
 */
export interface VhostUserDevice {
  /** The vhost-user.json "type" ("block", "rng"). */
  readonly type: string;
  /** Device-specific virtio feature bits (the engine adds VERSION_1, EVENT_IDX, ...). */
  readonly features: bigint;
  /** Queues offered (GET_QUEUE_NUM). */
  readonly numQueues: number;
  /** Reads config space [offset, offset+size) (zeros beyond the device's config). */
  readConfig(offset: number, size: number): Uint8Array;
  /** Writes config space; throws to refuse. */
  writeConfig(offset: number, data: Uint8Array): void;
  /** The features the driver acked (SET_FEATURES). */
  setFeatures(features: bigint): void;
  /** A ring started (first kick fd); the device may set up per-queue state. */
  startQueue(vq: VirtQueue, ctx: DeviceContext): void;
  /**
   * Buffers are available: pop, process, push used, flush. A VirtqueueError thrown here marks the
   * queue broken; the engine handles it. Work per call is bounded (a fair share, then
   * ctx.process on a later turn), so a driver that keeps refilling cannot starve the messages.
   */
  processQueue(vq: VirtQueue): void;
  /**
   * The ring stops (GET_VRING_BASE, reset, disconnect): pop nothing more and let the requests
   * already popped complete (the engine waits, with the event loop running, until vq.inFlight is
   * 0, then publishes the used ring). Must not block.
   */
  stopQueue(vq: VirtQueue): void;
  /**
   * A stop waited STOP_TIMEOUT_MS and requests are still in flight: drop them, so that none of
   * them completes into guest memory or the ring later.
   */
  cancelQueue(vq: VirtQueue): void;
  /** Releases everything (the daemon exits). */
  close(): void;
  /**
   * What another instance of this device, serving some of its queues on a queue thread, must
   * share with this one (plain data that crosses postMessage: SharedArrayBuffers).
   */
  readonly shared?: Record<string, SharedArrayBuffer | undefined>;
}

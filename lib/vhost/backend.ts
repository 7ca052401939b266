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
 * class MyDevice implements VhostUserDevice { ... }
 * new VhostUserHandler(new MyDevice(), { reactor, metrics });
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
}

/**
 * One virtio-blk queue's requests between pop and completion: a slot per descriptor head, the I/O
 * engine they go through, writethrough durability and publishing of the used ring.
 * @module
 */
import { IoVecs } from "../../../ffi/mod.ts";
import type { GuestRegion } from "../guest_memory.ts";
import type { QueueMetrics } from "../metrics.ts";
import type { VirtQueue } from "../virtqueue.ts";
import type { BlkIoEngine, BlkIoRequest } from "./blk_engine.ts";
import { BlkStatus, BlkType, SEG_MAX } from "./blk_spec.ts";

/** One request slot per descriptor head: reused, never allocated per request. */
export class BlkRequest implements BlkIoRequest {
  op: "read" | "write" | "flush" = "read";
  offset = 0;
  readonly iov: IoVecs;
  readonly q: BlkQueue;
  head = 0;
  type = 0;
  dataLen = 0;
  /** Where the status byte goes (the chain's last device-writable byte). */
  statusRegion: GuestRegion | null = null;
  statusOff = 0;
  start = 0;
  /** Writethrough: what the write returned while it waits for its flush. */
  writeResult = 0;

  constructor(q: BlkQueue) {
    this.q = q;
    this.iov = new IoVecs(SEG_MAX + 2);
  }

  done(result: number): void {
    this.q.complete(this, result);
  }
}

/**
 * Writethrough durability: one fdatasync for every write that completed before it was started,
 * instead of one per write.
 */
class DurabilityFlush implements BlkIoRequest {
  readonly op = "flush";
  readonly offset = 0;
  readonly iov = new IoVecs(1);
  readonly q: BlkQueue;
  /** The writes this flush makes durable. */
  batch: BlkRequest[] = [];

  constructor(q: BlkQueue) {
    this.q = q;
  }

  done(result: number): void {
    this.q.durabilityDone(result);
  }
}

/** What a queue needs to know of its device. */
export interface BlkQueueOwner {
  /** Writeback cache: writes complete without a durability flush (FLUSH makes them durable). */
  readonly writeback: boolean;
}

/**
 * Per-queue state of the block device: request slots, the engine, writethrough durability (one
 * fdatasync for all the writes completed before it started) and deferred publishing.
 */
export class BlkQueue {
  readonly dev: BlkQueueOwner;
  readonly engine: BlkIoEngine;
  readonly metrics: QueueMetrics;
  vq: VirtQueue;
  readonly slots: (BlkRequest | undefined)[] = [];
  inKick = false;
  /** Writes completed during the kick wait for a durability flush: start one and submit again. */
  requeued = false;
  /** Pop time (shared by the requests of one pass over the ring: one clock read per pass). */
  stamp = 0;
  /**
   * Work deferred out of engine callbacks (never re-enter an engine from its own completion) to
   * the reactor's next turn, right after the epoll batch that delivered the completions.
   */
  #needPublish = false;
  #needFlush = false;
  /** Removes this queue's reactor poller. */
  removePoller: (() => void) | null = null;
  /** Re-runs the queue through the engine's error handling (DeviceContext.process). */
  process: ((vq: VirtQueue) => void) | null = null;
  /** The last kick stopped after its fair share with buffers left: continue on the next turn. */
  resume = false;
  /** Start times of requests completed since the last publish (latency needs one clock read). */
  readonly #doneStarts = new Float64Array(1024);
  #doneN = 0;
  /** Writethrough: writes done, waiting for the next flush to start. */
  #waiting: BlkRequest[] = [];
  readonly #flush = new DurabilityFlush(this);
  #flushInFlight = false;

  /** Reactor poller (runs every turn): does the deferred work; busy only while a queue is behind. */
  readonly poll = (): boolean => {
    if (this.inKick) return false;
    if (this.#needFlush) {
      this.#needFlush = false;
      try {
        if (this.startDurabilityFlush()) this.engine.submit();
      } catch (e) {
        // The engine closed under us (queue stopped): the writes stay in flight (inflight area).
        console.error(`mpq vhost: queue ${this.vq.index}: writethrough flush: ${(e as Error).message}`);
      }
    }
    if (this.#needPublish) {
      this.#needPublish = false;
      this.publish();
    }
    if (this.resume) {
      this.resume = false;
      this.process?.(this.vq);
    }
    // Still behind (the pass stopped at its fair share again): keep the reactor turning.
    return this.resume;
  };

  constructor(dev: BlkQueueOwner, vq: VirtQueue, engine: BlkIoEngine, metrics: QueueMetrics) {
    this.dev = dev;
    this.vq = vq;
    this.engine = engine;
    this.metrics = metrics;
  }

  slot(head: number): BlkRequest {
    return this.slots[head] ??= new BlkRequest(this);
  }

  /** Completion from the engine (or inline). */
  complete(req: BlkRequest, result: number): void {
    if (result >= 0 && req.op === "write" && !this.dev.writeback) {
      // Writethrough: the write completes once a flush started after it has finished.
      req.writeResult = result;
      this.#waiting.push(req);
      if (this.#flushInFlight) return; // durabilityDone() starts the next one
      // One flush for all the writes of this kick or this reap: started after it.
      if (this.inKick) this.requeued = true;
      else this.#needFlush = true;
      return;
    }
    let status: number = BlkStatus.OK;
    let used = 1;
    if (result < 0) status = BlkStatus.IOERR;
    else if (req.type === BlkType.IN) {
      if (result !== req.dataLen) status = BlkStatus.IOERR;
      else used += req.dataLen;
    } else if (req.type === BlkType.OUT && result !== req.dataLen) status = BlkStatus.IOERR;
    this.finish(req, status, used);
  }

  /** Whether writes wait for, or are in, a durability flush. */
  get durabilityPending(): boolean {
    return this.#flushInFlight || this.#waiting.length > 0;
  }

  /** Starts one flush for every write waiting; false when there is none or one is in flight. */
  startDurabilityFlush(): boolean {
    if (this.#flushInFlight || this.#waiting.length === 0) return false;
    const f = this.#flush;
    const empty = f.batch;
    f.batch = this.#waiting;
    this.#waiting = empty;
    this.#flushInFlight = true;
    this.engine.queue(f);
    return true;
  }

  /** The durability flush finished: complete its writes. */
  durabilityDone(result: number): void {
    this.#flushInFlight = false;
    const batch = this.#flush.batch;
    for (let i = 0; i < batch.length; i++) {
      const r = batch[i];
      this.finish(r, result < 0 || r.writeResult !== r.dataLen ? BlkStatus.IOERR : BlkStatus.OK, 1);
    }
    batch.length = 0;
    if (this.#waiting.length > 0) {
      if (this.inKick) this.requeued = true;
      else this.#needFlush = true;
    }
  }

  finish(req: BlkRequest, status: number, usedLen: number): void {
    if (req.statusRegion) req.statusRegion.bytes[req.statusOff] = status;
    const m = this.metrics;
    m.requests++;
    if (status !== BlkStatus.OK) m.errors++;
    else if (req.type === BlkType.IN) m.readBytes += req.dataLen;
    else if (req.type === BlkType.OUT) m.writeBytes += req.dataLen;
    if (this.#doneN === this.#doneStarts.length) this.#observe();
    this.#doneStarts[this.#doneN++] = req.start;
    this.vq.pushUsed(req.head, usedLen);
    if (!this.inKick) this.#needPublish = true;
  }

  #observe(): void {
    const n = this.#doneN;
    if (n === 0) return;
    const now = performance.now();
    const m = this.metrics;
    for (let i = 0; i < n; i++) m.observe((now - this.#doneStarts[i]) * 1000);
    this.#doneN = 0;
  }

  /** Publishes the used ring (one store, one call if wanted) and records the batch's latencies. */
  publish(): void {
    this.vq.flush();
    this.#observe();
  }
}

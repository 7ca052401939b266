/**
 * The io_uring block I/O engine: queue() writes an SQE per request (readv/writev straight into the
 * mapped guest memory, fdatasync for flush), submit() hands the whole batch to the kernel with one
 * io_uring_enter and reaps what completed inline; later completions make a registered eventfd
 * readable and are reaped from the Reactor. Short transfers are resubmitted for the rest.
 * @module
 */
import {
  Errno,
  EventFd,
  IoUring,
  type IoVecs,
  type OwnedFd,
  type Reactor,
  type Watch,
} from "../../../ffi/mod.ts";
import type { BlkIoEngine, BlkIoRequest } from "./blk_engine.ts";

/** Errno.EAGAIN/Errno.EINTR completions are retried this often per request, then reported (no spinning). */
const MAX_RETRIES = 3;

/** Options for UringEngine. */
export interface UringEngineOptions {
  /** Requests in flight at once (1..4096, default 128); more are held until a slot frees. */
  depth?: number;
}

/**
 * A BlkIoEngine on io_uring. Completions run inside submit() when the kernel finished them inline,
 * otherwise from the reactor's turn.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, IoVecs, mapShared, memfdCreate, Reactor } from "../../../ffi/mod.ts";
 *
 * using file = memfdCreate("disk");
 * file.write(new TextEncoder().encode("hello"));
 * using guest = memfdCreate("guest");
 * ftruncate(guest, 4096);
 * using ram = mapShared(guest, 4096);
 * const iov = new IoVecs(1);
 * iov.push(ram, 0, 512); // a guest buffer
 * const reactor = new Reactor();
 * const running = reactor.run(); // completions the kernel did not finish inline come from here
 * const engine = new UringEngine(file, reactor, { depth: 128 });
 * const read = Promise.withResolvers<number>();
 * engine.queue({ op: "read", offset: 0, iov, done: read.resolve });
 * engine.submit(); // one io_uring_enter for everything queued
 * assert.equal(await read.promise, 5); // short: the file holds 5 bytes
 * engine.close(); // the file stays with its owner
 * reactor.stop();
 * await running;
 * reactor.close();
 * ```
 */
export class UringEngine implements BlkIoEngine {
  readonly name = "io_uring";
  /** Slots (requests in flight at once). */
  readonly depth: number;
  readonly #file: OwnedFd;
  readonly #ring: IoUring;
  readonly #ev: EventFd;
  readonly #watch: Watch;
  // Per-slot state, parallel arrays indexed by the SQE's user_data.
  readonly #req: Array<BlkIoRequest | null>;
  readonly #iov: Array<IoVecs | null>;
  readonly #moved: Float64Array;
  readonly #retries: Uint8Array;
  readonly #free: Int32Array;
  #freeTop: number;
  /** Requests queued while every slot was busy, oldest first from #waitHead. */
  #waiting: BlkIoRequest[] = [];
  #waitHead = 0;
  #closed = false;
  readonly #onCqe = (slot: number, res: number) => this.#complete(slot, res);

  constructor(file: OwnedFd, reactor: Reactor, options: UringEngineOptions = {}) {
    const depth = options.depth ?? 128;
    if (!Number.isInteger(depth) || depth < 1 || depth > 4096) {
      throw new RangeError(`io_uring engine depth must be 1..4096: got ${depth}`);
    }
    this.depth = depth;
    this.#file = file;
    // SQ >= depth so a slot always finds an SQE; CQ (2x SQ) > depth so the CQ never overflows.
    this.#ring = IoUring.create(depth);
    try {
      this.#ev = new EventFd({ label: "io_uring completions" });
      try {
        this.#ring.registerEventFd(this.#ev);
        this.#watch = reactor.add(this.#ev.fd, { readable: true }, () => {
          this.#ev.drain();
          if (!this.#closed) this.#pump();
        });
      } catch (e) {
        this.#ev.close();
        throw e;
      }
    } catch (e) {
      this.#ring.close();
      throw e;
    }
    this.#req = new Array(depth).fill(null);
    this.#iov = new Array(depth).fill(null);
    this.#moved = new Float64Array(depth);
    this.#retries = new Uint8Array(depth);
    this.#free = new Int32Array(depth);
    for (let i = 0; i < depth; i++) this.#free[i] = depth - 1 - i;
    this.#freeTop = depth;
  }

  /** Requests queued or in flight. */
  get pending(): number {
    return this.depth - this.#freeTop + this.#waiting.length - this.#waitHead;
  }

  /** Writes the request's SQE now, or holds it until a slot frees. Performs no I/O. */
  queue(req: BlkIoRequest): void {
    if (this.#closed) throw new Error(`io_uring engine is closed: cannot queue a ${req.op}`);
    if (this.#freeTop === 0) {
      this.#waiting.push(req);
      return;
    }
    const slot = this.#free[--this.#freeTop];
    this.#req[slot] = req;
    this.#iov[slot] = req.iov;
    this.#moved[slot] = 0;
    this.#retries[slot] = 0;
    try {
      this.#prep(slot, req, req.iov, req.offset);
    } catch (e) {
      // Not queued after all: the slot is free again (close() must not wait for it).
      this.#req[slot] = null;
      this.#iov[slot] = null;
      this.#free[this.#freeTop++] = slot;
      throw e;
    }
  }

  /** One io_uring_enter for everything queued, then reaps whatever already completed. */
  submit(): void {
    if (this.#closed) return;
    this.#pump();
  }

  #prep(slot: number, req: BlkIoRequest, iov: IoVecs, offset: number): void {
    const ring = this.#ring;
    const ok = req.op === "read"
      ? ring.prepReadv(this.#file, iov, offset, slot)
      : req.op === "write"
      ? ring.prepWritev(this.#file, iov, offset, slot)
      : ring.prepFsync(this.#file, slot, { datasync: true });
    // Cannot happen while depth <= SQ entries (each slot holds at most one SQE); be loud if it does.
    if (!ok) throw new Error(`io_uring SQ ring full with ${this.depth - this.#freeTop} slots busy`);
  }

  /** Submit, reap, refill freed slots, until nothing more completes inline; then arm the eventfd. */
  #pump(): void {
    const ring = this.#ring;
    ring.eventFdEnabled = false;
    let armed = false;
    try {
      while (true) {
        while (this.#freeTop > 0 && this.#waitHead < this.#waiting.length) {
          const req = this.#waiting[this.#waitHead++];
          if (this.#waitHead === this.#waiting.length) {
            this.#waiting = [];
            this.#waitHead = 0;
          }
          this.queue(req);
        }
        ring.submit();
        if (ring.reap(this.#onCqe) > 0) continue;
        if (this.#freeTop === this.depth && this.#waitHead === this.#waiting.length) break;
        ring.eventFdEnabled = true;
        armed = true;
        // A completion posted between the reap and re-arming would signal nobody: look once more.
        if (ring.cqReady === 0) break;
        ring.eventFdEnabled = false;
        armed = false;
      }
    } finally {
      // A done() callback or the kernel threw: keep the completion path alive for what is in flight.
      if (!armed && !this.#closed && this.#freeTop < this.depth) {
        ring.eventFdEnabled = true;
        if (ring.cqReady > 0) this.#ev.signal();
      }
    }
  }

  #complete(slot: number, res: number): void {
    const req = this.#req[slot];
    if (req === null) throw new Error(`io_uring completion for idle slot ${slot} (res ${res})`);
    if (this.#closed) return this.#release(slot);
    if ((res === -Errno.EAGAIN || res === -Errno.EINTR) && this.#retries[slot] < MAX_RETRIES) {
      this.#retries[slot]++;
      return this.#prep(slot, req, this.#iov[slot]!, req.offset + this.#moved[slot]);
    }
    if (res < 0) return this.#finish(slot, req, res);
    if (req.op === "flush") return this.#finish(slot, req, 0);
    const moved = this.#moved[slot] + res;
    const total = req.iov.totalBytes;
    // A read at end of file returns 0: report what was moved (as preadv would).
    if (res === 0 || moved >= total) return this.#finish(slot, req, moved);
    this.#moved[slot] = moved;
    const rest = req.iov.slice(moved);
    this.#iov[slot] = rest;
    this.#prep(slot, req, rest, req.offset + moved);
  }

  #release(slot: number): void {
    this.#req[slot] = null;
    this.#iov[slot] = null;
    this.#free[this.#freeTop++] = slot;
  }

  #finish(slot: number, req: BlkIoRequest, result: number): void {
    this.#release(slot);
    req.done(result);
  }

  /**
   * Stops the engine: requests held for a free slot are dropped, requests with an SQE are waited
   * for (so no I/O touches guest memory after close); done() is not called for either;
   * the eventfd watch, the eventfd and the ring are released. The file stays with its owner.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#waiting = [];
    this.#waitHead = 0;
    const ring = this.#ring;
    try {
      this.#watch.remove();
      // Hand over anything prepared (the kernel would otherwise see a half-published SQ), then
      // wait for every busy slot.
      ring.submit();
      let inKernel = this.depth - this.#freeTop;
      while (inKernel > 0) {
        ring.wait(1);
        inKernel -= ring.reap(this.#onCqe);
      }
    } finally {
      ring.close();
      this.#ev.close();
      this.#req.fill(null);
      this.#iov.fill(null);
      this.#freeTop = this.depth;
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

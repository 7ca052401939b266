/**
 * The split virtqueue (virtio 1.2 §2.7) seen from the device: descriptor chains with NEXT, WRITE
 * and INDIRECT, used-ring updates published once per batch, EVENT_IDX suppression both ways, and
 * optional inflight tracking. Every index check lives here; a ring that breaks the rules throws a
 * {@link VirtqueueError} and the queue is marked broken.
 *
 * Ring memory is read through the region's cached views. Index fields shared with the driver
 * (avail idx, used idx, used_event, avail_event) use Atomics (sequentially consistent: the used-idx
 * store is a full barrier before the used_event load, as virtio's memory model asks).
 * @module
 */
import type { EventFd, IoVecs } from "../../ffi/mod.ts";
import type { DirtyLog } from "./dirty_log.ts";
import type { GuestMemory, GuestRegion } from "./guest_memory.ts";
import type { InflightQueue } from "./inflight.ts";

/** Descriptor flags. */
export const DescFlags = { NEXT: 1, WRITE: 2, INDIRECT: 4 } as const;
/** Largest queue size we accept (and the cap on any chain's length). */
export const MAX_QUEUE_SIZE = 1024;
const AVAIL_F_NO_INTERRUPT = 1;
const USED_F_NO_NOTIFY = 1;

/** A ring that breaks the virtio rules. */
export class VirtqueueError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "VirtqueueError";
  }
}

/**
 * One walked descriptor chain: reused for every pop (no allocation per request). Segment i is
 * `lengths[i]` bytes at `offsets[i]` in `regions[i].map`; `writes[i]` is 1 for device-writable.
 *
 * It is also the chain's reader and writer (rust-vmm virtio-queue's Reader/Writer): devices copy
 * and gather the device-readable and device-writable bytes through these methods, by position in
 * that byte stream, and never do segment arithmetic themselves.
 */
export class DescriptorChain {
  head = 0;
  count = 0;
  /** Total device-readable bytes. */
  readable = 0;
  /** Total device-writable bytes. */
  writable = 0;
  readonly regions: (GuestRegion | null)[] = new Array(MAX_QUEUE_SIZE).fill(null);
  readonly offsets = new Float64Array(MAX_QUEUE_SIZE);
  readonly lengths = new Uint32Array(MAX_QUEUE_SIZE);
  readonly writes = new Uint8Array(MAX_QUEUE_SIZE);

  /**
   * Calls `fn(region, offset, len)` for the device-readable (`writable` false) or device-writable
   * bytes [from, from + len) of the chain, in order; returns the bytes covered (less at the end).
   * A callback returning false stops the walk.
   */
  segments(
    writable: boolean,
    from: number,
    len: number,
    fn: (region: GuestRegion, offset: number, len: number) => boolean | void,
  ): number {
    const want = writable ? 1 : 0;
    let skip = from;
    let done = 0;
    for (let i = 0; i < this.count && done < len; i++) {
      if (this.writes[i] !== want) continue;
      let off = this.offsets[i];
      let l = this.lengths[i];
      if (skip >= l) {
        skip -= l;
        continue;
      }
      off += skip;
      l -= skip;
      skip = 0;
      const k = Math.min(l, len - done);
      if (fn(this.regions[i]!, off, k) === false) break;
      done += k;
    }
    return done;
  }

  /** Copies device-readable bytes starting at `from` into `dst`; returns how many there were. */
  read(from: number, dst: Uint8Array): number {
    let pos = 0;
    return this.segments(false, from, dst.byteLength, (r, off, len) => {
      dst.set(r.bytes.subarray(off, off + len), pos);
      pos += len;
    });
  }

  /** Copies `src` into the device-writable bytes starting at `from`; returns how many fitted. */
  write(from: number, src: Uint8Array): number {
    let pos = 0;
    return this.segments(true, from, src.byteLength, (r, off, len) => {
      r.bytes.set(src.subarray(pos, pos + len), off);
      pos += len;
    });
  }

  /**
   * Appends the device-readable (or device-writable) bytes [from, from + len) to `iov`; returns
   * the byte count, or -1 when they need more entries than `iov` has left.
   */
  gather(iov: IoVecs, writable: boolean, from: number, len: number): number {
    // The hot path of every read and write: one walk, through a callback made once per chain.
    this.#iov = iov;
    this.#full = false;
    const n = this.segments(writable, from, len, this.#pushSegment);
    this.#iov = null;
    return this.#full ? -1 : n;
  }

  #iov: IoVecs | null = null;
  #full = false;
  readonly #pushSegment = (r: GuestRegion, off: number, l: number): boolean => {
    const iov = this.#iov!;
    if (iov.count >= iov.capacity) {
      this.#full = true;
      return false;
    }
    iov.push(r.map, off, l);
    return true;
  };

  /** The last device-writable byte (a status byte), or null when the chain ends readable. */
  lastWritable(): { region: GuestRegion; offset: number } | null {
    const n = this.count;
    if (n === 0 || this.writes[n - 1] !== 1) return null;
    return { region: this.regions[n - 1]!, offset: this.offsets[n - 1] + this.lengths[n - 1] - 1 };
  }
}

/**
 * One virtqueue of a vhost-user connection.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, memfdCreate } from "../../ffi/mod.ts";
 * import { GuestMemory } from "./guest_memory.ts";
 *
 * using memfd = memfdCreate("guest");
 * ftruncate(memfd, 1 << 16);
 * const memory = new GuestMemory();
 * const ram = memory.add({ guestAddr: 0n, size: 1n << 16n, userAddr: 0n, mmapOffset: 0n }, memfd);
 * // The driver: descriptor 0 is 16 device-readable bytes at 0x8000, made available (avail idx 1).
 * ram.view.setBigUint64(0, 0x8000n, true);
 * ram.view.setUint32(8, 16, true);
 * ram.view.setUint16(0x1002, 1, true);
 * const vq = new VirtQueue(0);
 * vq.size = 128; // SET_VRING_NUM
 * vq.setAddresses(0x0n, 0x1000n, 0x2000n); // SET_VRING_ADDR: descriptors, avail ring, used ring
 * vq.start(memory);
 * const chain = new DescriptorChain();
 * while (vq.pop(chain)) vq.pushUsed(chain.head, 0); // a device serves chain.readable bytes first
 * vq.flush(); // one used-index store for the batch, then the call eventfd if the driver wants it
 * assert.equal(ram.view.getUint16(0x2002, true), 1); // used idx
 * vq.stop();
 * memory.close();
 * ```
 */
export class VirtQueue {
  readonly index: number;
  /** Queue size (SET_VRING_NUM). */
  size = 0;
  descAddr = 0n;
  availAddr = 0n;
  usedAddr = 0n;
  addressesSet = false;
  /** Next available-ring index to consume. */
  lastAvail = 0;
  /** Shadow used index (published by flush()). */
  usedIdx = 0;
  enabled = false;
  started = false;
  broken = false;
  /** VIRTIO_RING_F_EVENT_IDX negotiated. */
  eventIdx = false;
  kick: EventFd | null = null;
  call: EventFd | null = null;
  err: EventFd | null = null;
  inflight: InflightQueue | null = null;
  /** Calls signalled, for metrics. */
  notifications = 0;
  /**
   * Stopping: the device finishes what it popped but pops nothing new (GET_VRING_BASE, reset and
   * disconnect wait for the in-flight count to reach 0 without blocking the event loop).
   */
  stopping = false;
  /** Called after each used element while set (the handler releases retired mappings from here). */
  onComplete: (() => void) | null = null;
  /**
   * The dirty log while QEMU migrates (LOG_ALL): every completed chain's device-writable buffers
   * and the used ring are marked after they were written. null: no logging (the hot path pays one
   * comparison).
   */
  dirtyLog: DirtyLog | null = null;
  /** Guest-physical address of the used ring for the log (SET_VRING_ADDR with VRING_F_LOG), or -1. */
  logUsedGpa = -1;
  readonly #logChain = new DescriptorChain();

  #memory: GuestMemory | null = null;
  #desc: GuestRegion | null = null;
  #descOff = 0;
  #avail: GuestRegion | null = null;
  #availIdx = 0; // u16 index of avail->idx in #avail.u16
  #availRing = 0; // u16 index of avail->ring[0]
  #used: GuestRegion | null = null;
  #usedIdxPos = 0; // u16 index of used->idx
  #usedRing = 0; // u32 index of used->ring[0]
  #publishedUsed = 0;
  #resubmit: number[] = [];
  #batch = new Uint16Array(MAX_QUEUE_SIZE);
  #batchN = 0;
  #suppressed = false;
  // In-flight accounting: a chain is in flight from pop() to its pushUsed(). Each pop gets a serial
  // number, so "everything popped before now has completed" can be asked later (retireMark()).
  readonly #busy = new Uint8Array(MAX_QUEUE_SIZE);
  readonly #serial = new Float64Array(MAX_QUEUE_SIZE);
  #popSerial = 0;
  #inFlight = 0;
  #idleWaiters: (() => void)[] = [];

  constructor(index: number) {
    this.index = index;
  }

  /** Stores the ring addresses (front-end virtual); remaps at once if the queue is running. */
  setAddresses(desc: bigint, avail: bigint, used: bigint): void {
    if (desc % 16n !== 0n || avail % 2n !== 0n || used % 4n !== 0n) {
      throw new VirtqueueError(
        `queue ${this.index}: misaligned ring (desc 0x${desc.toString(16)} needs 16, avail 0x${
          avail.toString(16)
        } needs 2, used 0x${used.toString(16)} needs 4)`,
      );
    }
    this.descAddr = desc;
    this.availAddr = avail;
    this.usedAddr = used;
    this.addressesSet = true;
    if (this.started && this.#memory) this.map(this.#memory);
  }

  /** Translates the ring addresses through `memory` (on start and after a new memory table). */
  map(memory: GuestMemory): void {
    const n = this.size;
    if (n === 0 || (n & (n - 1)) !== 0 || n > MAX_QUEUE_SIZE) {
      throw new VirtqueueError(`queue ${this.index}: size ${n} is not a power of 2 in 1..${MAX_QUEUE_SIZE}`);
    }
    if (!this.addressesSet) throw new VirtqueueError(`queue ${this.index}: ring addresses not set`);
    const d = memory.translateUser(this.descAddr, 16 * n);
    const a = memory.translateUser(this.availAddr, 6 + 2 * n);
    const u = memory.translateUser(this.usedAddr, 6 + 8 * n);
    // The ring addresses are aligned (setAddresses) and GuestMemory.add made uaddr and mmap_offset
    // agree modulo 16, so the offsets are aligned too and the divisions below are exact.
    this.#memory = memory;
    this.#desc = d.region;
    this.#descOff = d.offset;
    this.#avail = a.region;
    // Offsets are safe integers that may exceed 2^32: divide, never `>>>` (which truncates to 32
    // bits and once put a ring at 4.5 GiB 4 GiB lower).
    this.#availIdx = (a.offset + 2) / 2;
    this.#availRing = (a.offset + 4) / 2;
    this.#used = u.region;
    this.#usedIdxPos = (u.offset + 2) / 2;
    this.#usedRing = (u.offset + 4) / 4;
  }

  /** Whether ring memory is mapped. */
  get mapped(): boolean {
    return this.#used !== null;
  }

  /**
   * Starts the ring: maps it, reads the used index, and with inflight tracking computes the
   * requests to resubmit (last_avail = used + in flight).
   */
  start(memory: GuestMemory): void {
    this.map(memory);
    this.usedIdx = Atomics.load(this.#used!.u16, this.#usedIdxPos);
    this.#publishedUsed = this.usedIdx;
    this.#batchN = 0;
    this.#resubmit = [];
    this.broken = false;
    this.stopping = false;
    this.#suppressed = false;
    this.#clearInFlight();
    if (this.inflight) {
      const heads = this.inflight.recover(this.usedIdx);
      for (const h of heads) {
        if (h >= this.size) {
          throw new VirtqueueError(`queue ${this.index}: inflight head ${h} >= size ${this.size}`);
        }
      }
      if (heads.length > 0) {
        this.#resubmit = heads;
        this.lastAvail = (this.usedIdx + heads.length) & 0xffff;
      }
    }
    this.started = true;
  }

  /** Stops the ring; returns the next available index (GET_VRING_BASE's answer). */
  stop(): number {
    this.started = false;
    this.stopping = false;
    this.unmap();
    return this.lastAvail;
  }

  /**
   * Drops every view of ring memory (before the mapping it points into may be unmapped). A started
   * queue without views does no ring access: it is broken until it is mapped and started again.
   */
  unmap(): void {
    this.#desc = this.#avail = this.#used = null;
    this.#memory = null;
  }

  /** Started, enabled and not broken. */
  get ready(): boolean {
    return this.started && this.enabled && !this.broken && !this.stopping;
  }

  /** Chains popped and not yet completed (pushUsed) by the device. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Resolves once no chain is in flight (at once if none is). */
  whenIdle(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /** Whether the chain at `head` was popped and not yet completed. */
  holds(head: number): boolean {
    return head < MAX_QUEUE_SIZE && this.#busy[head] === 1;
  }

  /** A mark for {@link completedBefore}: the serial of the latest pop so far. */
  retireMark(): number {
    return this.#popSerial;
  }

  /** Whether every chain popped up to `mark` has completed. */
  completedBefore(mark: number): boolean {
    if (this.#inFlight === 0) return true;
    const n = this.#busy.length;
    for (let h = 0; h < n; h++) {
      if (this.#busy[h] === 1 && this.#serial[h] <= mark) return false;
    }
    return true;
  }

  #begin(head: number): void {
    if (this.#busy[head] === 1) {
      throw new VirtqueueError(`queue ${this.index}: head ${head} made available again while in flight`);
    }
    this.#busy[head] = 1;
    this.#serial[head] = ++this.#popSerial;
    this.#inFlight++;
  }

  /** Forgets every in-flight chain (the device dropped them) and wakes whoever waits for idle. */
  #clearInFlight(): void {
    this.#busy.fill(0);
    this.#inFlight = 0;
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const w of waiters) w();
  }

  /** The driver's avail->idx. */
  availIdx(): number {
    return Atomics.load(this.#avail!.u16, this.#availIdx);
  }

  /** Whether buffers are waiting (resubmissions or new avail entries). */
  hasWork(): boolean {
    return this.#resubmit.length > 0 || (this.#avail !== null && this.availIdx() !== this.lastAvail);
  }

  /** Requests waiting for resubmission after a restart. */
  get resubmitPending(): number {
    return this.#resubmit.length;
  }

  /** Pops the next chain into `chain`; false when the ring is empty. Throws VirtqueueError. */
  pop(chain: DescriptorChain): boolean {
    if (this.#avail === null) return false; // not mapped (stopped, or broken by a failed remap)
    if (this.#resubmit.length > 0) {
      const head = this.#resubmit.shift()!;
      this.#walk(head, chain);
      this.#begin(head);
      return true;
    }
    const avail = this.availIdx();
    const last = this.lastAvail;
    if (avail === last) return false;
    const pending = (avail - last) & 0xffff;
    if (pending > this.size) {
      throw new VirtqueueError(
        `queue ${this.index}: avail idx ${avail} is ${pending} ahead of ${last}, more than size ${this.size}`,
      );
    }
    const head = this.#avail!.u16[this.#availRing + (last & (this.size - 1))];
    this.lastAvail = (last + 1) & 0xffff;
    this.#walk(head, chain);
    this.#begin(head);
    this.inflight?.begin(head);
    return true;
  }

  #walk(head: number, chain: DescriptorChain): void {
    const size = this.size;
    if (head >= size) throw new VirtqueueError(`queue ${this.index}: head ${head} >= size ${size}`);
    const mem = this.#memory!;
    let table = this.#desc!;
    let tableOff = this.#descOff;
    let tableLen = size;
    let indirect = false;
    let idx = head;
    let steps = 0;
    let n = 0;
    let readable = 0;
    let writable = 0;
    while (true) {
      if (idx >= tableLen) {
        throw new VirtqueueError(`queue ${this.index}: descriptor index ${idx} >= table length ${tableLen}`);
      }
      if (++steps > tableLen) {
        throw new VirtqueueError(
          `queue ${this.index}: chain at head ${head} longer than ${tableLen} descriptors (loop?)`,
        );
      }
      const o = tableOff + 16 * idx;
      const v = table.view;
      const lo = v.getUint32(o, true);
      const hi = v.getUint32(o + 4, true);
      const len = v.getUint32(o + 8, true);
      const flags = v.getUint16(o + 12, true);
      const next = v.getUint16(o + 14, true);
      if (flags & DescFlags.INDIRECT) {
        if (indirect) {
          throw new VirtqueueError(`queue ${this.index}: indirect descriptor inside an indirect table`);
        }
        if (flags & DescFlags.NEXT) {
          throw new VirtqueueError(`queue ${this.index}: descriptor with both INDIRECT and NEXT`);
        }
        if (len === 0 || (len & 15) !== 0 || len / 16 > MAX_QUEUE_SIZE) {
          throw new VirtqueueError(
            `queue ${this.index}: indirect table of ${len} bytes (not 16..16384, x16)`,
          );
        }
        const r = mem.findGpa(lo, hi, len);
        if (!r) {
          throw new VirtqueueError(
            `queue ${this.index}: indirect table 0x${
              (hi * 4294967296 + lo).toString(16)
            }+${len} outside guest memory`,
          );
        }
        table = r;
        tableOff = mem.offset;
        tableLen = len / 16;
        indirect = true;
        idx = 0;
        steps = 0;
        continue;
      }
      if (len > 0) {
        const r = mem.findGpa(lo, hi, len);
        if (!r) {
          throw new VirtqueueError(
            `queue ${this.index}: buffer 0x${
              (hi * 4294967296 + lo).toString(16)
            }+${len} outside guest memory`,
          );
        }
        if (n >= MAX_QUEUE_SIZE) {
          throw new VirtqueueError(`queue ${this.index}: chain over ${MAX_QUEUE_SIZE} buffers`);
        }
        chain.regions[n] = r;
        chain.offsets[n] = mem.offset;
        chain.lengths[n] = len;
        const w = (flags & DescFlags.WRITE) ? 1 : 0;
        chain.writes[n] = w;
        if (w) writable += len;
        else readable += len;
        n++;
      }
      if (!(flags & DescFlags.NEXT)) break;
      idx = next;
    }
    chain.head = head;
    chain.count = n;
    chain.readable = readable;
    chain.writable = writable;
  }

  /** Adds a used element (not yet visible to the driver: see flush()). */
  pushUsed(head: number, len: number): void {
    if (head < MAX_QUEUE_SIZE && this.#busy[head] === 1) {
      this.#busy[head] = 0;
      if (--this.#inFlight === 0 && this.#idleWaiters.length > 0) {
        const waiters = this.#idleWaiters;
        this.#idleWaiters = [];
        for (const w of waiters) w();
      }
    }
    if (this.onComplete !== null) this.onComplete();
    if (this.#batchN >= MAX_QUEUE_SIZE) this.flush();
    const used = this.#used;
    if (!used) return; // stopped meanwhile: the front-end owns the ring now
    if (this.dirtyLog !== null) this.#logWrites(head);
    const slot = this.#usedRing + 2 * (this.usedIdx & (this.size - 1));
    used.u32[slot] = head;
    used.u32[slot + 1] = len;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    this.#batch[this.#batchN++] = head;
  }

  /** Used elements pushed but not yet published. */
  get unpublished(): number {
    return this.#batchN;
  }

  /**
   * Publishes the used index once for the whole batch and signals the call eventfd if the driver
   * wants it (used_event with EVENT_IDX, else the NO_INTERRUPT flag). Returns whether it signalled.
   */
  flush(): boolean {
    const n = this.#batchN;
    if (n === 0 || !this.#used) return false;
    const inflight = this.inflight;
    if (inflight) inflight.prepareBatch(this.#batch, n);
    Atomics.store(this.#used.u16, this.#usedIdxPos, this.usedIdx);
    if (this.dirtyLog !== null) this.#logUsedRing();
    if (inflight) inflight.finishBatch(this.#batch, n, this.usedIdx);
    this.#batchN = 0;
    const old = this.#publishedUsed;
    const now = this.usedIdx;
    this.#publishedUsed = now;
    let notify: boolean;
    if (this.eventIdx) {
      const usedEvent = Atomics.load(this.#avail!.u16, this.#availRing + this.size);
      notify = ((now - usedEvent - 1) & 0xffff) < ((now - old) & 0xffff);
    } else {
      notify = (Atomics.load(this.#avail!.u16, this.#availIdx - 1) & AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (notify && this.call) {
      this.call.signal();
      this.notifications++;
    }
    return notify;
  }

  /**
   * Asks for the next kick (EVENT_IDX: avail_event = last_avail) and returns whether buffers
   * arrived meanwhile (then the caller must process them instead of sleeping).
   */
  enableNotification(): boolean {
    if (!this.#used) return false;
    if (this.#suppressed) return this.hasWork();
    if (this.eventIdx) {
      Atomics.store(this.#used.u16, this.#usedIdxPos + 1 + 4 * this.size, this.lastAvail);
      if (this.dirtyLog !== null) this.#logUsedRing();
    }
    return this.hasWork();
  }

  /**
   * Marks the device-writable buffers of a completed chain in the dirty log (all of each buffer:
   * a page marked needlessly costs a resend, a page missed corrupts the migrated guest). The chain
   * is walked again from the descriptor table; a driver that rewrote it meanwhile only hurts its
   * own migration, so a walk that fails marks nothing more.
   */
  #logWrites(head: number): void {
    const log = this.dirtyLog!;
    const c = this.#logChain;
    try {
      this.#walk(head, c);
    } catch {
      return;
    }
    for (let i = 0; i < c.count; i++) {
      if (c.writes[i] !== 1) continue;
      const r = c.regions[i]!;
      log.mark(r.guestAddr + (c.offsets[i] - r.base), c.lengths[i]);
    }
  }

  /** Marks the used ring (flags, idx, ring, avail_event) in the dirty log. */
  #logUsedRing(): void {
    if (this.logUsedGpa >= 0) this.dirtyLog!.mark(this.logUsedGpa, 6 + 8 * this.size);
  }

  /** Whether kicks are suppressed (busy-polling). */
  get suppressed(): boolean {
    return this.#suppressed;
  }

  /**
   * Busy-polling: asks the driver not to kick (VRING_USED_F_NO_NOTIFY; with EVENT_IDX, avail_event
   * is simply left behind), until resumeNotification().
   */
  suppressNotification(): void {
    if (this.#suppressed || !this.#used) return;
    this.#suppressed = true;
    if (!this.eventIdx) Atomics.store(this.#used.u16, this.#usedIdxPos - 1, USED_F_NO_NOTIFY);
  }

  /** Ends suppression and asks for the next kick; returns whether buffers arrived meanwhile. */
  resumeNotification(): boolean {
    if (!this.#suppressed) return false;
    this.#suppressed = false;
    if (!this.#used) return false;
    if (!this.eventIdx) Atomics.store(this.#used.u16, this.#usedIdxPos - 1, 0);
    return this.enableNotification();
  }

  /** Marks the queue broken and signals the error eventfd. */
  fail(): void {
    this.broken = true;
    try {
      this.err?.signal();
    } catch { /* the front-end closed it */ }
  }

  /** Forgets everything (RESET_DEVICE, disconnect); closes the eventfds. */
  reset(): void {
    this.stop();
    for (const e of [this.kick, this.call, this.err]) e?.close();
    this.kick = this.call = this.err = null;
    this.size = 0;
    this.addressesSet = false;
    this.lastAvail = this.usedIdx = 0;
    this.enabled = false;
    this.broken = false;
    this.inflight = null;
    this.#resubmit = [];
    this.#batchN = 0;
    this.#clearInFlight();
  }
}

/**
 * The driver ("guest") side of virtio for test peers: guest RAM in a memfd laid out as one or two
 * regions, and split virtqueues (descriptor table, avail and used rings) written into that RAM.
 * The back-end under test maps the same memfd, so every byte it reads or writes is visible here.
 *
 * Guest-physical addresses are plain numbers (test RAM is far below 2^53). Each region also gets a
 * synthetic front-end virtual address (`uaddr`), distinct from its GPA, as QEMU sends its own
 * process addresses: a back-end that confuses the two fails at once.
 * @module
 */
import { ftruncate, type MappedRegion, mapShared, memfdCreate, type OwnedFd } from "../../ffi/mod.ts";

/** Descriptor flags (virtio 1.2 §2.7.5). */
export const DescFlags = { NEXT: 1, WRITE: 2, INDIRECT: 4 } as const;
/** avail->flags: VIRTQ_AVAIL_F_NO_INTERRUPT. */
export const AVAIL_F_NO_INTERRUPT = 1;
/** used->flags: VIRTQ_USED_F_NO_NOTIFY. */
export const USED_F_NO_NOTIFY = 1;

/** Where the synthetic front-end virtual addresses start. */
export const UADDR_BASE = 0x7f12_0000_0000;

/** One guest memory region: GPA range backed by the memfd at `mmapOffset`. */
export interface RamRegion {
  gpa: number;
  size: number;
  mmapOffset: number;
  /** Front-end virtual address of the region (what SET_MEM_TABLE/SET_VRING_ADDR carry). */
  uaddr: number;
}

/** Options for GuestRam. */
export interface GuestRamOptions {
  /** Bytes of RAM (default 64 MiB). */
  size?: number;
  /** Two regions: the first half at GPA 0, the second at GPA 4 GiB (as QEMU splits RAM above 4G). */
  split?: boolean;
  /**
   * Where each region's allocator starts (bytes into the region, default 0): above 4 GiB in a
   * region of 6 GiB puts every ring and buffer at offsets a 32-bit index cannot reach.
   */
  allocFrom?: number;
}

/**
 * Guest RAM: a memfd mapped once, with a bump allocator per region.
 * @example
 * using ram = new GuestRam({ size: 16 << 20 });
 * const gpa = ram.alloc(4096, 4096);
 * ram.bytes(gpa, 4096).fill(1);
 */
export class GuestRam {
  readonly memfd: OwnedFd;
  readonly map: MappedRegion;
  readonly size: number;
  readonly regions: readonly RamRegion[];
  /** The whole mapping as bytes (index = memfd offset). */
  readonly mem: Uint8Array<ArrayBuffer>;
  /** The whole mapping as a DataView (index = memfd offset). */
  readonly view: DataView;
  readonly #next: number[];

  constructor(options: GuestRamOptions = {}) {
    const size = options.size ?? 64 << 20;
    if (size % (2 << 20) !== 0) {
      throw new RangeError(`guest RAM size must be a multiple of 2 MiB: got ${size}`);
    }
    this.size = size;
    this.memfd = memfdCreate("vhost-frontend-ram");
    try {
      ftruncate(this.memfd, size);
      this.map = mapShared(this.memfd, size);
    } catch (e) {
      this.memfd.close();
      throw e;
    }
    this.mem = this.map.bytes;
    this.view = new DataView(this.mem.buffer);
    const half = size / 2;
    this.regions = options.split
      ? [
        { gpa: 0, size: half, mmapOffset: 0, uaddr: UADDR_BASE },
        { gpa: 0x1_0000_0000, size: half, mmapOffset: half, uaddr: UADDR_BASE + 0x1_0000_0000 },
      ]
      : [{ gpa: 0, size, mmapOffset: 0, uaddr: UADDR_BASE }];
    const from = options.allocFrom ?? 0;
    if (!Number.isSafeInteger(from) || from < 0 || this.regions.some((r) => from >= r.size)) {
      throw new RangeError(`allocFrom ${from} is not inside every region`);
    }
    this.#next = this.regions.map(() => from);
  }

  /** Allocates `size` bytes aligned to `align` in region `region` (default: the last one); returns the GPA. */
  alloc(size: number, align = 64, region = this.regions.length - 1): number {
    const r = this.regions[region];
    const off = Math.ceil(this.#next[region] / align) * align;
    if (off + size > r.size) {
      throw new RangeError(
        `guest RAM region ${region} exhausted: ${size} bytes wanted, ${r.size - off} left of ${r.size}`,
      );
    }
    this.#next[region] = off + size;
    return r.gpa + off;
  }

  /** The memfd offset of a GPA range, checked to lie inside one region. */
  offset(gpa: number, len = 1): number {
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa + len <= r.gpa + r.size) return r.mmapOffset + (gpa - r.gpa);
    }
    throw new RangeError(`GPA 0x${gpa.toString(16)}+${len} is outside guest RAM`);
  }

  /** The front-end virtual address of a GPA. */
  uaddr(gpa: number): number {
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa < r.gpa + r.size) return r.uaddr + (gpa - r.gpa);
    }
    throw new RangeError(`GPA 0x${gpa.toString(16)} is outside guest RAM`);
  }

  /** A live view of guest bytes at `gpa`. */
  bytes(gpa: number, len: number): Uint8Array<ArrayBuffer> {
    const o = this.offset(gpa, len);
    return this.mem.subarray(o, o + len);
  }

  /** Unmaps and closes the memfd. */
  close(): void {
    this.map.close();
    this.memfd.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** One element of a request's descriptor chain. */
export interface Segment {
  /** Guest-physical address. */
  gpa: number;
  len: number;
  /** Device-writable. */
  write: boolean;
}

/** A raw descriptor (for malicious-ring tests). */
export interface RawDesc {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

/** Options for a SplitQueue. */
export interface SplitQueueOptions {
  /** Ring size, a power of 2 up to 32768 (default 128). */
  size?: number;
  /** VIRTIO_RING_F_EVENT_IDX negotiated. */
  eventIdx?: boolean;
  /** Most descriptors one indirect table holds (default 0: no indirect area). */
  indirectMax?: number;
}

function align(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/**
 * A split virtqueue driven from the driver side.
 * @example
 * const q = new SplitQueue(ram, { size: 128, eventIdx: true });
 * const head = q.add([{ gpa: hdr, len: 16, write: false }, { gpa: st, len: 1, write: true }]);
 * if (q.publish()) kick.signal();
 * q.collect((id, len) => console.log(id, len));
 */
export class SplitQueue {
  readonly ram: GuestRam;
  readonly size: number;
  readonly eventIdx: boolean;
  /** GPAs of the three areas. */
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  readonly #indirectGpa: number;
  readonly #indirectMax: number;
  readonly #mask: number;
  // memfd offsets and cached typed views (x86 is little-endian, like virtio 1.x)
  readonly #desc: number;
  readonly #availIdxAt: number; // u16 index in the Uint16Array
  readonly #availRingAt: number;
  readonly #usedEventAt: number;
  readonly #usedFlagsAt: number;
  readonly #usedIdxAt: number;
  readonly #usedRingAt: number; // u32 index
  readonly #availEventAt: number;
  readonly #u16: Uint16Array;
  readonly #u32: Uint32Array;
  readonly #view: DataView;
  readonly #free: number[] = [];
  /** Next avail index the driver will publish (shadow). */
  availIdx = 0;
  /** Avail index last published to the ring. */
  #published = 0;
  /** Next used index the driver expects to consume. */
  lastUsed = 0;

  constructor(ram: GuestRam, options: SplitQueueOptions = {}) {
    const size = options.size ?? 128;
    if (size < 1 || size > 32768 || (size & (size - 1)) !== 0) {
      throw new RangeError(`queue size must be a power of 2 in 1..32768: got ${size}`);
    }
    this.ram = ram;
    this.size = size;
    this.#mask = size - 1;
    this.eventIdx = options.eventIdx ?? false;
    this.#indirectMax = options.indirectMax ?? 0;
    // Rings live in region 0 (QEMU puts them in low RAM too).
    this.descGpa = ram.alloc(16 * size, 4096, 0);
    this.availGpa = ram.alloc(6 + 2 * size, 4096, 0);
    this.usedGpa = ram.alloc(align(6 + 8 * size, 4), 4096, 0);
    this.#indirectGpa = this.#indirectMax ? ram.alloc(16 * this.#indirectMax * size, 4096) : 0;
    this.#u16 = new Uint16Array(ram.mem.buffer);
    this.#u32 = new Uint32Array(ram.mem.buffer);
    this.#view = ram.view;
    this.#desc = ram.offset(this.descGpa, 16 * size);
    const avail = ram.offset(this.availGpa, 6 + 2 * size);
    const used = ram.offset(this.usedGpa, 6 + 8 * size);
    ram.mem.fill(0, this.#desc, this.#desc + 16 * size);
    ram.mem.fill(0, avail, avail + 6 + 2 * size);
    ram.mem.fill(0, used, used + 6 + 8 * size);
    // Element indexes by division: offsets past 4 GiB must not be cut to 32 bits (`>>`).
    this.#availIdxAt = (avail + 2) / 2;
    this.#availRingAt = (avail + 4) / 2;
    this.#usedEventAt = (avail + 4 + 2 * size) / 2;
    this.#usedFlagsAt = used / 2;
    this.#usedIdxAt = (used + 2) / 2;
    this.#usedRingAt = (used + 4) / 4;
    this.#availEventAt = (used + 4 + 8 * size) / 2;
    for (let i = size - 1; i >= 0; i--) this.#free.push(i);
    this.#state = new Uint8Array(size);
    this.#transient = new Uint8Array(size);
    this.#chainIds = new Array(size);
  }

  /** Free descriptors in the table. */
  get freeCount(): number {
    return this.#free.length;
  }

  /** Requests published and not yet collected. */
  get inFlight(): number {
    return (this.#published - this.lastUsed) & 0xffff;
  }

  #writeDesc(at: number, addr: number, len: number, flags: number, next: number): void {
    const v = this.#view;
    v.setBigUint64(at, BigInt(addr), true);
    v.setUint32(at + 8, len, true);
    v.setUint16(at + 12, flags, true);
    v.setUint16(at + 14, next, true);
  }

  /**
   * Puts a chain on the ring (not yet visible to the device: see publish()). Returns the head
   * descriptor id, or null when the table has too few free descriptors.
   */
  add(segments: readonly Segment[], options: { indirect?: boolean } = {}): number | null {
    if (segments.length === 0) throw new RangeError("a descriptor chain needs at least one segment");
    if (options.indirect) {
      if (segments.length > this.#indirectMax) {
        throw new RangeError(`indirect chain of ${segments.length} exceeds indirectMax ${this.#indirectMax}`);
      }
      const head = this.#free.pop();
      if (head === undefined) return null;
      const tableGpa = this.#indirectGpa + head * 16 * this.#indirectMax;
      const table = this.ram.offset(tableGpa, 16 * segments.length);
      segments.forEach((s, i) => {
        const last = i === segments.length - 1;
        this.#writeDesc(
          table + 16 * i,
          s.gpa,
          s.len,
          (last ? 0 : DescFlags.NEXT) | (s.write ? DescFlags.WRITE : 0),
          last ? 0 : i + 1,
        );
      });
      this.#writeDesc(this.#desc + 16 * head, tableGpa, 16 * segments.length, DescFlags.INDIRECT, 0);
      this.#chainIds[head] = [head];
      this.#transient[head] = 1;
      this.submitHead(head);
      return head;
    }
    const head = this.reserveChain(segments);
    if (head === null) return null;
    this.#transient[head] = 1;
    this.submitHead(head);
    return head;
  }

  /**
   * Writes a chain into free descriptors and keeps them reserved (not freed on completion), for
   * load generators that resubmit the same chain: change the request in place, then
   * submitHead(head). Returns the head, or null when too few descriptors are free.
   */
  reserveChain(segments: readonly Segment[]): number | null {
    if (this.#free.length < segments.length) return null;
    const ids = segments.map(() => this.#free.pop()!);
    segments.forEach((s, i) => {
      const last = i === segments.length - 1;
      this.#writeDesc(
        this.#desc + 16 * ids[i],
        s.gpa,
        s.len,
        (last ? 0 : DescFlags.NEXT) | (s.write ? DescFlags.WRITE : 0),
        last ? 0 : ids[i + 1],
      );
    });
    this.#chainIds[ids[0]] = ids;
    return ids[0];
  }

  /** Rewrites the flags of descriptor `id` (e.g. the data descriptor's WRITE bit of a reserved chain). */
  setDescFlags(id: number, flags: number): void {
    this.#view.setUint16(this.#desc + 16 * id + 12, flags, true);
  }

  /** The ids of the chain headed by `head` (reserved or in flight). */
  chainOf(head: number): readonly number[] {
    return this.#chainIds[head] ?? [head];
  }

  /** Puts `head` on the avail ring (shadow index; publish() makes it visible). */
  submitHead(head: number): void {
    this.#state[head] = 1;
    this.#pushAvail(head);
  }

  /** Releases a reserved chain's descriptors (it must not be in flight). */
  releaseChain(head: number): void {
    const ids = this.#chainIds[head];
    if (!ids) return;
    this.#chainIds[head] = undefined;
    for (let j = ids.length - 1; j >= 0; j--) this.#free.push(ids[j]);
  }

  #pushAvail(head: number): void {
    this.#u16[this.#availRingAt + (this.availIdx & this.#mask)] = head;
    this.availIdx = (this.availIdx + 1) & 0xffff;
  }

  readonly #state: Uint8Array;
  readonly #chainIds: Array<number[] | undefined>;
  /** Heads added with add() (freed on completion), as opposed to reserved chains. */
  readonly #transient: Uint8Array;

  /**
   * Makes everything added since the last publish visible (one store of avail->idx, then a full
   * fence) and says whether the device wants a kick (EVENT_IDX avail_event, else NO_NOTIFY).
   */
  publish(): boolean {
    const old = this.#published;
    const now = this.availIdx;
    if (old === now) return false;
    this.#published = now;
    // A locked exchange (xchg on x86) is a full fence: the loads below cannot be satisfied before
    // the new index is visible to the device (the store-load order EVENT_IDX depends on).
    Atomics.exchange(this.#u16, this.#availIdxAt, now);
    if (this.eventIdx) {
      const event = Atomics.load(this.#u16, this.#availEventAt);
      return ((now - event - 1) & 0xffff) < ((now - old) & 0xffff);
    }
    return (Atomics.load(this.#u16, this.#usedFlagsAt) & USED_F_NO_NOTIFY) === 0;
  }

  /** The device's avail_event (EVENT_IDX: "kick me when avail->idx passes this"). */
  availEvent(): number {
    return Atomics.load(this.#u16, this.#availEventAt);
  }

  /** The device's used->flags. */
  usedFlags(): number {
    return Atomics.load(this.#u16, this.#usedFlagsAt);
  }

  /** The device's used->idx. */
  usedIdx(): number {
    return Atomics.load(this.#u16, this.#usedIdxAt);
  }

  /**
   * Consumes new used entries, calling `done(id, len)` for each and freeing their descriptors.
   * Throws when the device returns an id that is not an in-flight head. Returns the count.
   */
  collect(done: (id: number, len: number) => void): number {
    const idx = this.usedIdx();
    const n = (idx - this.lastUsed) & 0xffff;
    if (n === 0) return 0;
    if (n > this.inFlight) {
      throw new Error(
        `device advanced used->idx by ${n} (${this.lastUsed} -> ${idx}) with ${this.inFlight} in flight`,
      );
    }
    for (let i = 0; i < n; i++) {
      const slot = this.#usedRingAt + 2 * (this.lastUsed & this.#mask);
      const id = this.#u32[slot];
      const len = this.#u32[slot + 1];
      if (id >= this.size || this.#state[id] !== 1) {
        throw new Error(`device returned used.id ${id} (len ${len}), which is not an in-flight head`);
      }
      this.#state[id] = 0;
      if (this.#transient[id]) {
        this.#transient[id] = 0;
        this.releaseChain(id);
      }
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
      done(id, len);
    }
    return n;
  }

  /**
   * Asks for a call on the next completion (EVENT_IDX: used_event = lastUsed; else clears
   * NO_INTERRUPT), then re-checks. Returns true when completions are already waiting.
   */
  armCall(): boolean {
    // Exchange, not store: the used->idx load below must not pass it (see publish()).
    if (this.eventIdx) Atomics.exchange(this.#u16, this.#usedEventAt, this.lastUsed);
    else Atomics.exchange(this.#u16, this.#availRingAt - 2, 0);
    return this.usedIdx() !== this.lastUsed;
  }

  /** Suppresses calls (EVENT_IDX: used_event far ahead; else NO_INTERRUPT). */
  suppressCalls(): void {
    if (this.eventIdx) Atomics.store(this.#u16, this.#usedEventAt, (this.lastUsed + 0x7fff) & 0xffff);
    else Atomics.store(this.#u16, this.#availRingAt - 2, AVAIL_F_NO_INTERRUPT);
  }

  /** Writes descriptor `i` as given (malicious-ring tests: loops, bad addresses...). */
  rawDesc(i: number, d: RawDesc): void {
    const at = this.#desc + 16 * (i & this.#mask);
    this.#view.setBigUint64(at, d.addr, true);
    this.#view.setUint32(at + 8, d.len, true);
    this.#view.setUint16(at + 12, d.flags, true);
    this.#view.setUint16(at + 14, d.next, true);
  }

  /**
   * Puts `head` on the avail ring as-is (no bookkeeping: completions of it are not expected) and
   * marks it in flight so collect() accepts it if the device does complete it.
   */
  rawAvail(head: number): void {
    const i = this.#free.indexOf(head);
    if (i >= 0) this.#free.splice(i, 1);
    this.#state[head & this.#mask] = 1;
    this.#pushAvail(head);
  }

  /** The head stored in avail->ring[i % size]. */
  availEntry(i: number): number {
    return this.#u16[this.#availRingAt + (i & this.#mask)];
  }

  /** Sets avail->idx directly (e.g. to claim more entries than the ring holds). */
  rawAvailIdx(idx: number): void {
    this.availIdx = idx & 0xffff;
    this.#published = this.availIdx;
    Atomics.store(this.#u16, this.#availIdxAt, this.availIdx);
  }

  /** Forces the driver's view after a back-end restart (QEMU restores last_avail_idx = used->idx). */
  get publishedIdx(): number {
    return this.#published;
  }

  /** Descriptor ids of in-flight chains (head -> all ids), for inflight-region tests. */
  inFlightHeads(): number[] {
    const out: number[] = [];
    this.#state.forEach((v, i) => v && out.push(i));
    return out;
  }

  /** Writes a used entry as if the device had (to simulate a back-end that died mid-batch). */
  rawUsed(id: number, len: number): void {
    const idx = this.usedIdx();
    const slot = this.#usedRingAt + 2 * (idx & this.#mask);
    this.#u32[slot] = id;
    this.#u32[slot + 1] = len;
    Atomics.store(this.#u16, this.#usedIdxAt, (idx + 1) & 0xffff);
  }
}

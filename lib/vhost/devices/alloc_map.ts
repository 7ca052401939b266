/**
 * Which pages of a sparse file are known to hold data: one bit per 4 KiB page. The vmcopy engine
 * reads through a shared mapping of the file only where every page is known to be allocated,
 * because on tmpfs a read fault on a hole allocates the page (a plain preadv reads zeros without
 * allocating). Seeded from SEEK_DATA/SEEK_HOLE; a write marks its pages allocated (a partial
 * page write allocates the whole page); a discard or write-zeroes marks its pages unknown again.
 * Only ever errs towards "unknown", which costs a preadv instead of a copy, never memory.
 *
 * Pure: no I/O.
 * @module
 */

/** The page granularity of the map. */
export const ALLOC_PAGE = 4096;

/** The largest file the map covers (1 TiB: a 32 MiB bitmap). */
export const ALLOC_MAP_MAX_BYTES = 2 ** 40;

function popcount(x: number): number {
  x = x - ((x >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const map = AllocMap.fromExtents(1 << 20, [[0, 65536]]); // the file's data extents
 * assert.equal(map.allocated(4096, 4096), true); // read through the mapping
 * map.markUnknown(0, 8192); // discarded
 * assert.equal(map.allocated(4096, 4096), false); // preadv
 * ```
 */
export class AllocMap {
  readonly size: number;
  readonly pages: number;
  /** The bitmap, then the count of unknown pages: shareable with another thread (see `shared`). */
  readonly shared: SharedArrayBuffer;
  readonly #bits: Int32Array;
  readonly #unknown: Int32Array;

  /**
   * A map of `size` bytes with no page known to be allocated; or, given another map's `shared`
   * buffer, that same map seen from this thread (a device whose queues several threads serve).
   * Bits change with atomic OR/AND, so threads marking pages of one word lose nothing.
   */
  constructor(size: number, shared?: SharedArrayBuffer) {
    if (!Number.isSafeInteger(size) || size < 0 || size > ALLOC_MAP_MAX_BYTES) {
      throw new RangeError(`allocation map of ${size} bytes (at most ${ALLOC_MAP_MAX_BYTES})`);
    }
    this.size = size;
    this.pages = Math.ceil(size / ALLOC_PAGE);
    const words = Math.ceil(this.pages / 32);
    if (shared && shared.byteLength !== (words + 1) * 4) {
      throw new RangeError(`shared allocation map of ${shared.byteLength} bytes for ${size} bytes`);
    }
    this.shared = shared ?? new SharedArrayBuffer((words + 1) * 4);
    this.#bits = new Int32Array(this.shared, 0, words);
    this.#unknown = new Int32Array(this.shared, words * 4, 1);
    if (!shared) this.#unknown[0] = this.pages;
  }

  /** A map with the given [start, end) data extents allocated. */
  static fromExtents(size: number, extents: Iterable<readonly [number, number]>): AllocMap {
    const map = new AllocMap(size);
    for (const [start, end] of extents) map.markAllocated(start, end - start);
    return map;
  }

  /** Pages not known to be allocated. */
  get unknownPages(): number {
    return Atomics.load(this.#unknown, 0);
  }

  /** Whether every page of [offset, offset+len) is known to be allocated (len 0: true). */
  allocated(offset: number, len: number): boolean {
    if (this.#unknown[0] === 0) return true;
    const [first, end] = this.#span(offset, len);
    for (let p = first; p < end;) {
      const w = p >>> 5;
      const bit = p & 31;
      const n = Math.min(32 - bit, end - p);
      const mask = n === 32 ? 0xffffffff : ((1 << n) - 1) << bit;
      if (((this.#bits[w] & mask) >>> 0) !== (mask >>> 0)) return false;
      p += n;
    }
    return true;
  }

  /** Data was written to [offset, offset+len): its pages (rounded out) are allocated. */
  markAllocated(offset: number, len: number): void {
    this.#set(offset, len, true);
  }

  /** [offset, offset+len) was discarded or zeroed: its pages (rounded out) may be holes. */
  markUnknown(offset: number, len: number): void {
    this.#set(offset, len, false);
  }

  /** Pages [first, end) touched by the byte range, clamped to the file. */
  #span(offset: number, len: number): [number, number] {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(len) || offset < 0 || len < 0) {
      throw new RangeError(`allocation map range ${offset}+${len}`);
    }
    if (len === 0) return [0, 0];
    const first = Math.min(this.pages, Math.floor(offset / ALLOC_PAGE));
    const end = Math.min(this.pages, Math.ceil((offset + len) / ALLOC_PAGE));
    return [first, end];
  }

  #set(offset: number, len: number, on: boolean): void {
    const [first, end] = this.#span(offset, len);
    for (let p = first; p < end;) {
      const w = p >>> 5;
      const bit = p & 31;
      const n = Math.min(32 - bit, end - p);
      const mask = n === 32 ? -1 : ((1 << n) - 1) << bit;
      const old = on ? Atomics.or(this.#bits, w, mask) : Atomics.and(this.#bits, w, ~mask);
      const changed = popcount(((on ? ~old : old) & mask) >>> 0);
      if (changed) Atomics.add(this.#unknown, 0, on ? -changed : changed);
      p += n;
    }
  }
}

/**
 * The dirty-page log of live migration (vhost-user.rst "Dirty pages logging"): a bitmap the
 * front-end shares with SET_LOG_BASE, one bit per 4 KiB page of guest-physical memory (bit
 * `page % 8` of byte `page / 8`, which is also QEMU's array of little-endian 64-bit chunks). While
 * VHOST_F_LOG_ALL is negotiated the back-end sets the bit of every page it writes — buffers the
 * device filled and the used ring — after writing it, with an atomic OR: QEMU clears chunks with an
 * atomic exchange while it migrates, and queue threads mark the same bitmap.
 * @module
 */
import type { MappedRegion } from "../../ffi/mod.ts";

/** The page a log bit covers. */
export const LOG_PAGE = 4096;

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, mapShared, memfdCreate } from "../../ffi/mod.ts";
 *
 * using fd = memfdCreate("log"); // as the front-end sends it with SET_LOG_BASE
 * ftruncate(fd, 4096);
 * const log = new DirtyLog(mapShared(fd, 4096), 0, 4096); // covers 4096 * 8 pages = 128 MiB
 * log.mark(0x5000, 0x2001); // bytes 0x5000..0x7000: pages 5, 6 and 7
 * assert.equal(log.bits[0], 0b1110_0000);
 * log.close(); // unmaps
 * ```
 */
export class DirtyLog {
  /** The bitmap (a view of the mapping, from the log's offset). */
  readonly bits: Uint8Array;
  /** Pages the bitmap covers. */
  readonly pages: number;
  /** Writes to pages beyond the bitmap (the front-end sized it too small): counted, not marked. */
  beyond = 0;
  readonly #map: MappedRegion;

  /** A log of `size` bytes at `offset` in `map` (which it owns from now on). */
  constructor(map: MappedRegion, offset: number, size: number) {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(size) || offset < 0 || size < 0) {
      throw new RangeError(`dirty log of ${size} bytes at offset ${offset}`);
    }
    if (offset + size > map.size) {
      throw new RangeError(
        `dirty log of ${size} bytes at offset ${offset} beyond its ${map.size}-byte mapping`,
      );
    }
    this.#map = map;
    this.bits = new Uint8Array(map.bytes.buffer, map.bytes.byteOffset + offset, size);
    this.pages = size * 8;
  }

  /** Marks every page of guest-physical [gpa, gpa + len) dirty (len 0: nothing). */
  mark(gpa: number, len: number): void {
    if (len <= 0) return;
    // Guest addresses pass 4 GiB: division, never shifts.
    const first = Math.floor(gpa / LOG_PAGE);
    let last = Math.floor((gpa + len - 1) / LOG_PAGE);
    if (last >= this.pages) {
      this.beyond += last - Math.max(first, this.pages) + 1;
      if (first >= this.pages) return;
      last = this.pages - 1;
    }
    const bits = this.bits;
    const b0 = Math.floor(first / 8), b1 = Math.floor(last / 8);
    for (let b = b0; b <= b1; b++) {
      const lo = b === b0 ? first % 8 : 0;
      const hi = b === b1 ? last % 8 : 7;
      const mask = ((0xff << lo) & (0xff >> (7 - hi))) & 0xff;
      if ((bits[b] & mask) !== mask) Atomics.or(bits, b, mask);
    }
  }

  /** Unmaps the log. */
  close(): void {
    this.#map.close();
  }
}

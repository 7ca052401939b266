/**
 * iovec arrays over mapped regions, for preadv/pwritev and io_uring. Each entry is checked to lie
 * inside its region before its address is written, so no unchecked address reaches a syscall.
 * @module
 */
import { addressOf } from "./_libc.ts";
import { IOVEC } from "./_layout.ts";
import type { MappedRegion } from "./memory.ts";

/** Largest iovec count one preadv/pwritev takes (IOV_MAX). */
export const IOV_MAX = 1024;

/**
 * A reusable, preallocated iovec array.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { preadv } from "./file.ts";
 * import { ftruncate, mapShared, memfdCreate } from "./memory.ts";
 *
 * using file = memfdCreate("disk");
 * file.write(new TextEncoder().encode("hello"));
 * using mem = memfdCreate("guest");
 * ftruncate(mem, 8192);
 * using region = mapShared(mem, 8192);
 * const iov = new IoVecs(16);
 * iov.push(region, 4096, 512); // 512 bytes at offset 4096 of the region (checked against its size)
 * assert.equal(preadv(file, iov, 0), 5); // short: the file has 5 bytes
 * assert.equal(new TextDecoder().decode(region.bytes.subarray(4096, 4101)), "hello");
 * ```
 */
export class IoVecs {
  readonly capacity: number;
  readonly #buf: Uint8Array<ArrayBuffer>;
  /** Each iovec as four u32 words: base low, base high, len low, len high. */
  readonly #u32: Uint32Array;
  #count = 0;
  #bytes = 0;

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > IOV_MAX) {
      throw new RangeError(`iovec capacity must be 1..${IOV_MAX}: got ${capacity}`);
    }
    this.capacity = capacity;
    this.#buf = new Uint8Array(IOVEC.size * capacity);
    this.#u32 = new Uint32Array(this.#buf.buffer);
  }

  /** Number of entries. */
  get count(): number {
    return this.#count;
  }

  /** Total bytes described. */
  get totalBytes(): number {
    return this.#bytes;
  }

  /** Empties the array (the buffer is kept). */
  clear(): void {
    this.#count = 0;
    this.#bytes = 0;
  }

  /** Appends `len` bytes of `region` at `offset`. Throws RangeError if outside the region or full. */
  push(region: MappedRegion, offset: number, len: number): void {
    if (this.#count >= this.capacity) throw new RangeError(`iovec array full (${this.capacity} entries)`);
    if (
      !Number.isSafeInteger(offset) || !Number.isSafeInteger(len) || offset < 0 || len < 0 ||
      offset + len > region.size
    ) {
      throw new RangeError(`iovec [${offset}, +${len}) is outside the ${region.size}-byte region`);
    }
    // Plain number arithmetic (x86_64 user addresses are below 2^47, so every value is exact): no
    // BigInt is made per segment on the hot path.
    const a = region.unsafeBase + offset;
    const i = this.#count * 4;
    this.#u32[i] = a >>> 0;
    this.#u32[i + 1] = Math.floor(a / 4294967296);
    this.#u32[i + 2] = len >>> 0;
    this.#u32[i + 3] = Math.floor(len / 4294967296);
    this.#count++;
    this.#bytes += len;
  }

  /**
   * Appends every entry of `other` (already checked when it was filled): one iovec array for a
   * batch of requests. Throws RangeError if they do not all fit.
   */
  append(other: IoVecs): void {
    const n = other.#count;
    if (this.#count + n > this.capacity) {
      throw new RangeError(`iovec array has room for ${this.capacity - this.#count} more entries: got ${n}`);
    }
    this.#u32.set(other.#u32.subarray(0, 4 * n), 4 * this.#count);
    this.#count += n;
    this.#bytes += other.#bytes;
  }

  /** A new array describing the same bytes less the first `skip` (to resume a short transfer). */
  slice(skip: number): IoVecs {
    const out = new IoVecs(this.capacity);
    let rest = skip;
    for (let i = 0; i < this.#count; i++) {
      const len = this.#u32[4 * i + 2] + this.#u32[4 * i + 3] * 4294967296;
      if (rest >= len) {
        rest -= len;
        continue;
      }
      const a = this.#u32[4 * i] + this.#u32[4 * i + 1] * 4294967296 + rest;
      const j = out.#count * 4;
      out.#u32[j] = a >>> 0;
      out.#u32[j + 1] = Math.floor(a / 4294967296);
      out.#u32[j + 2] = (len - rest) >>> 0;
      out.#u32[j + 3] = Math.floor((len - rest) / 4294967296);
      out.#count++;
      out.#bytes += len - rest;
      rest = 0;
    }
    return out;
  }

  /** The raw iovec buffer, for ffi/ calls only. */
  get unsafeBuffer(): Uint8Array<ArrayBuffer> {
    return this.#buf;
  }

  /** Address of the iovec buffer, for ffi/ calls only (io_uring SQEs). */
  get unsafeAddress(): bigint {
    return addressOf(this.#buf);
  }
}

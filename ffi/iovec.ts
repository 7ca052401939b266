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
 * const iov = new IoVecs(16);
 * iov.push(region, 4096, 512);
 * preadv(file, iov, 0);
 */
export class IoVecs {
  readonly capacity: number;
  readonly #buf: Uint8Array<ArrayBuffer>;
  readonly #u64: BigUint64Array;
  #count = 0;
  #bytes = 0;

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > IOV_MAX) {
      throw new RangeError(`iovec capacity must be 1..${IOV_MAX}: got ${capacity}`);
    }
    this.capacity = capacity;
    this.#buf = new Uint8Array(IOVEC.size * capacity);
    this.#u64 = new BigUint64Array(this.#buf.buffer);
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
    const i = this.#count * 2;
    this.#u64[i] = region.unsafeAddress + BigInt(offset);
    this.#u64[i + 1] = BigInt(len);
    this.#count++;
    this.#bytes += len;
  }

  /** A new array describing the same bytes less the first `skip` (to resume a short transfer). */
  slice(skip: number): IoVecs {
    const out = new IoVecs(this.capacity);
    let rest = skip;
    for (let i = 0; i < this.#count; i++) {
      const len = Number(this.#u64[2 * i + 1]);
      if (rest >= len) {
        rest -= len;
        continue;
      }
      const j = out.#count * 2;
      out.#u64[j] = this.#u64[2 * i] + BigInt(rest);
      out.#u64[j + 1] = BigInt(len - rest);
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

/**
 * The guest memory table: each region the front-end sends (SET_MEM_TABLE, ADD_MEM_REG) is mmap'd
 * once with one set of cached views, and guest-physical (descriptor) and front-end-virtual (ring)
 * addresses are translated to (region, offset) only after containment and overflow are checked.
 *
 * Addresses stay `bigint` in the public API until {@link GuestMemory.translateGpa} or
 * {@link GuestMemory.translateUser} has checked them. The hot path ({@link GuestMemory.findGpa})
 * takes the two 32-bit halves of a descriptor address, refuses any address at or above 2^52 before
 * combining them, so the number arithmetic that follows is exact.
 * @module
 */
import {
  fdKind,
  fstat,
  type MappedRegion,
  mapShared,
  type OwnedFd,
  sealedAgainstShrink,
} from "../../ffi/mod.ts";
import type { MemoryRegion } from "./message.ts";

const PAGE = 4096;
/** Regions must end below this (numbers stay exact: 2^52). */
export const ADDRESS_LIMIT = 2 ** 52;
const HI_LIMIT = ADDRESS_LIMIT / 2 ** 32;

/** An address that is outside guest memory, or a region table that does not make sense. */
export class GuestMemoryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "GuestMemoryError";
  }
}

/** One mapped region with its cached views. */
export class GuestRegion {
  /** Guest-physical start. */
  readonly guestAddr: number;
  readonly size: number;
  /** Front-end virtual start. */
  readonly userAddr: number;
  /** Offset of the region inside `map` (mmap_offset rounded down to a page leaves a remainder). */
  readonly base: number;
  readonly map: MappedRegion;
  /** Cached views over the whole mapping: created once, never per access. */
  readonly bytes: Uint8Array<ArrayBuffer>;
  readonly view: DataView;
  readonly u16: Uint16Array;
  readonly u32: Uint32Array;
  /**
   * The fd was sealed against shrinking (F_SEAL_SHRINK, QEMU's memfd default): the front-end
   * cannot truncate it under the mapping later. Unsealed files were checked at mapping time only.
   */
  sealed = false;

  constructor(r: MemoryRegion, map: MappedRegion, base: number) {
    this.guestAddr = Number(r.guestAddr);
    this.size = Number(r.size);
    this.userAddr = Number(r.userAddr);
    this.base = base;
    this.map = map;
    this.bytes = map.bytes;
    this.view = new DataView(map.bytes.buffer);
    // Element counts by division, never `>>>` (32 bits): a region of 4 GiB or more needs every
    // element (V8 typed arrays index past 2^32).
    this.u16 = new Uint16Array(map.bytes.buffer, 0, Math.floor(map.size / 2));
    this.u32 = new Uint32Array(map.bytes.buffer, 0, Math.floor(map.size / 4));
  }

  /** Whether the region's description equals `r`. */
  matches(r: MemoryRegion): boolean {
    return BigInt(this.guestAddr) === r.guestAddr && BigInt(this.size) === r.size &&
      BigInt(this.userAddr) === r.userAddr;
  }
}

/** A checked translation: `offset` is the byte offset in `region.map`. */
export interface Translation {
  region: GuestRegion;
  offset: number;
}

function describe(r: MemoryRegion): string {
  return `region gpa 0x${r.guestAddr.toString(16)} size 0x${r.size.toString(16)} uaddr 0x${
    r.userAddr.toString(16)
  } mmap_offset 0x${r.mmapOffset.toString(16)}`;
}

function validate(r: MemoryRegion): void {
  const what = describe(r);
  if (r.size === 0n) throw new GuestMemoryError(`${what}: size is 0`);
  const lim = BigInt(ADDRESS_LIMIT);
  if (r.guestAddr + r.size > lim || r.userAddr + r.size > lim) {
    throw new GuestMemoryError(`${what}: ends beyond 2^52`);
  }
  if (r.mmapOffset + r.size > lim) {
    throw new GuestMemoryError(`${what}: mmap offset 0x${r.mmapOffset.toString(16)} too large`);
  }
  // Ring fields are read through u16/u32 views of the mapping: an aligned ring address must land
  // at an aligned offset, so uaddr and mmap_offset must agree modulo 16 (QEMU's are page aligned).
  if ((r.userAddr - r.mmapOffset) % 16n !== 0n) {
    throw new GuestMemoryError(
      `${what}: uaddr and mmap_offset differ modulo 16, so aligned rings would be misaligned in the mapping`,
    );
  }
}

/**
 * Checks the fd against reality before it is mapped: a memory file (not a socket, pipe or device)
 * holding at least mmap_offset + size bytes (touching a mapping beyond the end of the file would
 * kill the process with SIGBUS).
 */
function checkFd(r: MemoryRegion, fd: OwnedFd): void {
  const problem = memoryFdProblem(fd, r.mmapOffset + r.size, {
    fd: "the fd",
    kinds: "memfd, /dev/shm or hugetlbfs file",
    need: "mmap_offset + size",
  });
  if (problem) throw new GuestMemoryError(`${describe(r)}: ${problem}`);
}

/**
 * What is wrong with `fd` as the memory behind `need` bytes (mmap_offset + size) before it is
 * mapped, or null: not a memory file, or smaller than `need` (touching the mapping past the end of
 * the file would kill the process with SIGBUS). `names` words the message.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { memfdCreate } from "../../ffi/mod.ts";
 *
 * using fd = memfdCreate("short");
 * const names = { fd: "the fd", kinds: "memfd", need: "mmap_offset + size" };
 * assert.equal(memoryFdProblem(fd, 4096n, names), "the fd holds 0 bytes, fewer than mmap_offset + size = 4096");
 * assert.equal(memoryFdProblem(fd, 0n, names), null);
 * ```
 */
export function memoryFdProblem(
  fd: OwnedFd,
  need: bigint,
  names: { fd: string; kinds: string; need: string },
): string | null {
  const kind = fdKind(fd);
  if (kind !== "regular file") return `${names.fd} is a ${kind}, expected a memory file (${names.kinds})`;
  const { size } = fstat(fd);
  if (BigInt(size) < need) return `${names.fd} holds ${size} bytes, fewer than ${names.need} = ${need}`;
  return null;
}

/**
 * The memory table of one connection.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, memfdCreate } from "../../ffi/mod.ts";
 *
 * using memfd = memfdCreate("guest"); // as the front-end sends it with SET_MEM_TABLE
 * ftruncate(memfd, 1 << 20);
 * const mem = new GuestMemory();
 * mem.add({ guestAddr: 0n, size: 1n << 20n, userAddr: 0x7f00_0000_0000n, mmapOffset: 0n }, memfd);
 * const { region, offset } = mem.translateGpa(0x1000n, 16);
 * region.bytes[offset] = 7; // the guest's byte at 0x1000
 * assert.equal(mem.translateUser(0x7f00_0000_1000n, 1).offset, offset);
 * assert.throws(() => mem.translateGpa(0xffff8n, 16), GuestMemoryError); // runs past the end
 * mem.close(); // unmaps every region
 * ```
 */
export class GuestMemory {
  #regions: GuestRegion[] = [];
  #last = 0;
  /** Set by findGpa/findUser: the offset in the found region's mapping. */
  offset = 0;

  /** The regions, in insertion order. */
  get regions(): readonly GuestRegion[] {
    return this.#regions;
  }

  /**
   * Maps `fd` for region `r` (the fd stays with the caller and may be closed afterwards).
   * Refuses regions overlapping an existing one in guest-physical or virtual space, fds that are
   * not memory files or are smaller than mmap_offset + size, and misaligned uaddr/mmap_offset.
   */
  add(r: MemoryRegion, fd: OwnedFd): GuestRegion {
    validate(r);
    checkFd(r, fd);
    for (const o of this.#regions) {
      const g = Number(r.guestAddr), u = Number(r.userAddr), s = Number(r.size);
      if (g < o.guestAddr + o.size && o.guestAddr < g + s) {
        throw new GuestMemoryError(`region gpa 0x${g.toString(16)}+0x${s.toString(16)} overlaps another`);
      }
      if (u < o.userAddr + o.size && o.userAddr < u + s) {
        throw new GuestMemoryError(`region uaddr 0x${u.toString(16)}+0x${s.toString(16)} overlaps another`);
      }
    }
    const off = Number(r.mmapOffset);
    const mapOff = Math.floor(off / PAGE) * PAGE;
    const base = off - mapOff;
    const map = mapShared(fd, Number(r.size) + base, { offset: mapOff });
    const region = new GuestRegion(r, map, base);
    region.sealed = sealedAgainstShrink(fd);
    this.#regions.push(region);
    return region;
  }

  /** Removes (and unmaps) the region described by `r`; false if there is none. */
  remove(r: MemoryRegion): boolean {
    const i = this.#regions.findIndex((x) => x.matches(r));
    if (i < 0) return false;
    const [gone] = this.#regions.splice(i, 1);
    gone.map.close();
    this.#last = 0;
    return true;
  }

  /** Takes `region` out of the table without unmapping it (the caller unmaps it later). */
  detach(region: GuestRegion): void {
    const i = this.#regions.indexOf(region);
    if (i >= 0) this.#regions.splice(i, 1);
    this.#last = 0;
  }

  /** Unmaps every region. */
  close(): void {
    for (const r of this.#regions) r.map.close();
    this.#regions = [];
    this.#last = 0;
  }

  /**
   * Hot path: the region holding guest-physical [hi:lo, +len), or null. On success `this.offset`
   * is the offset in the region's mapping. `lo` and `hi` are the u32 halves of the address.
   */
  findGpa(lo: number, hi: number, len: number): GuestRegion | null {
    if (hi >= HI_LIMIT) return null;
    const addr = hi * 4294967296 + lo;
    const rs = this.#regions;
    const n = rs.length;
    for (let k = 0; k < n; k++) {
      const i = (this.#last + k) % n;
      const r = rs[i];
      const rel = addr - r.guestAddr;
      if (rel >= 0 && rel + len <= r.size) {
        this.#last = i;
        this.offset = r.base + rel;
        return r;
      }
    }
    return null;
  }

  /** Like findGpa for a front-end virtual address (ring addresses). */
  findUser(addr: number, len: number): GuestRegion | null {
    if (!(addr >= 0 && addr < ADDRESS_LIMIT)) return null;
    for (const r of this.#regions) {
      const rel = addr - r.userAddr;
      if (rel >= 0 && rel + len <= r.size) {
        this.offset = r.base + rel;
        return r;
      }
    }
    return null;
  }

  /** Translates guest-physical [addr, addr+len); throws GuestMemoryError when not inside one region. */
  translateGpa(addr: bigint, len: number): Translation {
    const r = addr >= 0n && addr < BigInt(ADDRESS_LIMIT) && Number.isSafeInteger(len) && len >= 0
      ? this.findGpa(Number(addr & 0xffffffffn), Number(addr >> 32n), len)
      : null;
    if (!r) {
      throw new GuestMemoryError(`guest address 0x${addr.toString(16)}+${len} is not inside guest memory`);
    }
    return { region: r, offset: this.offset };
  }

  /** Translates front-end virtual [addr, addr+len); throws GuestMemoryError when not inside one region. */
  translateUser(addr: bigint, len: number): Translation {
    const r = addr >= 0n && addr < BigInt(ADDRESS_LIMIT) && Number.isSafeInteger(len) && len >= 0
      ? this.findUser(Number(addr), len)
      : null;
    if (!r) {
      throw new GuestMemoryError(
        `front-end address 0x${addr.toString(16)}+${len} is not inside guest memory`,
      );
    }
    return { region: r, offset: this.offset };
  }
}

/**
 * Shared memory: memfd_create, shm_open/shm_unlink, mkostemp in a directory (hugetlbfs),
 * ftruncate, fstat size, and mmap'd regions with one ArrayBuffer view each.
 * @module
 */
import { cstr, libc } from "./_libc.ts";
import { STAT } from "./_layout.ts";
import { check, Errno, ErrnoError, lastErrno } from "./errno.ts";
import { O_CLOEXEC, OwnedFd } from "./fd.ts";

const MFD_CLOEXEC = 1;
const MFD_ALLOW_SEALING = 2;
const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 1;
const MAP_FAILED = 0xffffffffffffffffn;

/** Creates an anonymous memory file (CLOEXEC). */
export function memfdCreate(name: string, options: { sealing?: boolean } = {}): OwnedFd {
  const flags = MFD_CLOEXEC | (options.sealing ? MFD_ALLOW_SEALING : 0);
  return OwnedFd.unsafeAdopt(
    check("memfd_create", libc.memfd_create(cstr(name), flags), name),
    `memfd ${name}`,
  );
}

/** shm_open flags. */
export const ShmFlags = { O_RDONLY: 0, O_RDWR: 2, O_CREAT: 0o100, O_EXCL: 0o200, O_TRUNC: 0o1000 } as const;

/** Opens (or creates) a POSIX shared memory object such as "ivshmem" (/dev/shm/ivshmem). */
export function shmOpen(name: string, flags: number, mode = 0o600): OwnedFd {
  const n = name.startsWith("/") ? name : `/${name}`;
  if (n.length < 2 || n.indexOf("/", 1) !== -1) {
    throw new ErrnoError("shm_open", Errno.EINVAL, `${name}: a shm name is one path component`);
  }
  return OwnedFd.unsafeAdopt(
    check("shm_open", libc.shm_open(cstr(n), flags | O_CLOEXEC, mode), name),
    `shm ${name}`,
  );
}

/** Removes a POSIX shared memory object; ENOENT is not an error. */
export function shmUnlink(name: string): void {
  const n = name.startsWith("/") ? name : `/${name}`;
  if (libc.shm_unlink(cstr(n)) === -1 && lastErrno() !== Errno.ENOENT) {
    throw new ErrnoError("shm_unlink", lastErrno(), name);
  }
}

/** Creates a unique file `dir/prefixXXXXXX` (e.g. on hugetlbfs); returns its fd and path. */
export function mkstempIn(dir: string, prefix: string): { fd: OwnedFd; path: string } {
  const template = cstr(`${dir.replace(/\/+$/, "")}/${prefix}XXXXXX`);
  const fd = check("mkostemp", libc.mkostemp(template, O_CLOEXEC), dir);
  const path = new TextDecoder().decode(template.subarray(0, template.length - 1));
  return { fd: OwnedFd.unsafeAdopt(fd, `file ${path}`), path };
}

/** Sets a file's size. */
export function ftruncate(fd: OwnedFd, size: number | bigint): void {
  check("ftruncate", libc.ftruncate(fd.unsafeFd, BigInt(size)), fd.label);
}

/** fstat(2): size and mode. */
export function fstat(fd: OwnedFd): { size: number; mode: number } {
  const st = new Uint8Array(STAT.size);
  check("fstat", libc.fstat(fd.unsafeFd, st), fd.label);
  const v = new DataView(st.buffer);
  return { size: Number(v.getBigInt64(STAT.size_, true)), mode: v.getUint32(STAT.mode, true) };
}

const F_ADD_SEALS = 1033;
const F_GET_SEALS = 1034;
const F_SEAL_SHRINK = 2;
const F_SEAL_GROW = 4;

/** Seals a memfd made with `{ sealing: true }` against shrinking and growing (its size is final). */
export function sealSize(fd: OwnedFd): void {
  check("fcntl(F_ADD_SEALS)", libc.fcntl(fd.unsafeFd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), fd.label);
}

/**
 * Whether the file can never shrink (a memfd with F_SEAL_SHRINK, as QEMU's memory-backend-memfd
 * makes by default): a mapping of it cannot later fault with SIGBUS because the owner truncated it.
 * False for files that cannot be sealed (shm_open objects, hugetlbfs, regular files).
 */
export function sealedAgainstShrink(fd: OwnedFd): boolean {
  const seals = libc.fcntl(fd.unsafeFd, F_GET_SEALS, 0);
  if (seals === -1) {
    if (lastErrno() === Errno.EINVAL) return false; // not a sealable file
    throw new ErrnoError("fcntl(F_GET_SEALS)", lastErrno(), fd.label);
  }
  return (seals & F_SEAL_SHRINK) !== 0;
}

/** Options for mapShared. */
export interface MapOptions {
  /** Offset into the file (page aligned). */
  offset?: number | bigint;
  /** Map read-only. */
  readOnly?: boolean;
}

/**
 * A shared mapping of a file. `bytes` is the one view of it; cache typed arrays made from
 * `bytes.buffer`. Unmapped by close(); the fd stays with its owner.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * using memfd = memfdCreate("shared");
 * ftruncate(memfd, 4096);
 * using region = mapShared(memfd, 4096);
 * region.bytes[0] = 1;
 * using other = mapShared(memfd, 4096, { readOnly: true }); // another mapping of the same memory
 * assert.equal(other.bytes[0], 1);
 * ```
 */
export class MappedRegion {
  readonly size: number;
  readonly bytes: Uint8Array<ArrayBuffer>;
  #ptr: Deno.PointerObject | null;
  readonly #base: number;

  constructor(ptr: Deno.PointerObject, size: number) {
    this.#ptr = ptr;
    this.#base = Number(Deno.UnsafePointer.value(ptr));
    this.size = size;
    this.bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, size));
  }

  /** The mapping's address, for building iovecs inside ffi/. */
  get unsafeAddress(): bigint {
    if (this.#ptr === null) throw new ErrnoError("use", Errno.EFAULT, "of an unmapped region");
    return BigInt(Deno.UnsafePointer.value(this.#ptr));
  }

  /**
   * The mapping's address as a number, for building iovecs inside ffi/ without BigInt work on the
   * hot path (x86_64 user addresses are below 2^47, so the number is exact).
   */
  get unsafeBase(): number {
    if (this.#ptr === null) throw new ErrnoError("use", Errno.EFAULT, "of an unmapped region");
    return this.#base;
  }

  /** Whether close() has run. */
  get closed(): boolean {
    return this.#ptr === null;
  }

  /** munmap once. Views of `bytes` must not be used afterwards. */
  close(): void {
    if (this.#ptr === null) return;
    const p = this.#ptr;
    this.#ptr = null;
    check("munmap", libc.munmap(p, BigInt(this.size)));
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** mmap(MAP_SHARED) `size` bytes of `fd` at `offset`. */
export function mapShared(fd: OwnedFd, size: number, options: MapOptions = {}): MappedRegion {
  if (!Number.isSafeInteger(size) || size <= 0) throw new RangeError(`mmap size must be > 0: got ${size}`);
  const prot = options.readOnly ? PROT_READ : PROT_READ | PROT_WRITE;
  const p = libc.mmap(null, BigInt(size), prot, MAP_SHARED, fd.unsafeFd, BigInt(options.offset ?? 0));
  if (p === null || BigInt(Deno.UnsafePointer.value(p)) === MAP_FAILED) {
    throw new ErrnoError("mmap", lastErrno(), `${fd.label} (${size} bytes at offset ${options.offset ?? 0})`);
  }
  return new MappedRegion(p, size);
}

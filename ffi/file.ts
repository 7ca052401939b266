/**
 * File I/O for block back-ends: preadv/pwritev straight into mapped memory, fdatasync, fallocate
 * (punch hole, zero range), the size of a file or block device, its data extents (SEEK_DATA /
 * SEEK_HOLE) and its file system type.
 * @module
 */
import { libc } from "./_libc.ts";
import { check, Errno, ErrnoError, lastErrno } from "./errno.ts";
import type { OwnedFd } from "./fd.ts";
import { fstat } from "./memory.ts";
import type { IoVecs } from "./iovec.ts";

const S_IFMT = 0o170000;
const S_IFBLK = 0o060000;
const BLKGETSIZE64 = 0x80081272n;
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;

function rw(name: "preadv" | "pwritev", fd: OwnedFd, iov: IoVecs, offset: number): number {
  const call = name === "preadv" ? libc.preadv : libc.pwritev;
  while (true) {
    const n = call(fd.unsafeFd, iov.unsafeBuffer, iov.count, BigInt(offset));
    if (n !== -1n) return Number(n);
    if (lastErrno() !== Errno.EINTR) throw new ErrnoError(name, lastErrno(), `${fd.label} at ${offset}`);
  }
}

/** preadv(2) into the regions `iov` describes; returns bytes read (short at end of file). */
export function preadv(fd: OwnedFd, iov: IoVecs, offset: number): number {
  return rw("preadv", fd, iov, offset);
}

/** pwritev(2) from the regions `iov` describes; returns bytes written. */
export function pwritev(fd: OwnedFd, iov: IoVecs, offset: number): number {
  return rw("pwritev", fd, iov, offset);
}

/** fdatasync(2). */
export function fdatasync(fd: OwnedFd): void {
  check("fdatasync", libc.fdatasync(fd.unsafeFd), fd.label);
}

/** Deallocates [offset, offset+len) keeping the size (reads then return zeros). */
export function punchHole(fd: OwnedFd, offset: number, len: number): void {
  check(
    "fallocate(PUNCH_HOLE)",
    libc.fallocate(fd.unsafeFd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BigInt(offset), BigInt(len)),
    fd.label,
  );
}

/** Zeroes [offset, offset+len) (FALLOC_FL_ZERO_RANGE, keeping the size). */
export function zeroRange(fd: OwnedFd, offset: number, len: number): void {
  check(
    "fallocate(ZERO_RANGE)",
    libc.fallocate(fd.unsafeFd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, BigInt(offset), BigInt(len)),
    fd.label,
  );
}

/** Size in bytes of a regular file or a block device. */
export function deviceSize(fd: OwnedFd): { size: number; blockDevice: boolean } {
  const st = fstat(fd);
  if ((st.mode & S_IFMT) !== S_IFBLK) return { size: st.size, blockDevice: false };
  const out = new BigUint64Array(1);
  check("ioctl(BLKGETSIZE64)", libc.ioctl(fd.unsafeFd, BLKGETSIZE64, new Uint8Array(out.buffer)), fd.label);
  return { size: Number(out[0]), blockDevice: true };
}

const SEEK_DATA = 3;
const SEEK_HOLE = 4;

/**
 * The data extents of `fd` below `size` as [start, end) byte pairs, from lseek(SEEK_DATA /
 * SEEK_HOLE); null when there are more than `limit` of them. A file system without hole support
 * reports one extent covering the whole file.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, memfdCreate } from "./memory.ts";
 *
 * using file = memfdCreate("sparse"); // tmpfs: holes are reported
 * file.write(new Uint8Array(4096).fill(1)); // one page of data at 0...
 * ftruncate(file, 1 << 20); // ...then a hole up to 1 MiB
 * assert.deepEqual(dataExtents(file, 1 << 20, 16), [[0, 4096]]);
 * ```
 */
export function dataExtents(fd: OwnedFd, size: number, limit: number): Array<[number, number]> | null {
  const out: Array<[number, number]> = [];
  let pos = 0;
  while (pos < size) {
    const data = seek(fd, pos, SEEK_DATA, "lseek(SEEK_DATA)");
    if (data < 0 || data >= size) break;
    const hole = seek(fd, data, SEEK_HOLE, "lseek(SEEK_HOLE)");
    const end = hole < 0 ? size : Math.min(hole, size);
    if (out.length === limit) return null;
    out.push([data, end]);
    pos = end;
  }
  return out;
}

/** lseek(2); -1 for ENXIO (no data / hole at or after `offset`). */
function seek(fd: OwnedFd, offset: number, whence: number, what: string): number {
  const r = libc.lseek(fd.unsafeFd, BigInt(offset), whence);
  if (r >= 0n) return Number(r);
  const e = lastErrno();
  if (e === Errno.ENXIO) return -1;
  throw new ErrnoError(what, e, `${fd.label} at ${offset}`);
}

/** statfs f_type of tmpfs (and /dev/shm, memfd). */
export const TMPFS_MAGIC = 0x01021994;

/**
 * The f_type of the file system holding `fd` (fstatfs(2)): TMPFS_MAGIC, EXT4_SUPER_MAGIC...
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { memfdCreate } from "./memory.ts";
 *
 * using file = memfdCreate("disk");
 * assert.equal(fileSystemType(file), TMPFS_MAGIC); // memfds live on tmpfs
 * ```
 */
export function fileSystemType(fd: OwnedFd): number {
  // struct statfs is 120 bytes on x86_64; f_type (__fsword_t, a long) comes first.
  const buf = new BigInt64Array(15);
  check("fstatfs", libc.fstatfs(fd.unsafeFd, new Uint8Array(buf.buffer)), fd.label);
  return Number(buf[0]);
}

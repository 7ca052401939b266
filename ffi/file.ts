/**
 * File I/O for block back-ends: preadv/pwritev straight into mapped memory, fdatasync, fallocate
 * (punch hole, zero range) and the size of a file or block device.
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

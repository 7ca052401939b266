/**
 * Memory-to-memory copies inside this process with process_vm_readv/process_vm_writev on our own
 * pid: one system call moves up to IOV_MAX iovecs on each side, and a fault on the "remote" side
 * (a file mapping whose file was truncated, a tmpfs page that cannot be allocated) comes back as
 * EFAULT or a short count instead of SIGBUS. The block device uses it to copy a whole kick between
 * guest memory and a mapping of the backing file.
 * @module
 */
import { addressOf, libc } from "./_libc.ts";
import { check, ErrnoError, lastErrno } from "./errno.ts";
import { OpenFlags, type OwnedFd } from "./fd.ts";
import type { IoVecs } from "./iovec.ts";

const F_GETFL = 3;

let selfPid = 0;
function pid(): number {
  if (selfPid === 0) selfPid = libc.getpid();
  return selfPid;
}

function call(
  name: "process_vm_readv" | "process_vm_writev",
  local: IoVecs,
  remote: IoVecs,
  lFrom = 0,
  lCount = local.count,
  rFrom = 0,
  rCount = remote.count,
): number {
  if (lFrom < 0 || lFrom + lCount > local.count || rFrom < 0 || rFrom + rCount > remote.count) {
    throw new RangeError(
      `${name}: iovecs [${lFrom}, +${lCount}) of ${local.count} / [${rFrom}, +${rCount}) of ${remote.count}`,
    );
  }
  const fn = name === "process_vm_readv" ? libc.process_vm_readv : libc.process_vm_writev;
  const lb = lFrom === 0 ? local.unsafeBuffer : local.unsafeBuffer.subarray(16 * lFrom);
  const rb = rFrom === 0 ? remote.unsafeBuffer : remote.unsafeBuffer.subarray(16 * rFrom);
  const n = fn(pid(), lb, BigInt(lCount), rb, BigInt(rCount), 0n);
  if (n === -1n) {
    throw new ErrnoError(name, lastErrno(), `${lCount} local / ${rCount} remote iovecs`);
  }
  return Number(n);
}

/**
 * Copies the bytes `remote` describes into the buffers `local` describes (process_vm_readv on our
 * own pid). Both must describe memory of this process. Returns the bytes copied, short when a page
 * of `remote` (or `local`) faulted after some bytes were copied; throws ErrnoError (EFAULT when
 * the very first page faulted).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVecs } from "./iovec.ts";
 * import { ftruncate, mapShared, memfdCreate } from "./memory.ts";
 *
 * using fd = memfdCreate("memory");
 * ftruncate(fd, 8192);
 * using mem = mapShared(fd, 8192); // guest buffers in the first page, the "file" in the second
 * mem.bytes.fill(1, 4096);
 * const guestBuffers = new IoVecs(1), fileRanges = new IoVecs(1);
 * guestBuffers.push(mem, 0, 512);
 * fileRanges.push(mem, 4096, 512);
 * assert.equal(vmReadSelf(guestBuffers, fileRanges), 512);
 * assert.equal(mem.bytes[511], 1);
 * ```
 */
export function vmReadSelf(local: IoVecs, remote: IoVecs): number {
  return call("process_vm_readv", local, remote);
}

/**
 * Copies the bytes `local` describes into the memory `remote` describes (process_vm_writev on our
 * own pid). Returns the bytes copied (short on a fault); throws ErrnoError.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVecs } from "./iovec.ts";
 * import { ftruncate, mapShared, memfdCreate } from "./memory.ts";
 *
 * using fd = memfdCreate("memory");
 * ftruncate(fd, 8192);
 * using mem = mapShared(fd, 8192); // guest buffers in the first page, the "file" in the second
 * mem.bytes.fill(1, 0, 4096);
 * const guestBuffers = new IoVecs(1), fileRanges = new IoVecs(1);
 * guestBuffers.push(mem, 0, 512);
 * fileRanges.push(mem, 4096, 512);
 * assert.equal(vmWriteSelf(guestBuffers, fileRanges), 512);
 * assert.equal(mem.bytes[4096 + 511], 1);
 * ```
 */
export function vmWriteSelf(local: IoVecs, remote: IoVecs): number {
  return call("process_vm_writev", local, remote);
}

/** What probeVmCopy() found. */
export type VmCopyProbe = { ok: true } | { ok: false; reason: string; errno?: number };

let probed: VmCopyProbe | undefined;

/**
 * Whether process_vm_readv on our own pid works here (seccomp can refuse it with EPERM, old
 * kernels with ENOSYS): copies 8 bytes between two buffers and checks them. Cached.
 * @example
 * ```ts
 * const probe = probeVmCopy();
 * if (!probe.ok) console.log(`falling back to preadv: ${probe.reason}`);
 * ```
 */
export function probeVmCopy(): VmCopyProbe {
  if (probed) return probed;
  const src = new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]);
  const dst = new Uint8Array(8);
  const local = new BigUint64Array([addressOf(dst), 8n]);
  const remote = new BigUint64Array([addressOf(src), 8n]);
  const n = libc.process_vm_readv(pid(), local, 1n, remote, 1n, 0n);
  if (n === -1n) {
    const e = new ErrnoError("process_vm_readv", lastErrno(), "of our own pid");
    probed = { ok: false, reason: e.message, errno: e.errno };
  } else if (n !== 8n || dst.some((b, i) => b !== src[i])) {
    probed = { ok: false, reason: `process_vm_readv of our own pid copied ${n} bytes wrongly: expected 8` };
  } else {
    probed = { ok: true };
  }
  return probed;
}

/**
 * Whether `fd` was opened with O_DIRECT (fcntl F_GETFL): such a file must not be read through a
 * mapping (the page cache), which would mix cached and direct I/O.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { memfdCreate } from "./memory.ts";
 *
 * using file = memfdCreate("disk");
 * assert.equal(isDirectIo(file), false); // no O_DIRECT: it may be read through a mapping
 * ```
 */
export function isDirectIo(fd: OwnedFd): boolean {
  return (check("fcntl(F_GETFL)", libc.fcntl(fd.unsafeFd, F_GETFL, 0), fd.label) & OpenFlags.O_DIRECT) !== 0;
}

/**
 * vmReadSelf / vmWriteSelf over part of the iovecs: local [lFrom, lFrom+lCount) and remote
 * [rFrom, rFrom+rCount) (checked against their counts; RangeError otherwise).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVecs } from "./iovec.ts";
 * import { ftruncate, mapShared, memfdCreate } from "./memory.ts";
 *
 * using fd = memfdCreate("memory");
 * ftruncate(fd, 8192);
 * using mem = mapShared(fd, 8192); // guest buffers in the first page, the "file" in the second
 * mem.bytes.fill(1, 4096);
 * const guestBuffers = new IoVecs(8), fileRanges = new IoVecs(8);
 * for (let i = 0; i < 8; i++) {
 *   guestBuffers.push(mem, 512 * i, 512);
 *   fileRanges.push(mem, 4096 + 512 * i, 512);
 * }
 * assert.equal(vmCopySelf("read", guestBuffers, 4, 4, fileRanges, 4, 4), 2048); // the second half
 * assert.deepEqual([mem.bytes[2047], mem.bytes[2048]], [0, 1]);
 * ```
 */
export function vmCopySelf(
  op: "read" | "write",
  local: IoVecs,
  lFrom: number,
  lCount: number,
  remote: IoVecs,
  rFrom: number,
  rCount: number,
): number {
  return call(
    op === "read" ? "process_vm_readv" : "process_vm_writev",
    local,
    remote,
    lFrom,
    lCount,
    rFrom,
    rCount,
  );
}

/**
 * io_uring(7) for block I/O: ring setup (io_uring_setup), the SQ/CQ rings and the SQE array mapped
 * once each with cached typed-array views, SQE preparation for READV/WRITEV/FSYNC/NOP, one
 * io_uring_enter per batch, completion reaping without a system call, and an eventfd registered so
 * completions wake the epoll Reactor.
 *
 * Head/tail indices shared with the kernel are read and written with Atomics on Uint32Array views
 * (load of the producer's index, store of ours), which keeps the compiler from reordering them
 * around the SQE/CQE accesses; x86_64 TSO does the rest. JS is single-threaded, so there is one
 * submitter and one reaper.
 * @module
 */
import { addressOf, libc } from "./_libc.ts";
import { Errno, ErrnoError, lastErrno } from "./errno.ts";
import type { EventFd } from "./eventfd.ts";
import { OwnedFd } from "./fd.ts";
import type { IoVecs } from "./iovec.ts";
import { MappedRegion } from "./memory.ts";

const SYS_io_uring_setup = 425;
const SYS_io_uring_enter = 426;
const SYS_io_uring_register = 427;
const SYS_ENTER = BigInt(SYS_io_uring_enter);

/** struct io_uring_params and its io_sqring_offsets / io_cqring_offsets (linux/io_uring.h). */
export const IO_URING_PARAMS = {
  size: 120,
  sqEntries: 0,
  cqEntries: 4,
  flags: 8,
  features: 20,
  sqOff: 40,
  cqOff: 80,
} as const;
/** struct io_sqring_offsets (40 bytes), offsets inside it. */
export const SQRING_OFFSETS = {
  head: 0,
  tail: 4,
  ringMask: 8,
  ringEntries: 12,
  flags: 16,
  dropped: 20,
  array: 24,
} as const;
/** struct io_cqring_offsets (40 bytes), offsets inside it. */
export const CQRING_OFFSETS = {
  head: 0,
  tail: 4,
  ringMask: 8,
  ringEntries: 12,
  overflow: 16,
  cqes: 20,
  flags: 24,
} as const;
/** struct io_uring_sqe (64 bytes). */
export const SQE = {
  size: 64,
  opcode: 0,
  flags: 1,
  ioprio: 2,
  fd: 4,
  off: 8,
  addr: 16,
  len: 24,
  rwFlags: 28,
  userData: 32,
  bufIndex: 40,
} as const;
/** struct io_uring_cqe (16 bytes). */
export const CQE = { size: 16, userData: 0, res: 8, flags: 12 } as const;

/** The opcodes this module prepares. */
export const IoUringOp = { NOP: 0, READV: 1, WRITEV: 2, FSYNC: 3, POLL_ADD: 6, WRITE: 23 } as const;
/** IOSQE_IO_LINK: the next SQE starts only after this one completed successfully. */
const IOSQE_IO_LINK = 1 << 2;

const IORING_OFF_SQ_RING = 0n;
const IORING_OFF_CQ_RING = 0x8000000n;
const IORING_OFF_SQES = 0x10000000n;
const IORING_SETUP_CQSIZE = 1 << 3;
const IORING_SETUP_CLAMP = 1 << 4;
/** IORING_FEAT_SINGLE_MMAP: SQ and CQ rings share one mapping. */
export const IORING_FEAT_SINGLE_MMAP = 1 << 0;
/** IORING_FEAT_NODROP: the kernel keeps overflowed CQEs instead of dropping them. */
export const IORING_FEAT_NODROP = 1 << 1;
const IORING_ENTER_GETEVENTS = 1 << 0;
const IORING_REGISTER_EVENTFD = 4;
const IORING_UNREGISTER_EVENTFD = 5;
const IORING_FSYNC_DATASYNC = 1 << 0;
const IORING_CQ_EVENTFD_DISABLED = 1 << 0;
const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 1;
const MAP_POPULATE = 0x8000;
const MAP_FAILED = 0xffffffffffffffffn;
const TWO_32 = 0x1_0000_0000;
/** Largest ring the kernel accepts (IORING_MAX_ENTRIES). */
export const IORING_MAX_ENTRIES = 32768;

/**
 * iovec array addresses, cached: Deno.UnsafePointer.of costs about as much as the rest of an SQE
 * (measured), and an IoVecs buffer never moves (it is an ArrayBuffer's off-heap backing store).
 */
const iovAddresses = new WeakMap<IoVecs, bigint>();

function iovAddress(iov: IoVecs): bigint {
  let a = iovAddresses.get(iov);
  if (a === undefined) {
    a = iov.unsafeAddress;
    iovAddresses.set(iov, a);
  }
  return a;
}

function sysFail(name: string, detail?: string): never {
  throw new ErrnoError(name, lastErrno(), detail);
}

function mapRing(fd: OwnedFd, size: number, offset: bigint, what: string): MappedRegion {
  const p = libc.mmap(
    null,
    BigInt(size),
    PROT_READ | PROT_WRITE,
    MAP_SHARED | MAP_POPULATE,
    fd.unsafeFd,
    offset,
  );
  if (p === null || BigInt(Deno.UnsafePointer.value(p)) === MAP_FAILED) {
    throw new ErrnoError("mmap", lastErrno(), `io_uring ${what} (${size} bytes)`);
  }
  return new MappedRegion(p, size);
}

/** Options for IoUring.create(). */
export interface IoUringOptions {
  /** CQ ring size (default: twice the SQ size, the kernel's default). */
  cqEntries?: number;
}

/** A completion: the user_data the SQE carried and the result (>= 0, or a negative errno). */
export type CompletionHandler = (userData: number, res: number) => void;

/**
 * One io_uring instance. Prepare SQEs with prep*(), start them with submit() (one io_uring_enter),
 * collect completions with reap() (no system call). user_data is a non-negative safe integer.
 * Callers keep the buffers an SQE points at (IoVecs and the memory they describe) alive and
 * unchanged until its completion has been reaped.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVecs } from "./iovec.ts";
 * import { ftruncate, mapShared, memfdCreate } from "./memory.ts";
 *
 * using file = memfdCreate("disk");
 * file.write(new TextEncoder().encode("hello"));
 * using mem = memfdCreate("buffers");
 * ftruncate(mem, 4096);
 * using region = mapShared(mem, 4096);
 * const iov = new IoVecs(1);
 * iov.push(region, 0, 512);
 * using ring = IoUring.create(64);
 * ring.prepReadv(file, iov, 0, 1); // file offset 0, user_data 1
 * ring.submit();
 * ring.wait(1); // blocks: for tools and tests; a server registers an EventFd with the Reactor
 * const done: Array<[number, number]> = [];
 * ring.reap((id, res) => done.push([id, res]));
 * assert.deepEqual(done, [[1, 5]]); // 5 bytes read
 * ```
 */
export class IoUring {
  /** SQ ring size. */
  readonly sqEntries: number;
  /** CQ ring size. */
  readonly cqEntries: number;
  /** IORING_FEAT_* bits the kernel reported. */
  readonly features: number;
  readonly #fd: OwnedFd;
  readonly #sqRing: MappedRegion;
  readonly #cqRing: MappedRegion | null;
  readonly #sqes: MappedRegion;
  // Cached views: u32 indices into the ring mappings, and the SQE / CQE arrays.
  readonly #sq32: Uint32Array;
  readonly #cq32: Uint32Array;
  readonly #cqI32: Int32Array;
  readonly #sqe8: Uint8Array;
  readonly #sqe32: Uint32Array;
  readonly #sqe64: BigUint64Array;
  readonly #sqHead: number;
  readonly #sqTail: number;
  readonly #sqMask: number;
  readonly #sqArray: number;
  readonly #cqHead: number;
  readonly #cqTail: number;
  readonly #cqMask: number;
  readonly #cqes: number;
  readonly #cqFlags: number;
  readonly #cqOverflow: number;
  /** Our SQ tail: SQEs up to here are prepared; the shared tail is published by submit(). */
  #tail = 0;
  /** Prepared SQEs not yet handed to io_uring_enter. */
  #unsubmitted = 0;
  #eventFdRegistered = false;
  readonly #argBuf = new Int32Array(1);
  readonly #fdBig: bigint;

  private constructor(fd: OwnedFd, params: DataView) {
    this.#fd = fd;
    this.#fdBig = BigInt(fd.unsafeFd);
    const p = IO_URING_PARAMS;
    this.sqEntries = params.getUint32(p.sqEntries, true);
    this.cqEntries = params.getUint32(p.cqEntries, true);
    this.features = params.getUint32(p.features, true);
    const sq = (k: keyof typeof SQRING_OFFSETS) => params.getUint32(p.sqOff + SQRING_OFFSETS[k], true);
    const cq = (k: keyof typeof CQRING_OFFSETS) => params.getUint32(p.cqOff + CQRING_OFFSETS[k], true);
    const sqSize = sq("array") + this.sqEntries * 4;
    const cqSize = cq("cqes") + this.cqEntries * CQE.size;
    const single = (this.features & IORING_FEAT_SINGLE_MMAP) !== 0;
    const regions: MappedRegion[] = [];
    try {
      this.#sqRing = mapRing(fd, single ? Math.max(sqSize, cqSize) : sqSize, IORING_OFF_SQ_RING, "SQ ring");
      regions.push(this.#sqRing);
      this.#cqRing = single ? null : mapRing(fd, cqSize, IORING_OFF_CQ_RING, "CQ ring");
      if (this.#cqRing) regions.push(this.#cqRing);
      this.#sqes = mapRing(fd, this.sqEntries * SQE.size, IORING_OFF_SQES, "SQE array");
    } catch (e) {
      for (const r of regions) r.close();
      throw e;
    }
    const cqRegion = this.#cqRing ?? this.#sqRing;
    this.#sq32 = new Uint32Array(this.#sqRing.bytes.buffer);
    this.#cq32 = new Uint32Array(cqRegion.bytes.buffer);
    this.#cqI32 = new Int32Array(cqRegion.bytes.buffer);
    this.#sqe8 = this.#sqes.bytes;
    this.#sqe32 = new Uint32Array(this.#sqes.bytes.buffer);
    this.#sqe64 = new BigUint64Array(this.#sqes.bytes.buffer);
    // All offsets the kernel reports for these fields are 4-byte aligned; store u32 indices.
    this.#sqHead = sq("head") >>> 2;
    this.#sqTail = sq("tail") >>> 2;
    this.#sqMask = this.#sq32[sq("ringMask") >>> 2];
    this.#sqArray = sq("array") >>> 2;
    this.#cqHead = cq("head") >>> 2;
    this.#cqTail = cq("tail") >>> 2;
    this.#cqMask = this.#cq32[cq("ringMask") >>> 2];
    this.#cqes = cq("cqes") >>> 2;
    this.#cqFlags = cq("flags") >>> 2;
    this.#cqOverflow = cq("overflow") >>> 2;
    this.#tail = Atomics.load(this.#sq32, this.#sqTail);
    // Identity SQ array: slot i of the ring always names SQE i.
    for (let i = 0; i < this.sqEntries; i++) this.#sq32[this.#sqArray + i] = i;
  }

  /**
   * io_uring_setup(2) with `entries` SQEs (rounded up to a power of two by the kernel), then maps
   * the rings. Throws ErrnoError (syscall "io_uring_setup") when the kernel refuses: ENOSYS when
   * io_uring is not built in, EPERM when it is disabled (sysctl kernel.io_uring_disabled, seccomp).
   */
  static create(entries: number, options: IoUringOptions = {}): IoUring {
    if (!Number.isInteger(entries) || entries < 1 || entries > IORING_MAX_ENTRIES) {
      throw new RangeError(`io_uring entries must be 1..${IORING_MAX_ENTRIES}: got ${entries}`);
    }
    const params = new Uint8Array(IO_URING_PARAMS.size);
    const view = new DataView(params.buffer);
    let flags = 0;
    if (options.cqEntries !== undefined) {
      if (!Number.isInteger(options.cqEntries) || options.cqEntries < entries) {
        throw new RangeError(
          `io_uring cqEntries must be an integer >= entries (${entries}): got ${options.cqEntries}`,
        );
      }
      flags |= IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
      view.setUint32(IO_URING_PARAMS.cqEntries, options.cqEntries, true);
    }
    view.setUint32(IO_URING_PARAMS.flags, flags, true);
    const r = libc.syscall(BigInt(SYS_io_uring_setup), BigInt(entries), addressOf(params), 0n, 0n, 0n, 0n);
    if (r === -1n) sysFail("io_uring_setup", `(${entries} entries)`);
    const fd = OwnedFd.unsafeAdopt(Number(r), "io_uring");
    try {
      return new IoUring(fd, view);
    } catch (e) {
      fd.close();
      throw e;
    }
  }

  /** SQEs that can be prepared now (free slots in the SQ ring). */
  get sqSpace(): number {
    if (this.#fd.closed) return 0;
    const head = Atomics.load(this.#sq32, this.#sqHead);
    return this.sqEntries - ((this.#tail - head) >>> 0);
  }

  /** Prepared SQEs that submit() has not handed to the kernel yet. */
  get unsubmitted(): number {
    return this.#unsubmitted;
  }

  /** Completions waiting in the CQ ring. */
  get cqReady(): number {
    if (this.#fd.closed) return 0;
    return (Atomics.load(this.#cq32, this.#cqTail) - this.#cq32[this.#cqHead]) >>> 0;
  }

  /** CQEs the kernel could not post because the CQ ring was full (0 unless in-flight exceeded the CQ). */
  get cqOverflow(): number {
    if (this.#fd.closed) return 0;
    return Atomics.load(this.#cq32, this.#cqOverflow);
  }

  /** Next free SQE index (zeroed and with user_data set), or -1 when the SQ ring is full. */
  #next(op: number, fd: number, userData: number): number {
    if (this.#fd.closed) this.#closedError();
    if (this.sqSpace === 0) return -1;
    if (!Number.isSafeInteger(userData) || userData < 0) {
      throw new RangeError(`io_uring user_data must be a non-negative safe integer: got ${userData}`);
    }
    const idx = this.#tail & this.#sqMask;
    const w = idx * (SQE.size >>> 2);
    this.#sqe32.fill(0, w, w + (SQE.size >>> 2));
    this.#sqe8[idx * SQE.size + SQE.opcode] = op;
    this.#sqe32[w + (SQE.fd >>> 2)] = fd;
    this.#sqe32[w + (SQE.userData >>> 2)] = userData >>> 0;
    this.#sqe32[w + (SQE.userData >>> 2) + 1] = Math.floor(userData / TWO_32);
    this.#tail = (this.#tail + 1) >>> 0;
    this.#unsubmitted++;
    return w;
  }

  #prepRw(op: number, name: string, file: OwnedFd, iov: IoVecs, offset: number, userData: number): boolean {
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw new RangeError(`io_uring ${name} offset must be a non-negative safe integer: got ${offset}`);
    }
    if (iov.count === 0) throw new RangeError(`io_uring ${name} needs at least one iovec`);
    const w = this.#next(op, file.unsafeFd, userData);
    if (w < 0) return false;
    this.#sqe32[w + (SQE.off >>> 2)] = offset >>> 0;
    this.#sqe32[w + (SQE.off >>> 2) + 1] = Math.floor(offset / TWO_32);
    this.#sqe64[(w >>> 1) + (SQE.addr >>> 3)] = iovAddress(iov);
    this.#sqe32[w + (SQE.len >>> 2)] = iov.count;
    return true;
  }

  /** Prepares a readv of `iov.count` buffers from `file` at `offset`. False when the SQ ring is full. */
  prepReadv(file: OwnedFd, iov: IoVecs, offset: number, userData: number): boolean {
    return this.#prepRw(IoUringOp.READV, "readv", file, iov, offset, userData);
  }

  /** Prepares a writev of `iov.count` buffers to `file` at `offset`. False when the SQ ring is full. */
  prepWritev(file: OwnedFd, iov: IoVecs, offset: number, userData: number): boolean {
    return this.#prepRw(IoUringOp.WRITEV, "writev", file, iov, offset, userData);
  }

  /** Prepares an fsync (fdatasync with `datasync`). False when the SQ ring is full. */
  prepFsync(file: OwnedFd, userData: number, options: { datasync?: boolean } = {}): boolean {
    const w = this.#next(IoUringOp.FSYNC, file.unsafeFd, userData);
    if (w < 0) return false;
    if (options.datasync) this.#sqe32[w + (SQE.rwFlags >>> 2)] = IORING_FSYNC_DATASYNC;
    return true;
  }

  /**
   * Prepares a one-shot poll of `fd` for `events` (POLLIN = 1). With `link`, the next SQE runs only
   * once the poll has fired. False when the SQ ring is full.
   */
  prepPollAdd(fd: OwnedFd, events: number, userData: number, options: { link?: boolean } = {}): boolean {
    const w = this.#next(IoUringOp.POLL_ADD, fd.unsafeFd, userData);
    if (w < 0) return false;
    this.#sqe32[w + (SQE.rwFlags >>> 2)] = events >>> 0;
    if (options.link) this.#sqe8[(w << 2) + SQE.flags] = IOSQE_IO_LINK;
    return true;
  }

  /**
   * Prepares a write of `buf` to `fd` (at the current position: pipes and sockets). `buf` must stay
   * referenced by the caller until the completion is reaped. False when the SQ ring is full.
   */
  prepWrite(fd: OwnedFd, buf: Uint8Array<ArrayBuffer>, userData: number): boolean {
    const w = this.#next(IoUringOp.WRITE, fd.unsafeFd, userData);
    if (w < 0) return false;
    // off = -1: the file position (required for non-seekable fds on older kernels).
    this.#sqe32[w + (SQE.off >>> 2)] = 0xffffffff;
    this.#sqe32[w + (SQE.off >>> 2) + 1] = 0xffffffff;
    this.#sqe64[(w >>> 1) + (SQE.addr >>> 3)] = addressOf(buf);
    this.#sqe32[w + (SQE.len >>> 2)] = buf.byteLength;
    return true;
  }

  /** Prepares a no-op (completes with res 0). False when the SQ ring is full. */
  prepNop(userData: number): boolean {
    return this.#next(IoUringOp.NOP, -1, userData) >= 0;
  }

  #enter(toSubmit: number, minComplete: number, flags: number): number {
    while (true) {
      const r = libc.syscall(
        SYS_ENTER,
        this.#fdBig,
        BigInt(toSubmit),
        BigInt(minComplete),
        BigInt(flags),
        0n,
        0n,
      );
      if (r !== -1n) return Number(r);
      const e = lastErrno();
      if (e !== Errno.EINTR) {
        throw new ErrnoError("io_uring_enter", e, `(submit ${toSubmit}, wait ${minComplete})`);
      }
    }
  }

  /**
   * Publishes the prepared SQEs and hands them to the kernel with one io_uring_enter that does not
   * wait. Returns how many the kernel consumed. No-op (no system call) when nothing is prepared.
   */
  submit(): number {
    if (this.#unsubmitted === 0) return 0;
    if (this.#fd.closed) this.#closedError();
    Atomics.store(this.#sq32, this.#sqTail, this.#tail);
    const n = this.#unsubmitted;
    const done = this.#enter(n, 0, 0);
    this.#unsubmitted -= done;
    return done;
  }

  /**
   * Submits what is prepared and blocks until at least `minComplete` completions are in the CQ
   * ring. Blocks the thread: for tests, tools and shutdown, not for the serving path.
   */
  wait(minComplete: number): void {
    if (this.#fd.closed) this.#closedError();
    if (this.#unsubmitted > 0) Atomics.store(this.#sq32, this.#sqTail, this.#tail);
    const n = this.#unsubmitted;
    const done = this.#enter(n, minComplete, IORING_ENTER_GETEVENTS);
    this.#unsubmitted -= done;
  }

  /**
   * Calls `handler(userData, res)` for each completion in the CQ ring (at most `max`), advancing
   * the CQ head. No system call. Returns how many were reaped. The head is published before each
   * handler runs, so a handler may prepare and submit new SQEs.
   */
  reap(handler: CompletionHandler, max = Infinity): number {
    if (this.#fd.closed) this.#closedError();
    const cq = this.#cq32;
    let head = cq[this.#cqHead];
    let n = 0;
    while (n < max) {
      const tail = Atomics.load(cq, this.#cqTail);
      if (head === tail) break;
      const w = this.#cqes + (head & this.#cqMask) * (CQE.size >>> 2);
      const userData = cq[w] + cq[w + 1] * TWO_32;
      const res = this.#cqI32[w + 2];
      head = (head + 1) >>> 0;
      Atomics.store(cq, this.#cqHead, head);
      n++;
      handler(userData, res);
      head = cq[this.#cqHead];
    }
    return n;
  }

  /** Makes `ev` readable whenever a completion is posted (IORING_REGISTER_EVENTFD). */
  registerEventFd(ev: EventFd): void {
    this.#argBuf[0] = ev.fd.unsafeFd;
    this.#register(IORING_REGISTER_EVENTFD, addressOf(this.#argBuf), 1, "REGISTER_EVENTFD");
    this.#eventFdRegistered = true;
  }

  /** Removes the registered eventfd. */
  unregisterEventFd(): void {
    if (!this.#eventFdRegistered) return;
    this.#register(IORING_UNREGISTER_EVENTFD, 0n, 0, "UNREGISTER_EVENTFD");
    this.#eventFdRegistered = false;
  }

  /**
   * Turns eventfd notification off or on (IORING_CQ_EVENTFD_DISABLED in the CQ ring flags), e.g.
   * off while submitting and reaping inline so completions seen at once cost no eventfd wake-up.
   */
  set eventFdEnabled(on: boolean) {
    if (this.#fd.closed) this.#closedError();
    const f = this.#cq32[this.#cqFlags];
    const next = on ? f & ~IORING_CQ_EVENTFD_DISABLED : f | IORING_CQ_EVENTFD_DISABLED;
    if (next !== f) Atomics.store(this.#cq32, this.#cqFlags, next >>> 0);
  }

  get eventFdEnabled(): boolean {
    if (this.#fd.closed) return false;
    return (this.#cq32[this.#cqFlags] & IORING_CQ_EVENTFD_DISABLED) === 0;
  }

  #register(opcode: number, arg: bigint, nrArgs: number, what: string): void {
    const r = libc.syscall(
      BigInt(SYS_io_uring_register),
      BigInt(this.#fd.unsafeFd),
      BigInt(opcode),
      arg,
      BigInt(nrArgs),
      0n,
      0n,
    );
    if (r === -1n) sysFail("io_uring_register", what);
  }

  #closedError(): never {
    throw new ErrnoError("io_uring", Errno.EBADF, "used after close()");
  }

  /** Whether close() has run. */
  get closed(): boolean {
    return this.#fd.closed;
  }

  /**
   * Unmaps the rings and closes the ring fd. The kernel cancels or finishes requests still in
   * flight after this returns: callers that need their buffers settled wait() for them first.
   */
  close(): void {
    if (this.#fd.closed) return;
    this.#sqes.close();
    this.#cqRing?.close();
    this.#sqRing.close();
    this.#fd.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

const SYS_preadv2 = 327n;
const RWF_NOWAIT = 8n;
const EOPNOTSUPP = 95;

/**
 * Whether the kernel can try I/O on `file` without blocking (the file has FMODE_NOWAIT: block
 * devices, ext4/xfs/btrfs). io_uring runs such readv/writev inline in io_uring_enter; for other
 * files (tmpfs on Linux 6.x, many FUSE/network file systems) it hands every request to a kernel
 * worker thread, which on page-cache-speed files costs far more than a plain preadv. Probed with a
 * 1-byte preadv2(RWF_NOWAIT) at offset 0 (EOPNOTSUPP means no).
 * @example
 * ```ts
 * import { memfdCreate } from "./memory.ts";
 *
 * using file = memfdCreate("disk");
 * const engine = supportsNowait(file) ? "io_uring" : "preadv"; // tmpfs on Linux 6.x: "preadv"
 * ```
 */
export function supportsNowait(file: OwnedFd): boolean {
  const byte = new Uint8Array(1);
  const iov = new BigUint64Array([addressOf(byte), 1n]);
  const r = libc.syscall(SYS_preadv2, BigInt(file.unsafeFd), addressOf(iov), 1n, 0n, 0n, RWF_NOWAIT);
  return !(r === -1n && lastErrno() === EOPNOTSUPP);
}

/** What probeIoUring() found. */
export type IoUringProbe = { ok: true; features: number } | { ok: false; reason: string; errno?: number };

let probed: IoUringProbe | undefined;

/**
 * Whether io_uring works here: sets up a small ring and runs one NOP through it. The result is
 * cached. `ok: false` (with the reason) means: use a synchronous fallback (EPERM when disabled by
 * sysctl or seccomp, ENOSYS when the kernel lacks it).
 * @example
 * ```ts
 * const probe = probeIoUring();
 * const engine = probe.ok ? "io_uring" : "preadv";
 * if (!probe.ok) console.log(`io_uring: ${probe.reason}; using preadv`);
 * ```
 */
export function probeIoUring(): IoUringProbe {
  if (probed) return probed;
  let ring: IoUring | undefined;
  try {
    ring = IoUring.create(4);
    ring.prepNop(7);
    ring.wait(1);
    let seen = -1;
    ring.reap((id, res) => {
      if (id === 7) seen = res;
    });
    probed = seen === 0
      ? { ok: true, features: ring.features }
      : { ok: false, reason: `io_uring NOP completed with ${seen}, expected 0` };
  } catch (e) {
    probed = e instanceof ErrnoError
      ? { ok: false, reason: e.message, errno: e.errno }
      : { ok: false, reason: String(e) };
  } finally {
    ring?.close();
  }
  return probed;
}

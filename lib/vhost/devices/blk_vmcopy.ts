/**
 * The batched-copy block I/O engine for files without nowait I/O (tmpfs): the backing file is
 * mapped once (MAP_SHARED) and a whole kick's reads (or writes) move with one process_vm_readv
 * (process_vm_writev) on our own pid, guest buffers on the local side and ranges of the file
 * mapping on the remote side, instead of one preadv/pwritev per request. A fault in the mapping
 * (file truncated under us, a tmpfs page that cannot be allocated) comes back as EFAULT or a short
 * count, never SIGBUS: requests copied in full succeed, the one that faulted is redone with
 * preadv/pwritev (which reports the real errno or short count), the rest go in a new call. Writes
 * dirty the page cache like pwrite; flushes are fdatasync on the fd, which writes back pages
 * dirtied through the mapping.
 *
 * Holes: on tmpfs a read fault on a hole allocates the page, where preadv reads zeros without
 * allocating. So a tmpfs file carries an AllocMap (seeded from SEEK_DATA/SEEK_HOLE, updated by
 * writes, discards and write-zeroes): reads that touch a page not known to be allocated go through
 * preadv, and reading a sparse or discarded disk allocates nothing. "auto" picks this engine for
 * tmpfs files (where io_uring would punt every request to a kernel worker).
 * @module
 */
import {
  CopyHelper,
  dataExtents,
  deviceSize,
  Errno,
  ErrnoError,
  fileSystemType,
  IOV_MAX,
  IoVecs,
  isDirectIo,
  type MappedRegion,
  mapShared,
  type OwnedFd,
  probeVmCopy,
  TMPFS_MAGIC,
  vmCopySelf,
  vmReadSelf,
  vmWriteSelf,
} from "../../../ffi/mod.ts";
import { ALLOC_MAP_MAX_BYTES, AllocMap } from "./alloc_map.ts";
import type { BlkIoEngine, BlkIoRequest } from "./blk_engine.ts";
import { PreadvEngine } from "./blk_preadv.ts";
import { SplitGate } from "./split_gate.ts";

/** The file size must be a multiple of this for the mapping to cover it exactly. */
const PAGE = 4096;

/** Whether the vmcopy engine can serve `file`, and why not. */
export type VmCopyUsable = { ok: true; size: number } | { ok: false; reason: string };

/**
 * Whether the vmcopy engine can serve `file`: process_vm_readv of our own pid works (seccomp may
 * refuse it), the file is a regular file not opened with O_DIRECT, and its size is a non-zero
 * multiple of the page size.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, memfdCreate } from "../../../ffi/mod.ts";
 *
 * using file = memfdCreate("disk");
 * ftruncate(file, 1000);
 * assert.deepEqual(vmCopyUsable(file), {
 *   ok: false,
 *   reason: "memfd disk is 1000 bytes: expected a non-zero multiple of 4096",
 * });
 * ftruncate(file, 1 << 20);
 * assert.deepEqual(vmCopyUsable(file), { ok: true, size: 1 << 20 });
 * ```
 */
export function vmCopyUsable(file: OwnedFd): VmCopyUsable {
  const probe = probeVmCopy();
  if (!probe.ok) return { ok: false, reason: probe.reason };
  if (isDirectIo(file)) return { ok: false, reason: `${file.label} is open with O_DIRECT (--direct)` };
  const { size, blockDevice } = deviceSize(file);
  if (blockDevice) return { ok: false, reason: `${file.label} is a block device, not a regular file` };
  if (size <= 0 || size % PAGE !== 0) {
    return { ok: false, reason: `${file.label} is ${size} bytes: expected a non-zero multiple of ${PAGE}` };
  }
  if (fileSystemType(file) === TMPFS_MAGIC && size > ALLOC_MAP_MAX_BYTES) {
    return { ok: false, reason: `${file.label} is a tmpfs file larger than ${ALLOC_MAP_MAX_BYTES} bytes` };
  }
  return { ok: true, size };
}

/** Runs of at least this many requests are shared with the helper thread. */
const SPLIT_MIN = 8;

/** More data extents than this at start: the map starts all-unknown (writes then fill it in). */
const MAX_SEED_EXTENTS = 1 << 16;

/**
 * The mapping of a backing file and, on tmpfs, its allocation map: one per device, shared by the
 * vmcopy engines of all its queues (so a discard on one queue is seen by reads on another).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, memfdCreate } from "../../../ffi/mod.ts";
 *
 * using file = memfdCreate("disk"); // tmpfs: the mapping gets an allocation map
 * ftruncate(file, 1 << 20);
 * file.write(new Uint8Array(4096).fill(1)); // one page of data at offset 0, the rest holes
 * const vm = VmCopyFile.open(file);
 * assert.equal(vm.alloc?.allocated(0, 4096), true); // reads there copy through the mapping
 * vm.deallocated(0, 1 << 20); // after a discard
 * assert.equal(vm.alloc?.allocated(0, 4096), false); // reads there go through preadv
 * vm.close(); // the file stays with its owner
 * ```
 */
export class VmCopyFile {
  readonly file: OwnedFd;
  readonly map: MappedRegion;
  /** null: reads through the mapping never allocate (not tmpfs). */
  readonly alloc: AllocMap | null;

  private constructor(file: OwnedFd, map: MappedRegion, alloc: AllocMap | null) {
    this.file = file;
    this.map = map;
    this.alloc = alloc;
  }

  /**
   * Maps `file` (read-only when it was opened so) and seeds the allocation map of a tmpfs file
   * (or, with `sharedAlloc`, uses another instance's map of the same file: see AllocMap);
   * throws Error naming why when vmCopyUsable() says no or the mapping fails.
   */
  static open(file: OwnedFd, sharedAlloc?: SharedArrayBuffer): VmCopyFile {
    const usable = vmCopyUsable(file);
    if (!usable.ok) throw new Error(`vmcopy engine cannot serve ${file.label}: ${usable.reason}`);
    let alloc: AllocMap | null = null;
    if (fileSystemType(file) === TMPFS_MAGIC) {
      alloc = sharedAlloc
        ? new AllocMap(usable.size, sharedAlloc)
        : AllocMap.fromExtents(usable.size, dataExtents(file, usable.size, MAX_SEED_EXTENTS) ?? []);
    }
    let map: MappedRegion;
    try {
      map = mapShared(file, usable.size);
    } catch (e) {
      if (!(e instanceof ErrnoError) || e.errno !== Errno.EACCES) throw e;
      map = mapShared(file, usable.size, { readOnly: true });
    }
    return new VmCopyFile(file, map, alloc);
  }

  #helper: CopyHelper | null = null;
  /** Whether a helper thread may share big batches (set before the first one). */
  helperEnabled = true;

  /**
   * The helper thread for big batches, started on first use (null when disabled). One helper is
   * shared by every device of the process: their queues run on one thread, which posts a job and
   * collects it within one submit, so two jobs never overlap (a Worker per device cost ~8 MiB each).
   */
  helper(): CopyHelper | null {
    if (!this.helperEnabled) return null;
    return this.#helper ??= acquireHelper();
  }

  /** Whether helper() has started the helper thread. */
  get helperStarted(): boolean {
    return this.#helper !== null;
  }

  /** [offset, offset+len) was discarded or zeroed: reads there go through preadv again. */
  deallocated(offset: number, len: number): void {
    this.alloc?.markUnknown(offset, Math.max(0, Math.min(len, this.map.size - offset)));
  }

  close(): void {
    if (this.#helper) releaseHelper();
    this.#helper = null;
    this.map.close();
  }
}

/** The process's copy helper and how many mappings use it. */
let sharedHelper: CopyHelper | null = null;
let helperUsers = 0;

function acquireHelper(): CopyHelper {
  helperUsers++;
  return sharedHelper ??= CopyHelper.start();
}

function releaseHelper(): void {
  if (--helperUsers > 0) return;
  helperUsers = 0;
  sharedHelper?.close();
  sharedHelper = null;
}

/**
 * Copies each run of queued reads (or writes) with one process_vm_readv (process_vm_writev) of up
 * to IOV_MAX iovecs a side; flushes and requests that faulted go through a PreadvEngine.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, IoVecs, mapShared, memfdCreate } from "../../../ffi/mod.ts";
 *
 * using file = memfdCreate("disk");
 * ftruncate(file, 1 << 20);
 * using guest = memfdCreate("guest");
 * ftruncate(guest, 4096);
 * using ram = mapShared(guest, 4096);
 * ram.bytes.fill(7, 0, 512);
 * const from = new IoVecs(1);
 * from.push(ram, 0, 512);
 * const into = new IoVecs(1);
 * into.push(ram, 512, 512);
 * const engine = VmCopyEngine.open(file); // maps the file for this engine alone
 * const results: number[] = [];
 * engine.queue({ op: "write", offset: 4096, iov: from, done: (n) => results.push(n) });
 * engine.queue({ op: "read", offset: 4096, iov: into, done: (n) => results.push(n) });
 * engine.submit(); // one process_vm_writev, then one process_vm_readv
 * assert.deepEqual(results, [512, 512]);
 * assert.equal(engine.copyCalls, 2);
 * assert.deepEqual(ram.bytes.subarray(512, 1024), new Uint8Array(512).fill(7)); // read back
 * engine.close(); // unmaps the file; the file stays with its owner
 * ```
 */
export class VmCopyEngine implements BlkIoEngine {
  readonly name = "vmcopy";
  readonly #vm: VmCopyFile;
  readonly #ownsVm: boolean;
  readonly #map: MappedRegion;
  readonly #alloc: AllocMap | null;
  readonly #sync: PreadvEngine;
  readonly #local = new IoVecs(IOV_MAX);
  readonly #remote = new IoVecs(IOV_MAX);
  #queued: BlkIoRequest[] = [];
  #spare: BlkIoRequest[] = [];
  /** The first error a done() callback threw during submit(), rethrown once all have completed. */
  #thrown: { error: unknown } | null = null;
  /** process_vm_readv/writev calls made, and requests that went through preadv/pwritev instead. */
  copyCalls = 0;
  syncRequests = 0;
  /** Copies the helper thread did. */
  helperCalls = 0;
  /** Whether batches are being shared with the helper (the gate's probe or decision). */
  get sharing(): boolean {
    return this.#vm.helperEnabled && this.#gate.allowing;
  }

  /** Whether sharing with the helper pays now (measured: see SplitGate), and for this submit. */
  readonly #gate = new SplitGate();
  #share = false;

  /** An engine on a device's shared VmCopyFile (closed by its owner, not by close()). */
  constructor(vm: VmCopyFile, owns = false) {
    this.#vm = vm;
    this.#ownsVm = owns;
    this.#map = vm.map;
    this.#alloc = vm.alloc;
    this.#sync = new PreadvEngine(vm.file);
  }

  /** Maps `file` for this engine alone; throws Error naming why when it cannot (see VmCopyFile). */
  static open(file: OwnedFd): VmCopyEngine {
    return new VmCopyEngine(VmCopyFile.open(file), true);
  }

  get pending(): number {
    return this.#queued.length;
  }

  queue(req: BlkIoRequest): void {
    this.#queued.push(req);
  }

  submit(): void {
    const batch = this.#queued;
    this.#queued = this.#spare;
    // (Not before the helper runs: a probe window without it would measure nothing.)
    // The helper starts with the first batch big enough to share (an idle device, or one that only
    // ever sees small batches, costs no thread).
    const vm = this.#vm;
    this.#share = vm.helperEnabled && batch.length > 0 && (vm.helperStarted || batch.length >= SPLIT_MIN) &&
      vm.helper()!.ready && this.#gate.batch(performance.now(), batch.length);
    let i = 0;
    while (i < batch.length) {
      const req = batch[i];
      if (req.op === "flush") {
        this.#viaSync(req);
        i++;
        continue;
      }
      i = this.#copyRun(batch, i);
    }
    batch.length = 0;
    this.#spare = batch;
    const thrown = this.#thrown;
    this.#thrown = null;
    if (thrown) throw thrown.error;
  }

  /** Runs req.done(result); a throw is kept for submit() so the other requests still complete. */
  #complete(req: BlkIoRequest, result: number): void {
    try {
      req.done(result);
    } catch (error) {
      this.#thrown ??= { error };
    }
  }

  /**
   * Copies the run of requests of batch[start]'s op that fits one call; returns the index after
   * the last request it completed.
   */
  #copyRun(batch: BlkIoRequest[], start: number): number {
    const op = batch[start].op;
    const local = this.#local;
    const remote = this.#remote;
    local.clear();
    remote.clear();
    let end = start;
    while (end < batch.length && remote.count < IOV_MAX) {
      const r = batch[end];
      const len = r.iov.totalBytes;
      if (r.op !== op || local.count + r.iov.count > IOV_MAX) break;
      if (!Number.isSafeInteger(r.offset) || r.offset < 0 || r.offset + len > this.#map.size) break;
      // A read touching a page that may be a hole: preadv (reads zeros without allocating it).
      if (op === "read" && this.#alloc && !this.#alloc.allocated(r.offset, len)) break;
      if (len > 0) {
        local.append(r.iov);
        remote.push(this.#map, r.offset, len);
      }
      end++;
    }
    if (end === start) {
      // Out of the mapping, or more segments than one call takes: preadv/pwritev decides.
      this.#viaSync(batch[start]);
      return start + 1;
    }
    if (this.#share && end - start >= SPLIT_MIN && op !== "flush" && this.#split(batch, start, end, op)) {
      return end;
    }
    let copied = 0;
    if (remote.count > 0) {
      try {
        this.copyCalls++;
        copied = op === "read" ? vmReadSelf(local, remote) : vmWriteSelf(local, remote);
      } catch (e) {
        if (!(e instanceof ErrnoError) || e.errno !== Errno.EFAULT) {
          // Not a fault in one request (EPERM, ENOMEM...): redo the whole run the slow way.
          for (let k = start; k < end; k++) this.#viaSync(batch[k]);
          return end;
        }
      }
    }
    // Requests copied in full, in order, succeed; the one the copy stopped in is redone alone.
    const k = this.#completeCopied(batch, start, end, op, copied);
    if (k === end) return end;
    this.#viaSync(batch[k]);
    return k + 1;
  }

  /**
   * A run big enough to share: the helper thread copies the first half of the requests while this
   * thread copies the second. false when the helper is not awake (the caller copies it all).
   */
  #split(batch: BlkIoRequest[], start: number, end: number, op: "read" | "write"): boolean {
    const helper = this.#vm.helper();
    if (!helper) return false;
    // Iovec counts of the first half (requests of length 0 have no remote iovec).
    const mid = start + ((end - start) >> 1);
    let nl = 0;
    let nr = 0;
    for (let k = start; k < mid; k++) {
      nl += batch[k].iov.count;
      if (batch[k].iov.totalBytes > 0) nr++;
    }
    const local = this.#local;
    const remote = this.#remote;
    if (nr === 0 || nr === remote.count) return false;
    if (!helper.post(op, local, 0, nl, remote, 0, nr)) return false;
    this.copyCalls++;
    const mine = this.#copyRange(op, nl, local.count - nl, nr, remote.count - nr);
    let theirs = helper.collect();
    if (theirs === null) theirs = this.#copyRange(op, 0, nl, 0, nr);
    else this.helperCalls++;
    this.#settle(batch, start, mid, op, theirs);
    this.#settle(batch, mid, end, op, mine);
    return true;
  }

  /** vmCopySelf over part of the run's iovecs; bytes copied or -errno. */
  #copyRange(op: "read" | "write", lFrom: number, lCount: number, rFrom: number, rCount: number): number {
    try {
      return vmCopySelf(op, this.#local, lFrom, lCount, this.#remote, rFrom, rCount);
    } catch (e) {
      return e instanceof ErrnoError ? -e.errno : -Errno.EIO;
    }
  }

  /**
   * Completes, in order, the requests of batch[from..to) that a copy of `copied` bytes (negative:
   * none) moved in full; returns the index of the first one it did not.
   */
  #completeCopied(
    batch: BlkIoRequest[],
    from: number,
    to: number,
    op: BlkIoRequest["op"],
    copied: number,
  ): number {
    let left = Math.max(0, copied);
    let k = from;
    for (; k < to; k++) {
      const len = batch[k].iov.totalBytes;
      if (len > left) break;
      left -= len;
      if (op === "write") this.#alloc?.markAllocated(batch[k].offset, len);
      this.#complete(batch[k], len);
    }
    return k;
  }

  /**
   * Completes batch[from..to) after a copy that moved `copied` bytes of them (-errno: none):
   * requests copied in full succeed, the rest go through preadv/pwritev one by one.
   */
  #settle(batch: BlkIoRequest[], from: number, to: number, op: "read" | "write", copied: number): void {
    for (let k = this.#completeCopied(batch, from, to, op, copied); k < to; k++) this.#viaSync(batch[k]);
  }

  /** One request through preadv/pwritev (reports the real errno or short count). */
  #viaSync(req: BlkIoRequest): void {
    this.syncRequests++;
    const n = this.#sync.perform(req);
    const alloc = this.#alloc;
    if (alloc && n > 0 && req.op === "write" && Number.isSafeInteger(req.offset) && req.offset >= 0) {
      if (req.offset < alloc.size) alloc.markAllocated(req.offset, Math.min(n, alloc.size - req.offset));
    }
    this.#complete(req, n);
  }

  close(): void {
    this.#queued = [];
    this.#sync.close();
    if (this.#ownsVm) this.#vm.close();
  }
}

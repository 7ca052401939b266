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
 * Opt-in only (`--engine=vmcopy`): on tmpfs it measured ~10% more IOPS than preadv at QD32, the 4 KiB
 * copies and page walks costing far more than the system calls saved; and a read of a hole in a
 * sparse tmpfs file faults a page into the file through the mapping (preadv reads zeros without
 * allocating), so reading a sparse or discarded disk uses memory.
 * @module
 */
import {
  deviceSize,
  Errno,
  ErrnoError,
  IOV_MAX,
  IoVecs,
  isDirectIo,
  type MappedRegion,
  mapShared,
  type OwnedFd,
  probeVmCopy,
  vmReadSelf,
  vmWriteSelf,
} from "../../../ffi/mod.ts";
import { type BlkIoEngine, type BlkIoRequest, SyncEngine } from "./blk_io.ts";

/** The file size must be a multiple of this for the mapping to cover it exactly. */
const PAGE = 4096;

/** Whether the vmcopy engine can serve `file`, and why not. */
export type VmCopyUsable = { ok: true; size: number } | { ok: false; reason: string };

/**
 * Whether the vmcopy engine can serve `file`: process_vm_readv of our own pid works (seccomp may
 * refuse it), the file is a regular file not opened with O_DIRECT, and its size is a non-zero
 * multiple of the page size.
 * @example
 * const usable = vmCopyUsable(file);
 * if (!usable.ok) console.log(usable.reason);
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
  return { ok: true, size };
}

/**
 * Copies each run of queued reads (or writes) with one process_vm_readv (process_vm_writev) of up
 * to IOV_MAX iovecs a side; flushes and requests that faulted go through a SyncEngine.
 * @example
 * const engine = VmCopyEngine.open(file);
 * engine.queue({ op: "read", offset: 0, iov, done: (n) => complete(n) });
 * engine.submit();
 * engine.close();
 */
export class VmCopyEngine implements BlkIoEngine {
  readonly name = "vmcopy";
  readonly #map: MappedRegion;
  readonly #sync: SyncEngine;
  readonly #local = new IoVecs(IOV_MAX);
  readonly #remote = new IoVecs(IOV_MAX);
  #queued: BlkIoRequest[] = [];
  #spare: BlkIoRequest[] = [];
  /** The first error a done() callback threw during submit(), rethrown once all have completed. */
  #thrown: { error: unknown } | null = null;

  private constructor(file: OwnedFd, map: MappedRegion) {
    this.#map = map;
    this.#sync = new SyncEngine(file);
  }

  /**
   * Maps `file` and builds the engine; throws Error naming why when vmCopyUsable() says no or the
   * mapping fails. A read-only file is mapped read-only (writes then fail through pwritev).
   */
  static open(file: OwnedFd): VmCopyEngine {
    const usable = vmCopyUsable(file);
    if (!usable.ok) throw new Error(`vmcopy engine cannot serve ${file.label}: ${usable.reason}`);
    let map: MappedRegion;
    try {
      map = mapShared(file, usable.size);
    } catch (e) {
      if (!(e instanceof ErrnoError) || e.errno !== Errno.EACCES) throw e;
      map = mapShared(file, usable.size, { readOnly: true });
    }
    return new VmCopyEngine(file, map);
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
    let copied = 0;
    if (remote.count > 0) {
      try {
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
    let k = start;
    for (; k < end; k++) {
      const len = batch[k].iov.totalBytes;
      if (len > copied) break;
      copied -= len;
      this.#complete(batch[k], len);
    }
    if (k === end) return end;
    this.#viaSync(batch[k]);
    return k + 1;
  }

  #viaSync(req: BlkIoRequest): void {
    this.#sync.queue(req);
    try {
      this.#sync.submit();
    } catch (error) {
      this.#thrown ??= { error };
    }
  }

  close(): void {
    this.#queued = [];
    this.#sync.close();
    this.#map.close();
  }
}

/**
 * The block I/O engine interface that `mpq vhost blk` drives: requests are queued as a kick's
 * descriptor chains are parsed, then submitted together, so an engine can move a whole batch with
 * one system call (io_uring) instead of one per request.
 * @module
 */
import {
  fdatasync,
  fileSystemType,
  IoVecs,
  type OwnedFd,
  preadv,
  probeIoUring,
  pwritev,
  type Reactor,
  supportsNowait,
  TMPFS_MAGIC,
} from "../../../ffi/mod.ts";
import { UringEngine } from "./blk_uring.ts";
import { VmCopyEngine, type VmCopyFile, vmCopyUsable } from "./blk_vmcopy.ts";

/** One queued operation. `iov` must stay untouched until `done` runs. */
export interface BlkIoRequest {
  op: "read" | "write" | "flush";
  /** Byte offset in the file (read/write). */
  offset: number;
  /** Guest buffers (read/write); bounds-checked when they were pushed. */
  iov: IoVecs;
  /** Called once with bytes transferred (>= 0) or a negative errno. */
  done(result: number): void;
}

/**
 * An I/O engine. `queue()` never performs I/O; `submit()` starts everything queued. Completions may
 * run inside submit() (synchronous engines) or later from the reactor (io_uring).
 */
export interface BlkIoEngine {
  readonly name: string;
  queue(req: BlkIoRequest): void;
  submit(): void;
  /** Requests queued or in flight. */
  readonly pending: number;
  close(): void;
}

/**
 * The fallback engine: one preadv/pwritev per request, straight into mapped guest memory.
 * @example
 * const engine = new SyncEngine(file);
 * engine.queue({ op: "read", offset: 0, iov, done: (n) => complete(n) });
 * engine.submit();
 */
export class SyncEngine implements BlkIoEngine {
  readonly name = "preadv";
  readonly #file: OwnedFd;
  #queued: BlkIoRequest[] = [];

  constructor(file: OwnedFd) {
    this.#file = file;
  }

  get pending(): number {
    return this.#queued.length;
  }

  queue(req: BlkIoRequest): void {
    this.#queued.push(req);
  }

  submit(): void {
    const batch = this.#queued;
    this.#queued = [];
    for (const req of batch) req.done(this.perform(req));
  }

  /** Performs one request now and returns its result (bytes, or a negative errno); no done(). */
  perform(req: BlkIoRequest): number {
    try {
      if (req.op === "flush") {
        fdatasync(this.#file);
        return 0;
      }
      let done = 0;
      // Short transfers: retry the rest (a read at end of file returns 0 and stops).
      const total = req.iov.totalBytes;
      while (done < total) {
        const n = req.op === "read"
          ? preadv(this.#file, done === 0 ? req.iov : tail(req.iov, done), req.offset + done)
          : pwritev(this.#file, done === 0 ? req.iov : tail(req.iov, done), req.offset + done);
        if (n === 0) break;
        done += n;
      }
      return done;
    } catch (e) {
      return -((e as { errno?: number }).errno ?? 5);
    }
  }

  close(): void {
    this.#queued = [];
  }
}

function tail(iov: IoVecs, skip: number): IoVecs {
  return iov.slice(skip);
}

/**
 * Which engine createEngine() builds: "auto" resolves with chooseEngine(); the others force one.
 */
export type EngineKind = "auto" | "uring" | "vmcopy" | "preadv";

/** Options for createEngine(). */
export interface CreateEngineOptions {
  /** Default "auto". */
  engine?: EngineKind;
  /** io_uring: requests in flight at once (default 128). */
  depth?: number;
  /**
   * vmcopy: the device's shared mapping (one per device, so all queues see one allocation map);
   * without it the engine maps the file for itself.
   */
  vmFile?: () => VmCopyFile;
}

/**
 * What "auto" picks for `file`, and why (for the start-up log line):
 * - io_uring when it works here (probed once with a NOP: ENOSYS, or EPERM from sysctl or seccomp,
 *   mean no) and the file supports nowait I/O (block devices, ext4, xfs...), so io_uring runs each
 *   request inline within the one io_uring_enter of a batch;
 * - vmcopy for a tmpfs file (/dev/shm): there io_uring would hand every request to a kernel worker
 *   thread (measured 3-10x slower than preadv), while one process_vm_readv/writev per kick moves
 *   the batch with one system call, with holes kept unallocated by the allocation map;
 * - preadv/pwritev otherwise (FUSE, NFS, O_DIRECT on tmpfs...).
 * @example
 * const { kind, reason } = chooseEngine(file); // "vmcopy", "tmpfs file: ..."
 */
export function chooseEngine(file: OwnedFd): { kind: "uring" | "vmcopy" | "preadv"; reason: string } {
  const probe = probeIoUring();
  if (probe.ok && supportsNowait(file)) {
    return { kind: "uring", reason: "io_uring works and the file supports nowait I/O" };
  }
  const uring = probe.ok ? "the file has no nowait I/O" : `io_uring does not work here (${probe.reason})`;
  if (fileSystemType(file) === TMPFS_MAGIC) {
    const usable = vmCopyUsable(file);
    if (usable.ok) return { kind: "vmcopy", reason: `tmpfs file, ${uring}` };
    return { kind: "preadv", reason: `${uring}; vmcopy cannot serve it: ${usable.reason}` };
  }
  return { kind: "preadv", reason: uring };
}

/**
 * Builds the block I/O engine for `file`: "auto" as chooseEngine() says; "uring" and "vmcopy"
 * force that engine and throw when it does not work here, naming why; "preadv" always works.
 * @example
 * const engine = createEngine(file, reactor, { engine: "auto" });
 * console.log(engine.name); // "io_uring", "vmcopy" or "preadv"
 */
export function createEngine(
  file: OwnedFd,
  reactor: Reactor,
  options: CreateEngineOptions = {},
): BlkIoEngine {
  let kind = options.engine ?? "auto";
  if (kind !== "auto" && kind !== "uring" && kind !== "vmcopy" && kind !== "preadv") {
    throw new RangeError(
      `block I/O engine must be auto, uring, vmcopy or preadv: got ${JSON.stringify(kind)}`,
    );
  }
  if (kind === "auto") kind = chooseEngine(file).kind;
  if (kind === "preadv") return new SyncEngine(file);
  if (kind === "vmcopy") return options.vmFile ? new VmCopyEngine(options.vmFile()) : VmCopyEngine.open(file);
  const probe = probeIoUring();
  if (!probe.ok) {
    throw new Error(`io_uring engine requested but io_uring does not work here: ${probe.reason}`);
  }
  return new UringEngine(file, reactor, { depth: options.depth });
}

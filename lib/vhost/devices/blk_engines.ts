/**
 * The one place a block I/O engine is chosen and built: resolveEngine() turns "auto" (or a forced
 * engine, checked to work here) into a concrete engine once per device, createEngine() builds it for
 * each queue.
 * @module
 */
import {
  fileSystemType,
  type OwnedFd,
  probeIoUring,
  type Reactor,
  supportsNowait,
  TMPFS_MAGIC,
} from "../../../ffi/mod.ts";
import type { BlkIoEngine, EngineChoice, EngineKind } from "./blk_engine.ts";
import { PreadvEngine } from "./blk_preadv.ts";
import { UringEngine } from "./blk_uring.ts";
import { VmCopyEngine, type VmCopyFile, vmCopyUsable } from "./blk_vmcopy.ts";

/** A resolved engine and why it was chosen (for the start-up line). */
export interface ResolvedEngine {
  kind: EngineKind;
  reason: string;
}

/**
 * Resolves the configured engine for `file`, once per device:
 * - "auto" picks io_uring when it works here (probed once with a NOP: ENOSYS, or EPERM from sysctl
 *   or seccomp, mean no) and the file supports nowait I/O (block devices, ext4, xfs...), so io_uring
 *   runs each request inline within the one io_uring_enter of a batch; vmcopy for a tmpfs file
 *   (/dev/shm), where io_uring would hand every request to a kernel worker thread (measured 3-10x
 *   slower than preadv) while one process_vm_readv/writev per kick moves the batch with one system
 *   call, holes kept unallocated by the allocation map; preadv/pwritev otherwise (FUSE, NFS,
 *   O_DIRECT on tmpfs...);
 * - "uring" and "vmcopy" are checked to work here and throw naming why not; "preadv" always works.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, memfdCreate, supportsNowait } from "../../../ffi/mod.ts";
 *
 * using file = memfdCreate("disk"); // tmpfs, like a file in /dev/shm
 * ftruncate(file, 1 << 20);
 * const { kind, reason } = resolveEngine(file, "auto"); // once per device
 * assert.equal(kind, supportsNowait(file) ? "uring" : "vmcopy");
 * assert.match(reason, /^(io_uring works|tmpfs file)/); // "tmpfs file, the file has no nowait I/O"
 * assert.deepEqual(resolveEngine(file, "preadv"), { kind: "preadv", reason: "forced" });
 * ```
 */
export function resolveEngine(file: OwnedFd, choice: EngineChoice): ResolvedEngine {
  const probe = probeIoUring();
  if (choice === "uring") {
    if (!probe.ok) throw new Error(`engine uring: io_uring does not work here: ${probe.reason}`);
    return { kind: "uring", reason: "forced" };
  }
  if (choice === "vmcopy") {
    const usable = vmCopyUsable(file);
    if (!usable.ok) throw new Error(`engine vmcopy: ${usable.reason}`);
    return { kind: "vmcopy", reason: "forced" };
  }
  if (choice === "preadv") return { kind: "preadv", reason: "forced" };
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

/** Options for createEngine(). */
export interface CreateEngineOptions {
  /** io_uring: requests in flight at once (default 128). */
  depth?: number;
  /**
   * vmcopy: the device's shared mapping (one per device, so all queues see one allocation map);
   * without it the engine maps the file for itself.
   */
  vmFile?: VmCopyFile;
}

/**
 * Builds one queue's engine of a kind resolveEngine() returned.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, memfdCreate, Reactor } from "../../../ffi/mod.ts";
 *
 * using file = memfdCreate("disk");
 * ftruncate(file, 1 << 20);
 * const reactor = new Reactor();
 * const engine = createEngine(file, reactor, resolveEngine(file, "auto").kind, { depth: 128 });
 * assert.ok(["io_uring", "vmcopy", "preadv"].includes(engine.name));
 * engine.close(); // the file stays with the device
 * reactor.close();
 * ```
 */
export function createEngine(
  file: OwnedFd,
  reactor: Reactor,
  kind: EngineKind,
  options: CreateEngineOptions = {},
): BlkIoEngine {
  switch (kind) {
    case "preadv":
      return new PreadvEngine(file);
    case "vmcopy":
      return options.vmFile ? new VmCopyEngine(options.vmFile) : VmCopyEngine.open(file);
    case "uring":
      return new UringEngine(file, reactor, { depth: options.depth });
  }
}

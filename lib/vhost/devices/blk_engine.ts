/**
 * The block I/O engine contract `mpq vhost blk` drives: requests are queued as a kick's descriptor
 * chains are parsed, then submitted together, so an engine can move a whole batch with one system
 * call (io_uring, process_vm_readv/writev) instead of one per request. The engines' names live here.
 * @module
 */
import type { IoVecs } from "../../../ffi/mod.ts";

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

/** The engines there are; "auto" (resolved once, by resolveEngine) picks one of them. */
export const ENGINE_KINDS = ["uring", "vmcopy", "preadv"] as const;
/** A concrete engine. */
export type EngineKind = (typeof ENGINE_KINDS)[number];
/** What a device is configured with. */
export type EngineChoice = "auto" | EngineKind;

/**
 * Checks an engine name (from a flag or a config file).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(parseEngineChoice("uring"), "uring");
 * assert.throws(() => parseEngineChoice("aio"), {
 *   name: "RangeError",
 *   message: 'engine must be auto, uring, vmcopy, preadv: got "aio"',
 * });
 * ```
 */
export function parseEngineChoice(name: string): EngineChoice {
  if (name === "auto" || (ENGINE_KINDS as readonly string[]).includes(name)) return name as EngineChoice;
  throw new RangeError(`engine must be auto, ${ENGINE_KINDS.join(", ")}: got ${JSON.stringify(name)}`);
}

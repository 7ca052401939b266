/**
 * The fallback block I/O engine: one preadv/pwritev per request, straight into mapped guest memory.
 * @module
 */
import { fdatasync, type IoVecs, type OwnedFd, preadv, pwritev } from "../../../ffi/mod.ts";
import type { BlkIoEngine, BlkIoRequest } from "./blk_engine.ts";

/**
 * The fallback engine: one preadv/pwritev per request, straight into mapped guest memory.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, IoVecs, mapShared, memfdCreate } from "../../../ffi/mod.ts";
 *
 * using file = memfdCreate("disk");
 * file.write(new TextEncoder().encode("hello"));
 * using guest = memfdCreate("guest");
 * ftruncate(guest, 4096);
 * using ram = mapShared(guest, 4096);
 * const iov = new IoVecs(1);
 * iov.push(ram, 0, 512); // a guest buffer
 * const engine = new PreadvEngine(file);
 * let result = NaN;
 * engine.queue({ op: "read", offset: 0, iov, done: (n) => result = n });
 * engine.submit(); // completes inside submit()
 * assert.equal(result, 5); // short: the file holds 5 bytes
 * engine.close(); // the file stays with its owner
 * ```
 */
export class PreadvEngine implements BlkIoEngine {
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

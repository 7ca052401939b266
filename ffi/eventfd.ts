/**
 * eventfd(2): a counter fd used for kicks, calls, doorbells and reactor wake-ups.
 * @module
 */
import { libc } from "./_libc.ts";
import { check, checkAgain } from "./errno.ts";
import { OwnedFd } from "./fd.ts";

const EFD_CLOEXEC = 0o2000000;
const EFD_NONBLOCK = 0o4000;

/**
 * An eventfd. `signal()` adds 1; `drain()` reads and resets the counter (0 when it was zero).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * using ev = new EventFd();
 * ev.signal();
 * ev.signal();
 * assert.equal(ev.drain(), 2n);
 * assert.equal(ev.drain(), 0n); // nonblocking: nothing signalled since
 * ```
 */
export class EventFd {
  readonly fd: OwnedFd;
  readonly #buf = new BigUint64Array(1);
  readonly #bytes = new Uint8Array(this.#buf.buffer);

  constructor(options: { nonBlocking?: boolean; label?: string } | OwnedFd = {}) {
    if (options instanceof OwnedFd) {
      this.fd = options;
    } else {
      const flags = EFD_CLOEXEC | ((options.nonBlocking ?? true) ? EFD_NONBLOCK : 0);
      this.fd = OwnedFd.unsafeAdopt(check("eventfd", libc.eventfd(0, flags)), options.label ?? "eventfd");
    }
  }

  /** Adds `n` (default 1) to the counter. Returns false if the counter is full (EAGAIN). */
  signal(n = 1n): boolean {
    this.#buf[0] = n;
    return checkAgain("write(eventfd)", libc.write(this.fd.unsafeFd, this.#bytes, 8n), this.fd.label) !==
      null;
  }

  /** Reads and resets the counter; 0n if it was zero (nonblocking). */
  drain(): bigint {
    const r = checkAgain("read(eventfd)", libc.read(this.fd.unsafeFd, this.#bytes, 8n), this.fd.label);
    return r === null ? 0n : this.#buf[0];
  }

  close(): void {
    this.fd.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

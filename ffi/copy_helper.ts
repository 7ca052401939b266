/**
 * A second thread for process_vm_readv/writev: the caller hands it the first part of a batch of
 * copies, does the rest itself, then collects its result, so one queue's copies use two cores.
 *
 * The helper spins for a short while after each job (waking a sleeping thread costs tens of µs on
 * a VM, more than the copy it would take over), then sleeps. It is only given work while it is
 * awake: a caller that finds it asleep wakes it for the batches to come and copies this one alone.
 * A job it has not picked up yet is taken back by the caller (compare-and-swap on the job state),
 * so a helper that lost its core never makes the caller wait for more than a copy in progress.
 *
 * The helper runs plain JavaScript in a Worker made from source text (no module files, so it
 * works from the bundled single-file mpq); it calls libc itself through its own Deno.dlopen.
 * @module
 */
import { addressOf } from "./_libc.ts";
import type { IoVecs } from "./iovec.ts";

// Shared control words (Int32Array indices).
const STATE = 0; // job state, below
const SLEEPING = 1; // 1 while the helper is (about to be) asleep
const READY = 2; // 1 once the helper has opened libc
const STOP = 3; // 1: exit
const OP = 4; // 0 read, 1 write
const PAUSED = 5; // 1: take no jobs (they are taken back)
// Float64Array indices (after the 16 Int32 words): job arguments and result.
const F_LOCAL = 0;
const F_NLOCAL = 1;
const F_REMOTE = 2;
const F_NREMOTE = 3;
const F_RESULT = 4; // bytes copied, or -errno

const IDLE = 0;
const POSTED = 1;
const TAKEN = 2;
const DONE = 3;

/** How long the helper spins for the next job before it sleeps (ms). */
const SPIN_MS = 0.2;

const WORKER_SOURCE = `
const lib = Deno.dlopen("libc.so.6", {
  process_vm_readv: { parameters: ["i32", "pointer", "u64", "pointer", "u64", "u64"], result: "i64" },
  process_vm_writev: { parameters: ["i32", "pointer", "u64", "pointer", "u64", "u64"], result: "i64" },
  getpid: { parameters: [], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
}).symbols;
const pid = lib.getpid();
self.onmessage = (e) => {
  const ctl = new Int32Array(e.data, 0, 16);
  const f = new Float64Array(e.data, 64, 8);
  Atomics.store(ctl, ${READY}, 1);
  for (;;) {
    let t0 = performance.now();
    while (Atomics.load(ctl, ${STATE}) !== ${POSTED} || Atomics.load(ctl, ${PAUSED})) {
      if (Atomics.load(ctl, ${STOP})) {
        self.close();
        return;
      }
      if (performance.now() - t0 > ${SPIN_MS}) {
        Atomics.store(ctl, ${SLEEPING}, 1);
        const s = Atomics.load(ctl, ${STATE});
        if (s !== ${POSTED} && !Atomics.load(ctl, ${STOP})) Atomics.wait(ctl, ${STATE}, s, 1000);
        Atomics.store(ctl, ${SLEEPING}, 0);
        t0 = performance.now();
      }
    }
    if (Atomics.compareExchange(ctl, ${STATE}, ${POSTED}, ${TAKEN}) !== ${POSTED}) continue;
    const fn = ctl[${OP}] === 0 ? lib.process_vm_readv : lib.process_vm_writev;
    const r = fn(pid, Deno.UnsafePointer.create(BigInt(f[${F_LOCAL}])), BigInt(f[${F_NLOCAL}]),
      Deno.UnsafePointer.create(BigInt(f[${F_REMOTE}])), BigInt(f[${F_NREMOTE}]), 0n);
    f[${F_RESULT}] = r === -1n
      ? -new Deno.UnsafePointerView(lib.__errno_location()).getInt32(0)
      : Number(r);
    Atomics.store(ctl, ${STATE}, ${DONE});
  }
};
`;

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVecs } from "./iovec.ts";
 * import { ftruncate, mapShared, memfdCreate } from "./memory.ts";
 * import { vmCopySelf } from "./vmcopy.ts";
 *
 * using fd = memfdCreate("memory");
 * ftruncate(fd, 8192);
 * using mem = mapShared(fd, 8192);
 * mem.bytes.fill(7, 4096); // copy the second page into the first, in two halves
 * const local = new IoVecs(2), remote = new IoVecs(2);
 * for (const half of [0, 2048]) {
 *   local.push(mem, half, 2048);
 *   remote.push(mem, 4096 + half, 2048);
 * }
 * const helper = CopyHelper.start();
 * const posted = helper.post("read", local, 0, 1, remote, 0, 1); // false while it is not awake
 * let copied = vmCopySelf("read", local, 1, 1, remote, 1, 1); // meanwhile, our half
 * const theirs = posted ? helper.collect() : null; // bytes, -errno, or null when taken back
 * if (theirs !== null && theirs < 0) throw new Error(`process_vm_readv: errno ${-theirs}`);
 * copied += theirs ?? vmCopySelf("read", local, 0, 1, remote, 0, 1); // not posted or taken back
 * helper.close();
 * assert.equal(copied, 4096);
 * assert.deepEqual(mem.bytes.subarray(0, 4096), new Uint8Array(4096).fill(7));
 * ```
 */
export class CopyHelper {
  readonly #sab = new SharedArrayBuffer(64 + 8 * 8);
  readonly #ctl = new Int32Array(this.#sab, 0, 16);
  readonly #f = new Float64Array(this.#sab, 64, 8);
  readonly #worker: Worker;
  #url: string;
  /** Jobs the helper did, and jobs taken back from it (tests, metrics). */
  jobs = 0;
  takenBack = 0;

  private constructor() {
    this.#url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "application/javascript" }));
    this.#worker = new Worker(this.#url, { type: "module" });
    this.#worker.postMessage(this.#sab);
  }

  /** Starts the helper thread; it takes jobs once it has opened libc (ready). */
  static start(): CopyHelper {
    return new CopyHelper();
  }

  /** Whether the helper has started. */
  get ready(): boolean {
    return Atomics.load(this.#ctl, READY) === 1;
  }

  /**
   * Posts the copy of local iovecs [lFrom, lFrom+lCount) from/to remote [rFrom, rFrom+rCount);
   * the iovecs and the memory must stay untouched until collect() returned. false when the
   * helper is not awake (then it is woken for later batches): copy it yourself.
   */
  post(
    op: "read" | "write",
    local: IoVecs,
    lFrom: number,
    lCount: number,
    remote: IoVecs,
    rFrom: number,
    rCount: number,
  ): boolean {
    const ctl = this.#ctl;
    if (Atomics.load(ctl, READY) !== 1 || Atomics.load(ctl, STATE) !== IDLE) return false;
    if (Atomics.load(ctl, SLEEPING) === 1) {
      Atomics.notify(ctl, STATE, 1);
      return false;
    }
    const f = this.#f;
    f[F_LOCAL] = Number(addressOf(local.unsafeBuffer)) + 16 * lFrom;
    f[F_NLOCAL] = lCount;
    f[F_REMOTE] = Number(addressOf(remote.unsafeBuffer)) + 16 * rFrom;
    f[F_NREMOTE] = rCount;
    ctl[OP] = op === "read" ? 0 : 1;
    Atomics.store(ctl, STATE, POSTED);
    return true;
  }

  /**
   * The posted job's result: bytes copied or -errno; null when the helper had not picked it up
   * (it is taken back: copy it yourself). `takeBack: false` waits for the helper instead.
   */
  collect(takeBack = true): number | null {
    const ctl = this.#ctl;
    if (takeBack && Atomics.compareExchange(ctl, STATE, POSTED, IDLE) === POSTED) {
      this.takenBack++;
      return null;
    }
    while (Atomics.load(ctl, STATE) !== DONE) { /* a copy in progress: microseconds */ }
    // (Without takeBack this also waits for the helper to pick the job up.)
    const r = this.#f[F_RESULT];
    Atomics.store(ctl, STATE, IDLE);
    this.jobs++;
    return r;
  }

  /**
   * While paused the helper takes no job, so collect() takes every posted one back (for tests of
   * that path, and to keep the helper's core free without stopping it).
   */
  pause(paused: boolean): void {
    Atomics.store(this.#ctl, PAUSED, paused ? 1 : 0);
  }

  /** Stops the helper thread (after collect() of any posted job). */
  close(): void {
    Atomics.store(this.#ctl, STOP, 1);
    Atomics.notify(this.#ctl, STATE, 1);
    this.#worker.terminate();
    URL.revokeObjectURL(this.#url);
  }
}

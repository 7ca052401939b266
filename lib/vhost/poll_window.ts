/**
 * Adaptive busy-poll window, the policy of QEMU's AioContext polling (poll-max-ns, grow 2, shrink
 * 2): after the last request the back-end keeps looking at the avail rings for `windowUs` before it
 * asks for kicks and sleeps. When a kick then comes sooner than `maxUs` after the last request, a
 * longer window would have caught it without a sleep and a wake-up, so the window doubles (from
 * 4 µs); when the driver stayed quiet for longer than `maxUs`, polling was wasted and the window
 * halves (to 0 below 4 µs). Idle devices therefore cost no CPU, and a driver that answers quickly
 * (a polling guest, a guest at queue depth 1) never waits for a wake-up.
 *
 * Pure: times are passed in (milliseconds, performance.now()).
 * @module
 */

/** The first non-zero window, as in QEMU (4 µs). */
export const POLL_START_US = 4;

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const w = new PollWindow(32); // times in ms (performance.now()), windows in µs
 * w.work(0); // a request was served
 * assert.equal(w.keepPolling(0.001), false); // window (0 µs) over: ask for kicks and sleep
 * w.woken(0.01); // a kick after 10 µs ended the sleep: a window would have caught it
 * assert.equal(w.windowUs, 4); // so the window grows, from 4 µs
 * w.work(0.01);
 * assert.equal(w.keepPolling(0.012), true); // 2 µs after the last request: keep polling
 * ```
 */
export class PollWindow {
  /** The largest window (µs); 0 turns polling off. */
  readonly maxUs: number;
  #windowUs: number;
  #lastWork = 0;
  #asleep = false;
  /** How often the window grew and shrank (metrics, tests). */
  grows = 0;
  shrinks = 0;

  constructor(maxUs: number, initialUs = 0) {
    if (!(maxUs >= 0) || !Number.isFinite(maxUs)) throw new RangeError(`poll window maximum ${maxUs} µs`);
    this.maxUs = maxUs;
    this.#windowUs = Math.min(maxUs, Math.max(0, initialUs));
  }

  /** The current window (µs). */
  get windowUs(): number {
    return this.#windowUs;
  }

  /** Whether the back-end is between keepPolling() → false and the next woken(). */
  get asleep(): boolean {
    return this.#asleep;
  }

  /** A request was found (by polling or after a kick) at `nowMs`. */
  work(nowMs: number): void {
    this.#lastWork = nowMs;
    this.#asleep = false;
  }

  /**
   * Nothing found at `nowMs`: whether to keep polling. false means the window is over; the caller
   * asks for kicks and sleeps, and reports the kick that wakes it with woken().
   */
  keepPolling(nowMs: number): boolean {
    if (this.#asleep) return false;
    if ((nowMs - this.#lastWork) * 1000 < this.#windowUs) return true;
    this.#asleep = true;
    return false;
  }

  /** A kick ended a sleep at `nowMs`: adapt the window to how long the driver was quiet. */
  woken(nowMs: number): void {
    if (!this.#asleep) return;
    this.#asleep = false;
    const quietUs = (nowMs - this.#lastWork) * 1000;
    this.#lastWork = nowMs;
    if (quietUs <= this.#windowUs) return;
    if (quietUs > this.maxUs) {
      if (this.#windowUs > 0) {
        this.#windowUs = this.#windowUs / 2 < POLL_START_US ? 0 : this.#windowUs / 2;
        this.shrinks++;
      }
    } else if (this.#windowUs < this.maxUs) {
      this.#windowUs = Math.min(this.maxUs, this.#windowUs === 0 ? POLL_START_US : this.#windowUs * 2);
      this.grows++;
    }
  }
}

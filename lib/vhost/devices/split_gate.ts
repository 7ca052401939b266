/**
 * Whether to share batches' copies with the helper thread, decided by measuring. Sharing pays
 * only while the helper has a core to itself: when the other cores are busy (a guest's vCPU or a
 * polling driver spinning there), the helper's work and spinning slow whoever owns that core, and
 * a slower driver sends fewer requests, which no measurement on the daemon's own side shows. So the
 * gate probes, the way a congestion controller does: it serves `windowMs` with sharing and
 * `windowMs` without, counting requests after the first `settleMs` of each, then holds the better setting for `holdMs` (sharing only
 * when it served at least `minGain` times as many), and probes again. After `idleMs` without a
 * batch, whatever load comes next is probed afresh.
 *
 * Pure: times (performance.now() milliseconds) are passed in.
 * @module
 */

/** Options of a SplitGate. */
export interface SplitGateOptions {
  /** Length of each probe window (default 600 ms), of which the first settleMs are not counted. */
  windowMs?: number;
  /**
   * Time for the machine to settle after a switch (default 300 ms): the scheduler spreads the
   * threads over the cores only after a while, and figures from before then mislead (measured
   * here: 50 ms windows chose wrong most of the time, 300 ms of settling right every time).
   */
  settleMs?: number;
  /**
   * How long a decision holds (default 3000 ms); doubled, up to 16 times, each time probing
   * confirms it, so a steady load pays for probing less and less; a third of it after a near tie.
   */
  holdMs?: number;
  /** Sharing must serve this many times the requests of not sharing (default 1.1). */
  minGain?: number;
  /** A pause between batches longer than this (default 1000 ms) ends any decision: probe again. */
  idleMs?: number;
}

type Phase = "on" | "off" | "hold";

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const gate = new SplitGate({ windowMs: 100, settleMs: 10 });
 * let shared = 0;
 * for (let t = 0; t < 250; t++) { // one batch a millisecond
 *   const requests = gate.allowing ? 16 : 8; // here sharing serves twice as many
 *   if (gate.batch(t, requests)) shared++; // this batch's copies may be shared with the helper
 * }
 * assert.equal(gate.phase, "hold"); // probed with and without sharing, then decided
 * assert.equal(gate.sharing, true);
 * assert.ok(shared > 100);
 * ```
 */
export class SplitGate {
  readonly windowMs: number;
  readonly settleMs: number;
  readonly holdMs: number;
  readonly minGain: number;
  readonly idleMs: number;
  #lastBatch = NaN;
  #phase: Phase = "on";
  #phaseStart = NaN;
  #count = 0;
  #rateOn = 0;
  #choice = false;
  /** Whether the last decision was clear (not a near tie). */
  #clear = false;
  #hold: number;
  /** Decisions taken: to share, not to share (metrics, tests). */
  sharedHolds = 0;
  soloHolds = 0;

  /** Decisions taken so far. */
  get decisions(): number {
    return this.sharedHolds + this.soloHolds;
  }

  /** How long the current (or next) decision holds. */
  get holdingMs(): number {
    return this.#hold;
  }

  constructor(options: SplitGateOptions = {}) {
    this.windowMs = options.windowMs ?? 600;
    this.settleMs = Math.min(options.settleMs ?? 300, this.windowMs / 2);
    this.holdMs = options.holdMs ?? 3000;
    this.minGain = options.minGain ?? 1.1;
    this.idleMs = options.idleMs ?? 1000;
    this.#hold = this.holdMs;
  }

  /** The current phase: probing with sharing ("on"), without ("off"), or holding a decision. */
  get phase(): Phase {
    return this.#phase;
  }

  /** The decision held (or last taken): share or not. */
  get sharing(): boolean {
    return this.#choice;
  }

  /** A batch of `requests` is being served at `nowMs`: whether it may be shared. */
  batch(nowMs: number, requests: number): boolean {
    if (Number.isNaN(this.#phaseStart)) this.#phaseStart = nowMs;
    // After an idle stretch the load that comes may be another one: judge it afresh.
    if (nowMs - this.#lastBatch > this.idleMs) {
      this.#start("on", nowMs);
      this.#hold = this.holdMs;
    }
    this.#lastBatch = nowMs;
    const elapsed = nowMs - this.#phaseStart;
    const planned = this.#phase === "hold" ? this.#hold : this.windowMs;
    if (elapsed >= planned) {
      if (this.#phase !== "hold" && elapsed > 3 * planned) {
        // The device was idle in this window: its count says nothing. Probe again.
        this.#start("on", nowMs);
      } else if (this.#phase === "on") {
        this.#rateOn = this.#count / (elapsed - this.settleMs);
        this.#start("off", nowMs);
      } else if (this.#phase === "off") {
        const rateOff = this.#count / (elapsed - this.settleMs);
        const choice = this.#rateOn >= rateOff * this.minGain;
        // A near tie (within minGain either way) may be noise: decided for a third as long.
        const clear = choice || rateOff >= this.#rateOn * this.minGain;
        this.#hold = !clear
          ? this.holdMs / 3
          : choice === this.#choice && this.#clear
          ? Math.min(this.holdMs * 16, this.#hold * 2)
          : this.holdMs;
        this.#clear = clear;
        this.#choice = choice;
        if (this.#choice) this.sharedHolds++;
        else this.soloHolds++;
        this.#start("hold", nowMs);
      } else {
        this.#start("on", nowMs);
      }
    }
    if (this.#phase === "hold" || nowMs - this.#phaseStart >= this.settleMs) this.#count += requests;
    return this.allowing;
  }

  /** Whether batches are shared now: while probing with sharing, or holding a decision for it. */
  get allowing(): boolean {
    return this.#phase === "on" || (this.#phase === "hold" && this.#choice);
  }

  #start(phase: Phase, nowMs: number): void {
    this.#phase = phase;
    this.#phaseStart = nowMs;
    this.#count = 0;
  }
}

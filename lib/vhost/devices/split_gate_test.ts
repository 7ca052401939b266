import assert from "node:assert/strict";
import { SplitGate } from "./split_gate.ts";

/**
 * Drives a gate for `ms` with one batch a millisecond whose size is the rate (requests per ms) the
 * machine reaches with sharing on or off, as the gate's previous answer set it.
 */
function drive(
  gate: SplitGate,
  ms: number,
  rateOn: number,
  rateOff: number,
  t0 = 0,
): { t: number; shared: number } {
  let t = t0;
  let shared = 0;
  let allowed = gate.batch(t, 0);
  while (t < t0 + ms) {
    // The batch's size depends on what the previous decision made the machine do.
    const rate = allowed ? rateOn : rateOff;
    t += 1;
    allowed = gate.batch(t, rate);
    if (allowed) shared++;
  }
  return { t, shared };
}

Deno.test("SplitGate probes on then off, and shares when sharing serves more", () => {
  const gate = new SplitGate({ windowMs: 100, settleMs: 50, holdMs: 1000 });
  assert.equal(gate.batch(0, 10), true, "probing starts with sharing on");
  drive(gate, 250, 600, 400, 0);
  assert.equal(gate.phase, "hold");
  assert.equal(gate.sharing, true);
  assert.equal(gate.sharedHolds, 1);
});

Deno.test("SplitGate stops sharing when it serves fewer requests (a busy machine), and probes again later", () => {
  const gate = new SplitGate({ windowMs: 100, settleMs: 50, holdMs: 1000 });
  const { t } = drive(gate, 250, 300, 600, 0);
  assert.equal(gate.phase, "hold");
  assert.equal(gate.sharing, false);
  assert.equal(gate.batch(t + 10, 1), false, "held: no sharing");
  // After the hold, probing again: now sharing wins.
  drive(gate, 1300, 900, 600, t + 10);
  assert.equal(gate.sharing, true);
  assert.equal(gate.soloHolds, 1);
  assert.equal(gate.sharedHolds, 1);
});

Deno.test("SplitGate needs minGain: a gain under 10% keeps the cheaper solo copy, and probes again sooner", () => {
  const gate = new SplitGate({ windowMs: 100, settleMs: 50, holdMs: 1200 });
  drive(gate, 250, 640, 600, 0);
  assert.equal(gate.sharing, false);
  assert.equal(gate.holdingMs, 400, "a near tie holds a third as long");
  drive(gate, 900, 300, 600, 250);
  assert.equal(gate.sharing, false);
  assert.equal(gate.holdingMs, 1200, "a clear loss holds the full time");
});

Deno.test("SplitGate: a confirmed decision holds twice as long, up to 16 times; a change resets it", () => {
  const gate = new SplitGate({ windowMs: 100, settleMs: 50, holdMs: 1000 });
  let t = 0;
  const holds: number[] = [];
  for (let i = 0; i < 7; i++) {
    t = drive(gate, 200 + gate.holdingMs + 5, 900, 600, t).t;
    holds.push(gate.holdingMs);
  }
  assert.deepEqual(holds.slice(0, 6), [1000, 2000, 4000, 8000, 16000, 16000]);
  t = drive(gate, 200 + gate.holdingMs + 5, 300, 600, t).t;
  assert.equal(gate.sharing, false);
  assert.equal(gate.holdingMs, 1000, "a changed decision holds for the base time");
});

Deno.test("SplitGate probes afresh after an idle stretch, even in the middle of a decision", () => {
  const gate = new SplitGate({ windowMs: 100, settleMs: 50, holdMs: 10_000 });
  const { t } = drive(gate, 250, 300, 600, 0);
  assert.equal(gate.phase, "hold");
  assert.equal(gate.sharing, false);
  // Quiet for two seconds, then a new load: probing starts over with sharing on.
  assert.equal(gate.batch(t + 2000, 10), true);
  assert.equal(gate.phase, "on");
  drive(gate, 250, 900, 600, t + 2000);
  assert.equal(gate.sharing, true);
});

import assert from "node:assert/strict";
import { caseSeed, Prng } from "./prng.ts";

Deno.test("Prng is deterministic for a seed and differs between seeds", () => {
  const a = new Prng(42), b = new Prng(42), c = new Prng(43);
  const xs = Array.from({ length: 8 }, () => a.u32());
  assert.deepEqual(xs, Array.from({ length: 8 }, () => b.u32()));
  assert.notDeepEqual(xs, Array.from({ length: 8 }, () => c.u32()));
});

Deno.test("Prng.int, range, pick, weighted and bytes stay in bounds", () => {
  const r = new Prng(7);
  for (let i = 0; i < 2000; i++) {
    const n = r.int(10);
    assert.ok(n >= 0 && n < 10 && Number.isInteger(n));
    const m = r.range(-3, 3);
    assert.ok(m >= -3 && m <= 3);
    assert.ok(["a", "b"].includes(r.pick(["a", "b"])));
    assert.equal(r.weighted([[0, "never"], [1, "always"]]), "always");
  }
  assert.equal(r.bytes(13).byteLength, 13);
  assert.throws(() => r.int(0), /n >= 1/);
  assert.throws(() => r.pick([]), /empty array/);
});

Deno.test("caseSeed separates cases, seeds and labels", () => {
  const s = new Set([caseSeed(1, 0), caseSeed(1, 1), caseSeed(2, 0), caseSeed(1, 0, "rng")]);
  assert.equal(s.size, 4);
  assert.equal(caseSeed(1, 5, "blk"), caseSeed(1, 5, "blk"));
});

import assert from "node:assert/strict";
import { withKicks } from "./minimize.ts";
import type { RingStep, Step } from "./steps.ts";

const ring = (queue: number): RingStep => ({
  op: "ring",
  queue,
  note: "",
  state: { size: 8, clear: true, memory: [], descs: [], avail: [] },
});

Deno.test("withKicks adds a kick after every ring state that no later kick of its queue follows", () => {
  const steps: Step[] = [ring(0), ring(1), { op: "kick", queue: 1 }, ring(0), { op: "sync" }];
  assert.deepEqual(
    withKicks(steps).map((s) => s.op === "ring" || s.op === "kick" ? `${s.op}${s.queue}` : s.op),
    [
      "ring0",
      "kick0",
      "ring1",
      "kick1",
      "ring0",
      "kick0",
      "sync",
    ],
  );
  assert.equal(withKicks([{ op: "sync" }]).length, 1);
});

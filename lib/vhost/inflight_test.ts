import assert from "node:assert/strict";
import { inflightAreaSize, InflightQueue, inflightQueueSize } from "./inflight.ts";

Deno.test("inflight area sizes are 16 + 16 per descriptor, rounded up to 64 per queue", () => {
  assert.equal(inflightQueueSize(128), 2112);
  assert.equal(inflightQueueSize(256), 4160);
  assert.equal(inflightAreaSize(4, 128), 4 * 2112);
  assert.throws(
    () => new InflightQueue(new DataView(new ArrayBuffer(100)), { offset: 0, queueSize: 128 }),
    /too small/,
  );
});

Deno.test("inflight a fresh area is initialised and nothing is resubmitted", () => {
  const v = new DataView(new ArrayBuffer(inflightQueueSize(8)));
  const q = new InflightQueue(v, { offset: 0, queueSize: 8 });
  assert.deepEqual(q.recover(5), []);
  assert.equal(q.version, 1);
  assert.equal(q.descNum, 8);
  assert.equal(q.usedIdx, 5);
});

Deno.test("inflight returns heads still in flight in submission order", () => {
  const v = new DataView(new ArrayBuffer(inflightQueueSize(8)));
  const q = new InflightQueue(v, { offset: 0, queueSize: 8 });
  q.recover(0);
  for (const h of [5, 2, 7]) q.begin(h);
  const heads = new Uint16Array([2]);
  q.prepareBatch(heads, 1);
  q.finishBatch(heads, 1, 1);
  const again = new InflightQueue(v, { offset: 0, queueSize: 8 });
  assert.deepEqual(again.recover(1), [5, 7]);
});

Deno.test("inflight completes a batch whose used index was published before the crash", () => {
  const v = new DataView(new ArrayBuffer(inflightQueueSize(8)));
  const q = new InflightQueue(v, { offset: 0, queueSize: 8 });
  q.recover(0);
  for (const h of [1, 3, 4, 6]) q.begin(h);
  // The back-end published used idx 3 for heads 3, 1, 6 but died before finishBatch.
  q.prepareBatch(new Uint16Array([3, 1, 6]), 3);
  const again = new InflightQueue(v, { offset: 0, queueSize: 8 });
  assert.deepEqual(again.recover(3), [4], "the published batch is not resubmitted");
  assert.equal(again.usedIdx, 3);
});

Deno.test("inflight counters continue after recovery so new requests sort after resubmitted ones", () => {
  const v = new DataView(new ArrayBuffer(inflightQueueSize(8)));
  const q = new InflightQueue(v, { offset: 0, queueSize: 8 });
  q.recover(0);
  q.begin(0);
  q.begin(1);
  const again = new InflightQueue(v, { offset: 0, queueSize: 8 });
  again.recover(0);
  again.begin(2);
  assert.ok(again.counterOf(2) > again.counterOf(1));
});

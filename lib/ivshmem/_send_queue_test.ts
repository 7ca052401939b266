import assert from "node:assert/strict";
import { SendQueue } from "./_send_queue.ts";

function contents(q: SendQueue): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  q.drain((v, t) => out.push([v, t]));
  return out;
}

Deno.test("SendQueue is FIFO across growth while its head has wrapped around", () => {
  const q = new SendQueue();
  const expected: Array<[number, number]> = [];
  // Move the head into the middle of the 16-slot ring, then grow past it several times.
  for (let i = 0; i < 10; i++) q.push(-1 - i, 0);
  for (let i = 0; i < 10; i++) {
    assert.equal(q.headValue, -1 - i);
    q.shift();
  }
  for (let i = 0; i < 1000; i++) {
    q.push(i, i % 66);
    expected.push([i, i % 66]);
  }
  assert.equal(q.length, 1000);
  for (let i = 0; i < 300; i++) {
    assert.deepEqual([q.headValue, q.headTag], expected.shift());
    q.shift();
  }
  assert.deepEqual(contents(q), expected);
  assert.equal(q.length, 0);
});

Deno.test("SendQueue head tag can be cleared, shift resets the partial count, drain empties", () => {
  const q = new SendQueue();
  q.push(7, 3);
  q.push(8, 1);
  q.sent = 5;
  q.headTag = 0;
  assert.deepEqual([q.headValue, q.headTag], [7, 0]);
  q.shift();
  assert.equal(q.sent, 0);
  assert.deepEqual(contents(q), [[8, 1]]);
  q.push(-1, 1);
  assert.deepEqual([q.length, q.headValue], [1, -1]);
});

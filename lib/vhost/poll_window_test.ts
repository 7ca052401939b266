import assert from "node:assert/strict";
import { POLL_START_US, PollWindow } from "./poll_window.ts";

// Times are in milliseconds, as performance.now() gives them.
const us = (n: number) => n / 1000;

Deno.test("PollWindow starts closed: the first idle look sleeps", () => {
  const w = new PollWindow(32);
  w.work(0);
  assert.equal(w.windowUs, 0);
  assert.equal(w.keepPolling(0), false);
  assert.equal(w.asleep, true);
  assert.equal(w.keepPolling(us(1)), false, "stays asleep until woken");
});

Deno.test("PollWindow grows 4, 8, 16, 32 µs while kicks come sooner than the maximum, then holds", () => {
  const w = new PollWindow(32);
  let t = 0;
  const seen: number[] = [];
  for (let i = 0; i < 6; i++) {
    w.work(t);
    // Poll until the window closes, then a kick 20 µs after the last request.
    while (w.keepPolling(t)) t += us(1);
    t = t + us(20) - (t % us(20));
    w.woken(t);
    seen.push(w.windowUs);
  }
  assert.deepEqual(seen.slice(0, 4), [POLL_START_US, 8, 16, 32]);
  assert.equal(w.windowUs, 32, "capped at the maximum");
});

Deno.test("PollWindow keeps polling inside the window and catches requests there without a sleep", () => {
  const w = new PollWindow(32, 32);
  w.work(0);
  assert.equal(w.keepPolling(us(10)), true);
  assert.equal(w.keepPolling(us(31)), true);
  w.work(us(31)); // a request found by polling
  assert.equal(w.keepPolling(us(60)), true, "the window restarts at the last request");
  assert.equal(w.keepPolling(us(64)), false);
  assert.equal(w.asleep, true);
});

Deno.test("PollWindow halves after a quiet stretch longer than the maximum, down to off", () => {
  const w = new PollWindow(32, 32);
  let t = 0;
  const seen: number[] = [];
  for (let i = 0; i < 5; i++) {
    w.work(t);
    while (w.keepPolling(t)) t += us(1);
    t += 5; // 5 ms of silence
    w.woken(t);
    seen.push(w.windowUs);
  }
  assert.deepEqual(seen, [16, 8, 4, 0, 0]);
  assert.equal(w.shrinks, 4);
});

Deno.test("PollWindow: a kick while polling (not asleep) changes nothing; maximum 0 never polls", () => {
  const w = new PollWindow(32, 8);
  w.work(0);
  w.woken(us(2));
  assert.equal(w.windowUs, 8);
  const off = new PollWindow(0);
  off.work(0);
  off.keepPolling(0);
  off.woken(us(1));
  assert.equal(off.windowUs, 0);
  assert.throws(() => new PollWindow(-1), RangeError);
  assert.throws(() => new PollWindow(NaN), RangeError);
});

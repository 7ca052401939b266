import assert from "node:assert/strict";
import { Request } from "./message.ts";
import { ringOf } from "./split_handler.ts";

const msg = (request: number, payload: number[]) => ({
  request,
  flags: 1,
  payload: new Uint8Array(payload),
  fds: [],
});

Deno.test("split handler ringOf reads the ring of every per-ring message and nothing else", () => {
  // VRING_STATE and VRING_ADDR: a u32 index.
  assert.equal(ringOf(msg(Request.SET_VRING_NUM, [3, 0, 0, 0, 0, 1, 0, 0])), 3);
  assert.equal(ringOf(msg(Request.GET_VRING_BASE, [1, 0, 0, 0, 0, 0, 0, 0])), 1);
  assert.equal(ringOf(msg(Request.SET_VRING_ADDR, [2, 0, 0, 0, ...new Array(36).fill(0)])), 2);
  // VRING_FILE: the low byte of a u64 (bit 8 is "no fd").
  assert.equal(ringOf(msg(Request.SET_VRING_KICK, [5, 1, 0, 0, 0, 0, 0, 0])), 5);
  assert.equal(ringOf(msg(Request.SET_VRING_CALL, [1, 0, 0, 0, 0, 0, 0, 0])), 1);
  // Device-wide messages and short payloads stay with the connection's handler.
  assert.equal(ringOf(msg(Request.SET_MEM_TABLE, [1, 0, 0, 0])), -1);
  assert.equal(ringOf(msg(Request.SET_FEATURES, [1, 0, 0, 0, 0, 0, 0, 0])), -1);
  assert.equal(ringOf(msg(Request.SET_VRING_NUM, [1, 0])), -1);
});

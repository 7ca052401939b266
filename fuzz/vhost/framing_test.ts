import assert from "node:assert/strict";
import { encodeMessage } from "../../tests/helpers/vhost_frontend.ts";
import { FramingModel } from "./framing.ts";

const msg = (req: number, flags: number, payload = new Uint8Array(0), size = payload.byteLength) =>
  encodeMessage(req, flags, payload, size);

Deno.test("FramingModel counts complete messages and GET_FEATURES, at a boundary after each", () => {
  const f = new FramingModel();
  f.feed(msg(1, 1));
  f.feed(msg(2, 1, new Uint8Array(8)));
  f.feed(msg(1, 9));
  assert.equal(f.messages, 3);
  assert.equal(f.getFeatures, 2);
  assert.ok(f.atBoundary);
  assert.equal(f.filler().byteLength, 0);
});

Deno.test("FramingModel follows a message split over several writes", () => {
  const f = new FramingModel();
  const m = msg(1, 1, new Uint8Array(40));
  f.feed(m.subarray(0, 5));
  assert.ok(!f.atBoundary);
  f.feed(m.subarray(5, 30));
  f.feed(m.subarray(30));
  assert.equal(f.getFeatures, 1);
  assert.ok(f.atBoundary);
});

Deno.test("FramingModel: a header claiming more than was sent leaves the stream mid-payload; filler completes it", () => {
  const f = new FramingModel();
  f.feed(msg(5, 1, new Uint8Array(8), 40));
  assert.ok(!f.atBoundary);
  const fill = f.filler();
  assert.equal(fill.byteLength, 32);
  f.feed(fill);
  assert.ok(f.atBoundary);
  assert.equal(f.messages, 1);
});

Deno.test("FramingModel: a header claiming less makes the rest of the payload the next header", () => {
  const f = new FramingModel();
  const payload = new Uint8Array(20);
  new DataView(payload.buffer).setUint32(8, 1, true); // bytes 4..15 read as request 0, flags 1, size 0
  f.feed(msg(2, 1, payload, 4));
  assert.equal(f.messages, 2);
  assert.ok(!f.atBoundary, "the last 4 bytes start a third header");
  f.feed(f.filler());
  assert.match(f.closedBecause ?? "", /version 0/);
});

Deno.test("FramingModel expects a close on a bad version or an oversized payload", () => {
  const a = new FramingModel();
  a.feed(msg(1, 0));
  assert.match(a.closedBecause ?? "", /version 0/);
  assert.ok(a.atBoundary);
  const b = new FramingModel();
  b.feed(msg(1, 1, new Uint8Array(0), 4097));
  assert.match(b.closedBecause ?? "", /4097 payload bytes/);
  b.feed(msg(1, 1));
  assert.equal(b.getFeatures, 0, "nothing is read after the close");
});

Deno.test("FramingModel: zeros completing a cut header give version 0 (a close)", () => {
  const f = new FramingModel();
  f.feed(msg(1, 1).subarray(0, 3));
  f.feed(f.filler());
  assert.match(f.closedBecause ?? "", /version 0/);
});

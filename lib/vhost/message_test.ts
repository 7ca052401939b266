import assert from "node:assert/strict";
import {
  decodeConfig,
  decodeHeader,
  decodeInflight,
  decodeMemTable,
  decodeSingleRegion,
  decodeU64,
  decodeVringAddr,
  decodeVringFile,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeMemTable,
  encodeMessage,
  encodeReply,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  Flags,
  HEADER_SIZE,
  MAX_PAYLOAD,
  Request,
  requestName,
  VhostMessageError,
} from "./message.ts";

const R = { guestAddr: 0x1000n, size: 0x20000n, userAddr: 0x7f0000001000n, mmapOffset: 0x3000n };

Deno.test("message header round-trips request, flags and size", () => {
  const m = encodeMessage(Request.SET_FEATURES, Flags.VERSION | Flags.NEED_REPLY, encodeU64(5n));
  assert.equal(m.byteLength, HEADER_SIZE + 8);
  assert.deepEqual(decodeHeader(m), { request: 2, flags: 0x9, size: 8 });
});

Deno.test("message reply is flagged 0x5", () => {
  const m = encodeReply(Request.GET_FEATURES, encodeU64(1n));
  assert.equal(decodeHeader(m).flags, 0x5);
});

Deno.test("message header rejects short input, wrong version and oversized payloads", () => {
  assert.throws(() => decodeHeader(new Uint8Array(11)), VhostMessageError);
  const bad = encodeMessage(1, 0x2, new Uint8Array(0));
  assert.throws(() => decodeHeader(bad), /version 2, expected 1/);
  const big = encodeMessage(1, 1, new Uint8Array(0));
  new DataView(big.buffer).setUint32(8, MAX_PAYLOAD + 1, true);
  assert.throws(() => decodeHeader(big), /exceeds/);
});

Deno.test("message u64 round-trips and rejects other sizes", () => {
  assert.equal(decodeU64(1, encodeU64(0xffff_ffff_ffff_ffffn)), 0xffff_ffff_ffff_ffffn);
  assert.throws(
    () => decodeU64(Request.SET_FEATURES, new Uint8Array(4)),
    /SET_FEATURES: payload of 4 bytes, expected 8/,
  );
  assert.throws(() => decodeU64(1, new Uint8Array(9)), VhostMessageError);
});

Deno.test("message vring state round-trips and rejects other sizes", () => {
  assert.deepEqual(decodeVringState(8, encodeVringState({ index: 3, num: 256 })), { index: 3, num: 256 });
  assert.throws(() => decodeVringState(8, new Uint8Array(12)), /expected 8/);
});

Deno.test("message vring address round-trips in desc, used, avail order", () => {
  const a = { index: 1, flags: 0, desc: 0x1000n, used: 0x3000n, avail: 0x2000n, log: 0n };
  const bytes = encodeVringAddr(a);
  assert.equal(new DataView(bytes.buffer).getBigUint64(16, true), 0x3000n); // used comes before avail
  assert.deepEqual(decodeVringAddr(9, bytes), a);
  assert.throws(() => decodeVringAddr(9, new Uint8Array(32)), /expected 40/);
});

Deno.test("message memory table round-trips and checks count against size", () => {
  const t = encodeMemTable([R, { ...R, guestAddr: 0x100000n }]);
  assert.equal(t.byteLength, 8 + 64);
  assert.deepEqual(decodeMemTable(5, t), [R, { ...R, guestAddr: 0x100000n }]);
  assert.throws(() => decodeMemTable(5, t.slice(0, 40)), /expected 72/);
  const zero = encodeMemTable([]);
  assert.throws(() => decodeMemTable(5, zero), /0 regions/);
  const nine = new Uint8Array(8 + 32 * 9);
  new DataView(nine.buffer).setUint32(0, 9, true);
  assert.throws(() => decodeMemTable(5, nine), /9 regions, expected 1..8/);
  assert.throws(() => decodeMemTable(5, new Uint8Array(4)), /expected >= 8/);
});

Deno.test("message single region round-trips (u64 padding first)", () => {
  const b = encodeSingleRegion(R);
  assert.equal(b.byteLength, 40);
  assert.deepEqual(decodeSingleRegion(Request.ADD_MEM_REG, b), R);
  assert.throws(() => decodeSingleRegion(Request.ADD_MEM_REG, new Uint8Array(32)), /expected 40/);
});

Deno.test("message config round-trips and bounds offset and size", () => {
  const c = { offset: 20, flags: 0, data: new Uint8Array([1, 2, 3, 4]) };
  assert.deepEqual(decodeConfig(24, encodeConfig(c)), c);
  const bad = encodeConfig({ offset: 250, flags: 0, data: new Uint8Array(10) });
  assert.throws(() => decodeConfig(24, bad), /outside 0..256/);
  const lying = encodeConfig(c);
  new DataView(lying.buffer).setUint32(4, 8, true); // claims 8 bytes, carries 4
  assert.throws(() => decodeConfig(24, lying), /expected 20/);
  assert.throws(() => decodeConfig(24, new Uint8Array(8)), /expected >= 12/);
});

Deno.test("message inflight round-trips in 24 bytes and accepts the unpadded 20", () => {
  const i = { mmapSize: 8192n, mmapOffset: 0n, numQueues: 2, queueSize: 128 };
  const b = encodeInflight(i);
  assert.equal(b.byteLength, 24);
  assert.deepEqual(decodeInflight(31, b), i);
  assert.deepEqual(decodeInflight(31, b.slice(0, 20)), i);
  assert.throws(() => decodeInflight(31, new Uint8Array(16)), /expected 24/);
});

Deno.test("message vring file splits index and no-fd bit, rejects reserved bits", () => {
  assert.deepEqual(decodeVringFile(12, encodeU64(3n)), { index: 3, noFd: false });
  assert.deepEqual(decodeVringFile(12, encodeU64(0x101n)), { index: 1, noFd: true });
  assert.throws(() => decodeVringFile(12, encodeU64(0x200n)), /reserved bits/);
});

Deno.test("message request names cover known and unknown codes", () => {
  assert.equal(requestName(Request.GET_INFLIGHT_FD), "GET_INFLIGHT_FD");
  assert.equal(requestName(9999), "request 9999");
});

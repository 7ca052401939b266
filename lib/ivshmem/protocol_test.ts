import assert from "node:assert/strict";
import {
  ClientDecoder,
  decodeMessage,
  encodeMessage,
  isPeerId,
  joinPlan,
  leavePlan,
  MAX_PEER_ID,
  parseSize,
  parseVectors,
  PeerIdAllocator,
  ProtocolError,
  roundUpPowerOfTwo,
} from "./protocol.ts";

Deno.test("encodeMessage writes one little-endian int64", () => {
  assert.deepEqual([...encodeMessage(0)], [0, 0, 0, 0, 0, 0, 0, 0]);
  assert.deepEqual([...encodeMessage(-1)], [255, 255, 255, 255, 255, 255, 255, 255]);
  assert.deepEqual([...encodeMessage(0x0102)], [2, 1, 0, 0, 0, 0, 0, 0]);
  assert.deepEqual([...encodeMessage(65535)], [255, 255, 0, 0, 0, 0, 0, 0]);
  assert.deepEqual([...encodeMessage(-(2n ** 63n))], [0, 0, 0, 0, 0, 0, 0, 128]);
});

Deno.test("encodeMessage rejects values outside int64 and short buffers", () => {
  assert.throws(() => encodeMessage(2n ** 63n), /out of int64 range/);
  assert.throws(() => encodeMessage(1, new Uint8Array(4)), /must hold 8 bytes: got 4/);
});

Deno.test("decodeMessage reverses encodeMessage and rejects short input", () => {
  for (const v of [0n, 1n, -1n, 65535n, 2n ** 62n, -(2n ** 63n)]) {
    assert.equal(decodeMessage(encodeMessage(v)), v);
  }
  const shifted = new Uint8Array(12);
  shifted.set(encodeMessage(7), 4);
  assert.equal(decodeMessage(shifted.subarray(4)), 7n);
  assert.throws(() => decodeMessage(new Uint8Array(7)), ProtocolError);
});

Deno.test("isPeerId accepts 0..65535 only", () => {
  assert.ok(isPeerId(0) && isPeerId(MAX_PEER_ID) && isPeerId(5n));
  assert.ok(!isPeerId(-1) && !isPeerId(65536) && !isPeerId(1.5) && !isPeerId(-1n));
});

Deno.test("PeerIdAllocator starts at 0 and grows monotonically without reusing a freed id", () => {
  const ids = new PeerIdAllocator();
  assert.deepEqual([ids.allocate(), ids.allocate(), ids.allocate()], [0, 1, 2]);
  ids.release(1);
  ids.release(0);
  assert.equal(ids.allocate(), 3);
  assert.equal(ids.size, 2);
});

Deno.test("PeerIdAllocator wraps the 16-bit space and skips ids in use", () => {
  const ids = new PeerIdAllocator();
  for (let i = 0; i <= MAX_PEER_ID; i++) assert.equal(ids.allocate(), i);
  assert.throws(() => ids.allocate(), /no free peer id: all 65536 ids are in use/);
  ids.release(7);
  ids.release(3);
  assert.equal(ids.allocate(), 3);
  assert.equal(ids.allocate(), 7);
  assert.throws(() => ids.allocate(), RangeError);
});

Deno.test("joinPlan orders messages as contrib ivshmem-server: initial info, others told, others, self", () => {
  const plan = joinPlan(5, [1, 3], 2).map((m) => [m.to, m.value, m.fd ? JSON.stringify(m.fd) : null]);
  const v = (peer: number, vector: number) => JSON.stringify({ kind: "vector", peer, vector });
  assert.deepEqual(plan, [
    [5, 0, null],
    [5, 5, null],
    [5, -1, JSON.stringify({ kind: "shm" })],
    [1, 5, v(5, 0)],
    [1, 5, v(5, 1)],
    [3, 5, v(5, 0)],
    [3, 5, v(5, 1)],
    [5, 1, v(1, 0)],
    [5, 1, v(1, 1)],
    [5, 3, v(3, 0)],
    [5, 3, v(3, 1)],
    [5, 5, v(5, 0)],
    [5, 5, v(5, 1)],
  ]);
});

Deno.test("joinPlan for the first peer is version, id, shm and its own vectors", () => {
  assert.deepEqual(joinPlan(0, [], 1).map((m) => [m.to, m.value, m.fd?.kind ?? null]), [
    [0, 0, null],
    [0, 0, null],
    [0, -1, "shm"],
    [0, 0, "vector"],
  ]);
});

Deno.test("leavePlan sends the id without fd to every remaining peer", () => {
  assert.deepEqual(leavePlan(4, [0, 9]), [{ to: 0, value: 4 }, { to: 9, value: 4 }]);
  assert.deepEqual(leavePlan(4, []), []);
});

function feed(d: ClientDecoder, msgs: Array<[number, boolean]>) {
  return msgs.flatMap(([v, fd]) => d.push(BigInt(v), fd));
}

Deno.test("ClientDecoder reports joined with existing peers once its own run has their vector count", () => {
  const d = new ClientDecoder();
  const ev = feed(d, [[0, false], [2, false], [-1, true], [0, true], [0, true], [1, true], [1, true], [
    2,
    true,
  ], [
    2,
    true,
  ]]);
  assert.deepEqual(ev, [
    { type: "shm" },
    { type: "vector", peer: 0, vector: 0 },
    { type: "vector", peer: 0, vector: 1 },
    { type: "vector", peer: 1, vector: 0 },
    { type: "vector", peer: 1, vector: 1 },
    { type: "vector", peer: 2, vector: 0 },
    { type: "vector", peer: 2, vector: 1 },
    { type: "joined", id: 2, vectors: 2, peers: [0, 1] },
  ]);
  assert.deepEqual(d.flush(), []);
});

Deno.test("ClientDecoder: the first peer's joined comes at the flush ending its own run", () => {
  const d = new ClientDecoder();
  assert.deepEqual(feed(d, [[0, false], [0, false], [-1, true], [0, true], [0, true]]).map((e) => e.type), [
    "shm",
    "vector",
    "vector",
  ]);
  assert.equal(d.joined, false);
  assert.deepEqual(d.flush(), [{ type: "joined", id: 0, vectors: 2, peers: [] }]);
  assert.equal(d.joined, true);
});

Deno.test("ClientDecoder announces a later peer when all its vectors arrived, and its leave", () => {
  const d = new ClientDecoder();
  feed(d, [[0, false], [0, false], [-1, true], [0, true], [0, true]]);
  d.flush();
  assert.deepEqual(feed(d, [[1, true]]), [{ type: "vector", peer: 1, vector: 0 }]);
  assert.deepEqual(d.flush(), []);
  assert.deepEqual(feed(d, [[1, true]]), [
    { type: "vector", peer: 1, vector: 1 },
    { type: "peer-joined", peer: 1, vectors: 2 },
  ]);
  assert.deepEqual(feed(d, [[1, false]]), [{ type: "peer-left", peer: 1 }]);
  assert.equal(d.peers.size, 0);
});

Deno.test("ClientDecoder rejects a wrong version, a bad id, a missing shm fd and unknown leaves", () => {
  assert.throws(() => new ClientDecoder().push(1n, false), /expected protocol version 0 without fd: got 1/);
  assert.throws(() => new ClientDecoder().push(0n, true), /got 0 with an fd/);
  const id = new ClientDecoder();
  id.push(0n, false);
  assert.throws(() => id.push(70000n, false), /own peer id 0..65535 without fd: got 70000/);
  const shm = new ClientDecoder();
  feed(shm, [[0, false], [1, false]]);
  assert.throws(() => shm.push(-1n, false), /expected -1 with the shared memory fd: got -1/);
  const leave = new ClientDecoder();
  feed(leave, [[0, false], [1, false], [-1, true], [1, true]]);
  leave.flush();
  assert.throws(() => leave.push(9n, false), /unknown peer 9 as left/);
  assert.throws(() => leave.push(1n, false), /own id 1 as left/);
  assert.throws(() => leave.push(-5n, true), /expected a peer id 0..65535: got -5/);
});

Deno.test("parseSize takes bytes and K/M/G/T suffixes like -l", () => {
  assert.equal(parseSize("4096"), 4096);
  assert.equal(parseSize("1K"), 1024);
  assert.equal(parseSize("4M"), 4 << 20);
  assert.equal(parseSize("2g"), 2 * 2 ** 30);
  assert.equal(parseSize("1.5K"), 1536);
  assert.equal(parseSize("1T"), 2 ** 40);
});

Deno.test("parseSize rejects junk, zero and fractional bytes", () => {
  for (const bad of ["", "abc", "4X", "-1", "1.5", "0", "4 MB"]) {
    assert.throws(() => parseSize(bad), RangeError, bad);
  }
});

Deno.test("roundUpPowerOfTwo rounds up sizes, including past 2 GiB", () => {
  assert.equal(roundUpPowerOfTwo(1), 1);
  assert.equal(roundUpPowerOfTwo(4 << 20), 4 << 20);
  assert.equal(roundUpPowerOfTwo((4 << 20) + 1), 8 << 20);
  assert.equal(roundUpPowerOfTwo(3 * 2 ** 30), 4 * 2 ** 30);
  assert.throws(() => roundUpPowerOfTwo(0), /positive integer: got 0/);
});

Deno.test("parseVectors accepts 1..64 in decimal or hex", () => {
  assert.equal(parseVectors("1"), 1);
  assert.equal(parseVectors("64"), 64);
  assert.equal(parseVectors("0x10"), 16);
  assert.throws(() => parseVectors("65"), /must be 1..64: got 65/);
  assert.throws(() => parseVectors("0"), /must be 1..64: got 0/);
  assert.throws(() => parseVectors("four"), /not a number/);
});

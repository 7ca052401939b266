import assert from "node:assert/strict";
import { EventFd, memfdCreate, OpenFlags, openPath, type OwnedFd, Reactor } from "../../ffi/mod.ts";
import { BlkDevice, BlkStatus, BlkType } from "./devices/blk.ts";
import { RngDevice } from "./devices/rng.ts";
import { type Message, type Outcome, VhostUserHandler } from "./handler.ts";
import {
  bit,
  decodeConfig,
  decodeHeader,
  decodeInflight,
  decodeU64,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeMemTable,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  Flags,
  HEADER_SIZE,
  ProtocolFeature,
  Request,
  VirtioFeature,
} from "./message.ts";
import { Metrics } from "./metrics.ts";
import { DescFlags } from "./virtqueue.ts";
import type { VhostUserDevice } from "./backend.ts";
import { TestGuest, TestRing } from "./_testing.ts";

const { NEXT, WRITE } = DescFlags;
const ACK = Flags.VERSION | Flags.NEED_REPLY;

function send(
  h: VhostUserHandler,
  request: number,
  payload = new Uint8Array(0),
  fds: OwnedFd[] = [],
  flags = ACK,
) {
  const m: Message = { request, flags, payload, fds };
  const o = h.handle(m);
  assert.ok(!(o instanceof Promise), "this message is handled at once (nothing in flight)");
  return o;
}

function ack(o: Outcome): bigint {
  assert.ok(o.reply, "expected a reply");
  const hdr = decodeHeader(o.reply!);
  assert.equal(hdr.flags, 0x5);
  return decodeU64(hdr.request, o.reply!.subarray(HEADER_SIZE));
}

function payloadOf(o: Outcome): Uint8Array {
  assert.ok(o.reply, "expected a reply");
  return o.reply!.subarray(HEADER_SIZE);
}

/** A handler on a real device with a reactor that is never run (kicks are processed by hand). */
function harness(device: VhostUserDevice) {
  const reactor = new Reactor();
  const metrics = new Metrics(device.type, device.numQueues);
  const logs: string[] = [];
  const h = new VhostUserHandler(device, { reactor, metrics }, { log: (l) => logs.push(l) });
  return {
    h,
    logs,
    metrics,
    close() {
      h.close();
      device.close();
      reactor.close();
    },
  };
}

/** Protocol handshake as QEMU 7.2 does it, then memory and one ring, started and enabled. */
function bringUp(h: VhostUserHandler, g: TestGuest, ring: TestRing, q = 0, features?: bigint) {
  assert.deepEqual(
    send(h, Request.SET_PROTOCOL_FEATURES, encodeU64(bit(ProtocolFeature.REPLY_ACK)), [], 1),
    {},
  );
  const f = features ?? (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.PROTOCOL_FEATURES));
  assert.equal(ack(send(h, Request.SET_FEATURES, encodeU64(f))), 0n);
  assert.equal(ack(send(h, Request.SET_OWNER)), 0n);
  assert.equal(ack(send(h, Request.SET_MEM_TABLE, encodeMemTable([g.region]), [g.fd.dup()])), 0n);
  assert.equal(ack(send(h, Request.SET_VRING_NUM, encodeVringState({ index: q, num: ring.size }))), 0n);
  assert.equal(ack(send(h, Request.SET_VRING_BASE, encodeVringState({ index: q, num: 0 }))), 0n);
  const a = ring.userAddrs;
  assert.equal(
    ack(send(h, Request.SET_VRING_ADDR, encodeVringAddr({ index: q, flags: 0, ...a, log: 0n }))),
    0n,
  );
  const kick = new EventFd();
  const call = new EventFd();
  assert.equal(ack(send(h, Request.SET_VRING_KICK, encodeU64(BigInt(q)), [kick.fd.dup()])), 0n);
  assert.equal(ack(send(h, Request.SET_VRING_CALL, encodeU64(BigInt(q)), [call.fd.dup()])), 0n);
  return { kick, call };
}

function tempDisk(size: number): { path: string; fd: OwnedFd } {
  const path = Deno.makeTempFileSync({ prefix: "mpq-vhost-test-" });
  Deno.truncateSync(path, size);
  return { path, fd: openPath(path, OpenFlags.O_RDWR) };
}

Deno.test("handler offers exactly the transport and protocol features of the spec", () => {
  const t = harness(new RngDevice());
  try {
    const f = decodeU64(1, payloadOf(send(t.h, Request.GET_FEATURES, undefined, [], 1)));
    for (const b of [32, 29, 28, 24, 30, 26]) assert.ok(f & bit(b), `feature bit ${b} offered`);
    for (const b of [33, 34]) assert.equal(f & bit(b), 0n, `feature bit ${b} not offered`);
    const p = decodeU64(15, payloadOf(send(t.h, Request.GET_PROTOCOL_FEATURES, undefined, [], 1)));
    const want = [0, 1, 3, 9, 12, 13, 15].reduce((a, b) => a | bit(b), 0n);
    assert.equal(p, want, `protocol features 0x${p.toString(16)}`);
    assert.equal(decodeU64(17, payloadOf(send(t.h, Request.GET_QUEUE_NUM, undefined, [], 1))), 1n);
    assert.equal(decodeU64(36, payloadOf(send(t.h, Request.GET_MAX_MEM_SLOTS, undefined, [], 1))), 32n);
  } finally {
    t.close();
  }
});

Deno.test("handler acks failures with non-zero and never acks a failed handler with 0", () => {
  const t = harness(new RngDevice());
  try {
    // Without REPLY_ACK negotiated there is no ack at all.
    assert.deepEqual(send(t.h, Request.SET_OWNER), {});
    send(t.h, Request.SET_PROTOCOL_FEATURES, encodeU64(bit(ProtocolFeature.REPLY_ACK)), [], 1);
    assert.equal(ack(send(t.h, Request.SET_FEATURES, encodeU64(bit(40)))), 1n, "unoffered feature");
    assert.equal(t.h.features, 0n);
    assert.equal(ack(send(t.h, Request.SET_FEATURES, new Uint8Array(4))), 1n, "size mismatch");
    assert.equal(ack(send(t.h, Request.SET_PROTOCOL_FEATURES, encodeU64(bit(16)))), 1n, "STATUS not offered");
    assert.equal(ack(send(t.h, Request.SET_VRING_NUM, encodeVringState({ index: 0, num: 100 }))), 1n);
    assert.equal(ack(send(t.h, Request.SET_VRING_NUM, encodeVringState({ index: 5, num: 64 }))), 1n);
    assert.equal(ack(send(t.h, Request.SET_VRING_KICK, encodeU64(0n))), 1n, "kick without its fd");
    assert.equal(ack(send(t.h, Request.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 2 }))), 1n);
    assert.equal(ack(send(t.h, Request.SET_VRING_BASE, encodeVringState({ index: 0, num: 0x10000 }))), 1n);
    assert.equal(ack(send(t.h, Request.SET_OWNER)), 0n);
    assert.ok(t.logs.length >= 8);
  } finally {
    t.close();
  }
});

Deno.test("handler refuses unknown and unsupported requests cleanly and closes their fds", () => {
  const t = harness(new RngDevice());
  try {
    send(t.h, Request.SET_PROTOCOL_FEATURES, encodeU64(bit(ProtocolFeature.REPLY_ACK)), [], 1);
    const fd = memfdCreate("stray");
    const o = send(t.h, 99, new Uint8Array(3), [fd]);
    assert.equal(ack(o), 1n);
    assert.ok(fd.closed, "the dispatcher closed the fd nobody took");
    // SET_LOG_BASE has a reply of its own: a malformed one (8 bytes, no fd) closes the connection.
    assert.match(send(t.h, Request.SET_LOG_BASE, encodeU64(0n)).close ?? "", /SET_LOG_BASE: payload/);
    assert.deepEqual(send(t.h, Request.SET_STATUS, encodeU64(0n), [], 1), {
      failure: "SET_STATUS is not supported",
    }, "no need_reply: no answer (the failure is noted for the caller)");
    // A request with a defined reply that fails cannot be answered: the connection closes.
    const bad = send(t.h, Request.GET_VRING_BASE, encodeVringState({ index: 7, num: 0 }), [], 1);
    assert.match(bad.close ?? "", /queue index 7 out of range/);
    assert.equal(bad.reply, undefined);
  } finally {
    t.close();
  }
});

Deno.test("handler starts a ring on kick, keeps it disabled until SET_VRING_ENABLE, stops it on GET_VRING_BASE", () => {
  const g = new TestGuest(1 << 20);
  const ring = new TestRing(g, 8);
  const t = harness(new RngDevice());
  const { kick, call } = bringUp(t.h, g, ring);
  try {
    const q = t.h.queues[0];
    assert.ok(q.started);
    assert.equal(q.enabled, false, "bit 30 negotiated: starts disabled");
    ring.setDesc(0, 0x10000, 64, WRITE);
    ring.publish(0);
    t.h.process(q);
    assert.equal(ring.usedIdx, 0, "a disabled ring is not served");
    assert.equal(ack(send(t.h, Request.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }))), 0n);
    assert.equal(ring.usedIdx, 1, "enabling serves what is pending");
    assert.deepEqual(ring.usedElem(0), { id: 0, len: 64 });
    assert.ok(g.bytes.subarray(0x10000, 0x10040).some((b) => b !== 0), "random bytes arrived");
    assert.equal(call.drain(), 1n);
    const st = decodeVringState(
      11,
      payloadOf(send(t.h, Request.GET_VRING_BASE, encodeVringState({ index: 0, num: 0 }), [], 1)),
    );
    assert.deepEqual(st, { index: 0, num: 1 });
    assert.equal(q.started, false);
    // Restart from the returned base.
    send(t.h, Request.SET_VRING_BASE, encodeVringState({ index: 0, num: st.num }));
    send(t.h, Request.SET_VRING_KICK, encodeU64(0n), [kick.fd.dup()]);
    assert.ok(q.started);
    ring.publish(0);
    t.h.process(q);
    assert.equal(ring.usedIdx, 2);
  } finally {
    kick.close();
    call.close();
    t.close();
    g.close();
  }
});

Deno.test("handler without PROTOCOL_FEATURES starts rings enabled", () => {
  const g = new TestGuest(1 << 20);
  const ring = new TestRing(g, 8);
  const t = harness(new RngDevice());
  const { kick, call } = bringUp(t.h, g, ring, 0, bit(VirtioFeature.VERSION_1));
  try {
    assert.equal(t.h.queues[0].enabled, true);
  } finally {
    kick.close();
    call.close();
    t.close();
    g.close();
  }
});

Deno.test("handler marks a queue with a corrupt ring broken, signals the error fd, keeps answering", () => {
  const g = new TestGuest(1 << 20);
  const ring = new TestRing(g, 8);
  const t = harness(new RngDevice());
  const { kick, call } = bringUp(t.h, g, ring);
  const err = new EventFd();
  try {
    assert.equal(ack(send(t.h, Request.SET_VRING_ERR, encodeU64(0n), [err.fd.dup()])), 0n);
    send(t.h, Request.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));
    ring.setDesc(0, 0x10000, 16, NEXT, 0); // loops onto itself
    ring.publish(0);
    t.h.process(t.h.queues[0]);
    assert.equal(t.h.queues[0].broken, true);
    assert.equal(err.drain(), 1n);
    assert.equal(t.metrics.brokenQueues, 1);
    assert.match(t.logs.join("\n"), /broken ring/);
    assert.equal(decodeU64(1, payloadOf(send(t.h, Request.GET_FEATURES, undefined, [], 1))) !== 0n, true);
  } finally {
    err.close();
    kick.close();
    call.close();
    t.close();
    g.close();
  }
});

Deno.test("handler remaps running rings when a new memory table arrives", () => {
  const g = new TestGuest(1 << 20);
  const ring = new TestRing(g, 8);
  const t = harness(new RngDevice());
  const { kick, call } = bringUp(t.h, g, ring);
  try {
    send(t.h, Request.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));
    assert.equal(ack(send(t.h, Request.SET_MEM_TABLE, encodeMemTable([g.region]), [g.fd.dup()])), 0n);
    ring.setDesc(0, 0x10000, 32, WRITE);
    ring.publish(0);
    t.h.process(t.h.queues[0]);
    assert.equal(ring.usedIdx, 1);
    assert.equal(
      ack(send(t.h, Request.SET_MEM_TABLE, encodeMemTable([g.region]), [])),
      1n,
      "fd count must match",
    );
  } finally {
    kick.close();
    call.close();
    t.close();
    g.close();
  }
});

Deno.test("handler GET_INFLIGHT_FD hands out a zeroed area that SET_INFLIGHT_FD maps per queue", () => {
  const t = harness(new RngDevice());
  try {
    send(t.h, Request.SET_PROTOCOL_FEATURES, encodeU64(bit(ProtocolFeature.REPLY_ACK)), [], 1);
    const o = send(
      t.h,
      Request.GET_INFLIGHT_FD,
      encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: 128 }),
      [],
      1,
    );
    const p = decodeInflight(31, payloadOf(o));
    assert.equal(p.mmapSize, BigInt(16 + 16 * 128 + 48)); // rounded up to 64
    assert.equal(o.fds?.length, 1);
    const fd = o.fds![0];
    assert.equal(ack(send(t.h, Request.SET_INFLIGHT_FD, encodeInflight(p), [fd])), 0n);
    assert.ok(t.h.queues[0].inflight);
    const two = send(t.h, Request.GET_INFLIGHT_FD, encodeInflight({ ...p, numQueues: 2 }), []);
    assert.match(two.close ?? "", /2 queues, this device has 1/, "rng has one queue; a GET cannot be acked");
  } finally {
    t.close();
  }
});

// ---- blk through the handler ----

interface BlkRig {
  g: TestGuest;
  ring: TestRing;
  disk: { path: string; fd: OwnedFd };
  t: ReturnType<typeof harness>;
  kick: EventFd;
  call: EventFd;
  close(): void;
}

function blkRig(options: { readOnly?: boolean; serial?: string; writeback?: boolean } = {}): BlkRig {
  const g = new TestGuest(1 << 20);
  const ring = new TestRing(g, 16);
  const disk = tempDisk(1 << 20);
  // The preadv engine completes inside submit(); this reactor never runs, so io_uring could not complete.
  const dev = new BlkDevice(disk.fd, 1 << 20, { writeback: true, engine: "preadv", ...options });
  const t = harness(dev);
  const { kick, call } = bringUp(t.h, g, ring);
  send(t.h, Request.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));
  return {
    g,
    ring,
    disk,
    t,
    kick,
    call,
    close() {
      kick.close();
      call.close();
      t.close();
      g.close();
      Deno.removeSync(disk.path);
    },
  };
}

/** Writes a blk request (header at 0x10000 + 0x1000*slot) and publishes it; returns the status address. */
function blkRequest(
  r: BlkRig,
  slot: number,
  type: number,
  sector: number,
  data: number,
  dataWritable: boolean,
) {
  const hdr = 0x10000 + 0x1000 * slot;
  const status = hdr + 0x800;
  const buf = 0x80000 + 0x2000 * slot;
  r.g.view.setUint32(hdr, type, true);
  r.g.view.setUint32(hdr + 4, 0, true);
  r.g.view.setBigUint64(hdr + 8, BigInt(sector), true);
  r.g.bytes[status] = 0xff;
  const d0 = slot * 3;
  if (data > 0) {
    r.ring.setDesc(d0, hdr, 16, NEXT, d0 + 1);
    r.ring.setDesc(d0 + 1, buf, data, NEXT | (dataWritable ? WRITE : 0), d0 + 2);
    r.ring.setDesc(d0 + 2, status, 1, WRITE);
  } else {
    r.ring.setDesc(d0, hdr, 16, NEXT, d0 + 2);
    r.ring.setDesc(d0 + 2, status, 1, WRITE);
  }
  r.ring.publish(d0);
  return { status, buf, hdr };
}

Deno.test("blk writes, flushes and reads back through guest memory and the file", () => {
  const r = blkRig();
  try {
    const w = blkRequest(r, 0, BlkType.OUT, 8, 4096, false);
    for (let i = 0; i < 4096; i++) r.g.bytes[w.buf + i] = (i * 7) & 0xff;
    const f = blkRequest(r, 1, BlkType.FLUSH, 0, 0, false);
    r.t.h.process(r.t.h.queues[0]);
    assert.equal(r.g.bytes[w.status], BlkStatus.OK);
    assert.equal(r.g.bytes[f.status], BlkStatus.OK);
    const file = Deno.readFileSync(r.disk.path);
    assert.deepEqual(file.subarray(4096, 8192), r.g.bytes.subarray(w.buf, w.buf + 4096));
    const rd = blkRequest(r, 2, BlkType.IN, 8, 4096, true);
    r.t.h.process(r.t.h.queues[0]);
    assert.equal(r.g.bytes[rd.status], BlkStatus.OK);
    assert.deepEqual(r.g.bytes.subarray(rd.buf, rd.buf + 4096), file.subarray(4096, 8192));
    assert.equal(r.ring.usedIdx, 3);
    assert.deepEqual(r.ring.usedElem(0), { id: 0, len: 1 });
    assert.deepEqual(r.ring.usedElem(2), { id: 6, len: 4097 }, "IN: data + status byte");
    assert.equal(r.t.metrics.queue(0).requests, 3);
    assert.equal(r.t.metrics.queue(0).writeBytes, 4096);
    assert.equal(r.t.metrics.queue(0).readBytes, 4096);
  } finally {
    r.close();
  }
});

Deno.test("blk in writethrough mode completes a write after its flush", () => {
  const r = blkRig({ writeback: false });
  try {
    const w = blkRequest(r, 0, BlkType.OUT, 0, 512, false);
    r.g.bytes.fill(0x42, w.buf, w.buf + 512);
    r.t.h.process(r.t.h.queues[0]);
    assert.equal(r.g.bytes[w.status], BlkStatus.OK);
    assert.deepEqual(r.ring.usedElem(0), { id: 0, len: 1 });
    assert.ok(Deno.readFileSync(r.disk.path).subarray(0, 512).every((b) => b === 0x42));
  } finally {
    r.close();
  }
});

Deno.test("blk answers GET_ID, rejects out-of-range I/O with IOERR and unknown types with UNSUPP", () => {
  const r = blkRig({ serial: "disk-serial-1" });
  try {
    const id = blkRequest(r, 0, BlkType.GET_ID, 0, 20, true);
    const past = blkRequest(r, 1, BlkType.IN, (1 << 20) / 512 - 1, 1024, true);
    const odd = blkRequest(r, 2, 99, 0, 0, false);
    r.t.h.process(r.t.h.queues[0]);
    assert.equal(r.g.bytes[id.status], BlkStatus.OK);
    assert.equal(new TextDecoder().decode(r.g.bytes.subarray(id.buf, id.buf + 13)), "disk-serial-1");
    assert.equal(r.g.bytes[id.buf + 13], 0);
    assert.equal(r.g.bytes[past.status], BlkStatus.IOERR);
    assert.equal(r.g.bytes[odd.status], BlkStatus.UNSUPP);
    assert.equal(r.t.metrics.queue(0).errors, 2);
  } finally {
    r.close();
  }
});

Deno.test("blk discard and write-zeroes clear the file range", () => {
  const r = blkRig();
  try {
    Deno.writeFileSync(r.disk.path, new Uint8Array(1 << 20).fill(0xaa));
    const seg = (slot: number, sector: number, num: number, flags: number) => {
      const req = blkRequest(r, slot, 0, 0, 16, false);
      r.g.view.setBigUint64(req.buf, BigInt(sector), true);
      r.g.view.setUint32(req.buf + 8, num, true);
      r.g.view.setUint32(req.buf + 12, flags, true);
      return req;
    };
    const d = seg(0, 0, 8, 0);
    r.g.view.setUint32(d.hdr, BlkType.DISCARD, true);
    const z = seg(1, 16, 8, 0);
    r.g.view.setUint32(z.hdr, BlkType.WRITE_ZEROES, true);
    const bad = seg(2, 4096, 8, 0);
    r.g.view.setUint32(bad.hdr, BlkType.WRITE_ZEROES, true);
    r.t.h.process(r.t.h.queues[0]);
    assert.equal(r.g.bytes[d.status], BlkStatus.OK);
    assert.equal(r.g.bytes[z.status], BlkStatus.OK);
    assert.equal(r.g.bytes[bad.status], BlkStatus.IOERR, "beyond capacity");
    const file = Deno.readFileSync(r.disk.path);
    assert.ok(file.subarray(0, 4096).every((b) => b === 0));
    assert.ok(file.subarray(8192, 12288).every((b) => b === 0));
    assert.ok(file.subarray(4096, 8192).every((b) => b === 0xaa), "between the ranges untouched");
  } finally {
    r.close();
  }
});

Deno.test("blk read-only rejects writes with IOERR and writes nothing", () => {
  const r = blkRig({ readOnly: true });
  try {
    const feats = decodeU64(1, payloadOf(send(r.t.h, Request.GET_FEATURES, undefined, [], 1)));
    assert.ok(feats & bit(5), "VIRTIO_BLK_F_RO offered");
    const w = blkRequest(r, 0, BlkType.OUT, 0, 4096, false);
    r.g.bytes.fill(0x55, w.buf, w.buf + 4096);
    r.t.h.process(r.t.h.queues[0]);
    assert.equal(r.g.bytes[w.status], BlkStatus.IOERR);
    assert.ok(Deno.readFileSync(r.disk.path).every((b) => b === 0));
  } finally {
    r.close();
  }
});

Deno.test("blk config space carries capacity, seg_max, blk_size, num_queues and limits", () => {
  const disk = tempDisk(1 << 20);
  const t = harness(new BlkDevice(disk.fd, 1 << 20, { numQueues: 4, blkSize: 4096, writeback: true }));
  try {
    const req = encodeConfig({ offset: 0, flags: 0, data: new Uint8Array(60) });
    const c = decodeConfig(24, payloadOf(send(t.h, Request.GET_CONFIG, req, [], 1)));
    const v = new DataView(c.data.buffer, c.data.byteOffset);
    assert.equal(v.getBigUint64(0, true), 2048n, "capacity in 512-byte sectors");
    assert.equal(v.getUint32(12, true), 126, "seg_max");
    assert.equal(v.getUint32(20, true), 4096, "blk_size");
    assert.equal(v.getUint8(32), 1, "writeback");
    assert.equal(v.getUint16(34, true), 4, "num_queues");
    assert.ok(v.getUint32(36, true) > 0 && v.getUint32(40, true) >= 1, "discard limits");
    assert.ok(v.getUint32(48, true) > 0 && v.getUint32(52, true) >= 1, "write-zeroes limits");
    const f = decodeU64(1, payloadOf(send(t.h, Request.GET_FEATURES, undefined, [], 1)));
    for (const b of [2, 6, 9, 11, 12, 13, 14]) assert.ok(f & bit(b), `blk feature ${b}`);
    assert.deepEqual(
      send(t.h, Request.SET_CONFIG, encodeConfig({ offset: 32, flags: 0, data: new Uint8Array([0]) }), [], 1),
      {},
    );
    const after = decodeConfig(24, payloadOf(send(t.h, Request.GET_CONFIG, req, [], 1)));
    assert.equal(after.data[32], 0, "the guest switched to writethrough");
  } finally {
    t.close();
    Deno.removeSync(disk.path);
  }
});

import assert from "node:assert/strict";
import { memfdCreate, Reactor, socketPair, type UnixSocket } from "../../ffi/mod.ts";
import { VhostUserConnection } from "./connection.ts";
import { RngDevice } from "./devices/rng.ts";
import { VhostUserHandler } from "./handler.ts";
import { decodeHeader, decodeU64, encodeMessage, Flags, HEADER_SIZE, Request } from "./message.ts";
import { Metrics } from "./metrics.ts";

const tick = () => new Promise((r) => setTimeout(r, 2));

/** One connection served on a running reactor; `client` is the front-end's end of a socketpair. */
async function withConnection(
  fn: (client: UnixSocket, closed: () => string | null) => Promise<void>,
): Promise<void> {
  const [server, client] = socketPair();
  const reactor = new Reactor();
  const device = new RngDevice();
  const handler = new VhostUserHandler(device, { reactor, metrics: new Metrics("rng", 1) }, {
    log: () => {},
  });
  let reason: string | null = null;
  const conn = new VhostUserConnection(server, handler, {
    reactor,
    log: () => {},
    onClose: (r) => reason = r,
  });
  const running = reactor.run();
  try {
    await fn(client, () => reason);
  } finally {
    conn.close();
    client.close();
    reactor.stop();
    await running;
    reactor.close();
  }
}

async function readReply(client: UnixSocket, size: number): Promise<Uint8Array<ArrayBuffer>> {
  const buf = new Uint8Array(size);
  let got = 0;
  for (let i = 0; i < 2000 && got < size; i++) {
    const r = client.recvMsg(buf.subarray(got));
    if (r === null) {
      await tick();
      continue;
    }
    for (const f of r.fds) f.close();
    if (r.bytes === 0) throw new Error("connection closed");
    got += r.bytes;
  }
  if (got < size) throw new Error(`reply: ${got} of ${size} bytes`);
  return buf;
}

async function waitClosed(closed: () => string | null): Promise<string> {
  for (let i = 0; i < 2000; i++) {
    const r = closed();
    if (r !== null) return r;
    await tick();
  }
  throw new Error("connection did not close");
}

Deno.test("connection assembles a message that arrives in pieces and replies once", async () => {
  await withConnection(async (client) => {
    const msg = encodeMessage(Request.GET_FEATURES, Flags.VERSION, new Uint8Array(0));
    const two = new Uint8Array([
      ...msg,
      ...encodeMessage(Request.GET_QUEUE_NUM, Flags.VERSION, new Uint8Array(0)),
    ]);
    for (const [a, b] of [[0, 5], [5, 11], [11, 12 + 7], [19, two.byteLength]]) {
      client.sendMsg(two.slice(a, b));
      await tick();
    }
    const r1 = await readReply(client, HEADER_SIZE + 8);
    assert.deepEqual(decodeHeader(r1), { request: Request.GET_FEATURES, flags: 0x5, size: 8 });
    const r2 = await readReply(client, HEADER_SIZE + 8);
    assert.equal(decodeU64(Request.GET_QUEUE_NUM, r2.subarray(HEADER_SIZE)), 1n);
  });
});

Deno.test("connection closes on a bad version or an oversized payload, never crashing", async () => {
  for (
    const bad of [
      encodeMessage(1, 0x2, new Uint8Array(0)),
      (() => {
        const m = encodeMessage(1, 1, new Uint8Array(0));
        new DataView(m.buffer).setUint32(8, 1 << 20, true);
        return m;
      })(),
    ]
  ) {
    await withConnection(async (client, closed) => {
      client.sendMsg(bad);
      assert.match(await waitClosed(closed), /version 2|exceeds/);
      const buf = new Uint8Array(16);
      let r = client.recvMsg(buf);
      for (let i = 0; r === null && i < 500; i++) {
        await tick();
        r = client.recvMsg(buf);
      }
      assert.equal(r?.bytes, 0, "the front-end sees end of file");
    });
  }
});

Deno.test("connection closes when a message carries more than 8 fds, closing them all", async () => {
  await withConnection(async (client, closed) => {
    const fds = Array.from({ length: 9 }, (_, i) => memfdCreate(`fd${i}`));
    try {
      // The default socket carries at most 8 fds per sendmsg; send 9 in two parts of one header.
      const msg = encodeMessage(Request.SET_OWNER, Flags.VERSION, new Uint8Array(0));
      client.sendMsg(msg.slice(0, 6), fds.slice(0, 8));
      client.sendMsg(msg.slice(6), fds.slice(8));
      assert.match(await waitClosed(closed), /9 fds with one message, at most 8/);
    } finally {
      for (const f of fds) f.close();
    }
  });
});

Deno.test("connection reports the front-end hanging up mid-message", async () => {
  await withConnection(async (client, closed) => {
    client.sendMsg(encodeMessage(Request.SET_FEATURES, Flags.VERSION, new Uint8Array(8)).slice(0, 14));
    await tick();
    client.shutdown();
    assert.match(await waitClosed(closed), /mid-message/);
  });
});

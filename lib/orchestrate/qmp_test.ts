import assert from "node:assert/strict";
import { Reactor, socketPair, type UnixSocket } from "../../ffi/mod.ts";
import { matchesExpectation, QmpClient, QmpClosedError, QmpError, type QmpEvent } from "./qmp.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

/** A scripted QMP server on the other end of a real socketpair (blocking reads on its end). */
function send(peer: UnixSocket, obj: unknown): void {
  const n = peer.sendMsg(enc.encode(JSON.stringify(obj) + "\r\n"));
  assert.ok(n !== null && n > 0);
}

const pendingText = new WeakMap<UnixSocket, string>();

/** Reads one line the client sent (keeps what came after it for the next call). */
async function readLine(peer: UnixSocket): Promise<Record<string, unknown>> {
  const buf = new Uint8Array(4096);
  let text = pendingText.get(peer) ?? "";
  while (!text.includes("\n")) {
    const got = peer.recvMsg(buf);
    if (got === null) {
      await new Promise((r) => setTimeout(r, 1));
      continue;
    }
    assert.ok(got.bytes > 0, "client closed the connection");
    text += dec.decode(buf.subarray(0, got.bytes));
  }
  const nl = text.indexOf("\n");
  pendingText.set(peer, text.slice(nl + 1));
  return JSON.parse(text.slice(0, nl));
}

const GREETING = {
  QMP: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: "test" }, capabilities: ["oob"] },
};

async function withClient(fn: (qmp: QmpClient, peer: UnixSocket) => Promise<void>): Promise<void> {
  const reactor = new Reactor();
  const running = reactor.run();
  const [a, b] = socketPair();
  const qmp = QmpClient.fromSocket(a, reactor, "test");
  try {
    await fn(qmp, b);
  } finally {
    qmp.close();
    b.close();
    reactor.stop();
    await running;
    reactor.close();
  }
}

Deno.test("qmp client reads the greeting, sends commands with ids and matches answers", async () => {
  await withClient(async (qmp, peer) => {
    send(peer, GREETING);
    const g = await qmp.greeting;
    assert.equal(g.version.qemu.minor, 2);
    const p1 = qmp.execute("qmp_capabilities");
    const p2 = qmp.execute("query-status");
    const m1 = await readLine(peer);
    assert.deepEqual(m1, { execute: "qmp_capabilities", id: 1 });
    const m2 = await readLine(peer);
    assert.deepEqual(m2, { execute: "query-status", id: 2 });
    // Answer out of order, with an event in between: each promise gets its own answer.
    send(peer, { return: { status: "running", running: true }, id: 2 });
    send(peer, { event: "RESUME", timestamp: { seconds: 1, microseconds: 2 } });
    send(peer, { return: {}, id: 1 });
    assert.deepEqual(await p1, {});
    assert.deepEqual(await p2, { status: "running", running: true });
  });
});

Deno.test("qmp client delivers events and sends arguments", async () => {
  await withClient(async (qmp, peer) => {
    const events: QmpEvent[] = [];
    const gotEvent = new Promise<void>((r) =>
      qmp.onEvent((e) => {
        events.push(e);
        r();
      })
    );
    send(peer, GREETING);
    await qmp.greeting;
    const p = qmp.execute("device_del", { id: "lsi0" });
    assert.deepEqual(await readLine(peer), { execute: "device_del", arguments: { id: "lsi0" }, id: 1 });
    send(peer, { event: "DEVICE_DELETED", data: { device: "lsi0" } });
    send(peer, { return: {}, id: 1 });
    await p;
    await gotEvent;
    assert.deepEqual(events, [{ event: "DEVICE_DELETED", data: { device: "lsi0" } }]);
  });
});

Deno.test("qmp client turns error answers into QmpError naming the command", async () => {
  await withClient(async (qmp, peer) => {
    send(peer, GREETING);
    await qmp.greeting;
    const p = qmp.execute("frobnicate");
    await readLine(peer);
    send(peer, {
      error: { class: "CommandNotFound", desc: "The command frobnicate has not been found" },
      id: 1,
    });
    await assert.rejects(p, (e: unknown) => {
      assert.ok(e instanceof QmpError);
      assert.equal(e.command, "frobnicate");
      assert.equal(e.errorClass, "CommandNotFound");
      assert.equal(e.message, "frobnicate: CommandNotFound: The command frobnicate has not been found");
      return true;
    });
  });
});

Deno.test("qmp client rejects the greeting and pending commands when the peer closes", async () => {
  await withClient(async (qmp, peer) => {
    peer.close();
    await assert.rejects(qmp.greeting, QmpClosedError);
    await qmp.closed;
    assert.ok(qmp.ended);
    await assert.rejects(qmp.execute("query-status"), /QMP connection test is closed/);
  });
  await withClient(async (qmp, peer) => {
    send(peer, GREETING);
    await qmp.greeting;
    const p = qmp.execute("quit");
    await readLine(peer);
    peer.close();
    await assert.rejects(
      p,
      (e: unknown) => e instanceof QmpClosedError && /quit: QEMU closed/.test(e.message),
    );
  });
});

Deno.test("qmp matchesExpectation compares the expected keys deeply", () => {
  assert.ok(matchesExpectation({ status: "running", running: true }, { status: "running" }));
  assert.ok(!matchesExpectation({ status: "paused" }, { status: "running" }));
  assert.ok(matchesExpectation({ a: { b: [1, 2] }, c: 1 }, { a: { b: [1, 2] } }));
  assert.ok(!matchesExpectation({ a: { b: [1] } }, { a: { b: [1, 2] } }));
  assert.ok(!matchesExpectation(null, { a: 1 }));
  assert.ok(matchesExpectation(3, 3));
});

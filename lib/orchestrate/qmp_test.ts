import assert from "node:assert/strict";
import { ErrnoError, Reactor, socketPair, type UnixSocket } from "../../ffi/mod.ts";
import {
  matchesExpectation,
  QMP_MAX_LINE_BYTES,
  QmpClient,
  QmpClosedError,
  QmpError,
  type QmpEvent,
  QmpProtocolError,
} from "./qmp.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

/** A scripted QMP server on the other end of a real socketpair (blocking reads on its end). */
function send(peer: UnixSocket, obj: unknown): void {
  const n = peer.sendMsg(enc.encode(JSON.stringify(obj) + "\r\n"));
  assert.ok(n !== null && n > 0);
}

const delay = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Sends raw bytes as the peer, waiting (and letting the reactor run) while the socket is full.
 * Returns how many bytes went out before the client closed its end (EPIPE/ECONNRESET), or all.
 */
async function sendRaw(peer: UnixSocket, bytes: Uint8Array<ArrayBuffer>): Promise<number> {
  let sent = 0;
  while (sent < bytes.byteLength) {
    let n: number | null;
    try {
      n = peer.sendMsg(bytes.subarray(sent));
    } catch (e) {
      if (e instanceof ErrnoError && (e.code === "EPIPE" || e.code === "ECONNRESET")) return sent;
      throw e;
    }
    if (n === null) await delay(1);
    else sent += n;
  }
  return sent;
}

/** Asserts `p` rejects with a QmpProtocolError whose message is exactly `message`. */
async function rejectsWithProtocolError(p: Promise<unknown>, message: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof QmpProtocolError, `expected a QmpProtocolError, got ${e}`);
    assert.ok(e instanceof QmpClosedError, "a protocol error is also a closed connection");
    assert.equal(e.message, message);
    return true;
  });
}

/**
 * Greets, starts `command`, then sends `line` as QEMU's next line (line 2): the command must be
 * rejected with `QMP protocol error on test: <what>`, the connection closed and the client unusable.
 */
async function expectViolation(line: string, what: string): Promise<void> {
  await withClient(async (qmp, peer) => {
    send(peer, GREETING);
    await qmp.greeting;
    const p = rejectsWithProtocolError(
      qmp.execute("query-status"),
      `query-status: QMP protocol error on test: ${what}`,
    );
    await readLine(peer);
    await sendRaw(peer, enc.encode(line + "\r\n"));
    await p;
    await qmp.closed;
    assert.ok(qmp.ended);
    assert.ok(qmp.endError instanceof QmpProtocolError);
    assert.equal(qmp.endError.message, `QMP protocol error on test: ${what}`);
    // Later commands are told why.
    await rejectsWithProtocolError(
      qmp.execute("query-name"),
      `query-name: QMP protocol error on test: ${what}`,
    );
    // mpq closed its end: the peer sees end of file.
    await readEof(peer);
  });
}

/** Waits until the client has closed its end of the socketpair. */
async function readEof(peer: UnixSocket): Promise<void> {
  const buf = new Uint8Array(4096);
  for (let i = 0; i < 5000; i++) {
    let got;
    try {
      got = peer.recvMsg(buf);
    } catch (e) {
      if (e instanceof ErrnoError && e.code === "ECONNRESET") return;
      throw e;
    }
    if (got !== null && got.bytes === 0) return;
    if (got === null) await delay(1);
  }
  assert.fail("the client did not close its end");
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

Deno.test("qmp client ends the connection on a JSON line that is not an object, naming the line and what it held", async () => {
  await expectViolation("[1,2]", "line 2: expected a JSON object, got an array: [1,2]");
  await expectViolation("42", "line 2: expected a JSON object, got a number: 42");
  await expectViolation('"x"', 'line 2: expected a JSON object, got a string: "x"');
  await expectViolation("null", "line 2: expected a JSON object, got null");
  await expectViolation("true", "line 2: expected a JSON object, got a boolean: true");
});

Deno.test("qmp client ends the connection on a line that is not JSON, quoting it (control characters escaped)", async () => {
  await expectViolation(
    '{"return": {}, oops\u001b[2J',
    'line 2: expected a JSON object, got text that is not JSON: "{\\"return\\": {}, oops\\u001b[2J"',
  );
  // Blank lines are skipped but counted.
  await withClient(async (qmp, peer) => {
    await sendRaw(peer, enc.encode("\r\n\nnot json at all\n"));
    await rejectsWithProtocolError(
      qmp.greeting,
      'QMP protocol error on test: line 3: expected a JSON object, got text that is not JSON: "not json at all"',
    );
  });
});

Deno.test("qmp client rejects the greeting with the protocol error when QEMU's first line is bad", async () => {
  await withClient(async (qmp, peer) => {
    const what = "QMP protocol error on test: line 1: expected a JSON object, got an array: []";
    // Sent before the greeting came.
    const p = rejectsWithProtocolError(qmp.execute("qmp_capabilities"), `qmp_capabilities: ${what}`);
    await sendRaw(peer, enc.encode("[]\n"));
    await rejectsWithProtocolError(qmp.greeting, what);
    await p;
  });
  await withClient(async (qmp, peer) => {
    send(peer, { QMP: { version: { qemu: { major: "7" } }, capabilities: "oob" } });
    await rejectsWithProtocolError(
      qmp.greeting,
      'QMP protocol error on test: line 1: expected the greeting {"QMP": {"version": {"qemu": {"major", "minor", ' +
        '"micro"}, "package"}, "capabilities": [...]}}, got {"QMP":{"version":{"qemu":{"major":"7"}},"capabilities":"oob"}}',
    );
  });
});

Deno.test("qmp client gives up on a line of more than QMP_MAX_LINE_BYTES without a newline, before reading it all", async () => {
  await withClient(async (qmp, peer) => {
    send(peer, GREETING);
    await qmp.greeting;
    const what = `line 2: more than ${QMP_MAX_LINE_BYTES} bytes (QMP_MAX_LINE_BYTES) without a newline; ` +
      "expected one JSON object per line";
    const p = rejectsWithProtocolError(
      qmp.execute("query-status"),
      `query-status: QMP protocol error on test: ${what}`,
    );
    await readLine(peer);
    // 20 MiB of a JSON string that never ends, in 1 MiB writes, as a runaway QEMU would send it.
    const total = 20 * 1024 * 1024;
    const chunk = new Uint8Array(1024 * 1024).fill(0x61);
    chunk.set(enc.encode('{"return": "'));
    let sent = 0;
    while (sent < total && !qmp.ended) sent += await sendRaw(peer, chunk);
    await p;
    assert.ok(qmp.ended);
    // It stopped reading at the bound: what it took is the bound plus at most one receive, and the
    // rest could not be sent at all (the peer's end is closed).
    assert.ok(sent < total, `the client read all ${sent} bytes instead of giving up at the bound`);
    assert.equal(await sendRaw(peer, chunk), 0, "the client's end is closed");
  });
});

Deno.test("qmp client reassembles a long answer arriving in pieces, and a line split across writes", async () => {
  await withClient(async (qmp, peer) => {
    send(peer, GREETING);
    await qmp.greeting;
    const p1 = qmp.execute("query-qmp-schema");
    const p2 = qmp.execute("query-status");
    await readLine(peer);
    await readLine(peer);
    const big = "x".repeat(3 * 1024 * 1024);
    const line = enc.encode(
      JSON.stringify({ return: { big }, id: 1 }) + "\r\n" + '{"return": {"status": "runn',
    );
    for (let i = 0; i < line.byteLength; i += 4096) await sendRaw(peer, line.slice(i, i + 4096));
    assert.deepEqual(await p1, { big });
    await sendRaw(peer, enc.encode('ing"}, "id": 2}\n'));
    assert.deepEqual(await p2, { status: "running" });
    assert.ok(!qmp.ended);
  });
});

Deno.test("qmp client ends the connection on replies and events of the wrong shape", async () => {
  const errorShape = 'expected "error" to be {"class": STRING, "desc": STRING}, got ';
  for (const error of ['"boom"', "null", "[]", '{"class": 1, "desc": "x"}', '{"class": "GenericError"}']) {
    const line = `{"error": ${error}, "id": 1}`;
    await expectViolation(line, `line 2: ${errorShape}${line}`);
  }
  // Even when the id matches nothing: the message itself is malformed.
  await expectViolation('{"error": 7, "id": 99}', `line 2: ${errorShape}{"error": 7, "id": 99}`);
  const eventShape = 'expected an event {"event": NAME, "data"?: {...}, "timestamp"?: {...}}, got ';
  for (
    const line of ['{"event": 5}', '{"event": "STOP", "data": [1]}', '{"event": "STOP", "timestamp": 3}']
  ) {
    await expectViolation(line, `line 2: ${eventShape}${line}`);
  }
  await expectViolation('{"id": 1}', 'line 2: expected an event, a "return" or an "error", got {"id": 1}');
  await expectViolation(
    JSON.stringify(GREETING),
    `line 2: expected an event, a "return" or an "error", got ${JSON.stringify(GREETING)}`,
  );
});

Deno.test("qmp client ignores answers to nobody (an unknown, missing or non-number id) and keeps working", async () => {
  await withClient(async (qmp, peer) => {
    send(peer, GREETING);
    await qmp.greeting;
    const p = qmp.execute("query-status");
    await readLine(peer);
    send(peer, { return: { status: "wrong" }, id: 42 });
    send(peer, { return: {}, id: "1" });
    send(peer, { return: {} });
    send(peer, { error: { class: "GenericError", desc: "JSON parse error, stray '}'" } });
    send(peer, { error: { class: "GenericError", desc: "not yours" }, id: 7 });
    send(peer, { return: { status: "running" }, id: 1 });
    assert.deepEqual(await p, { status: "running" });
    // The same id answered twice: the second answer goes to nobody.
    send(peer, { return: { status: "again" }, id: 1 });
    const q = qmp.execute("query-name");
    assert.deepEqual(await readLine(peer), { execute: "query-name", id: 2 });
    send(peer, { return: { name: "vm1" }, id: 2 });
    assert.deepEqual(await q, { name: "vm1" });
    assert.ok(!qmp.ended);
    assert.equal(qmp.endError, null);
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

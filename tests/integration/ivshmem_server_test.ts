/**
 * The ivshmem server in-process against raw protocol peers and the client library, over real
 * UNIX sockets with real shm objects and eventfds.
 */
import assert from "node:assert/strict";
import {
  EventFd,
  fstat,
  listenUnix,
  listOpenFds,
  mapShared,
  type OwnedFd,
  ownedFdCount,
} from "../../ffi/mod.ts";
import { IvshmemServer, ShmSizeMismatchError } from "../../lib/ivshmem/server.ts";
import { IvshmemClient, type IvshmemEvent } from "../../lib/ivshmem/client.ts";
import { encodeMessage } from "../../lib/ivshmem/protocol.ts";
import { closeAll, type RawMessage, RawPeer, scratch, TestServer } from "./ivshmem_helpers.ts";

/** [value, has fd] of each message. */
function shape(msgs: RawMessage[]): Array<[number, boolean]> {
  return msgs.map((m) => [Number(m.value), m.fd !== null]);
}

/** Whether ringing `sender` makes `receiver` readable with count 1: the two fds are one eventfd. */
function sameEventFd(sender: OwnedFd, receiver: OwnedFd): boolean {
  const s = new EventFd(sender.dup());
  const r = new EventFd(receiver.dup());
  try {
    r.drain();
    s.signal();
    return r.drain() === 1n;
  } finally {
    s.close();
    r.close();
  }
}

/** Runs `fn` with a server and checks every fd it made is closed afterwards. */
async function withServer(
  options: { vectors: number; size?: number; queueLimit?: number },
  fn: (t: TestServer, path: string) => Promise<void>,
): Promise<void> {
  const before = ownedFdCount();
  const fdsBefore = listOpenFds().length;
  const s = scratch();
  try {
    const t = new TestServer({
      socketPath: s.socketPath,
      shm: { name: s.shmName },
      size: options.size ?? 1 << 20,
      vectors: options.vectors,
      queueLimit: options.queueLimit,
    });
    try {
      await fn(t, s.socketPath);
    } finally {
      await t.close();
    }
    assert.throws(() => Deno.statSync(s.socketPath), Deno.errors.NotFound);
    assert.throws(() => Deno.statSync(`/dev/shm/${s.shmName}`), Deno.errors.NotFound);
  } finally {
    s.remove();
  }
  assert.equal(ownedFdCount(), before, "every OwnedFd is closed");
  assert.equal(listOpenFds().length, fdsBefore, "no fd left in /proc/self/fd");
}

Deno.test("ivshmem server sends version, id, shm, then others' and own vectors in contrib order", async () => {
  await withServer({ vectors: 2 }, async (_t, path) => {
    const a = new RawPeer(path);
    const aInit = await a.recvMany(5);
    assert.deepEqual(shape(aInit), [[0, false], [0, false], [-1, true], [0, true], [0, true]]);
    assert.equal(a.pending(), false);

    const b = new RawPeer(path);
    const bInit = await b.recvMany(7);
    assert.deepEqual(shape(bInit), [[0, false], [1, false], [-1, true], [0, true], [0, true], [1, true], [
      1,
      true,
    ]]);
    const aToldOfB = await a.recvMany(2);
    assert.deepEqual(shape(aToldOfB), [[1, true], [1, true]]);

    // The fds are the real objects: B's copies of A's vectors ring A's own, and the reverse.
    assert.ok(sameEventFd(bInit[3].fd!, aInit[3].fd!));
    assert.ok(sameEventFd(bInit[4].fd!, aInit[4].fd!));
    assert.ok(!sameEventFd(bInit[3].fd!, aInit[4].fd!));
    assert.ok(sameEventFd(aToldOfB[0].fd!, bInit[5].fd!));
    assert.ok(sameEventFd(aToldOfB[1].fd!, bInit[6].fd!));
    // One shared memory: what A writes B reads.
    {
      using ma = mapShared(aInit[2].fd!, 4096);
      using mb = mapShared(bInit[2].fd!, 4096);
      ma.bytes.set([1, 2, 3], 100);
      assert.deepEqual([...mb.bytes.subarray(100, 103)], [1, 2, 3]);
    }

    const c = new RawPeer(path);
    const cInit = await c.recvMany(9);
    assert.deepEqual(shape(cInit), [
      [0, false],
      [2, false],
      [-1, true],
      [0, true],
      [0, true],
      [1, true],
      [1, true],
      [2, true],
      [2, true],
    ]);
    const aToldOfC = await a.recvMany(2);
    const bToldOfC = await b.recvMany(2);
    assert.deepEqual(shape(aToldOfC), [[2, true], [2, true]]);
    assert.deepEqual(shape(bToldOfC), [[2, true], [2, true]]);
    assert.ok(sameEventFd(bToldOfC[1].fd!, cInit[8].fd!));
    assert.equal(a.pending() || b.pending() || c.pending(), false);
    for (const m of [aInit, bInit, cInit, aToldOfB, aToldOfC, bToldOfC]) closeAll(m);
    a.close();
    b.close();
    c.close();
  });
});

Deno.test("ivshmem server tells every remaining peer of a leave with the id and no fd", async () => {
  await withServer({ vectors: 1 }, async (t, path) => {
    const peers = [new RawPeer(path), new RawPeer(path), new RawPeer(path)];
    closeAll(await peers[0].recvMany(4));
    closeAll(await peers[1].recvMany(5));
    closeAll(await peers[2].recvMany(6));
    closeAll(await peers[0].recvMany(2)); // told of 1 and 2
    closeAll(await peers[1].recvMany(1)); // told of 2
    peers[1].close();
    assert.deepEqual(shape(await peers[0].recvMany(1)), [[1, false]]);
    assert.deepEqual(shape(await peers[2].recvMany(1)), [[1, false]]);
    await t.until(() => t.server.peerIds().length === 2, "peer 1 to be freed");
    assert.deepEqual(t.server.peerIds(), [0, 2]);
    peers[0].close();
    assert.deepEqual(shape(await peers[2].recvMany(1)), [[0, false]]);
    assert.equal(peers[2].pending(), false);
    peers[2].close();
  });
});

Deno.test("ivshmem server ids start at 0 and grow monotonically: a freed id is not handed out again", async () => {
  await withServer({ vectors: 1 }, async (t, path) => {
    const ids: number[] = [];
    const keep = new RawPeer(path);
    const first = await keep.recvMany(4);
    ids.push(Number(first[1].value));
    closeAll(first);
    for (let i = 0; i < 5; i++) {
      const p = new RawPeer(path);
      const init = await p.recvMany(5);
      ids.push(Number(init[1].value));
      closeAll(init);
      p.close();
      await t.until(() => t.server.peerIds().length === 1, "the peer to leave");
    }
    assert.deepEqual(ids, [0, 1, 2, 3, 4, 5]);
    keep.close();
  });
});

Deno.test("ivshmem server rounds the shm size up to a power of two", async () => {
  for (const [asked, want] of [[3 << 20, 4 << 20], [4096, 4096], [5000, 8192]]) {
    await withServer({ vectors: 1, size: asked }, async (t, path) => {
      assert.equal(t.server.size, want);
      const p = new RawPeer(path);
      const init = await p.recvMany(4);
      assert.equal(fstat(init[2].fd!).size, want);
      closeAll(init);
      p.close();
    });
  }
});

Deno.test("ivshmem server serves shared memory of 2 GiB and more (3 GiB rounds to 4 GiB)", async () => {
  await withServer({ vectors: 1, size: 3 * 2 ** 30 }, async (t, path) => {
    assert.equal(t.server.size, 4 * 2 ** 30);
    const p = new RawPeer(path);
    const init = await p.recvMany(4);
    assert.equal(fstat(init[2].fd!).size, 4 * 2 ** 30);
    // The far end of the object is usable (mapped at an offset past 2^32).
    using tail = mapShared(init[2].fd!, 4096, { offset: 4 * 2 ** 30 - 4096 });
    tail.bytes[4095] = 0x5a;
    assert.equal(tail.bytes[4095], 0x5a);
    closeAll(init);
    p.close();
  });
});

/** A recognisable pattern for `size` bytes of a pre-existing shm object. */
function pattern(size: number): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (i * 7 + 3) & 0xff;
  return b;
}

Deno.test("ivshmem server -M creates a missing object (0600, the rounded size) and removes it on close", async () => {
  const fdsBefore = listOpenFds().length;
  const s = scratch();
  try {
    const t = new TestServer({
      socketPath: s.socketPath,
      shm: { name: s.shmName },
      size: 3 << 20,
      vectors: 1,
    });
    try {
      const st = Deno.statSync(`/dev/shm/${s.shmName}`);
      assert.equal(st.size, 4 << 20);
      assert.equal(st.mode! & 0o777, 0o600);
      assert.ok(
        t.log.includes(`shm ${s.shmName}: created, ${4 << 20} bytes; removed on exit`),
        t.log.join("\n"),
      );
    } finally {
      await t.close();
    }
    assert.throws(() => Deno.statSync(`/dev/shm/${s.shmName}`), Deno.errors.NotFound);
  } finally {
    s.remove();
  }
  assert.equal(listOpenFds().length, fdsBefore, "no fd left");
});

Deno.test("ivshmem server -M leaves in place an object that replaced the one it created", async () => {
  const s = scratch();
  const path = `/dev/shm/${s.shmName}`;
  try {
    const t = new TestServer({ socketPath: s.socketPath, shm: { name: s.shmName }, size: 4096, vectors: 1 });
    try {
      // Someone removes the server's object and makes their own under the same name.
      Deno.removeSync(path);
      Deno.writeFileSync(path, pattern(8192), { createNew: true, mode: 0o600 });
    } finally {
      await t.close();
    }
    assert.deepEqual(Deno.readFileSync(path), pattern(8192), "theirs is still there, untouched");
    assert.ok(
      t.log.includes(
        `shm ${s.shmName} is another object now (not the one this server created): left in place`,
      ),
      t.log.join("\n"),
    );
  } finally {
    s.remove();
  }
});

Deno.test("ivshmem server -M uses an existing object of the requested size as it is and leaves it on close", async () => {
  const fdsBefore = listOpenFds().length;
  const s = scratch();
  const path = `/dev/shm/${s.shmName}`;
  const size = 1 << 20;
  try {
    Deno.writeFileSync(path, pattern(size), { createNew: true, mode: 0o640 });
    // 768 KiB rounds up to the object's 1 MiB: that is the size asked for.
    const t = new TestServer({
      socketPath: s.socketPath,
      shm: { name: s.shmName },
      size: 768 << 10,
      vectors: 1,
    });
    try {
      assert.equal(t.server.size, size);
      assert.ok(
        t.log.includes(
          `shm ${s.shmName}: exists with ${size} bytes; used as it is and left in place on exit`,
        ),
        t.log.join("\n"),
      );
      // Peers get that very object: its contents, and their writes land in it.
      const p = new RawPeer(s.socketPath);
      const init = await p.recvMany(4);
      {
        using m = mapShared(init[2].fd!, size);
        assert.deepEqual(m.bytes.slice(0, 64), pattern(size).slice(0, 64));
        assert.deepEqual(m.bytes.slice(size - 64), pattern(size).slice(size - 64));
        m.bytes.set([0xde, 0xad, 0xbe, 0xef], 4096);
      }
      closeAll(init);
      p.close();
    } finally {
      await t.close();
    }
    const st = Deno.statSync(path);
    assert.equal(st.size, size, "not resized");
    assert.equal(st.mode! & 0o777, 0o640, "its mode untouched");
    const want = pattern(size);
    want.set([0xde, 0xad, 0xbe, 0xef], 4096);
    assert.deepEqual(Deno.readFileSync(path), want, "contents intact (plus what the peer wrote)");
  } finally {
    s.remove();
  }
  assert.equal(listOpenFds().length, fdsBefore, "no fd left");
});

Deno.test("ivshmem server -M refuses an existing object of another size, naming it and both sizes, and leaves it unchanged", () => {
  const fdsBefore = listOpenFds().length;
  const s = scratch();
  const path = `/dev/shm/${s.shmName}`;
  const size = 64 << 10;
  try {
    Deno.writeFileSync(path, pattern(size), { createNew: true, mode: 0o600 });
    const cases: Array<[number, string]> = [
      [4 << 20, `expected ${4 << 20}`], // bigger: would grow it
      [4096, "expected 4096"], // smaller: would shrink it under whoever maps it
      [100 << 10, `expected ${128 << 10} (${100 << 10} rounded up to a power of two)`],
    ];
    for (const [asked, expected] of cases) {
      assert.throws(
        () =>
          IvshmemServer.open(null as never, {
            socketPath: s.socketPath,
            shm: { name: s.shmName },
            size: asked,
            vectors: 1,
          }),
        (e: unknown) => {
          assert.ok(e instanceof ShmSizeMismatchError);
          assert.equal(
            e.message,
            `shm object ${s.shmName} (${path}) already exists with ${size} bytes, ${expected}; ` +
              "mpq resizes only objects it creates: remove it or ask for its size",
          );
          assert.equal(e.actual, size);
          return true;
        },
      );
      assert.equal(Deno.statSync(path).size, size, "not resized");
      assert.deepEqual(Deno.readFileSync(path), pattern(size), "contents untouched");
      assert.throws(() => Deno.lstatSync(s.socketPath), Deno.errors.NotFound, "no socket left behind");
    }
  } finally {
    s.remove();
  }
  assert.equal(listOpenFds().length, fdsBefore, "no fd left");
});

Deno.test("ivshmem server with -m creates the file in the directory and unlinks it at once", async () => {
  const s = scratch();
  const shmDir = `${s.dir}/hugepages`;
  Deno.mkdirSync(shmDir);
  try {
    const t = new TestServer({ socketPath: s.socketPath, shm: { dir: shmDir }, size: 65536, vectors: 1 });
    try {
      assert.deepEqual([...Deno.readDirSync(shmDir)], []);
      const p = new RawPeer(s.socketPath);
      const init = await p.recvMany(4);
      assert.equal(fstat(init[2].fd!).size, 65536);
      closeAll(init);
      p.close();
    } finally {
      await t.close();
    }
    assert.throws(
      () =>
        new TestServer({
          socketPath: s.socketPath,
          shm: { dir: `${s.dir}/missing` },
          size: 4096,
          vectors: 1,
        }),
      /mkostemp .*missing: ENOENT/,
    );
  } finally {
    s.remove();
  }
});

Deno.test("ivshmem server vectors: 64 is the limit, each peer gets that many eventfds", async () => {
  const s = scratch();
  try {
    assert.throws(
      () => new TestServer({ socketPath: s.socketPath, shm: { name: s.shmName }, size: 4096, vectors: 65 }),
      /vectors must be 1..64: got 65/,
    );
    assert.throws(() => Deno.statSync(s.socketPath), Deno.errors.NotFound);
  } finally {
    s.remove();
  }
  await withServer({ vectors: 64 }, async (_t, path) => {
    const p = new RawPeer(path);
    const init = await p.recvMany(3 + 64);
    assert.ok(init.slice(3).every((m) => m.value === 0n && m.fd !== null));
    assert.equal(new Set(init.slice(3).map((m) => m.fd!.unsafeFd)).size, 64);
    assert.equal(p.pending(), false);
    closeAll(init);
    p.close();
  });
});

Deno.test("ivshmem server treats data from a peer as leaving: it is disconnected and others told", async () => {
  await withServer({ vectors: 1 }, async (_t, path) => {
    const a = new RawPeer(path);
    closeAll(await a.recvMany(4));
    const bad = new RawPeer(path);
    closeAll(await bad.recvMany(5));
    closeAll(await a.recvMany(1));
    assert.equal(bad.sock.sendMsg(encodeMessage(42)), 8);
    await bad.closedByServer();
    assert.deepEqual(shape(await a.recvMany(1)), [[1, false]]);
    bad.close();
    a.close();
  });
});

Deno.test("ivshmem server keeps serving when peers vanish during their own setup", async () => {
  await withServer({ vectors: 2 }, async (t, path) => {
    const a = new RawPeer(path);
    closeAll(await a.recvMany(5));
    // Connect and hang up at once, many times: sends to them fail mid-join.
    for (let i = 0; i < 20; i++) new RawPeer(path).close();
    await t.until(() => t.server.stats.left === 20, "20 vanished peers to be freed");
    // A saw each one join (2 fds) and leave (no fd), in that order, nothing lost.
    const seenMsgs = await a.recvMany(20 * 3);
    const seen = shape(seenMsgs);
    closeAll(seenMsgs);
    for (let i = 0; i < 20; i++) {
      const id = i + 1;
      assert.deepEqual(seen.slice(3 * i, 3 * i + 3), [[id, true], [id, true], [id, false]]);
    }
    const b = new RawPeer(path);
    const bInit = await b.recvMany(3 + 2 + 2);
    assert.deepEqual(shape(bInit).slice(0, 3), [[0, false], [21, false], [-1, true]]);
    closeAll(bInit);
    closeAll(await a.recvMany(2));
    a.close();
    b.close();
  });
});

Deno.test("ivshmem server disconnects a peer that stops reading, without stalling or losing for others", async () => {
  await withServer({ vectors: 1, queueLimit: 16 }, async (t, path) => {
    const stuck = new RawPeer(path); // never reads
    const reader = new RawPeer(path);
    closeAll(await reader.recvMany(3 + 1 + 1));
    const got: Array<[number, boolean]> = [];
    let done = false;
    const reading = (async () => {
      while (true) {
        const m = await reader.recvUnless(() => done);
        if (m === null) return;
        m.fd?.close();
        got.push([Number(m.value), m.fd !== null]);
      }
    })();
    let churn = 0;
    while (t.server.stats.slow === 0) {
      assert.ok(churn < 5000, "the stuck peer was never disconnected");
      const p = new RawPeer(path);
      closeAll(await p.recvJoin(1));
      p.close();
      churn++;
      await t.until(() => t.server.peerIds().length <= 3, "a churn peer to leave");
    }
    await t.until(() => t.server.peerIds().length === 1, "only the reader to be left");
    done = true;
    await reading;
    await stuck.closedByServer();
    assert.ok(churn > 16, `the socket buffer took some messages before the queue: ${churn} churns`);
    assert.ok(
      t.log.some((l) => /peer 0: not reading, 17 messages queued; disconnecting it/.test(l)),
      t.log.join("\n"),
    );
    // The reader saw every churn peer (ids 2..) join with its fd then leave, and the stuck peer leave.
    const expected: Array<[number, boolean]> = [];
    for (let id = 2; id < 2 + churn; id++) expected.push([id, true], [id, false]);
    const stuckLeave = got.findIndex(([v, fd]) => v === 0 && !fd);
    assert.ok(stuckLeave >= 0, "the reader was told the stuck peer left");
    assert.deepEqual(got.filter((_, i) => i !== stuckLeave), expected);
    assert.equal(t.server.stats.slow, 1);
    stuck.close();
    reader.close();
  });
});

Deno.test("ivshmem server keeps a departed peer's eventfds for messages still queued to a slow reader", async () => {
  await withServer({ vectors: 2 }, async (t, path) => {
    const slow = new RawPeer(path);
    closeAll(await slow.recvJoin(2));
    // Churn until the slow peer's socket is full and the server queues for it.
    let churn = 0;
    while (t.server.stats.queued === 0) {
      assert.ok(churn < 5000, "the socket never filled");
      const p = new RawPeer(path);
      closeAll(await p.recvJoin(2));
      p.close();
      churn++;
      await t.until(() => t.server.peerIds().length === 1, "a churn peer to leave");
    }
    // This peer's join messages to the slow peer wait in the queue; it leaves before they go out.
    const gone = new RawPeer(path);
    const goneInit = await gone.recvJoin(2);
    const goneId = Number(goneInit[1].value);
    const ownOfGone = goneInit.slice(-2).map((m) => m.fd!);
    gone.close();
    await t.until(() => t.server.peerIds().length === 1, "the peer to leave");
    // Now read everything: every join comes with live eventfds, each followed by its leave.
    const seen: Array<[number, boolean]> = [];
    let ringsGone = false;
    while (true) {
      const m = await slow.recvUnless(() =>
        seen.length > 0 && seen.at(-1)![0] === goneId && !seen.at(-1)![1]
      );
      if (m === null) break;
      seen.push([Number(m.value), m.fd !== null]);
      if (m.fd) {
        if (Number(m.value) === goneId) ringsGone ||= sameEventFd(m.fd, ownOfGone[0]);
        m.fd.close();
      }
    }
    closeAll(goneInit);
    const expected: Array<[number, boolean]> = [];
    for (let id = 1; id <= churn + 1; id++) expected.push([id, true], [id, true], [id, false]);
    assert.deepEqual(seen, expected);
    assert.ok(ringsGone, "the queued fd is the departed peer's own eventfd");
    slow.close();
  });
});

Deno.test("ivshmem client library: join events, notifications both ways, shared memory, leave", async () => {
  await withServer({ vectors: 2, size: 65536 }, async (t, path) => {
    const a = await IvshmemClient.connect(t.reactor, path);
    assert.deepEqual(await a.next(), { event: "joined", id: 0, vectors: 2, peers: [], shmSize: 65536 });
    const b = await IvshmemClient.connect(t.reactor, path);
    assert.deepEqual(await b.next(), { event: "joined", id: 1, vectors: 2, peers: [0], shmSize: 65536 });
    assert.deepEqual(await a.next(), { event: "peer-joined", peer: 1, vectors: 2 });
    assert.deepEqual(b.peers(), new Map([[0, 2]]));

    b.notify(0, 1);
    assert.deepEqual(await a.next(), { event: "notification", vector: 1, count: 1 });
    a.notifyAll(1);
    const got: IvshmemEvent[] = [await b.next(), await b.next()];
    assert.deepEqual(
      got.sort((x, y) => JSON.stringify(x).localeCompare(JSON.stringify(y))),
      [{ event: "notification", vector: 0, count: 1 }, { event: "notification", vector: 1, count: 1 }],
    );
    assert.throws(() => a.notify(7, 0), /cannot find peer_id = 7 \(known: 1\)/);
    assert.throws(() => a.notify(1, 2), /invalid vector 2 on peer 1: it has 2/);

    a.write(65530, new Uint8Array([9, 8, 7]));
    assert.deepEqual([...b.read(65530, 3)], [9, 8, 7]);
    assert.throws(() => b.read(65535, 2), /past the end of the shared memory \(65536 bytes\)/);
    assert.equal(
      a.dump(),
      [
        "our_id = 0",
        "  vector 0 is enabled",
        "  vector 1 is enabled",
        "peer_id = 1",
        "  vector 0 is enabled",
        "  vector 1 is enabled",
      ]
        .join("\n"),
    );

    b.close();
    assert.deepEqual(await a.next(), { event: "peer-left", peer: 1 });
    assert.deepEqual(a.peers(), new Map());
    a.close();
  });
});

Deno.test("ivshmem client library reports a disconnect when the server closes", async () => {
  const s = scratch();
  const t = new TestServer({ socketPath: s.socketPath, shm: { name: s.shmName }, size: 4096, vectors: 1 });
  try {
    const c = await IvshmemClient.connect(t.reactor, s.socketPath);
    await c.next();
    t.server.close();
    assert.deepEqual(await c.next(), { event: "disconnected", reason: "server closed the connection" });
    c.close();
  } finally {
    await t.close();
    s.remove();
  }
});

Deno.test("ivshmem server open refuses a live server on the path and replaces a stale socket", async () => {
  const s = scratch();
  try {
    const t = new TestServer({ socketPath: s.socketPath, shm: { name: s.shmName }, size: 4096, vectors: 1 });
    try {
      assert.throws(
        () =>
          new TestServer({
            socketPath: s.socketPath,
            shm: { name: s.shmName },
            size: 4096,
            vectors: 1,
          }),
        /another server is listening there/,
      );
      // The live server's shm object is untouched.
      assert.equal(Deno.statSync(`/dev/shm/${s.shmName}`).size, 4096);
    } finally {
      await t.close();
    }
    // A stale socket file (nobody listening) is replaced.
    const stale = listenUnix(s.socketPath);
    stale.fd.close(); // the fd goes, the socket file stays: what a killed server leaves behind
    assert.ok(Deno.lstatSync(s.socketPath).isSocket, "the stale socket file is there");
    const again = new TestServer({
      socketPath: s.socketPath,
      shm: { name: s.shmName },
      size: 4096,
      vectors: 1,
    });
    const p = new RawPeer(s.socketPath);
    closeAll(await p.recvMany(4));
    p.close();
    await again.close();
  } finally {
    s.remove();
  }
});

Deno.test("ivshmem server open names the socket path when its directory is unusable", () => {
  const s = scratch();
  try {
    assert.throws(
      () =>
        IvshmemServer.open(null as never, {
          socketPath: `${s.dir}/no/such/dir/sock`,
          shm: { name: s.shmName },
          size: 4096,
          vectors: 1,
        }),
      /bind .*no\/such\/dir\/sock: ENOENT/,
    );
    assert.throws(() => Deno.statSync(`/dev/shm/${s.shmName}`), Deno.errors.NotFound);
  } finally {
    s.remove();
  }
});

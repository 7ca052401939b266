import assert from "node:assert/strict";
import { ErrnoError } from "./errno.ts";
import { listOpenFds, OwnedFd } from "./fd.ts";
import { fstat, ftruncate, mapShared, memfdCreate } from "./memory.ts";
import {
  adoptListener,
  connectUnix,
  listenUnix,
  MAX_FDS_PER_MESSAGE,
  socketPair,
  UnixSocket,
} from "./socket.ts";

function recvAll(s: UnixSocket, buf: Uint8Array<ArrayBuffer>) {
  const r = s.recvMsg(buf);
  assert.ok(r, "a message was ready");
  return r;
}

Deno.test("socket sendMsg/recvMsg carry bytes and a memfd: the received fd maps the same memory", () => {
  const [a, b] = socketPair();
  const mem = memfdCreate("pass-me");
  try {
    ftruncate(mem, 8192);
    using region = mapShared(mem, 8192);
    region.bytes.set(new TextEncoder().encode("hello through SCM_RIGHTS"), 4096);
    assert.equal(a.sendMsg(new Uint8Array([42, 43]), [mem]), 2);
    const buf = new Uint8Array(16);
    const got = recvAll(b, buf);
    assert.equal(got.bytes, 2);
    assert.deepEqual([...buf.subarray(0, 2)], [42, 43]);
    assert.equal(got.fds.length, 1);
    const [recv] = got.fds;
    try {
      assert.notEqual(recv.unsafeFd, mem.unsafeFd);
      assert.equal(recv.closeOnExec, true, "MSG_CMSG_CLOEXEC");
      assert.equal(fstat(recv).size, 8192);
      using view = mapShared(recv, 8192);
      assert.equal(
        new TextDecoder().decode(view.bytes.subarray(4096, 4096 + 24)),
        "hello through SCM_RIGHTS",
      );
      view.bytes[0] = 7; // and writes go back the other way
      assert.equal(region.bytes[0], 7);
    } finally {
      recv.close();
    }
  } finally {
    mem.close();
    a.close();
    b.close();
  }
});

Deno.test("socket one message carries up to maxFds fds, in order", () => {
  const n = 16;
  const [a, b] = socketPair({ maxFds: n });
  const mems = Array.from({ length: n }, (_, i) => {
    const m = memfdCreate(`fd-${i}`);
    ftruncate(m, 4096 * (i + 1));
    return m;
  });
  try {
    assert.equal(a.sendMsg(new Uint8Array([1]), mems), 1);
    const got = recvAll(b, new Uint8Array(1));
    assert.equal(got.fds.length, n);
    got.fds.forEach((f, i) => assert.equal(fstat(f).size, 4096 * (i + 1)));
    for (const f of got.fds) f.close();
    assert.throws(
      () => a.sendMsg(new Uint8Array([1]), [...mems, mems[0]]),
      /17 fds, this socket carries at most 16/,
    );
  } finally {
    for (const m of mems) m.close();
    a.close();
    b.close();
  }
  assert.equal(MAX_FDS_PER_MESSAGE, 253);
});

Deno.test("socket MSG_CTRUNC: more fds than the receiver's maxFds throws EMSGSIZE and leaks no fd", () => {
  const before = listOpenFds();
  const [a, b] = socketPair({ maxFds: 8 });
  const small = new UnixSocket(b.fd, { maxFds: 2 }); // the same connection, room for 2 fds only
  const mems = Array.from({ length: 5 }, (_, i) => memfdCreate(`ctrunc-${i}`));
  try {
    assert.equal(a.sendMsg(new Uint8Array([5]), mems), 1);
    const during = listOpenFds();
    assert.throws(
      () => small.recvMsg(new Uint8Array(4)),
      (e: unknown) =>
        e instanceof ErrnoError && e.code === "EMSGSIZE" && e.syscall === "recvmsg" &&
        /MSG_CTRUNC/.test(e.message),
    );
    assert.deepEqual(listOpenFds(), during, "the fds that did arrive were closed");
    // The connection still works afterwards.
    assert.equal(a.sendMsg(new Uint8Array([6]), mems.slice(0, 2)), 1);
    const ok = small.recvMsg(new Uint8Array(4));
    assert.ok(ok);
    assert.equal(ok.fds.length, 2);
    for (const f of ok.fds) f.close();
  } finally {
    for (const m of mems) m.close();
    a.close();
    small.close();
  }
  assert.deepEqual(listOpenFds(), before);
});

Deno.test("socket recvMsg returns null when nothing is ready and bytes 0 when the peer closed", () => {
  const [a, b] = socketPair();
  try {
    assert.equal(b.recvMsg(new Uint8Array(4)), null);
    a.close();
    assert.deepEqual(b.recvMsg(new Uint8Array(4)), { bytes: 0, fds: [] });
  } finally {
    a.close();
    b.close();
  }
});

Deno.test("socket sendMsg of nothing is a no-op; fds without a data byte are refused, not dropped", () => {
  const [a, b] = socketPair();
  const mem = memfdCreate("needs-a-byte");
  try {
    assert.equal(a.sendMsg(new Uint8Array(0)), 0);
    assert.equal(b.recvMsg(new Uint8Array(4)), null, "nothing was sent");
    assert.throws(() => a.sendMsg(new Uint8Array(0), [mem]), /1 fd\(s\) need at least one data byte/);
  } finally {
    mem.close();
    a.close();
    b.close();
  }
});

function tempSock(): { dir: string; path: string } {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-sock-" });
  return { dir, path: `${dir}/s` };
}

Deno.test("listenUnix accepts a connection, creates the socket 0600 and unlinks it on close", () => {
  const { dir, path } = tempSock();
  try {
    const l = listenUnix(path);
    try {
      assert.equal(Deno.lstatSync(path).mode! & 0o777, 0o600);
      assert.equal(l.accept(), null, "nothing pending");
      const c = connectUnix(path);
      const s = l.accept();
      assert.ok(s);
      try {
        assert.equal(c.sendMsg(new Uint8Array([1, 2, 3])), 3);
        const buf = new Uint8Array(8);
        assert.equal(s.recvMsg(buf)?.bytes, 3);
      } finally {
        c.close();
        s.close();
      }
    } finally {
      l.close();
    }
    assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
    const m = listenUnix(path, { mode: 0o660 });
    assert.equal(Deno.lstatSync(path).mode! & 0o777, 0o660);
    m.close();
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("listenUnix replaces a stale socket file and refuses a live server's path", () => {
  const { dir, path } = tempSock();
  try {
    const first = listenUnix(path);
    first.fd.close(); // dies without unlinking: a stale socket file remains
    assert.ok(Deno.lstatSync(path).isSocket);
    assert.throws(
      () => connectUnix(path),
      (e: unknown) => e instanceof ErrnoError && e.code === "ECONNREFUSED",
    );
    const second = listenUnix(path);
    try {
      connectUnix(path).close(); // it is live now
      assert.throws(
        () => listenUnix(path),
        (e: unknown) =>
          e instanceof ErrnoError && e.code === "EADDRINUSE" && e.message.includes(`${path}: another server`),
      );
      assert.ok(second.accept(), "the live server was left alone and still accepts");
    } finally {
      second.close();
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("listenUnix refuses a path that is not a socket, and a path too long for sun_path", () => {
  const { dir, path } = tempSock();
  try {
    Deno.writeTextFileSync(path, "not a socket");
    assert.throws(() => listenUnix(path), /exists and is not a socket/);
    assert.equal(Deno.readTextFileSync(path), "not a socket", "the file was not removed");
    const long = `${dir}/${"x".repeat(120)}`;
    assert.throws(
      () => listenUnix(long),
      (e: unknown) => e instanceof ErrnoError && e.code === "ENAMETOOLONG",
    );
    assert.throws(
      () => connectUnix(`${dir}/missing`),
      (e: unknown) => e instanceof ErrnoError && e.code === "ENOENT",
    );
    assert.throws(
      () => listenUnix("/nonexistent-mpq-dir/s"),
      (e: unknown) => e instanceof ErrnoError && e.syscall === "bind" && e.code === "ENOENT",
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("socket a received fd can be passed on again (fd re-send keeps the object)", () => {
  const [a, b] = socketPair();
  const [c, d] = socketPair();
  const mem = memfdCreate("relay");
  let relayed: OwnedFd[] = [];
  try {
    ftruncate(mem, 12288);
    a.sendMsg(new Uint8Array([1]), [mem]);
    const got = recvAll(b, new Uint8Array(1));
    c.sendMsg(new Uint8Array([2]), got.fds);
    for (const f of got.fds) f.close();
    relayed = recvAll(d, new Uint8Array(1)).fds;
    assert.equal(fstat(relayed[0]).size, 12288);
  } finally {
    for (const f of relayed) f.close();
    for (const s of [a, b, c, d]) s.close();
    mem.close();
  }
});

Deno.test("adoptListener serves an inherited listening socket and leaves its path alone on close", () => {
  const { dir, path } = tempSock();
  const owner = listenUnix(path);
  try {
    const adopted = adoptListener(owner.fd.dup(0, "inherited listener"));
    assert.equal(adopted.path, null);
    const c = connectUnix(path);
    const s = adopted.accept();
    assert.ok(s, "a connection to the path arrives on the adopted fd");
    s.close();
    c.close();
    adopted.close();
    assert.ok(Deno.lstatSync(path).isSocket, "closing the adopted listener does not unlink the path");
  } finally {
    owner.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("socket shutdown makes the peer read end of file; a second shutdown is harmless", () => {
  const [a, b] = socketPair();
  try {
    a.sendMsg(new Uint8Array([1]));
    a.shutdown();
    a.shutdown();
    assert.equal(b.recvMsg(new Uint8Array(4))?.bytes, 1, "data sent before shutdown still arrives");
    assert.equal(b.recvMsg(new Uint8Array(4))?.bytes, 0);
    assert.throws(
      () => a.sendMsg(new Uint8Array([2])),
      (e: unknown) => e instanceof ErrnoError && e.code === "EPIPE",
    );
  } finally {
    a.close();
    b.close();
  }
});

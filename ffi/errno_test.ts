import assert from "node:assert/strict";
import { Errno, ErrnoError, errnoName } from "./errno.ts";
import { OpenFlags, openPath } from "./fd.ts";
import { socketPair } from "./socket.ts";

Deno.test("errno a failing open carries the syscall, errno number, errno name and the path", () => {
  assert.throws(() => openPath("/nonexistent-mpq-dir/file", OpenFlags.O_RDONLY), (e: unknown) => {
    assert.ok(e instanceof ErrnoError);
    assert.equal(e.syscall, "open");
    assert.equal(e.errno, 2);
    assert.equal(e.code, "ENOENT");
    assert.equal(e.name, "ErrnoError");
    assert.match(e.message, /^open \/nonexistent-mpq-dir\/file: ENOENT \(errno 2\)$/);
    return true;
  });
});

Deno.test("errno EISDIR and EEXIST from real calls are named", () => {
  assert.throws(
    () => openPath("/", OpenFlags.O_WRONLY),
    (e: unknown) => e instanceof ErrnoError && e.code === "EISDIR",
  );
  const dir = Deno.makeTempDirSync();
  try {
    openPath(`${dir}/f`, OpenFlags.O_CREAT | OpenFlags.O_WRONLY).close();
    assert.throws(
      () => openPath(`${dir}/f`, OpenFlags.O_CREAT | OpenFlags.O_EXCL | OpenFlags.O_WRONLY),
      (e: unknown) => e instanceof ErrnoError && e.errno === Errno.EEXIST && e.syscall === "open",
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("errno sending to a closed peer is EPIPE (no SIGPIPE kills the test)", () => {
  const [a, b] = socketPair();
  b.close();
  try {
    assert.throws(
      () => a.sendMsg(new Uint8Array([1])),
      (e: unknown) => e instanceof ErrnoError && e.code === "EPIPE" && e.syscall === "sendmsg",
    );
  } finally {
    a.close();
  }
});

Deno.test("errno names known numbers and falls back to E<n>", () => {
  assert.equal(errnoName(11), "EAGAIN");
  assert.equal(errnoName(32), "EPIPE");
  assert.equal(errnoName(Errno.ECONNREFUSED), "ECONNREFUSED");
  assert.equal(errnoName(4095), "E4095");
  for (const [name, n] of Object.entries(Errno)) assert.equal(errnoName(n), name);
});

import assert from "node:assert/strict";
import { Errno, ErrnoError } from "./errno.ts";
import { EventFd } from "./eventfd.ts";
import { fdKind, listOpenFds, OpenFlags, openPath, OwnedFd, ownedFdCount, pipe } from "./fd.ts";
import { fstat, memfdCreate, mkstempIn, ShmFlags, shmOpen, shmUnlink } from "./memory.ts";
import { listenUnix, socketPair } from "./socket.ts";

/** The kernel's view of O_CLOEXEC for an fd of this process (flags line of /proc/self/fdinfo). */
function kernelCloexec(fd: OwnedFd): boolean {
  const flags = /flags:\s+([0-7]+)/.exec(Deno.readTextFileSync(`/proc/self/fdinfo/${fd.unsafeFd}`))![1];
  return (parseInt(flags, 8) & 0o2000000) !== 0;
}

Deno.test("OwnedFd close runs once: a second close does not close a reused fd number", () => {
  const a = memfdCreate("close-once-a");
  const n = a.unsafeFd;
  a.close();
  assert.equal(a.closed, true);
  const b = memfdCreate("close-once-b"); // the kernel hands out the lowest free number: n again
  try {
    assert.equal(b.unsafeFd, n);
    a.close();
    a[Symbol.dispose]();
    assert.equal(fstat(b).size, 0, "b is still open after a's extra closes");
    assert.ok(listOpenFds().includes(n));
  } finally {
    b.close();
  }
});

Deno.test("OwnedFd use after close throws EBADF naming the fd's label", () => {
  const fd = memfdCreate("use-after-close");
  fd.close();
  assert.throws(
    () => fd.unsafeFd,
    (e: unknown) =>
      e instanceof ErrnoError && e.errno === Errno.EBADF && /memfd use-after-close/.test(e.message),
  );
  assert.throws(() => fstat(fd), (e: unknown) => e instanceof ErrnoError && e.code === "EBADF");
  assert.throws(() => fd.read(new Uint8Array(1)), ErrnoError);
});

Deno.test("OwnedFd ownedFdCount follows opens and closes; unsafeRelease gives up ownership", () => {
  const before = ownedFdCount();
  const fd = memfdCreate("count");
  assert.equal(ownedFdCount(), before + 1);
  const raw = fd.unsafeRelease();
  assert.equal(ownedFdCount(), before);
  assert.ok(listOpenFds().includes(raw), "release does not close");
  OwnedFd.unsafeAdopt(raw, "re-adopted").close();
  assert.equal(ownedFdCount(), before);
  assert.ok(!listOpenFds().includes(raw));
  assert.throws(() => OwnedFd.unsafeAdopt(-1), /not an fd: -1/);
});

Deno.test("OwnedFd every fd the ffi makes is CLOEXEC by default, as the kernel sees it", () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-cloexec-" });
  const made: Array<{ close(): void }> = [];
  try {
    const mem = memfdCreate("cloexec");
    made.push(mem);
    const dup = mem.dup(20);
    made.push(dup);
    const file = openPath(`${dir}/f`, OpenFlags.O_CREAT | OpenFlags.O_RDWR);
    made.push(file);
    const tmp = mkstempIn(dir, "x");
    made.push(tmp.fd);
    const shmName = `mpq-cloexec-${Deno.pid}`;
    const shm = shmOpen(shmName, ShmFlags.O_CREAT | ShmFlags.O_EXCL | ShmFlags.O_RDWR);
    made.push(shm, { close: () => shmUnlink(shmName) });
    const ev = new EventFd();
    made.push(ev);
    const [a, b] = socketPair();
    made.push(a, b);
    const l = listenUnix(`${dir}/sock`);
    made.push(l);
    for (const fd of [mem, dup, file, tmp.fd, shm, ev.fd, a.fd, b.fd, l.fd]) {
      assert.equal(fd.closeOnExec, true, fd.label);
      assert.equal(kernelCloexec(fd), true, fd.label);
    }
    assert.ok(dup.unsafeFd >= 20);
    dup.setCloseOnExec(false);
    assert.equal(kernelCloexec(dup), false);
  } finally {
    for (const m of made.reverse()) m.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("OwnedFd setNonBlocking toggles O_NONBLOCK: read returns null instead of blocking", () => {
  const [a, b] = socketPair({ nonBlocking: false });
  try {
    a.fd.setNonBlocking(true);
    assert.equal(a.fd.read(new Uint8Array(4)), null);
    b.fd.write(new Uint8Array([9, 8]));
    const buf = new Uint8Array(4);
    assert.equal(a.fd.read(buf), 2);
    assert.deepEqual([...buf.subarray(0, 2)], [9, 8]);
    b.close();
    assert.equal(a.fd.read(buf), 0, "end of file once the peer closed");
  } finally {
    a.close();
    b.close();
  }
});

Deno.test("fdKind names eventfds, sockets, pipes, memfds, directories and devices", () => {
  using ev = new EventFd();
  using mem = memfdCreate("kind");
  using dir = openPath("/tmp", OpenFlags.O_RDONLY);
  using dev = openPath("/dev/null", OpenFlags.O_RDWR);
  const [a, b] = socketPair();
  const [r, w] = pipe();
  const p = Deno.makeTempFileSync();
  using file = openPath(p, OpenFlags.O_RDWR);
  try {
    assert.equal(fdKind(ev.fd), "eventfd");
    assert.equal(fdKind(a.fd), "socket");
    assert.equal(fdKind(mem), "regular file");
    assert.equal(fdKind(file), "regular file");
    assert.equal(fdKind(dir), "directory");
    assert.equal(fdKind(dev), "character device");
    assert.equal(fdKind(r), "pipe");
    assert.equal(fdKind(w), "pipe");
  } finally {
    r.close();
    w.close();
    a.close();
    b.close();
    Deno.removeSync(p);
  }
});

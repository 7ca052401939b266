import assert from "node:assert/strict";
import { ErrnoError } from "./errno.ts";
import { listOpenFds } from "./fd.ts";
import {
  fstat,
  ftruncate,
  mapShared,
  memfdCreate,
  mkstempIn,
  sealedAgainstShrink,
  sealSize,
  ShmFlags,
  shmOpen,
  shmUnlink,
} from "./memory.ts";

Deno.test("memory memfd: ftruncate sets the size fstat reports; two mappings share bytes", () => {
  using fd = memfdCreate("mem-test");
  assert.equal(fstat(fd).size, 0);
  ftruncate(fd, 3 * 4096);
  const st = fstat(fd);
  assert.equal(st.size, 3 * 4096);
  assert.equal(st.mode & 0o170000, 0o100000, "a regular file");
  assert.match(Deno.readLinkSync(`/proc/self/fd/${fd.unsafeFd}`), /^\/memfd:mem-test/);
  using a = mapShared(fd, 3 * 4096);
  using b = mapShared(fd, 4096, { offset: 8192 });
  assert.equal(a.bytes.byteLength, 3 * 4096);
  a.bytes[8192 + 5] = 0x5a;
  assert.equal(b.bytes[5], 0x5a);
  b.bytes[6] = 0xa5;
  assert.equal(a.bytes[8192 + 6], 0xa5);
});

Deno.test("memory a read-only mapping and a large sparse size (3 GiB) work", () => {
  using fd = memfdCreate("big");
  ftruncate(fd, 3n * 1024n ** 3n);
  assert.equal(fstat(fd).size, 3 * 1024 ** 3);
  using ro = mapShared(fd, 4096, { readOnly: true, offset: 2n * 1024n ** 3n });
  assert.equal(ro.bytes[0], 0);
});

Deno.test("memory MappedRegion close unmaps once; its address is unusable afterwards", () => {
  using fd = memfdCreate("unmap");
  ftruncate(fd, 4096);
  const r = mapShared(fd, 4096);
  assert.ok(r.unsafeAddress > 0n);
  r.close();
  r.close();
  assert.equal(r.closed, true);
  assert.throws(() => r.unsafeAddress, /unmapped region/);
});

Deno.test("memory mapShared rejects bad sizes and names the fd in mmap errors", () => {
  using fd = memfdCreate("bad-map");
  assert.throws(() => mapShared(fd, 0), /mmap size must be > 0: got 0/);
  assert.throws(() => mapShared(fd, 1.5), RangeError);
  assert.throws(
    () => mapShared(fd, 4096, { offset: 1 }),
    (e: unknown) => e instanceof ErrnoError && e.code === "EINVAL" && e.message.includes("memfd bad-map"),
  );
});

Deno.test("memory shm_open creates /dev/shm/NAME, O_EXCL refuses a second create, shm_unlink removes it", () => {
  const name = `mpq-test-${Deno.pid}-${Math.random().toString(16).slice(2)}`;
  const fd = shmOpen(name, ShmFlags.O_CREAT | ShmFlags.O_EXCL | ShmFlags.O_RDWR);
  try {
    ftruncate(fd, 65536);
    assert.equal(Deno.statSync(`/dev/shm/${name}`).size, 65536);
    assert.equal(Deno.statSync(`/dev/shm/${name}`).mode! & 0o777, 0o600);
    assert.throws(
      () => shmOpen(`/${name}`, ShmFlags.O_CREAT | ShmFlags.O_EXCL | ShmFlags.O_RDWR),
      (e: unknown) => e instanceof ErrnoError && e.code === "EEXIST" && e.syscall === "shm_open",
    );
    using again = shmOpen(name, ShmFlags.O_RDWR);
    assert.equal(fstat(again).size, 65536);
  } finally {
    fd.close();
    shmUnlink(name);
  }
  assert.throws(() => Deno.statSync(`/dev/shm/${name}`), Deno.errors.NotFound);
  shmUnlink(name); // ENOENT is not an error
  assert.throws(
    () => shmOpen(name, ShmFlags.O_RDWR),
    (e: unknown) => e instanceof ErrnoError && e.code === "ENOENT" && e.message.includes(name),
  );
  assert.throws(() => shmOpen("a/b", ShmFlags.O_RDWR), /a\/b: a shm name is one path component/);
  assert.throws(
    () => shmOpen("/", ShmFlags.O_RDWR),
    (e: unknown) => e instanceof ErrnoError && e.code === "EINVAL",
  );
});

Deno.test("memory mkstempIn makes a unique 0600 file in the directory; a missing dir is named", () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-mkstemp-" });
  try {
    const a = mkstempIn(dir, "ivshmem.");
    const b = mkstempIn(`${dir}/`, "ivshmem.");
    try {
      assert.match(a.path, new RegExp(`^${dir}/ivshmem\\.[A-Za-z0-9]{6}$`));
      assert.notEqual(a.path, b.path);
      assert.equal(Deno.statSync(a.path).mode! & 0o777, 0o600);
      ftruncate(a.fd, 8192);
      assert.equal(Deno.statSync(a.path).size, 8192);
      assert.equal(fstat(a.fd).mode, Deno.statSync(a.path).mode);
    } finally {
      a.fd.close();
      b.fd.close();
    }
    assert.throws(
      () => mkstempIn(`${dir}/missing`, "x"),
      (e: unknown) => e instanceof ErrnoError && e.code === "ENOENT" && e.message.includes(`${dir}/missing`),
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("memory nothing above leaks an fd", () => {
  const before = listOpenFds();
  for (let i = 0; i < 10; i++) {
    using fd = memfdCreate(`leak-${i}`);
    ftruncate(fd, 4096);
    using _m = mapShared(fd, 4096);
  }
  assert.deepEqual(listOpenFds(), before);
});

Deno.test("sealedAgainstShrink tells a size-sealed memfd from unsealed ones and from shm objects", () => {
  using plain = memfdCreate("unsealed");
  assert.equal(sealedAgainstShrink(plain), false);
  using sealed = memfdCreate("sealed", { sealing: true });
  ftruncate(sealed, 8192);
  assert.equal(sealedAgainstShrink(sealed), false, "sealable but not sealed yet");
  sealSize(sealed);
  assert.equal(sealedAgainstShrink(sealed), true);
  assert.throws(() => ftruncate(sealed, 4096), (e: ErrnoError) => e.syscall === "ftruncate");
  assert.equal(fstat(sealed).size, 8192);
  const name = `mpq-seal-test-${Deno.pid}`;
  using shm = shmOpen(name, ShmFlags.O_RDWR | ShmFlags.O_CREAT | ShmFlags.O_EXCL);
  try {
    assert.equal(sealedAgainstShrink(shm), false, "shm objects cannot be sealed");
  } finally {
    shmUnlink(name);
  }
});

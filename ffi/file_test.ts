import assert from "node:assert/strict";
import { dataExtents, fileSystemType, punchHole, TMPFS_MAGIC } from "./file.ts";
import { ftruncate, memfdCreate, mkstempIn } from "./memory.ts";
import { libc } from "./_libc.ts";

const MiB = 1 << 20;

function writeAt(fd: { unsafeFd: number }, offset: number, len: number): void {
  const buf = new Uint8Array(len).fill(0xab);
  assert.equal(
    libc.pwrite(fd.unsafeFd, Deno.UnsafePointer.of(buf), BigInt(len), BigInt(offset)),
    BigInt(len),
  );
}

Deno.test("dataExtents lists the written ranges of a sparse tmpfs file, and null past the limit", () => {
  using fd = memfdCreate("extents");
  ftruncate(fd, 16 * MiB);
  assert.deepEqual(dataExtents(fd, 16 * MiB, 16), [], "a fresh sparse file has no data");
  writeAt(fd, 0, 8192);
  writeAt(fd, 4 * MiB, 4096);
  writeAt(fd, 16 * MiB - 4096, 4096);
  assert.deepEqual(dataExtents(fd, 16 * MiB, 16), [
    [0, 8192],
    [4 * MiB, 4 * MiB + 4096],
    [16 * MiB - 4096, 16 * MiB],
  ]);
  punchHole(fd, 0, 4096);
  assert.deepEqual(dataExtents(fd, 16 * MiB, 16)?.[0], [4096, 8192], "a punched page is a hole again");
  assert.equal(dataExtents(fd, 16 * MiB, 2), null, "more extents than the limit");
  assert.deepEqual(dataExtents(fd, 4 * MiB, 16), [[4096, 8192]], "only below size");
});

Deno.test("fileSystemType tells tmpfs from the file system of the working directory", () => {
  using mem = memfdCreate("fstype");
  assert.equal(fileSystemType(mem), TMPFS_MAGIC);
  const { fd, path } = mkstempIn("/dev/shm", "mpq-fstype-");
  try {
    assert.equal(fileSystemType(fd), TMPFS_MAGIC, "/dev/shm is tmpfs");
  } finally {
    fd.close();
    Deno.removeSync(path);
  }
  // Wherever the checkout lives (ext4 here, overlayfs in containers), unless that is tmpfs too.
  const here = mkstempIn(".", ".mpq-fstype-");
  try {
    const type = fileSystemType(here.fd);
    assert.ok(Number.isInteger(type) && type > 0, `f_type ${type}`);
    const df = new Deno.Command("stat", { args: ["-f", "-c", "%t", here.path] }).outputSync();
    assert.equal(type, parseInt(new TextDecoder().decode(df.stdout), 16), "matches stat -f");
  } finally {
    here.fd.close();
    Deno.removeSync(here.path);
  }
});

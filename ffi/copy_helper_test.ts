import assert from "node:assert/strict";
import { CopyHelper } from "./copy_helper.ts";
import { IoVecs } from "./iovec.ts";
import { ftruncate, mapShared, memfdCreate } from "./memory.ts";

async function ready(h: CopyHelper): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!h.ready) {
    if (Date.now() > deadline) throw new Error("the helper thread did not start within 10 s");
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Posts until the helper, woken by the first refusal, takes a job (it sleeps when idle). */
function postAwake(post: () => boolean): void {
  const deadline = performance.now() + 5000;
  while (!post()) {
    if (performance.now() > deadline) throw new Error("the helper never woke up to take a job");
  }
}

Deno.test("CopyHelper copies a range of iovecs on its own thread (read and write), results like process_vm_*", async () => {
  using srcFd = memfdCreate("helper-src");
  using dstFd = memfdCreate("helper-dst");
  ftruncate(srcFd, 1 << 20);
  ftruncate(dstFd, 1 << 20);
  const src = mapShared(srcFd, 1 << 20);
  const dst = mapShared(dstFd, 1 << 20);
  const h = CopyHelper.start();
  try {
    assert.equal(h.post("read", new IoVecs(1), 0, 0, new IoVecs(1), 0, 0), false, "not ready yet: refused");
    await ready(h);
    for (let i = 0; i < src.size; i++) src.bytes[i] = (i * 7 + 3) & 0xff;
    // 16 scattered 4 KiB pieces; the helper does pieces 4..11 (iovecs [4, 12) on both sides).
    const local = new IoVecs(16);
    const remote = new IoVecs(16);
    for (let k = 0; k < 16; k++) {
      local.push(dst, k * 8192, 4096);
      remote.push(src, ((k * 37) % 200) * 4096, 4096);
    }
    postAwake(() => h.post("read", local, 4, 8, remote, 4, 8));
    let result = h.collect(false);
    assert.equal(result, 8 * 4096);
    assert.equal(h.jobs, 1);
    for (let k = 0; k < 16; k++) {
      const got = dst.bytes.slice(k * 8192, k * 8192 + 4096);
      const want = k >= 4 && k < 12
        ? src.bytes.slice(((k * 37) % 200) * 4096, ((k * 37) % 200) * 4096 + 4096)
        : new Uint8Array(4096);
      assert.deepEqual(got, want, `piece ${k}`);
    }
    // A write the other way, and a remote range past the end of a shrunk file: a short count.
    const back = new IoVecs(2);
    back.push(src, 0, 4096);
    back.push(src, 512 * 1024, 4096);
    const from = new IoVecs(2);
    from.push(dst, 4 * 8192, 4096);
    from.push(dst, 5 * 8192, 4096);
    ftruncate(srcFd, 256 * 1024); // src's second range now faults
    postAwake(() => h.post("write", from, 0, 2, back, 0, 2));
    result = h.collect(false);
    assert.equal(result, 4096, "the first range copied, the second faulted (no SIGBUS)");
    assert.deepEqual(src.bytes.slice(0, 4096), dst.bytes.slice(4 * 8192, 4 * 8192 + 4096));
  } finally {
    h.close();
    src.close();
    dst.close();
  }
});

Deno.test("CopyHelper: a job the helper has not picked up is taken back by collect()", async () => {
  using fd = memfdCreate("helper-back");
  ftruncate(fd, 65536);
  const m = mapShared(fd, 65536);
  const h = CopyHelper.start();
  try {
    await ready(h);
    const local = new IoVecs(1);
    const remote = new IoVecs(1);
    local.push(m, 0, 4096);
    remote.push(m, 8192, 4096);
    m.bytes.fill(9, 8192, 12288);
    h.pause(true);
    postAwake(() => h.post("read", local, 0, 1, remote, 0, 1));
    assert.equal(h.collect(), null, "taken back: the paused helper never started it");
    assert.equal(h.takenBack, 1);
    assert.deepEqual(m.bytes.slice(0, 4096), new Uint8Array(4096), "nothing was copied");
    h.pause(false);
    postAwake(() => h.post("read", local, 0, 1, remote, 0, 1));
    assert.equal(h.collect(false), 4096, "the next job is done again");
    assert.deepEqual(m.bytes.slice(0, 4096), new Uint8Array(4096).fill(9));
  } finally {
    h.close();
    m.close();
  }
});

/**
 * `mpq vhost rng` over a real UNIX socket with the test front-end: the handshake QEMU's
 * vhost-user-rng sends, entropy requests of several shapes, and a new front-end after a disconnect.
 */
import assert from "node:assert/strict";
import { Feature, type FrontendOptions, Proto, VhostUserFrontend } from "../helpers/vhost_frontend.ts";
import { type Backend, startMpqVhost } from "../helpers/vhost_backends.ts";

async function withRng(fn: (be: Backend) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhost-rng-" });
  const be = await startMpqVhost("rng", `${dir}/rng.sock`);
  try {
    await fn(be);
    assert.equal(be.child.status, null, `mpq vhost rng exited during the test: ${be.child.status?.text}`);
  } finally {
    await be.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

/** Distinct byte values in `b` (uniform random data of 4 KiB shows all 256). */
function distinct(b: Uint8Array): number {
  return new Set(b).size;
}

for (
  const variant of [
    { name: "chained", opts: {} },
    { name: "indirect, EVENT_IDX, 3 segments", opts: { indirect: true, eventIdx: true, dataSegments: 3 } },
  ] satisfies Array<{ name: string; opts: FrontendOptions }>
) {
  Deno.test(`vhost rng fills device-writable buffers with random bytes (${variant.name})`, async () => {
    await withRng(async (be) => {
      await using fe = await VhostUserFrontend.connect(be.socketPath, { device: "rng", ...variant.opts });
      const info = await fe.handshake();
      assert.ok(info.features & Feature.VERSION_1);
      assert.ok(info.features & Feature.PROTOCOL_FEATURES);
      assert.equal(info.ackedProtocol & Proto.CONFIG, 0n, "no config space for rng");
      await fe.start();
      const a = await fe.rngRead(4096);
      const b = await fe.rngRead(4096);
      assert.ok(a.len > 0 && a.len <= 4096, `used.len ${a.len}`);
      assert.equal(a.data.byteLength, a.len);
      if (a.len === 4096) assert.ok(distinct(a.data) > 240, `${distinct(a.data)} distinct byte values`);
      assert.notDeepEqual(a.data, b.data);
      const small = await Promise.all([1, 7, 16, 100, 513].map((n) => fe.rngRead(n)));
      small.forEach((r, i) => assert.ok(r.len >= 1 && r.len <= [1, 7, 16, 100, 513][i], `len ${r.len}`));
      assert.deepEqual(await fe.stop(), [fe.queues[0].ring.availIdx]);
    });
  });
}

Deno.test("vhost rng serves a new front-end after the previous one left", async () => {
  await withRng(async (be) => {
    for (let i = 0; i < 3; i++) {
      await using fe = await VhostUserFrontend.connect(be.socketPath, { device: "rng" });
      await fe.handshake();
      await fe.start();
      assert.ok((await fe.rngRead(64)).len > 0, `session ${i}`);
      if (i === 1) await fe.stop();
    }
  });
});

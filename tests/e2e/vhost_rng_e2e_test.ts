/**
 * End to end: a real QEMU 7.2 guest (TCG) with `-device vhost-user-rng-pci` served by
 * `mpq vhost rng`: the guest's hwrng core picks the virtio device and /dev/hwrng delivers random
 * bytes.
 */
import assert from "node:assert/strict";
import { Guest, guestAvailable } from "../helpers/guest.ts";
import { startMpqVhost } from "../helpers/vhost_backends.ts";

Deno.test({
  name: "vhost rng e2e: /dev/hwrng in the guest is fed by mpq vhost rng",
  ignore: !guestAvailable(),
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vhost-rng-e2e-" });
    const sock = `${dir}/rng.sock`;
    const be = await startMpqVhost("rng", sock);
    try {
      await using guest = await Guest.start({
        name: "vhost-rng guest",
        sharedMemory: true,
        args: ["-chardev", `socket,id=r0,path=${sock}`, "-device", "vhost-user-rng-pci,chardev=r0"],
        script: [
          `mark current $(cat /sys/class/misc/hw_random/rng_current)`,
          `timeout 60 dd if=/dev/hwrng of=/tmp/a bs=64 count=32 2>/dev/null`,
          `timeout 60 dd if=/dev/hwrng of=/tmp/b bs=64 count=32 2>/dev/null`,
          `mark bytes $(cat /tmp/a | wc -c) $(cat /tmp/b | wc -c)`,
          `mark distinct $(od -An -tx1 -v /tmp/a | tr ' ' '\\n' | grep . | sort -u | wc -l)`,
          `cmp -s /tmp/a /tmp/b && mark differ no || mark differ yes`,
        ].join("\n"),
      });
      assert.match(await guest.waitFor("current"), /^virtio_rng\.\d+$/);
      assert.equal(await guest.waitFor("bytes"), "2048 2048");
      // 2048 uniform random bytes hit nearly all 256 values; a stuck or patterned source does not.
      assert.ok(Number(await guest.waitFor("distinct")) > 200, guest.tail());
      assert.equal(await guest.waitFor("differ"), "yes");
      assert.equal(await guest.waitExit(), 0);
      assert.equal(be.child.status, null, `mpq vhost rng exited during the test: ${be.child.status?.text}`);
    } finally {
      await be.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

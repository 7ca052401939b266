import assert from "node:assert/strict";
import { Guest, guestAvailable } from "../helpers/guest.ts";

const ignore = !guestAvailable();

Deno.test({
  name: "guest boots the Debian kernel, loads the virtio modules, runs the script and powers off",
  ignore,
  fn: async () => {
    await using guest = await Guest.start({
      script: [
        `mark modules "$(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ')"`,
        `mark sum $(( 6 * 7 ))`,
        `[ -e /dev/null ] && mark devtmpfs yes`,
        "exit 5",
      ].join("\n"),
    });
    assert.match(await guest.waitFor("booted"), /^\d+\.\d+/);
    assert.equal(
      await guest.waitFor("modules"),
      "fuse virtio virtio_blk virtio_pci virtio_pci_legacy_dev virtio_pci_modern_dev virtio_ring virtio_rng virtiofs",
    );
    assert.equal(await guest.waitFor("sum"), "42");
    assert.equal(await guest.waitFor("devtmpfs"), "yes");
    assert.equal(await guest.waitExit(), 5);
    assert.ok(!guest.markers().some(([n]) => n === "insmod-failed"), guest.tail());
  },
});

Deno.test({
  name: "guest waitFor rejects with the console tail when QEMU exits before the marker",
  ignore,
  fn: async () => {
    await using guest = await Guest.start({ script: "mark first 1" });
    await assert.rejects(
      guest.waitFor("never"),
      /QEMU exited \(exit 0\) before marker MPQ:never[^]*MPQ:first 1/,
    );
  },
});

Deno.test({
  name: "guest close kills a guest that never powers off and removes its temp dir",
  ignore,
  fn: async () => {
    const guest = await Guest.start({ script: "mark waiting\nwhile true; do sleep 1; done" });
    await guest.waitFor("waiting");
    await assert.rejects(guest.waitExit(500), /QEMU still running after 500 ms/);
    await guest.close();
    await assert.rejects(Deno.stat(guest.dir), Deno.errors.NotFound);
    assert.throws(() => Deno.kill(guest.pid, "SIGCONT"));
  },
});

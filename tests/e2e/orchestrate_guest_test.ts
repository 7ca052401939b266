/**
 * Real guests (Debian kernel + busybox initramfs, QEMU 7.2 under TCG) launched by `mpq orchestrate`:
 * the guest sees the remote lsi53c895a through x-pci-proxy-dev (as QEMU's own multiprocess test
 * checks), and a VM with a remote device, an `mpq vhost blk` disk and an `mpq ivshmem` device uses
 * all three. The guest powers off at the end, so mpq ends with exit 0 on its own.
 */
import assert from "node:assert/strict";
import { guestAvailable, kernelPath, writeInitrd } from "../helpers/guest.ts";
import { EVENT_BOUND_MS, MpqRun, tempDir, waitGone, writeTopology } from "./orchestrate_harness.ts";

const ignore = !guestAvailable();

/** Waits (bounded) for `MPQ:name value` on the console file; returns the value. */
async function marker(run: MpqRun, consoleFile: string, name: string): Promise<string> {
  const re = new RegExp(`^MPQ:${name}(?: (.*))?$`, "m");
  const t = performance.now();
  let text = "";
  while (performance.now() - t < EVENT_BOUND_MS) {
    try {
      text = Deno.readTextFileSync(consoleFile).replaceAll("\r", "");
    } catch { /* not yet */ }
    const m = text.match(re);
    if (m) return (m[1] ?? "").trim();
    if (/^MPQ:exit /m.test(text) && name !== "exit") break;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`MPQ:${name} never appeared\n--- console ---\n${text}\n${run.report()}`);
}

async function sha256(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return [...d].map((b) => b.toString(16).padStart(2, "0")).join("");
}

const PCI_IDS =
  `mark pci "$(cat /sys/bus/pci/devices/*/uevent | grep -o 'PCI_ID=[0-9A-Fa-f:]*' | sort | tr '\\n' ' ')"`;

Deno.test({
  name: "orchestrate guest sees PCI_ID=1000:0012 (the remote lsi53c895a) through the proxy",
  ignore,
  async fn() {
    using dir = tempDir("mpq-guest-");
    const initrd = `${dir.path}/initrd`;
    await writeInitrd(initrd, PCI_IDS);
    const consoleFile = `${dir.path}/console.log`;
    const topo = writeTopology(dir.path, {
      name: "guest-pci",
      memory: "512M",
      kernel: kernelPath(),
      initrd,
      append: "console=ttyS0 panic=-1 quiet loglevel=3",
      console: { file: consoleFile },
      start: "paused",
      devices: [{ type: "remote", id: "lsi0", device: "lsi53c895a" }],
    });
    await using run = MpqRun.start(["orchestrate", topo]);
    const pci = await marker(run, consoleFile, "pci");
    assert.match(pci, /PCI_ID=1000:0012/, pci);
    const st = await run.status();
    assert.equal(st.code, 0, run.report());
    assert.match(run.stdout, /qemu +exited \(exit 0\): the guest shut down/);
    assert.deepEqual(await waitGone(run.pids.values()), []);
  },
});

Deno.test({
  name:
    "orchestrate guest uses a remote lsi53c895a, two mpq vhost blk disks and an rng from one mpq vhost serve, and mpq ivshmem shared memory",
  ignore,
  async fn() {
    using dir = tempDir("mpq-guest-");
    const disk = `${dir.path}/disk.img`;
    Deno.writeFileSync(disk, new Uint8Array(16 * 1024 * 1024));
    const disk2 = `${dir.path}/disk2.img`;
    Deno.writeFileSync(disk2, new Uint8Array(8 * 1024 * 1024));
    const initrd = `${dir.path}/initrd`;
    await writeInitrd(
      initrd,
      [
        PCI_IDS,
        // The vhost-user disk: write 1 MiB of random data, read it back past the page cache.
        `dd if=/dev/urandom of=/tmp/data bs=64k count=16 2>/dev/null`,
        `dd if=/tmp/data of=/dev/vda bs=64k conv=fsync 2>/dev/null && mark disk-written "$(sha256sum /tmp/data | cut -d' ' -f1)"`,
        `echo 3 > /proc/sys/vm/drop_caches`,
        `dd if=/dev/vda of=/tmp/back bs=64k count=16 2>/dev/null`,
        `cmp /tmp/data /tmp/back && mark disk-readback same`,
        // The second disk and the rng are served by the same \`mpq vhost serve\` process.
        `dd if=/tmp/data of=/dev/vdb bs=64k seek=2 conv=fsync 2>/dev/null && mark disk2-written`,
        `mark rng $(cat /sys/class/misc/hw_random/rng_current) $(timeout 60 dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c)`,
        // The ivshmem device: write a word into BAR2 (the shared memory), wait for the host's answer.
        `for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor):$(cat $d/device)" = 0x1af4:0x1110 ] && IV=$d; done`,
        `echo 1 > $IV/enable`,
        `BAR2=$(( $(sed -n 3p $IV/resource | cut -d' ' -f1) ))`,
        `devmem $BAR2 32 0x4D505121`,
        `mark iv-written`,
        `i=0; v=none; while [ $i -lt 1200 ]; do v=$(devmem $((BAR2 + 64)) 32); [ "$v" = 0xACCE55ED ] && break; sleep 0.1; i=$((i + 1)); done`,
        `mark iv-ack $v`,
      ].join("\n"),
    );
    const consoleFile = `${dir.path}/console.log`;
    const topo = writeTopology(dir.path, {
      name: "guest-full",
      memory: "512M",
      kernel: kernelPath(),
      initrd,
      append: "console=ttyS0 panic=-1 quiet loglevel=3",
      console: { file: consoleFile },
      start: "paused",
      steps: [{ execute: "query-status", expect: { status: "prelaunch" } }],
      devices: [
        { type: "remote", id: "lsi0", device: "lsi53c895a" },
        { type: "vhost-user-blk", id: "vblk0", backend: { mpq: { file: disk } } },
        { type: "vhost-user-blk", id: "vblk1", backend: { mpq: { file: disk2 } } },
        { type: "vhost-user-rng", id: "rng0", backend: { mpq: {} } },
        { type: "ivshmem", id: "ivs0", vectors: 1, server: { mpq: { size: "1M" } } },
      ],
    });
    await using run = MpqRun.start(["orchestrate", topo]);
    await run.waitFor(/\] running +4 processes/);
    assert.deepEqual([...run.pids.keys()].sort(), [
      "ivshmem ivs0",
      "qemu",
      "remote lsi0",
      "vhost vblk0,vblk1,rng0",
    ]);

    const pci = await marker(run, consoleFile, "pci");
    assert.match(pci, /PCI_ID=1000:0012/, "remote lsi53c895a");
    assert.match(pci, /PCI_ID=1AF4:10(01|42)/i, "vhost-user-blk-pci");
    assert.match(pci, /PCI_ID=1AF4:1110/i, "ivshmem-doorbell");

    const written = await marker(run, consoleFile, "disk-written");
    assert.equal(await marker(run, consoleFile, "disk-readback"), "same");
    const onHost = Deno.readFileSync(disk).slice(0, 1024 * 1024);
    assert.equal(await sha256(onHost), written, "the host file holds what the guest wrote");
    await marker(run, consoleFile, "disk2-written");
    const onHost2 = Deno.readFileSync(disk2).slice(128 * 1024, 128 * 1024 + 1024 * 1024);
    assert.equal(await sha256(onHost2), written, "the second disk (same serve process) holds it at 128 KiB");
    assert.match(
      await marker(run, consoleFile, "rng"),
      /^virtio_rng\.\d+ 256$/,
      "the rng of the same process",
    );

    await marker(run, consoleFile, "iv-written");
    // The host side of the shared memory, through another peer of the same mpq ivshmem server.
    const runtime = run.stdout.match(/mpq qmp (\S+)\/qmp-operator\.sock/)![1];
    const sock = `${runtime}/ivshmem-ivs0.sock`;
    await using peer = MpqRun.start([
      "ivshmem",
      "client",
      "-S",
      sock,
      "--json",
      "--write",
      "64:ed55ceac",
      "--read",
      "0:4",
    ]);
    assert.equal((await peer.status()).code, 0, peer.report());
    const read = peer.stdout.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l)).find((
      e,
    ) => e.event === "read");
    assert.equal(read?.hex, "2151504d", `the guest's word 0x4D505121 in the shared memory\n${peer.report()}`);
    assert.equal(await marker(run, consoleFile, "iv-ack"), "0xACCE55ED", "the guest read the host's word");

    const st = await run.status();
    assert.equal(st.code, 0, run.report());
    assert.deepEqual(await waitGone(run.pids.values()), []);
  },
});

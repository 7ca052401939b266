/**
 * Hot-plug while the guest runs (issue 11 §2), through `mpq ctl SOCKET add|remove`: a running
 * Debian guest sees an `mpq vhost blk` disk appear, writes and reads it (the host file holds the
 * data), and sees it disappear; then a remote (x-remote) lsi53c895a appears in its PCI scan. The
 * failure paths, with a QEMU that runs no guest OS: a back-end that cannot start, a device_add QEMU
 * refuses, and an unplug the guest never acknowledges — each a clear error, nothing left behind.
 */
import assert from "node:assert/strict";
import { controlRequest } from "../../lib/cli/control_client.ts";
import { guestAvailable, kernelPath, writeInitrd } from "../helpers/guest.ts";
import {
  consoleMarker,
  controlSocketOf,
  mpqCtl,
  MpqRun,
  qemuAvailable,
  sha256Hex,
  tempDir,
  writeTopology,
} from "./orchestrate_harness.ts";

const GUEST = [
  `mark booted`,
  // A disk appears (hot-plugged): write 256 KiB, read it back past the page cache.
  `i=0; while [ ! -e /sys/block/vda ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done`,
  `mark disk $(cat /sys/block/vda/size 2>/dev/null || echo none)`,
  `dd if=/dev/urandom of=/tmp/d bs=64k count=4 2>/dev/null`,
  `dd if=/tmp/d of=/dev/vda bs=64k conv=fsync 2>/dev/null`,
  `echo 3 > /proc/sys/vm/drop_caches`,
  `dd if=/dev/vda of=/tmp/b bs=64k count=4 2>/dev/null`,
  `cmp -s /tmp/d /tmp/b && mark rw same || mark rw differ`,
  `mark sha $(sha256sum /tmp/d | cut -d' ' -f1)`,
  // It disappears (hot-unplugged).
  `i=0; while [ -e /sys/block/vda ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done`,
  `[ -e /sys/block/vda ] && mark gone no || mark gone yes`,
  // A remote lsi53c895a appears on the PCI bus.
  `i=0; while ! grep -qx 0x0012 /sys/bus/pci/devices/*/device 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done`,
  `grep -lx 0x0012 /sys/bus/pci/devices/*/device >/dev/null 2>&1 && mark lsi yes || mark lsi no`,
  // An ivshmem-doorbell (1af4:1110) appears.
  `i=0; while ! grep -qx 0x1110 /sys/bus/pci/devices/*/device 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done`,
  `grep -lx 0x1110 /sys/bus/pci/devices/*/device >/dev/null 2>&1 && mark ivshmem yes || mark ivshmem no`,
  `sleep 120`, // the host checks the VM while it still runs, then stops it
].join("\n");

Deno.test({
  name:
    "orchestrate hot-plug e2e: a running guest sees an mpq vhost-user-blk disk appear, uses it, sees it go; then a remote lsi53c895a and an ivshmem device appear",
  ignore: !guestAvailable(),
  async fn() {
    using dir = tempDir("mpq-hotplug-");
    const disk = `${dir.path}/hp.img`;
    Deno.writeFileSync(disk, new Uint8Array(8 << 20));
    const initrd = `${dir.path}/initrd`;
    await writeInitrd(initrd, GUEST);
    const consoleFile = `${dir.path}/console.log`;
    await using run = MpqRun.start([
      "orchestrate",
      writeTopology(dir.path, {
        name: "hotplug",
        memory: "256M",
        kernel: kernelPath(),
        initrd,
        append: "console=ttyS0 panic=-1 quiet loglevel=3",
        console: { file: consoleFile },
      }),
    ]);
    await run.waitFor(/\] running +1 process/);
    const control = await controlSocketOf(run);
    await consoleMarker(consoleFile, "booted", run);

    const added = await mpqCtl([
      control,
      "add",
      JSON.stringify({ type: "vhost-user-blk", id: "hp0", backend: { mpq: { file: disk } } }),
    ]);
    assert.equal(added.code, 0, `${added.err}\n${run.report()}`);
    assert.equal(added.out.trim(), "added vhost-user-blk hp0");
    assert.equal(await consoleMarker(consoleFile, "disk", run), String((8 << 20) / 512));
    assert.equal(await consoleMarker(consoleFile, "rw", run), "same");
    const sha = await consoleMarker(consoleFile, "sha", run);
    assert.equal(await sha256Hex(Deno.readFileSync(disk).slice(0, 256 << 10)), sha, "the host file holds it");
    const st = await mpqCtl([control, "status"]);
    assert.match(st.out, /vhost \(hot-plug\)\tvhost\t\d+\trunning/);

    const removed = await mpqCtl([control, "remove", "hp0"]);
    assert.equal(removed.code, 0, removed.err);
    assert.equal(await consoleMarker(consoleFile, "gone", run), "yes");
    const chardevs = await mpqCtl([control, "qmp", "query-chardev"]);
    assert.doesNotMatch(chardevs.out, /chr-hp0/, "its chardev is gone");

    const lsi = await mpqCtl([
      control,
      "add",
      JSON.stringify({ type: "remote", id: "lsi9", device: "lsi53c895a" }),
    ]);
    assert.equal(lsi.code, 0, `${lsi.err}\n${run.report()}`);
    assert.equal(await consoleMarker(consoleFile, "lsi", run), "yes");
    assert.match((await mpqCtl([control, "status"])).out, /remote lsi9\tremote\t\d+\trunning/);

    const ivs = await mpqCtl([
      control,
      "add",
      JSON.stringify({ type: "ivshmem", id: "ivs9", vectors: 2, server: { mpq: { size: "1M" } } }),
    ]);
    assert.equal(ivs.code, 0, `${ivs.err}\n${run.report()}`);
    assert.equal(await consoleMarker(consoleFile, "ivshmem", run), "yes");
    assert.match((await mpqCtl([control, "status"])).out, /ivshmem ivs9\tivshmem\t\d+\trunning/);

    // Unplug both: the guest releases them (ACPI), their processes go.
    for (const id of ["lsi9", "ivs9"]) {
      const gone = await mpqCtl([control, "remove", id]);
      assert.equal(gone.code, 0, `${gone.err}\n${run.report()}`);
    }
    const after = (await mpqCtl([control, "status"])).out;
    assert.doesNotMatch(after, /lsi9|ivs9/);
  },
});

Deno.test({
  name:
    "orchestrate hot-plug: a back-end that cannot start, a device_add QEMU refuses and an unacknowledged unplug say why and leave nothing behind",
  ignore: !qemuAvailable(),
  async fn() {
    using dir = tempDir("mpq-hotplug-fail-");
    const disk = `${dir.path}/d.img`;
    Deno.writeFileSync(disk, new Uint8Array(1 << 20));
    await using run = MpqRun.start([
      "orchestrate",
      writeTopology(dir.path, {
        name: "hotplug-fail",
        memory: "32M",
        console: "none",
        devices: [{ type: "vhost-user-blk", id: "vblk0", backend: { mpq: { file: disk } } }],
      }),
    ]);
    await run.waitFor(/\] running +2 processes/);
    const control = await controlSocketOf(run);
    const vhostCtl = control.replace(/control\.sock$/, "vhost.ctl");
    const fdsOf = (pid: number) => [...Deno.readDirSync(`/proc/${pid}/fd`)].length;
    const vhostPid = run.pids.get("vhost vblk0")!;
    const qemuPid = run.pids.get("qemu")!;
    // Warm up what the checks themselves use (a control connection to each, a QMP passthrough),
    // so that the counts compared are those of the devices alone.
    await controlRequest(vhostCtl, "list");
    await mpqCtl([control, "qmp", "query-chardev"]);
    await mpqCtl([control, "qmp", "closefd", JSON.stringify({ fdname: "none" })]);
    const before = { vhost: fdsOf(vhostPid), qemu: fdsOf(qemuPid) };
    const nothingLeft = async (what: string) => {
      const devices = await controlRequest(vhostCtl, "list");
      assert.deepEqual((devices.result as Array<{ id: string }>).map((d) => d.id), ["vblk0"], what);
      const chr = await mpqCtl([control, "qmp", "query-chardev"]);
      assert.doesNotMatch(chr.out, /chr-hp/, `${what}: no chardev left`);
      assert.deepEqual({ vhost: fdsOf(vhostPid), qemu: fdsOf(qemuPid) }, before, `${what}: no fd left`);
    };

    // 1. The back-end cannot open its image.
    const missing = await mpqCtl([
      control,
      "add",
      JSON.stringify({
        type: "vhost-user-blk",
        id: "hp1",
        backend: { mpq: { file: `${dir.path}/none.img` } },
      }),
    ]);
    assert.equal(missing.code, 1);
    assert.match(missing.err, /add hp1: the vhost back-end failed: .*none\.img.*; nothing was left/);
    await nothingLeft("missing image");

    // 2. QEMU refuses the device: more queues than the back-end offers.
    const refused = await mpqCtl([
      control,
      "add",
      JSON.stringify({
        type: "vhost-user-blk",
        id: "hp2",
        backend: { mpq: { file: disk, numQueues: 1 } },
        numQueues: 4,
      }),
    ]);
    assert.equal(refused.code, 1);
    // (QEMU reports the last of its reconnect attempts, not the queue count it refused.)
    assert.match(refused.err, /add hp2: device_add failed: device_add: GenericError: .*; nothing was left/);
    await nothingLeft("refused device_add");

    // 3. A bad device object is refused before anything happens, naming the field.
    const bad = await mpqCtl([
      control,
      "add",
      JSON.stringify({ type: "vhost-user-blk", id: "hp3", backend: {} }),
    ]);
    assert.equal(bad.code, 1);
    assert.match(bad.err, /add: device\.backend: /);

    // 4. No guest OS acknowledges the unplug: a clear error after the timeout.
    const ok = await mpqCtl([
      control,
      "add",
      JSON.stringify({ type: "vhost-user-rng", id: "hp4", backend: { mpq: {} } }),
    ]);
    assert.equal(ok.code, 0, ok.err);
    const stuck = await controlRequest(control, "remove", { id: "hp4", timeoutMs: 1500 });
    assert.equal(stuck.ok, false);
    assert.match(stuck.error!, /remove hp4: the guest did not release it within 1\.5 s/);
    const notMine = await mpqCtl([control, "remove", "vblk0"]);
    assert.match(notMine.err, /only devices added with `add` can be removed/);
  },
});

/**
 * `"restart": "on-failure"` (issue 11 §4): when the `mpq vhost` process serving a VM's disks dies,
 * `mpq orchestrate` starts it again on the same pre-opened sockets instead of tearing the VM down;
 * QEMU (`reconnect=1`) reconnects and resubmits what was in flight, and the guest, writing and
 * verifying its disk in rounds, sees no error. Past the limit the VM is torn down, naming why.
 */
import assert from "node:assert/strict";
import { RESTART_LIMIT } from "../../lib/orchestrate/topology.ts";
import { guestAvailable, kernelPath, writeInitrd } from "../helpers/guest.ts";
import { guestScript, makeMigrationDisk, writeStop } from "../helpers/migrate_guest.ts";
import {
  alive,
  consoleMatch,
  MpqRun,
  qemuAvailable,
  tempDir,
  waitGone,
  writeTopology,
} from "./orchestrate_harness.ts";

Deno.test({
  name:
    "orchestrate restart on-failure: kill -9 of the vhost process mid-I/O; it is restarted, QEMU reconnects, the guest verifies its disk",
  ignore: !guestAvailable(),
  async fn() {
    using dir = tempDir("mpq-restart-");
    const disk = `${dir.path}/disk.img`;
    const initrd = `${dir.path}/initrd`;
    await writeInitrd(initrd, guestScript(await makeMigrationDisk(disk), 1, false));
    const consoleFile = `${dir.path}/console.log`;
    await using run = MpqRun.start([
      "orchestrate",
      writeTopology(dir.path, {
        name: "restart",
        memory: "256M",
        kernel: kernelPath(),
        initrd,
        append: "console=ttyS0 panic=-1 quiet loglevel=3",
        console: { file: consoleFile },
        devices: [{
          type: "vhost-user-blk",
          id: "vblk0",
          backend: { mpq: { file: disk } },
          restart: "on-failure",
        }],
      }),
    ]);
    await run.waitFor(/\] running +2 processes/);
    await consoleMatch(consoleFile, /MPQ:round 1\n/, "the first round", run);
    const first = run.pids.get("vhost vblk0")!;
    Deno.kill(first, "SIGKILL");
    const m = await run.waitFor(
      /\] vhost vblk0 +killed by SIGKILL: restarted as pid (\d+) \(1 of 3 in 60 s\)/,
    );
    const second = Number(m[1]);
    assert.ok(alive(second));
    const rounds = (Deno.readTextFileSync(consoleFile).match(/MPQ:round \d+/g) ?? []).length;
    await consoleMatch(
      consoleFile,
      new RegExp(`MPQ:round ${rounds + 2}\\n`),
      "two rounds after the restart",
      run,
    );
    const qemu = run.pids.get("qemu")!;
    assert.ok(alive(qemu), "QEMU kept running");
    writeStop(disk);
    const result = await consoleMatch(consoleFile, /MPQ:result (\d+) (\d+)\n/, "the result", run);
    assert.equal(Number(result[1]), 0, Deno.readTextFileSync(consoleFile).slice(-2000));
    await run.close();
    assert.deepEqual(await waitGone([qemu, second]), []);
  },
});

Deno.test({
  name: "orchestrate restart on-failure: past the limit the VM is torn down, naming the back-end",
  ignore: !qemuAvailable(),
  async fn() {
    using dir = tempDir("mpq-restart-limit-");
    const disk = `${dir.path}/disk.img`;
    Deno.writeFileSync(disk, new Uint8Array(1 << 20));
    await using run = MpqRun.start([
      "orchestrate",
      writeTopology(dir.path, {
        name: "restart-limit",
        memory: "32M",
        console: "none",
        devices: [{
          type: "vhost-user-blk",
          id: "vblk0",
          backend: { mpq: { file: disk } },
          restart: "on-failure",
        }],
      }),
    ]);
    await run.waitFor(/\] running +2 processes/);
    let pid = run.pids.get("vhost vblk0")!;
    for (let i = 1; i <= RESTART_LIMIT; i++) {
      Deno.kill(pid, "SIGKILL");
      const m = await run.waitFor(
        new RegExp(`restarted as pid (\\d+) \\(${i} of ${RESTART_LIMIT} in 60 s\\)`),
      );
      pid = Number(m[1]);
    }
    Deno.kill(pid, "SIGKILL");
    assert.equal((await run.status()).code, 1);
    assert.match(run.stdout, /killed by SIGKILL: restarted 3 times in 60 s already/);
    assert.match(
      run.stderr,
      /vhost vblk0 \(pid \d+\) exited unexpectedly: killed by SIGKILL; tearing the VM down/,
    );
  },
});

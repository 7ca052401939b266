/**
 * End to end (issue 10 §3): `mpq orchestrate` moves a whole VM. The destination runs the same
 * topology with `--incoming`; the source is told `mpq ctl SOCKET migrate URI`, prints progress,
 * tears itself down once the migration completed, and the guest — verifying its disk through the
 * switch — finishes on the destination with 0 mismatches. Topologies QEMU cannot migrate are
 * refused before anything starts, and a migration to nowhere leaves the source running.
 */
import assert from "node:assert/strict";
import { selfCommand } from "../../lib/cli/self.ts";
import { guestAvailable, kernelPath, writeInitrd } from "../helpers/guest.ts";
import {
  GUEST_APPEND,
  guestScript,
  makeMigrationDisk,
  MEMORY_MIB,
  writeStop,
} from "../helpers/migrate_guest.ts";
import {
  consoleMatch,
  controlSocketOf,
  mpqCtl,
  MpqRun,
  tempDir,
  waitGone,
  writeTopology,
} from "./orchestrate_harness.ts";

const ignore = !guestAvailable();

/**
 * The source migrates to `target` (what the destination's `--incoming` is told: `listen`), then
 * exits 0; the guest goes on verifying its disk on the destination.
 */
async function migrateVm(listen: (dir: string) => string, target: (dir: string) => string): Promise<void> {
  using dir = tempDir("mpq-migrate-");
  const disk = `${dir.path}/disk.img`;
  const filledSha = await makeMigrationDisk(disk);
  const initrd = `${dir.path}/initrd`;
  await writeInitrd(initrd, guestScript(filledSha, 1, false));
  const topology = (name: string) => ({
    name,
    memory: `${MEMORY_MIB}M`,
    kernel: kernelPath(),
    initrd,
    append: `console=ttyS0 panic=-1 quiet loglevel=3 ${GUEST_APPEND}`,
    console: { file: `${dir.path}/${name}.console` },
    devices: [{ type: "vhost-user-blk", id: "vblk0", backend: { mpq: { file: disk } } }],
  });
  const uri = target(dir.path);
  await using dst = MpqRun.start([
    "orchestrate",
    writeTopology(dir.path, topology("dst"), "dst.json"),
    "--incoming",
    listen(dir.path),
  ]);
  await dst.waitFor(/qmp incoming +waiting for the migration on (mpq-)?unix:/);
  const dstControl = await controlSocketOf(dst);
  const waiting = await mpqCtl([dstControl, "status"]);
  assert.equal(waiting.code, 0, waiting.err);
  assert.match(waiting.out, /guest inmigrate/);

  await using src = MpqRun.start(["orchestrate", writeTopology(dir.path, topology("src"), "src.json")]);
  await src.waitFor(/\] running +2 processes/);
  const srcControl = await controlSocketOf(src);
  const srcConsole = `${dir.path}/src.console`;
  await consoleMatch(srcConsole, /MPQ:round 1\n/, "the first round on the source", src);

  const moved = await mpqCtl([srcControl, "migrate", uri]);
  assert.equal(moved.code, 0, `${moved.err}\n${src.report()}`);
  assert.match(moved.out, /^migrated in \d+ ms, downtime \d+ ms, [\d.]+ MiB sent$/m);
  await src.waitFor(
    /\] migrate +active \d+%, [\d.]+ MiB sent, dirty [\d.]+ MiB\/s, expected downtime \d+ ms/,
  );
  await src.waitFor(/\] migrated +in \d+ ms \(downtime \d+ ms/);
  assert.equal((await src.child.status).code, 0, "the source tears itself down and exits 0");
  assert.deepEqual(await waitGone(src.pids.values()), [], "nothing of the source is left");
  await dst.waitFor(/qmp incoming +migration completed: guest running/);

  // The guest goes on on the destination: two more rounds there, then it finishes and reports.
  const rounds = (Deno.readTextFileSync(srcConsole).match(/MPQ:round \d+/g) ?? []).length;
  const dstConsole = `${dir.path}/dst.console`;
  await consoleMatch(
    dstConsole,
    new RegExp(`MPQ:round ${rounds + 2}\\n`),
    "two rounds on the destination",
    dst,
  );
  const st = await mpqCtl([dstControl, "status", "--json"]);
  const reply = JSON.parse(st.out);
  assert.equal(reply.result.guest.status, "running");
  assert.deepEqual(reply.result.processes.map((p: { role: string }) => p.role), ["vhost", "qemu"]);
  writeStop(disk);
  const result = await consoleMatch(dstConsole, /MPQ:result (\d+) (\d+)\n/, "the result", dst);
  assert.equal(Number(result[1]), 0, Deno.readTextFileSync(dstConsole).slice(-2000));
  assert.doesNotMatch(Deno.readTextFileSync(srcConsole) + Deno.readTextFileSync(dstConsole), /MISMATCH/);
}

Deno.test({
  name:
    "orchestrate migrate e2e: the source migrates the VM to an --incoming destination and exits 0; the guest verifies its disk through the switch",
  ignore,
  fn: () => migrateVm((d) => `unix:${d}/migrate.sock`, (d) => `unix:${d}/migrate.sock`),
});

Deno.test({
  name:
    "orchestrate migrate e2e: --incoming mpq-unix: mpq listens and hands the destination QEMU the source's connection",
  ignore,
  fn: () => migrateVm((d) => `mpq-unix:${d}/migrate.sock`, (d) => `unix:${d}/migrate.sock`),
});

Deno.test({
  name: "orchestrate migrate e2e: a migration to nowhere fails, says why, and the source VM runs on",
  ignore,
  async fn() {
    using dir = tempDir("mpq-migrate-fail-");
    const disk = `${dir.path}/disk.img`;
    const filledSha = await makeMigrationDisk(disk);
    const initrd = `${dir.path}/initrd`;
    await writeInitrd(initrd, guestScript(filledSha, 1, false));
    const consoleFile = `${dir.path}/src.console`;
    await using src = MpqRun.start([
      "orchestrate",
      writeTopology(dir.path, {
        name: "src",
        memory: `${MEMORY_MIB}M`,
        kernel: kernelPath(),
        initrd,
        append: `console=ttyS0 panic=-1 quiet loglevel=3 ${GUEST_APPEND}`,
        console: { file: consoleFile },
        devices: [{ type: "vhost-user-blk", id: "vblk0", backend: { mpq: { file: disk } } }],
      }),
    ]);
    await src.waitFor(/\] running +2 processes/);
    const control = await controlSocketOf(src);
    await consoleMatch(consoleFile, /MPQ:round 1\n/, "the first round", src);
    const failed = await mpqCtl([control, "migrate", `unix:${dir.path}/nobody.sock`]);
    assert.equal(failed.code, 1);
    assert.match(failed.err, /mpq ctl: migrate: .*(No such file|Failed to connect|failed)/i);
    const st = await mpqCtl([control, "status"]);
    assert.match(st.out, /guest running/);
    writeStop(disk);
    const result = await consoleMatch(consoleFile, /MPQ:result (\d+) (\d+)\n/, "the result", src);
    assert.equal(Number(result[1]), 0);
  },
});

Deno.test({
  name:
    "orchestrate migrate: topologies QEMU cannot migrate are refused before anything starts, naming the device",
  ignore,
  async fn() {
    using dir = tempDir("mpq-migrate-refuse-");
    const topo = writeTopology(dir.path, {
      name: "nomig",
      memory: "64M",
      devices: [
        { type: "remote", id: "lsi0", device: "lsi53c895a" },
        { type: "vhost-user-rng", id: "rng0", backend: { mpq: {} } },
        { type: "ivshmem", id: "ivs0", vectors: 1, server: { mpq: { size: "1M" } } },
      ],
    });
    const [exe, ...pre] = selfCommand();
    const o = await new Deno.Command(exe, {
      args: [...pre, "orchestrate", topo, "--incoming", "tcp:127.0.0.1:4444"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(o.stderr);
    assert.equal(o.code, 1);
    assert.match(
      err,
      /cannot be a migration destination: lsi0 \(x-pci-proxy-dev\): .*; rng0 \(vhost-user-rng-pci\): .*; ivs0 \(ivshmem-doorbell\): /,
    );
    assert.doesNotMatch(new TextDecoder().decode(o.stdout), /started|QMP ready/, "nothing started");
    // And a source: migrate names the same devices; the VM runs on.
    await using run = MpqRun.start([
      "orchestrate",
      writeTopology(dir.path, {
        name: "nomig-src",
        memory: "64M",
        devices: [{ type: "vhost-user-rng", id: "rng0", backend: { mpq: {} } }],
      }, "src.json"),
    ]);
    await run.waitFor(/\] running +2 processes/);
    const refused = await mpqCtl([await controlSocketOf(run), "migrate", "tcp:127.0.0.1:4444"]);
    assert.equal(refused.code, 1);
    assert.match(
      refused.err,
      /this VM cannot migrate: rng0 \(vhost-user-rng-pci\): QEMU 7.2 marks vhost-user-rng unmigratable/,
    );
    const bad = await mpqCtl([await controlSocketOf(run), "migrate", "ftp://x"]);
    assert.equal(bad.code, 1);
    assert.match(bad.err, /expected tcp:HOST:PORT or unix:\/ABSOLUTE\/PATH: got "ftp:\/\/x"/);
  },
});

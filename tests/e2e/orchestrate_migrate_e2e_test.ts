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
import { MpqRun, tempDir, waitGone, writeTopology } from "./orchestrate_harness.ts";

const ignore = !guestAvailable();

/** Waits (bounded) for `MPQ:name value` on the console file; returns the value. */
async function marker(consoleFile: string, re: RegExp, what: string, run: MpqRun): Promise<RegExpMatchArray> {
  const deadline = Date.now() + 120_000;
  let text = "";
  while (Date.now() < deadline) {
    try {
      text = Deno.readTextFileSync(consoleFile).replaceAll("\r", "");
    } catch { /* not yet */ }
    const m = text.match(re);
    if (m) return m;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${what} never appeared\n--- console ---\n${text.slice(-3000)}\n${run.report()}`);
}

async function ctl(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const [exe, ...pre] = selfCommand();
  const o = await new Deno.Command(exe, { args: [...pre, "ctl", ...args], stdout: "piped", stderr: "piped" })
    .output();
  const d = new TextDecoder();
  return { code: o.code, out: d.decode(o.stdout), err: d.decode(o.stderr) };
}

/** The control socket a run printed. */
async function controlSocket(run: MpqRun): Promise<string> {
  return (await run.waitFor(/\] control +mpq ctl (\S+) status/))[1];
}

Deno.test({
  name:
    "orchestrate migrate e2e: the source migrates the VM to an --incoming destination and exits 0; the guest verifies its disk through the switch",
  ignore,
  async fn() {
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
    const uri = `unix:${dir.path}/migrate.sock`;
    await using dst = MpqRun.start([
      "orchestrate",
      writeTopology(dir.path, topology("dst"), "dst.json"),
      "--incoming",
      uri,
    ]);
    await dst.waitFor(/qmp incoming +waiting for the migration on unix:/);
    const dstControl = await controlSocket(dst);
    const waiting = await ctl([dstControl, "status"]);
    assert.equal(waiting.code, 0, waiting.err);
    assert.match(waiting.out, /guest inmigrate/);

    await using src = MpqRun.start(["orchestrate", writeTopology(dir.path, topology("src"), "src.json")]);
    await src.waitFor(/\] running +2 processes/);
    const srcControl = await controlSocket(src);
    const srcConsole = `${dir.path}/src.console`;
    await marker(srcConsole, /MPQ:round 1\n/, "the first round on the source", src);

    const moved = await ctl([srcControl, "migrate", uri]);
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
    await marker(dstConsole, new RegExp(`MPQ:round ${rounds + 2}\\n`), "two rounds on the destination", dst);
    const st = await ctl([dstControl, "status", "--json"]);
    const reply = JSON.parse(st.out);
    assert.equal(reply.result.guest.status, "running");
    assert.deepEqual(reply.result.processes.map((p: { role: string }) => p.role), ["vhost", "qemu"]);
    writeStop(disk);
    const result = await marker(dstConsole, /MPQ:result (\d+) (\d+)\n/, "the result", dst);
    assert.equal(Number(result[1]), 0, Deno.readTextFileSync(dstConsole).slice(-2000));
    assert.doesNotMatch(Deno.readTextFileSync(srcConsole) + Deno.readTextFileSync(dstConsole), /MISMATCH/);
  },
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
    const control = await controlSocket(src);
    await marker(consoleFile, /MPQ:round 1\n/, "the first round", src);
    const failed = await ctl([control, "migrate", `unix:${dir.path}/nobody.sock`]);
    assert.equal(failed.code, 1);
    assert.match(failed.err, /mpq ctl: migrate: .*(No such file|Failed to connect|failed)/i);
    const st = await ctl([control, "status"]);
    assert.match(st.out, /guest running/);
    writeStop(disk);
    const result = await marker(consoleFile, /MPQ:result (\d+) (\d+)\n/, "the result", src);
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
    const refused = await ctl([await controlSocket(run), "migrate", "tcp:127.0.0.1:4444"]);
    assert.equal(refused.code, 1);
    assert.match(
      refused.err,
      /this VM cannot migrate: rng0 \(vhost-user-rng-pci\): QEMU 7.2 marks vhost-user-rng unmigratable/,
    );
    const bad = await ctl([await controlSocket(run), "migrate", "ftp://x"]);
    assert.equal(bad.code, 1);
    assert.match(bad.err, /expected tcp:HOST:PORT or unix:\/ABSOLUTE\/PATH: got "ftp:\/\/x"/);
  },
});

/**
 * The demo and QEMU's managed start modes (paused, preconfig, both) with real QEMU 7.2 under TCG,
 * plus `mpq qmp` against the operator monitor of a running VM.
 */
import assert from "node:assert/strict";
import { isListening } from "../../lib/orchestrate/launch.ts";
import { MpqRun, qemuAvailable, tempDir, waitGone, writeTopology } from "./orchestrate_harness.ts";

const ignore = !qemuAvailable();

Deno.test({
  name: "orchestrate --demo shows the remote lsi53c895a in the firmware's PCI scan and exits 0",
  ignore,
  async fn() {
    await using run = MpqRun.start(["orchestrate", "--demo"]);
    const st = await run.status();
    assert.equal(st.code, 0, run.report());
    assert.match(run.stdout, /PCI: init bdf=00:02\.0 id=1000:0012 +<- LSI53C895A, emulated by remote lsi0/);
    assert.match(run.stdout, /found lsi53c895a at 00:02\.0/);
    assert.match(run.stdout, /qmp step 1 +query-status: \{"status":"prelaunch"/);
    assert.match(run.stdout, /qmp cont +cont -> guest running/);
    assert.match(run.stdout, /qmp after 1 +query-status: \{"status":"running"/);
    assert.equal(run.pids.size, 2);
    assert.deepEqual(await waitGone(run.pids.values()), []);
    const dir = run.stdout.match(/mpq qmp (\S+)\/qmp-operator\.sock/)![1];
    assert.throws(() => Deno.statSync(dir), Deno.errors.NotFound, "runtime dir removed");
  },
});

Deno.test({
  name: "orchestrate --demo --dry-run prints the plan and starts nothing",
  ignore,
  async fn() {
    await using run = MpqRun.start(["orchestrate", "--demo", "--dry-run"]);
    const st = await run.status();
    assert.equal(st.code, 0, run.report());
    assert.match(run.stdout, /1\. remote lsi0/);
    assert.match(run.stdout, /-object x-remote-object,id=robj-lsi0,devid=lsi0,fd=3/);
    assert.match(run.stdout, /-device x-pci-proxy-dev,id=lsi0,fd=5/);
    assert.equal(run.pids.size, 0);
    await using json = MpqRun.start(["orchestrate", "--demo", "--dry-run", "--json"]);
    assert.equal((await json.status()).code, 0, json.report());
    const plan = JSON.parse(json.stdout);
    assert.deepEqual(plan.processes.map((p: { name: string }) => p.name), ["remote lsi0", "qemu"]);
  },
});

const MODES: Array<[string, string, string[]]> = [
  ["paused", "prelaunch", ["query-status", "cont"]],
  ["preconfig", "prelaunch", ["query-status", "x-exit-preconfig"]],
  ["preconfig-paused", "prelaunch", ["query-status", "x-exit-preconfig", "cont"]],
];

for (const [start, before, order] of MODES) {
  Deno.test({
    name: `orchestrate start "${start}" runs its QMP steps before the guest runs, then starts it`,
    ignore,
    async fn() {
      using dir = tempDir("mpq-start-");
      const topo = writeTopology(dir.path, {
        name: `start-${start}`,
        console: "none",
        start,
        steps: [{ execute: "query-status", expect: { status: before, running: false } }],
        afterStart: [{ execute: "query-status", expect: { status: "running", running: true } }],
        devices: [{ type: "remote", id: "lsi0", device: "lsi53c895a" }],
      });
      await using run = MpqRun.start(["orchestrate", topo]);
      await run.waitFor(/\] running +2 processes/);
      const seen = [...run.stdout.matchAll(/\] qmp (?:step \d+|preconfig|cont) +(\S+)/g)].map((m) =>
        m[1].replace(/:$/, "")
      );
      assert.deepEqual(seen, order, run.report());
      assert.match(run.stdout, /qmp after 1 +query-status: \{"status":"running"/);
      // An operator can ask too, on the second monitor.
      const sock = run.stdout.match(/mpq qmp (\S+qmp-operator\.sock)/)![1];
      await using q = MpqRun.start(["qmp", sock, "query-status"]);
      assert.equal((await q.status()).code, 0, q.report());
      assert.equal(JSON.parse(q.stdout).status, "running");
      run.child.kill("SIGTERM");
      assert.equal((await run.status()).code, 0, run.report());
      assert.deepEqual(await waitGone(run.pids.values()), []);
    },
  });
}

Deno.test({
  name: "qmp reports QEMU's error for a bad command with exit 1",
  ignore,
  async fn() {
    using dir = tempDir("mpq-start-");
    const topo = writeTopology(dir.path, { name: "qmp-cli", console: "none", start: "paused" });
    await using run = MpqRun.start(["orchestrate", topo]);
    await run.waitFor(/\] running +1 process;/);
    const sock = run.stdout.match(/mpq qmp (\S+qmp-operator\.sock)/)![1];
    await using bad = MpqRun.start(["qmp", sock, "no-such-command"]);
    assert.equal((await bad.status()).code, 1);
    assert.match(bad.stderr, /no-such-command: CommandNotFound/);
    await using args = MpqRun.start(["qmp", sock, "qom-get", '{"path": "/machine", "property": "type"}']);
    assert.equal((await args.status()).code, 0, args.report());
    assert.equal(JSON.parse(args.stdout), "pc-i440fx-7.2-machine");
    run.child.kill("SIGTERM");
    assert.equal((await run.status()).code, 0, run.report());
  },
});

Deno.test({
  name: "orchestrate uses an external vhost-user back-end (qemu-storage-daemon) on a socket path",
  ignore,
  async fn() {
    using dir = tempDir("mpq-start-");
    const disk = `${dir.path}/disk.img`;
    Deno.writeFileSync(disk, new Uint8Array(1024 * 1024));
    const sock = `${dir.path}/qsd.sock`;
    const qsd = new Deno.Command("qemu-storage-daemon", {
      args: [
        "--blockdev",
        `driver=file,node-name=disk0,filename=${disk}`,
        "--export",
        `type=vhost-user-blk,id=exp0,addr.type=unix,addr.path=${sock},node-name=disk0,writable=on`,
      ],
      stdout: "null",
      stderr: "piped",
      stdin: "null",
    }).spawn();
    try {
      const t = performance.now();
      while (!isListening(sock) && performance.now() - t < 20_000) {
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.ok(isListening(sock), "qemu-storage-daemon listens");
      const topo = writeTopology(dir.path, {
        name: "external",
        console: "none",
        start: "paused",
        devices: [{ type: "vhost-user-blk", id: "vblk0", backend: { socket: sock } }],
      });
      await using run = MpqRun.start(["orchestrate", topo]);
      await run.waitFor(/\] running +1 process;/);
      const opSock = run.stdout.match(/mpq qmp (\S+qmp-operator\.sock)/)![1];
      await using q = MpqRun.start([
        "qmp",
        opSock,
        "qom-get",
        '{"path": "/machine/peripheral/vblk0", "property": "type"}',
      ]);
      assert.equal((await q.status()).code, 0, q.report());
      assert.equal(JSON.parse(q.stdout), "vhost-user-blk-pci");
      run.child.kill("SIGTERM");
      assert.equal((await run.status()).code, 0, run.report());
    } finally {
      qsd.kill("SIGTERM");
      await qsd.status;
      await qsd.stderr.cancel();
    }
  },
});

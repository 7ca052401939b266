/**
 * Supervision with real QEMU 7.2 under TCG: unexpected exits tear the VM down and name the child,
 * signals tear it down with exit 0, SIGKILL of mpq leaves nothing behind, fds are exactly as planned.
 */
import assert from "node:assert/strict";
import {
  alive,
  fdTable,
  MpqRun,
  qemuAvailable,
  tempDir,
  waitGone,
  writeTopology,
} from "./orchestrate_harness.ts";

const ignore = !qemuAvailable();

/** A VM that stays up without a guest kernel: firmware only, one remote lsi53c895a. */
function firmwareVm(dir: string, extra: Record<string, unknown> = {}): unknown {
  return {
    name: "faults",
    memory: "512M",
    console: "none",
    debugcon: `${dir}/debugcon.log`,
    start: "paused",
    devices: [{ type: "remote", id: "lsi0", device: "lsi53c895a" }],
    ...extra,
  };
}

async function startVm(dir: string, extra: Record<string, unknown> = {}): Promise<MpqRun> {
  const run = MpqRun.start(["orchestrate", writeTopology(dir, firmwareVm(dir, extra))]);
  await run.waitFor(/\] running +2 processes/);
  assert.equal(run.pids.size, 2, run.report());
  return run;
}

/** The firmware VM plus an `mpq vhost blk` disk and an `mpq ivshmem` server: 4 processes, running. */
async function startFullVm(dir: string): Promise<MpqRun> {
  const disk = `${dir}/disk.img`;
  Deno.writeFileSync(disk, new Uint8Array(1024 * 1024));
  const run = MpqRun.start([
    "orchestrate",
    writeTopology(
      dir,
      firmwareVm(dir, {
        devices: [
          { type: "remote", id: "lsi0", device: "lsi53c895a" },
          { type: "vhost-user-blk", id: "vblk0", backend: { mpq: { file: disk } } },
          { type: "ivshmem", id: "ivs0", server: { mpq: { size: "1M" } } },
        ],
      }),
    ),
  ]);
  await run.waitFor(/\] running +4 processes/);
  return run;
}

function runtimeDirOf(run: MpqRun): string {
  const m = run.stdout.match(/mpq qmp (\S+)\/qmp-operator\.sock/);
  assert.ok(m, run.report());
  return m[1];
}

for (const victim of ["remote lsi0", "qemu"]) {
  Deno.test({
    name: `orchestrate kill -9 of ${victim} tears the VM down and exits 1 naming it`,
    ignore,
    async fn() {
      using dir = tempDir("mpq-faults-");
      await using run = await startVm(dir.path);
      const pid = run.pids.get(victim)!;
      const runtime = runtimeDirOf(run);
      Deno.kill(pid, "SIGKILL");
      const st = await run.status();
      assert.equal(st.code, 1, run.report());
      assert.match(
        run.stderr,
        new RegExp(`${victim} \\(pid ${pid}\\) exited unexpectedly: killed by SIGKILL`),
      );
      assert.deepEqual(await waitGone(run.pids.values()), [], "a VM process outlived mpq");
      assert.throws(() => Deno.statSync(runtime), Deno.errors.NotFound);
    },
  });
}

for (const sig of ["SIGTERM", "SIGINT"] as const) {
  Deno.test({
    name: `orchestrate ${sig} stops the VM in reverse order and exits 0`,
    ignore,
    async fn() {
      using dir = tempDir("mpq-faults-");
      await using run = await startVm(dir.path);
      const runtime = runtimeDirOf(run);
      run.child.kill(sig);
      const st = await run.status();
      assert.equal(st.code, 0, run.report());
      assert.match(run.stdout, new RegExp(`${sig} +stopping the VM`));
      // QEMU (started last) is stopped first, then the remote process.
      const qemuAt = run.stdout.search(/\] qemu +pid \d+ stopped/);
      const remoteAt = run.stdout.search(
        /\] remote lsi0 +pid \d+ (stopped|had already exited|ended with its proxy)/,
      );
      assert.ok(qemuAt > 0 && remoteAt > qemuAt, run.report());
      assert.deepEqual(await waitGone(run.pids.values()), []);
      assert.throws(() => Deno.statSync(runtime), Deno.errors.NotFound);
    },
  });
}

Deno.test({
  name: "orchestrate kill -9 of mpq leaves no process of the VM (parent-death signal)",
  ignore,
  async fn() {
    using dir = tempDir("mpq-faults-");
    await using run = await startVm(dir.path);
    const pids = [...run.pids.values()];
    assert.ok(pids.every(alive));
    run.child.kill("SIGKILL");
    const st = await run.status();
    assert.equal(st.signal, "SIGKILL");
    assert.deepEqual(await waitGone(pids), [], "VM processes survived SIGKILL of mpq");
  },
});

/** The inode of the listening UNIX socket bound at `path`, from /proc/net/unix. */
function listenerInode(path: string): string {
  for (const line of Deno.readTextFileSync("/proc/net/unix").split("\n")) {
    const cols = line.trim().split(/\s+/);
    if (cols.length >= 8 && cols[7] === path && (parseInt(cols[3], 16) & 0x10000) !== 0) return cols[6];
  }
  throw new Error(`no listening socket at ${path}`);
}

Deno.test({
  name: "orchestrate children get exactly the planned fds and no socket or pipe of mpq",
  ignore,
  async fn() {
    using dir = tempDir("mpq-faults-");
    await using run = await startFullVm(dir.path);
    const runtime = run.stdout.match(/mpq qmp (\S+)\/qmp-operator\.sock/)![1];
    const mpqFds = fdTable(run.child.pid);
    const tables = new Map([...run.pids].map(([name, pid]) => [name, fdTable(pid)]));
    const remote = tables.get("remote lsi0")!;
    const qemu = tables.get("qemu")!;
    const vhost = tables.get("vhost vblk0")!;
    // At the planned numbers: QEMU fd 3/4 = the QMP listeners mpq bound, fd 5 = the proxy's end of
    // the socketpair whose other end is the remote's fd 3; the vhost daemon's fd 3 = its listener.
    assert.equal(qemu.get(3), `socket:[${listenerInode(`${runtime}/qmp.sock`)}]`);
    assert.equal(qemu.get(4), `socket:[${listenerInode(`${runtime}/qmp-operator.sock`)}]`);
    assert.equal(vhost.get(3), `socket:[${listenerInode(`${runtime}/vhost-vblk0.sock`)}]`);
    assert.match(qemu.get(5) ?? "", /^socket:\[\d+\]$/);
    assert.match(remote.get(3) ?? "", /^socket:\[\d+\]$/);
    // Nothing of mpq's own (its epoll, eventfds, pidfds, QMP connection) leaked into any child.
    const stdio = new Set([0, 1, 2].map((fd) => mpqFds.get(fd)));
    const mine = new Set([...mpqFds.values()].filter((t) => /^(socket|pipe):/.test(t) && !stdio.has(t)));
    assert.ok(mine.size > 0, "mpq holds sockets of its own (at least its QMP connection)");
    for (const [name, table] of tables) {
      for (const [fd, target] of table) assert.ok(!mine.has(target), `${name} fd ${fd} is mpq's ${target}`);
      for (const fd of [0, 1, 2]) assert.equal(table.get(fd), mpqFds.get(fd), `${name} stdio fd ${fd}`);
    }
  },
});

Deno.test({
  name: "orchestrate a failing QMP step names the step, tears down and exits 1",
  ignore,
  async fn() {
    using dir = tempDir("mpq-faults-");
    const topo = writeTopology(dir.path, firmwareVm(dir.path, { steps: [{ execute: "no-such-command" }] }));
    await using run = MpqRun.start(["orchestrate", topo]);
    const st = await run.status();
    assert.equal(st.code, 1, run.report());
    assert.match(run.stderr, /QMP step 1 \(no-such-command\) failed: no-such-command: CommandNotFound/);
    assert.deepEqual(await waitGone(run.pids.values()), []);
  },
});

Deno.test({
  name: "orchestrate an unmet expectation of a step names it and exits 1",
  ignore,
  async fn() {
    using dir = tempDir("mpq-faults-");
    const topo = writeTopology(
      dir.path,
      firmwareVm(dir.path, { steps: [{ execute: "query-status", expect: { status: "running" } }] }),
    );
    await using run = MpqRun.start(["orchestrate", topo]);
    const st = await run.status();
    assert.equal(st.code, 1, run.report());
    assert.match(
      run.stderr,
      /QMP step 1 \(query-status\): expected \{"status":"running"\}, got \{"status":"prelaunch"/,
    );
    assert.deepEqual(await waitGone(run.pids.values()), []);
  },
});

Deno.test({
  name: "orchestrate a QEMU that fails at start-up is reported with its exit status",
  ignore,
  async fn() {
    using dir = tempDir("mpq-faults-");
    const topo = writeTopology(dir.path, firmwareVm(dir.path, { extraArgs: ["-device", "no-such-device"] }));
    await using run = MpqRun.start(["orchestrate", topo]);
    const st = await run.status();
    assert.equal(st.code, 1, run.report());
    assert.match(run.stderr, /qemu \(pid \d+\) exited (while starting|unexpectedly): exit 1/);
    assert.match(run.stderr, /no-such-device/); // QEMU's own message, on inherited stderr
    assert.deepEqual(await waitGone(run.pids.values()), []);
  },
});

for (const victim of ["vhost vblk0", "ivshmem ivs0"]) {
  Deno.test({
    name: `orchestrate kill -9 of ${victim} (an mpq child) tears the VM down and exits 1 naming it`,
    ignore,
    async fn() {
      using dir = tempDir("mpq-faults-");
      await using run = await startFullVm(dir.path);
      const pid = run.pids.get(victim)!;
      Deno.kill(pid, "SIGKILL");
      const st = await run.status();
      assert.equal(st.code, 1, run.report());
      assert.match(
        run.stderr,
        new RegExp(`${victim} \\(pid ${pid}\\) exited unexpectedly: killed by SIGKILL`),
      );
      assert.deepEqual(await waitGone(run.pids.values()), [], "a VM process outlived mpq");
    },
  });
}

Deno.test({
  name: "orchestrate kill -9 of mpq also takes its mpq vhost and mpq ivshmem children",
  ignore,
  async fn() {
    using dir = tempDir("mpq-faults-");
    await using run = await startFullVm(dir.path);
    const pids = [...run.pids.values()];
    assert.equal(pids.length, 4);
    run.child.kill("SIGKILL");
    await run.status();
    assert.deepEqual(await waitGone(pids), [], "VM processes survived SIGKILL of mpq");
  },
});

Deno.test({
  name: "orchestrate an mpq vhost child that cannot start (missing image) is named and nothing is left",
  ignore,
  async fn() {
    using dir = tempDir("mpq-faults-");
    const topo = writeTopology(
      dir.path,
      firmwareVm(dir.path, {
        devices: [{
          type: "vhost-user-blk",
          id: "vblk0",
          backend: { mpq: { file: `${dir.path}/missing.img` } },
        }],
      }),
    );
    await using run = MpqRun.start(["orchestrate", topo]);
    const st = await run.status();
    assert.equal(st.code, 1, run.report());
    assert.match(run.stderr, /vhost vblk0 \(pid \d+\) exited unexpectedly: exit 1/);
    assert.match(run.stderr, /missing\.img/, "the daemon's own message names the file");
    assert.deepEqual(await waitGone(run.pids.values()), []);
  },
});

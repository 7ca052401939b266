/**
 * `mpq orchestrate`'s control socket (issue 11 §1) with a real QEMU (no guest OS needed): the path
 * set in the topology, `status` with every process's role, pid, state, uptime, restarts and
 * sockets, `events` following what happens (a device added, a back-end killed and restarted, QEMU's
 * QMP events, the teardown), the QMP passthrough, and `stop`.
 */
import assert from "node:assert/strict";
import { selfCommand } from "../../lib/cli/self.ts";
import { mpqCtl, MpqRun, qemuAvailable, tempDir, waitGone, writeTopology } from "./orchestrate_harness.ts";

Deno.test({
  name: "orchestrate control socket: status, events, QMP passthrough and stop, at the path the topology sets",
  ignore: !qemuAvailable(),
  async fn() {
    using dir = tempDir("mpq-control-");
    const disk = `${dir.path}/d.img`;
    Deno.writeFileSync(disk, new Uint8Array(1 << 20));
    const control = `${dir.path}/vm.ctl`;
    await using run = MpqRun.start([
      "orchestrate",
      writeTopology(dir.path, {
        name: "ctl",
        memory: "32M",
        console: "none",
        control,
        devices: [{
          type: "vhost-user-blk",
          id: "vblk0",
          backend: { mpq: { file: disk } },
          restart: "on-failure",
        }],
      }),
    ]);
    await run.waitFor(/\] running +2 processes/);
    assert.match(run.stdout, new RegExp(`control +mpq ctl ${control} status`));
    assert.equal(Deno.statSync(control).mode! & 0o777, 0o600, "the control socket is private");

    // Follow the events from here on.
    const [exe, ...pre] = selfCommand();
    const follower = new Deno.Command(exe, {
      args: [...pre, "ctl", control, "events", "--json"],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const lines: string[] = [];
    const reading = (async () => {
      let pending = "";
      for await (const chunk of follower.stdout.pipeThrough(new TextDecoderStream())) {
        pending += chunk;
        const parts = pending.split("\n");
        pending = parts.pop()!;
        lines.push(...parts);
      }
    })();
    const seen = async (re: RegExp) => {
      const deadline = Date.now() + 30_000;
      while (!lines.some((l) => re.test(l))) {
        if (Date.now() > deadline) throw new Error(`no event ${re}: ${lines.join("\n")}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    };
    await new Promise((r) => setTimeout(r, 300)); // subscribed

    const st = JSON.parse((await mpqCtl([control, "status", "--json"])).out).result;
    assert.equal(st.guest.status, "running");
    assert.equal(st.control, control);
    const vhost = st.processes.find((p: { role: string }) => p.role === "vhost");
    assert.equal(vhost.state, "running");
    assert.equal(vhost.restarts, 0);
    assert.ok(vhost.uptime >= 0);
    assert.match(vhost.sockets.join(" "), /^fd 3: \/\S+\/mpq-ctl-\w+\/vhost-vblk0\.sock$/);

    // A device added: an event; a back-end killed: restarted, an event.
    const added = await mpqCtl([
      control,
      "add",
      JSON.stringify({ type: "vhost-user-rng", id: "rng9", backend: { mpq: {} } }),
    ]);
    assert.equal(added.code, 0, added.err);
    await seen(/"event":"added","data":\{"id":"rng9"\}/);
    Deno.kill(run.pids.get("vhost vblk0")!, "SIGKILL");
    await seen(/"event":"restarted","data":\{"name":"vhost vblk0","pid":\d+,"status":"killed by SIGKILL"\}/);
    const after = JSON.parse((await mpqCtl([control, "status", "--json"])).out).result;
    assert.equal(after.processes.find((p: { name: string }) => p.name === "vhost vblk0").restarts, 1);

    // QMP passthrough, and QEMU's events relayed.
    const stopped = await mpqCtl([control, "qmp", "stop"]);
    assert.equal(stopped.code, 0, stopped.err);
    await seen(/"event":"qmp","data":\{.*"event":"STOP"/);
    assert.match((await mpqCtl([control, "qmp", "query-status"])).out, /"status": "paused"/);
    const bad = await mpqCtl([control, "qmp", "no-such-command"]);
    assert.equal(bad.code, 1);
    assert.match(bad.err, /CommandNotFound/);

    // stop: the VM goes down in order, exit 0; the follower sees it and ends.
    const bye = await mpqCtl([control, "stop"]);
    assert.equal(bye.code, 0, bye.err);
    assert.equal((await run.status()).code, 0, run.report());
    await seen(/"event":"stopping","data":\{"code":0\}/);
    assert.equal((await follower.status).code, 0);
    await reading;
    assert.deepEqual(await waitGone(run.pids.values()), []);
  },
});

/**
 * `mpq vhost serve`: several devices in one process, each on its own socket, each with verified
 * I/O, reconnection and inflight recovery of its own, metrics labelled per device; devices added
 * and removed at runtime through the control socket and `mpq vhost ctl`; bad specs, configs and
 * control requests refused with errors naming what was wrong.
 */
import assert from "node:assert/strict";
import { assertSameBytes } from "../helpers/pattern.ts";
import { type ChildProcess, connectUnix, OpenFlags, openPath, Signal, spawn } from "../../ffi/mod.ts";
import { selfCommand } from "../../lib/cli/self.ts";
import { controlRequest } from "../../lib/cli/control_client.ts";
import { Blk, VhostUserFrontend } from "../helpers/vhost_frontend.ts";
import { makeDiskFile, patternBytes, readFileRange } from "../helpers/vhost_backends.ts";

const DISK = 8 << 20;

interface Env {
  dir: string;
  disks: string[];
  control: string;
  metrics: string;
  sock(name: string): string;
  start(args: string[]): Promise<ChildProcess>;
  log(): string;
}

async function withEnv(disks: number, fn: (env: Env) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhost-serve-" });
  const children: ChildProcess[] = [];
  const logPath = `${dir}/serve.log`;
  const env: Env = {
    dir,
    disks: [],
    control: `${dir}/ctl.sock`,
    metrics: `${dir}/metrics.sock`,
    sock: (name) => `${dir}/${name}.sock`,
    async start(args) {
      const log = openPath(logPath, OpenFlags.O_WRONLY | OpenFlags.O_CREAT | OpenFlags.O_APPEND);
      const [exe, ...pre] = selfCommand();
      const child = spawn(exe, [exe, ...pre, "vhost", "serve", ...args], {
        fds: new Map([[1, log], [2, log]]),
        stdio: "null",
      });
      log.close();
      children.push(child);
      const deadline = Date.now() + 15_000;
      while (!Deno.readTextFileSync(logPath).includes("listening on") || !exists(env.control)) {
        if (child.tryWait()) throw new Error(`mpq vhost serve exited: ${env.log()}`);
        if (Date.now() > deadline) throw new Error(`mpq vhost serve did not start: ${env.log()}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      return child;
    },
    log: () => {
      try {
        return Deno.readTextFileSync(logPath);
      } catch {
        return "";
      }
    },
  };
  try {
    for (let i = 0; i < disks; i++) {
      const f = `${dir}/disk${i}.img`;
      await makeDiskFile(f, DISK, (off) => patternBytes(1 << 20, 10 * i + (off >> 20)));
      env.disks.push(f);
    }
    await fn(env);
  } finally {
    for (const c of children) {
      if (!c.status) c.kill(Signal.SIGTERM);
      const t = setTimeout(() => c.status || c.kill(Signal.SIGKILL), 5000);
      await c.wait();
      clearTimeout(t);
    }
    await Deno.remove(dir, { recursive: true });
  }
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

async function until(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

function scrape(path: string): string {
  const s = connectUnix(path, { nonBlocking: false });
  try {
    const chunks: string[] = [];
    const buf = new Uint8Array(65536);
    while (true) {
      const r = s.recvMsg(buf);
      if (!r || r.bytes === 0) break;
      chunks.push(new TextDecoder().decode(buf.subarray(0, r.bytes)));
    }
    return chunks.join("");
  } finally {
    s.close();
  }
}

async function blkRoundTrip(
  fe: VhostUserFrontend,
  file: string,
  sector: number,
  seed: number,
): Promise<void> {
  const data = patternBytes(32768, seed);
  assert.equal((await fe.blkWrite(sector, data)).status, Blk.S_OK);
  assertSameBytes((await fe.blkRead(sector, 32768)).data, data);
  assertSameBytes(readFileRange(file, sector * 512, 32768), data);
}

async function mpqCtl(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const [exe, ...pre] = selfCommand();
  const o = await new Deno.Command(exe, {
    args: [...pre, "vhost", "ctl", ...args],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const d = new TextDecoder();
  return { code: o.code, out: d.decode(o.stdout), err: d.decode(o.stderr) };
}

Deno.test("vhost serve: two disks and an rng in one process, each front-end with verified I/O, metrics per device", async () => {
  await withEnv(2, async (env) => {
    await env.start([
      "--device",
      `blk,id=d0,file=${env.disks[0]},socket=${env.sock("d0")},num-queues=2`,
      "--device",
      `blk,id=d1,file=${env.disks[1]},socket=${env.sock("d1")},num-queues=1,engine=preadv`,
      "--device",
      `rng,id=r0,socket=${env.sock("r0")}`,
      `--control=${env.control}`,
      `--metrics=${env.metrics}`,
    ]);
    await using a = await VhostUserFrontend.connect(env.sock("d0"), { queues: 2 });
    await using b = await VhostUserFrontend.connect(env.sock("d1"));
    await using r = await VhostUserFrontend.connect(env.sock("r0"), { device: "rng" });
    for (const fe of [a, b, r]) await fe.handshake();
    for (const fe of [a, b, r]) await fe.start();
    // All three at once.
    await Promise.all([
      blkRoundTrip(a, env.disks[0], 100, 1),
      blkRoundTrip(b, env.disks[1], 100, 2),
      r.rngRead(64).then((x) => assert.equal(x.len, 64)),
    ]);
    const d0 = patternBytes(8192, 3);
    assert.equal((await a.blkWrite(300, d0, 1)).status, Blk.S_OK, "d0's second queue");
    assertSameBytes(readFileRange(env.disks[0], 300 * 512, 8192), d0);
    assertSameBytes(
      readFileRange(env.disks[1], 300 * 512, 8192),
      patternBytes(1 << 20, 10).subarray(300 * 512, 300 * 512 + 8192),
      "d1 untouched there",
    );
    const text = scrape(env.metrics);
    assert.equal(text.match(/^# HELP mpq_vhost_requests_total /gm)?.length, 1, "one HELP per family");
    assert.match(text, /mpq_vhost_requests_total\{device="d0",queue="1"\} 1\n/);
    assert.match(text, /mpq_vhost_requests_total\{device="d1",queue="0"\} 2\n/);
    assert.match(text, /mpq_vhost_requests_total\{device="r0",queue="0"\} 1\n/);
    const list = await controlRequest(env.control, "list");
    assert.equal(list.ok, true);
    const rows = list.result as Array<{ id: string; connected: boolean; requests: number; type: string }>;
    assert.deepEqual(rows.map((x) => [x.id, x.type, x.connected]), [
      ["d0", "blk", true],
      ["d1", "blk", true],
      ["r0", "rng", true],
    ]);
    for (const fe of [a, b, r]) await fe.stop();
  });
});

Deno.test("vhost serve: one device's front-end reconnects while another keeps serving", async () => {
  await withEnv(2, async (env) => {
    await env.start([
      "--device",
      `blk,id=d0,file=${env.disks[0]},socket=${env.sock("d0")},num-queues=1`,
      "--device",
      `blk,id=d1,file=${env.disks[1]},socket=${env.sock("d1")},num-queues=1`,
      `--control=${env.control}`,
    ]);
    await using b = await VhostUserFrontend.connect(env.sock("d1"));
    await b.handshake();
    await b.start();
    for (let round = 0; round < 3; round++) {
      const a = await VhostUserFrontend.connect(env.sock("d0"));
      await a.handshake();
      await a.start();
      await blkRoundTrip(a, env.disks[0], 200 + round * 64, 20 + round);
      await a.close(); // no stop: the socket just goes
      await blkRoundTrip(b, env.disks[1], 200 + round * 64, 30 + round);
    }
    await until(
      "d0 was connected three times",
      () =>
        /d0: front-end disconnected[^]*d0: front-end disconnected[^]*d0: front-end disconnected/.test(
          env.log(),
        ),
    );
    await b.stop();
  });
});

Deno.test("vhost serve: after kill -9, a restarted serve resubmits each device's in-flight writes", async () => {
  await withEnv(2, async (env) => {
    const args = [
      "--device",
      `blk,id=d0,file=${env.disks[0]},socket=${env.sock("d0")},num-queues=1`,
      "--device",
      `blk,id=d1,file=${env.disks[1]},socket=${env.sock("d1")},num-queues=1`,
      `--control=${env.control}`,
    ];
    const first = await env.start(args);
    await using a = await VhostUserFrontend.connect(env.sock("d0"), { queueSize: 256, depth: 32 });
    await using b = await VhostUserFrontend.connect(env.sock("d1"), { queueSize: 256, depth: 32 });
    for (const fe of [a, b]) {
      await fe.handshake();
      await fe.start();
      assert.ok(fe.inflight, "each device hands out its own inflight region");
    }
    const writes: Promise<{ status: number }>[] = [];
    for (let i = 0; i < 32; i++) {
      writes.push(a.blkWrite(i * 128, patternBytes(65536, 400 + i)));
      writes.push(b.blkWrite(i * 128, patternBytes(65536, 500 + i)));
    }
    await until(
      "all writes are on the rings",
      () => a.queues[0].ring.availIdx === 32 && b.queues[0].ring.availIdx === 32,
    );
    first.kill(Signal.SIGKILL);
    await first.wait();
    await until("the front-ends see the daemon gone", () => !a.connected && !b.connected);
    await Deno.remove(env.control).catch(() => {});
    await env.start(args);
    await a.resume();
    await b.resume();
    for (const r of await Promise.all(writes)) assert.equal(r.status, Blk.S_OK);
    for (let i = 0; i < 32; i++) {
      assertSameBytes(
        readFileRange(env.disks[0], i * 128 * 512, 65536),
        patternBytes(65536, 400 + i),
        `d0 write ${i}`,
      );
      assertSameBytes(
        readFileRange(env.disks[1], i * 128 * 512, 65536),
        patternBytes(65536, 500 + i),
        `d1 write ${i}`,
      );
    }
    assert.equal(a.queues[0].ring.usedIdx(), 32, "d0: every request completed once");
    assert.equal(b.queues[0].ring.usedIdx(), 32, "d1: every request completed once");
    await a.stop();
    await b.stop();
  });
});

Deno.test("vhost serve control: add and remove devices at runtime, refusing what is wrong", async () => {
  await withEnv(2, async (env) => {
    await env.start(["--device", `rng,id=r0,socket=${env.sock("r0")}`, `--control=${env.control}`]);
    // add (JSON object, and --device text)
    const added = await controlRequest(env.control, "add", {
      device: { type: "blk", id: "d0", file: env.disks[0], socket: env.sock("d0"), numQueues: 1 },
    });
    assert.equal(added.ok, true, added.error);
    const viaText = await controlRequest(env.control, "add", {
      device: `blk,id=d1,file=${env.disks[1]},socket=${env.sock("d1")}`,
    });
    assert.equal(viaText.ok, true, viaText.error);
    {
      await using fe = await VhostUserFrontend.connect(env.sock("d0"));
      await fe.handshake();
      await fe.start();
      await blkRoundTrip(fe, env.disks[0], 64, 7);
      const busy = await controlRequest(env.control, "remove", { id: "d0" });
      assert.deepEqual(busy, {
        id: 1,
        ok: false,
        error: "d0 has a connected front-end: detach it first, or remove with force",
      });
      const forced = await controlRequest(env.control, "remove", { id: "d0", force: true });
      assert.equal(forced.ok, true, forced.error);
      await until("the forced front-end is disconnected", () => !fe.connected);
    }
    assert.equal(exists(env.sock("d0")), false, "a removed device's socket is gone");
    assert.equal(
      (await controlRequest(env.control, "remove", { id: "d1" })).ok,
      true,
      "no front-end: removed",
    );
    // The same id and socket can be added again.
    assert.equal(
      (await controlRequest(env.control, "add", {
        device: `blk,id=d0,file=${env.disks[0]},socket=${env.sock("d0")}`,
      })).ok,
      true,
    );
    {
      await using fe = await VhostUserFrontend.connect(env.sock("d0"));
      await fe.handshake();
      await fe.start();
      await blkRoundTrip(fe, env.disks[0], 640, 8);
      await fe.stop();
    }
    const errors: Array<[string, Record<string, unknown>, RegExp]> = [
      [
        "add",
        { device: `blk,id=d0,file=${env.disks[1]},socket=${env.sock("x")}` },
        /d0: id d0 is already used by d0/,
      ],
      [
        "add",
        { device: `blk,id=d9,file=${env.disks[1]},socket=${env.sock("r0")}` },
        /socket .*r0.sock is already used by r0/,
      ],
      [
        "add",
        { device: `blk,id=d9,file=${env.dir}/missing.img,socket=${env.sock("d9")}` },
        /missing\.img: open .*ENOENT/,
      ],
      ["add", { device: { type: "blk", id: "d9", socket: env.sock("d9") } }, /d9: file=PATH is required/],
      ["add", { device: "nvme,socket=/x" }, /device type must be blk or rng: got "nvme"/],
      ["remove", { id: "nope" }, /no device "nope" \(devices: r0, d0\)/],
      ["remove", {}, /id: expected a device id string/],
      ["frobnicate", {}, /unknown command "frobnicate" \(commands: list, add, remove, stop\)/],
    ];
    for (const [cmd, args, re] of errors) {
      const r = await controlRequest(env.control, cmd, args);
      assert.equal(r.ok, false, `${cmd} ${JSON.stringify(args)}`);
      assert.match(r.error!, re);
    }
    assert.equal(exists(env.sock("d9")), false, "a failed add leaves no socket behind");
    const rows = (await controlRequest(env.control, "list")).result as Array<{ id: string }>;
    assert.deepEqual(rows.map((r) => r.id), ["r0", "d0"]);
  });
});

Deno.test("vhost serve control: malformed requests get an error reply and the connection stays usable", async () => {
  await withEnv(0, async (env) => {
    await env.start(["--device", `rng,id=r0,socket=${env.sock("r0")}`, `--control=${env.control}`]);
    const conn = await Deno.connect({ transport: "unix", path: env.control });
    try {
      const lines = [
        "not json",
        "[1,2]",
        '{"cmd": 5}',
        '{"cmd": "list", "args": []}',
        '{"id": 7, "cmd": "list"}',
      ];
      await conn.write(new TextEncoder().encode(lines.join("\n") + "\n"));
      let text = "";
      const buf = new Uint8Array(65536);
      while (text.split("\n").length <= lines.length) {
        const n = await conn.read(buf);
        if (n === null) break;
        text += new TextDecoder().decode(buf.subarray(0, n));
      }
      const replies = text.trim().split("\n").map((l) => JSON.parse(l));
      assert.equal(replies.length, 5);
      assert.match(replies[0].error, /request is not JSON/);
      assert.equal(replies[1].error, "a request must be a JSON object");
      assert.equal(replies[2].error, "cmd: expected a string");
      assert.equal(replies[3].error, "args: expected a JSON object");
      assert.equal(replies[4].id, 7);
      assert.equal(replies[4].ok, true);
    } finally {
      conn.close();
    }
    // A line that never ends is cut off at 64 KiB: error reply, then the connection closes.
    const big = await Deno.connect({ transport: "unix", path: env.control });
    try {
      await big.write(new Uint8Array(200_000).fill(0x61)).catch(() => 0);
      let text = "";
      const buf = new Uint8Array(65536);
      while (true) {
        const n = await big.read(buf).catch(() => null);
        if (n === null) break;
        text += new TextDecoder().decode(buf.subarray(0, n));
      }
      assert.match(text, /request line longer than 65536 bytes/);
    } finally {
      big.close();
    }
    assert.equal((await controlRequest(env.control, "list")).ok, true, "the server still answers");
  });
});

Deno.test("vhost ctl: list, add, remove and stop from the command line, with exit codes", async () => {
  await withEnv(1, async (env) => {
    const child = await env.start([
      "--device",
      `rng,id=r0,socket=${env.sock("r0")}`,
      `--control=${env.control}`,
    ]);
    const add = await mpqCtl([
      env.control,
      "add",
      `blk,id=d0,file=${env.disks[0]},socket=${env.sock("d0")},num-queues=1`,
    ]);
    assert.equal(add.code, 0, add.err);
    assert.match(
      add.out,
      /^added d0: .*disk0\.img, 8388608 bytes, writethrough, engine .*, listening on .*d0\.sock/,
    );
    const list = await mpqCtl([env.control, "list"]);
    assert.equal(list.code, 0);
    assert.match(
      list.out,
      /^ID\tTYPE\tLISTEN\tCONNECTED\tREQUESTS\nr0\trng\t.*r0\.sock\tno\t0\nd0\tblk\t.*d0\.sock\tno\t0\n$/,
    );
    const json = await mpqCtl([env.control, "list", "--json"]);
    assert.equal(JSON.parse(json.out).result.length, 2);
    const bad = await mpqCtl([env.control, "remove", "zz"]);
    assert.equal(bad.code, 1);
    assert.match(bad.err, /remove: no device "zz"/);
    assert.equal((await mpqCtl([env.control, "remove", "d0"])).code, 0);
    const usage = await mpqCtl([env.control, "frob"]);
    assert.equal(usage.code, 1);
    assert.match(usage.err, /unknown command 'frob'/);
    const nosock = await mpqCtl([`${env.dir}/nope.sock`, "list"]);
    assert.equal(nosock.code, 1);
    assert.match(nosock.err, /nope\.sock: cannot connect/);
    const stop = await mpqCtl([env.control, "stop"]);
    assert.equal(stop.code, 0);
    const st = await child.wait();
    assert.equal(st.code, 0, "serve exits 0 after stop");
    assert.equal(exists(env.control), false, "the control socket is removed");
    assert.equal(exists(env.sock("r0")), false, "device sockets are removed");
  });
});

Deno.test("vhost serve: bad --device, --config and clashes exit 1 naming what was wrong, leaving nothing", async () => {
  await withEnv(1, async (env) => {
    const cfg = `${env.dir}/serve.json`;
    const cases: Array<[string[], string | null, RegExp]> = [
      [["--device", "blk,socket=/x"], null, /--device "blk,socket=\/x" \(#1\): blk0: file=PATH is required/],
      [
        ["--device", `rng,id=a,socket=${env.sock("a")}`, "--device", `rng,id=a,socket=${env.sock("b")}`],
        null,
        /a: id a is already used by a/,
      ],
      [[], null, /nothing to serve/],
      [["--config", cfg], "{nope", /--config .*serve\.json: not JSON/],
      [["--config", cfg], '{"devices": {}}', /devices: expected an array/],
      [
        ["--config", cfg],
        '{"devices": [{"type": "rng"}]}',
        /devices\[0\]: rng0: exactly one of socket=PATH or fd=N is required/,
      ],
      [["--config", cfg], '{"devics": []}', /unknown key "devics"/],
      [
        ["--device", `blk,id=d0,file=${env.dir}/missing.img,socket=${env.sock("d0")}`],
        null,
        /device d0 file: .*missing\.img: open .*ENOENT/,
      ],
      [["--device", "rng,fd=1"], null, /device rng0 fd: 1: not a usable listening socket/],
    ];
    for (const [args, config, re] of cases) {
      if (config !== null) await Deno.writeTextFile(cfg, config);
      const [exe, ...pre] = selfCommand();
      const o = await new Deno.Command(exe, {
        args: [...pre, "vhost", "serve", ...args],
        stdout: "piped",
        stderr: "piped",
      }).output();
      const err = new TextDecoder().decode(o.stderr);
      assert.equal(o.code, 1, `${args.join(" ")}: ${err}`);
      assert.match(err, re, args.join(" "));
    }
    for (const e of Deno.readDirSync(env.dir)) assert.ok(!e.name.endsWith(".sock"), `left behind: ${e.name}`);
    // A config file with devices and the control socket works.
    await Deno.writeTextFile(
      cfg,
      JSON.stringify({
        devices: [{ type: "blk", id: "c0", file: env.disks[0], socket: env.sock("c0"), numQueues: 1 }],
        control: env.control,
      }),
    );
    await env.start(["--config", cfg]);
    await using fe = await VhostUserFrontend.connect(env.sock("c0"));
    await fe.handshake();
    await fe.start();
    await blkRoundTrip(fe, env.disks[0], 12, 9);
    await fe.stop();
  });
});

Deno.test("vhost serve --threads 2: devices spread over device threads, each with verified I/O; control and metrics span the threads", async () => {
  await withEnv(3, async (env) => {
    const child = await env.start([
      "--threads=2",
      "--device",
      `blk,id=d0,file=${env.disks[0]},socket=${env.sock("d0")},num-queues=2`,
      "--device",
      `blk,id=d1,file=${env.disks[1]},socket=${env.sock("d1")},num-queues=1`,
      "--device",
      `rng,id=r0,socket=${env.sock("r0")}`,
      `--control=${env.control}`,
      `--metrics=${env.metrics}`,
    ]);
    await until("every device listens", () => (env.log().match(/listening on/g) ?? []).length === 3);
    const threads = Number(Deno.readTextFileSync(`/proc/${child.pid}/status`).match(/Threads:\s+(\d+)/)![1]);
    assert.ok(threads >= 4, `device threads are running (${threads} threads)`);
    assert.match(env.log(), /d0: .*\(thread 0\)/);
    assert.match(env.log(), /d1: .*\(thread 1\)/);
    assert.match(env.log(), /r0: .*\(thread 0\)/, "the thread with the fewest devices gets the next one");
    {
      await using a = await VhostUserFrontend.connect(env.sock("d0"), { queues: 2 });
      await using b = await VhostUserFrontend.connect(env.sock("d1"));
      await using r = await VhostUserFrontend.connect(env.sock("r0"), { device: "rng" });
      for (const fe of [a, b, r]) await fe.handshake();
      for (const fe of [a, b, r]) await fe.start();
      for (let round = 0; round < 4; round++) {
        await Promise.all([
          blkRoundTrip(a, env.disks[0], 100 + 64 * round, 60 + round),
          blkRoundTrip(b, env.disks[1], 100 + 64 * round, 70 + round),
          r.rngRead(64).then((x) => assert.equal(x.len, 64)),
        ]);
      }
      // Adding at runtime: the new device goes to the thread with the fewest devices (thread 1).
      const added = await controlRequest(env.control, "add", {
        device: `blk,id=d2,file=${env.disks[2]},socket=${env.sock("d2")},num-queues=1`,
      });
      assert.equal(added.ok, true, added.error);
      assert.equal((added.result as { thread: number }).thread, 1);
      await using c = await VhostUserFrontend.connect(env.sock("d2"));
      await c.handshake();
      await c.start();
      await blkRoundTrip(c, env.disks[2], 300, 80);
      const rows = (await controlRequest(env.control, "list")).result as Array<
        { id: string; thread: number; connected: boolean; requests: number }
      >;
      assert.deepEqual(rows.map((x) => [x.id, x.thread, x.connected]), [
        ["d0", 0, true],
        ["d1", 1, true],
        ["r0", 0, true],
        ["d2", 1, true],
      ]);
      assert.equal(rows.find((x) => x.id === "d1")!.requests, 8);
      const text = scrape(env.metrics);
      assert.equal(
        text.match(/^# HELP mpq_vhost_requests_total /gm)?.length,
        1,
        "one HELP per family across threads",
      );
      assert.match(text, /mpq_vhost_requests_total\{device="d1",queue="0"\} 8\n/);
      assert.match(text, /mpq_vhost_requests_total\{device="r0",queue="0"\} 4\n/);
      assert.match(text, /mpq_vhost_requests_total\{device="d2",queue="0"\} 2\n/);
      const busy = await controlRequest(env.control, "remove", { id: "d2" });
      assert.match(busy.error!, /d2 has a connected front-end/);
      assert.equal((await controlRequest(env.control, "remove", { id: "d2", force: true })).ok, true);
      await until("d2's front-end is disconnected", () => !c.connected);
      assert.equal(exists(env.sock("d2")), false);
      const missing = await controlRequest(env.control, "add", {
        device: `blk,id=d9,file=${env.dir}/missing.img,socket=${env.sock("d9")}`,
      });
      assert.match(missing.error!, /missing\.img: open .*ENOENT/, "a failed add on a thread says why");
      for (const fe of [a, b, r]) await fe.stop();
    }
    assert.equal((await controlRequest(env.control, "stop")).ok, true);
    const st = await child.wait();
    assert.equal(st.code, 0, env.log());
    for (const n of ["d0", "d1", "r0", "d9"]) {
      assert.equal(exists(env.sock(n)), false, `${n}'s socket is removed`);
    }
  });
});

/** Front-end RAM mappings and open fds of a process. */
function footprint(pid: number): { maps: number; fds: number } {
  const maps = Deno.readTextFileSync(`/proc/${pid}/maps`).split("\n")
    .filter((l) => l.includes("memfd:vhost-frontend-ram")).length;
  return { maps, fds: [...Deno.readDirSync(`/proc/${pid}/fd`)].length };
}

Deno.test("vhost serve --queue-threads 3: a four-queue disk's rings on three threads with verified I/O on each; added and removed at runtime, twice, it leaves no mapping or fd behind", async () => {
  await withEnv(1, async (env) => {
    const child = await env.start([
      "--queue-threads=3",
      "--device",
      `rng,id=r0,socket=${env.sock("r0")}`,
      `--control=${env.control}`,
      `--metrics=${env.metrics}`,
    ]);
    const after: { maps: number; fds: number }[] = [];
    for (let cycle = 0; cycle < 2; cycle++) {
      const added = await controlRequest(env.control, "add", {
        device: { type: "blk", id: "d0", file: env.disks[0], socket: env.sock("d0"), numQueues: 4 },
      });
      assert.equal(added.ok, true, added.error);
      {
        await using fe = await VhostUserFrontend.connect(env.sock("d0"), { queues: 4, eventIdx: true });
        await fe.handshake();
        await fe.start();
        const data = [0, 1, 2, 3].map((q) => patternBytes(32768, 40 * cycle + q));
        const writes = await Promise.all(data.map((d, q) => fe.blkWrite(256 + 128 * q, d, q)));
        for (const w of writes) assert.equal(w.status, Blk.S_OK);
        // Read back through another queue than the one that wrote.
        const reads = await Promise.all(data.map((_, q) => fe.blkRead(256 + 128 * q, 32768, 3 - q)));
        reads.forEach((r, q) => assertSameBytes(r.data, data[q], `queue ${q}`));
        data.forEach((d, q) => assertSameBytes(readFileRange(env.disks[0], (256 + 128 * q) * 512, 32768), d));
        const text = scrape(env.metrics);
        for (let q = 0; q < 4; q++) {
          const served = Number(
            text.match(
              new RegExp(`^mpq_vhost_requests_total\\{device="d0",queue="${q}"\\} (\\d+)$`, "m"),
            )?.[1],
          );
          assert.ok(served >= 2, `queue ${q} counted its requests: ${served}`);
        }
        // Queue 0 stays on the device's thread; 1..3 go round the two queue threads, from the n-th.
        const placed = [0, 1, 2, 3].map((q) =>
          Number(
            text.match(new RegExp(`^mpq_vhost_queue_thread\\{device="d0",queue="${q}"\\} (\\d+)$`, "m"))?.[1],
          )
        );
        assert.deepEqual(placed, [0, (0 + cycle) % 2 + 1, (1 + cycle) % 2 + 1, (2 + cycle) % 2 + 1]);
        assert.equal(footprint(child.pid).maps, 3, "the device's thread and two queue threads map the RAM");
        assert.deepEqual(await fe.stop(), fe.queues.map((q) => q.ring.availIdx));
      }
      // The front-end is gone once the daemon saw the hang-up (its rings drained on every thread).
      let removed = await controlRequest(env.control, "remove", { id: "d0" });
      for (let i = 0; i < 200 && !removed.ok; i++) {
        await new Promise((r) => setTimeout(r, 10));
        removed = await controlRequest(env.control, "remove", { id: "d0" });
      }
      assert.equal(removed.ok, true, removed.error);
      await until("every thread unmapped the guest RAM", () => footprint(child.pid).maps === 0);
      await new Promise((r) => setTimeout(r, 200)); // the queue threads' detach replies
      after.push(footprint(child.pid));
    }
    assert.ok(after[1].fds <= after[0].fds, `no fd left behind by a device: ${JSON.stringify(after)}`);
  });
});

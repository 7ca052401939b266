/**
 * `mpq orchestrate` as a program, without QEMU: bad topologies and bad flags start nothing and say
 * what was wrong. Every "qemu" here is a script that would leave a marker file if it ever ran, or a
 * scripted QMP monitor (perl on the inherited listening socket) that breaks the protocol.
 */
import assert from "node:assert/strict";
import { listenUnix, resolveExecutable, type UnixSocket } from "../../ffi/mod.ts";
import { MpqRun, tempDir, waitGone, writeTopology } from "../e2e/orchestrate_harness.ts";

function markerQemu(dir: string): { qemu: string; marker: string } {
  const qemu = `${dir}/fake-qemu.sh`;
  const marker = `${dir}/started`;
  Deno.writeTextFileSync(qemu, `#!/bin/sh\necho "$$" >> ${marker}\nsleep 30\n`);
  Deno.chmodSync(qemu, 0o755);
  return { qemu, marker };
}

function started(marker: string): boolean {
  try {
    Deno.statSync(marker);
    return true;
  } catch {
    return false;
  }
}

const INVALID: Array<[string, (qemu: string) => unknown, RegExp]> = [
  [
    "a device field of the wrong type",
    (qemu) => ({ qemu, devices: [{ type: "vhost-user-blk", id: "b", backend: { socket: 42 } }] }),
    /vm\.json: devices\[0\]\.backend\.socket: expected a string path, got 42/,
  ],
  [
    "an unknown field",
    (qemu) => ({ qemu, devices: [{ type: "remote", id: "lsi0", device: "lsi53c895a", drive: [] }] }),
    /vm\.json: devices\[0\]\.drive: unknown field/,
  ],
  [
    "duplicate ids",
    (qemu) => ({
      qemu,
      devices: [{ type: "remote", id: "a", device: "x" }, { type: "remote", id: "a", device: "y" }],
    }),
    /devices\[1\]\.id: "a" is already the id of devices\[0\]/,
  ],
  [
    "steps with start run",
    (qemu) => ({ qemu, steps: [{ execute: "query-status" }] }),
    /vm\.json: steps: need "start" to be "paused"/,
  ],
];

for (const [what, topology, message] of INVALID) {
  Deno.test(`orchestrate with ${what} names the field and starts nothing`, async () => {
    using dir = tempDir("mpq-cli-");
    const { qemu, marker } = markerQemu(dir.path);
    await using run = MpqRun.start(["orchestrate", writeTopology(dir.path, topology(qemu))]);
    const st = await run.status();
    assert.equal(st.code, 1, run.report());
    assert.match(run.stderr, message);
    assert.equal(run.stdout, "");
    assert.ok(!started(marker), "a process was started");
  });
}

Deno.test("orchestrate with a topology that is not JSON says so and starts nothing", async () => {
  using dir = tempDir("mpq-cli-");
  const path = `${dir.path}/vm.json`;
  Deno.writeTextFileSync(path, "{ memory: 512M }");
  await using run = MpqRun.start(["orchestrate", path]);
  assert.equal((await run.status()).code, 1);
  assert.match(run.stderr, /\(json\): .*vm\.json is not valid JSON/);
});

Deno.test("orchestrate with a missing topology file names it", async () => {
  await using run = MpqRun.start(["orchestrate", "/nonexistent/vm.json"]);
  assert.equal((await run.status()).code, 1);
  assert.match(run.stderr, /cannot read topology \/nonexistent\/vm\.json/);
});

Deno.test("orchestrate refuses to start when an external back-end is not listening", async () => {
  using dir = tempDir("mpq-cli-");
  const { qemu, marker } = markerQemu(dir.path);
  const topo = writeTopology(dir.path, {
    qemu,
    devices: [
      { type: "remote", id: "lsi0", device: "lsi53c895a", qemu },
      { type: "vhost-user-blk", id: "vblk0", backend: { socket: `${dir.path}/nobody.sock` } },
    ],
  });
  await using run = MpqRun.start(["orchestrate", topo]);
  assert.equal((await run.status()).code, 1, run.report());
  assert.match(
    run.stderr,
    /vhost-user back-end of vblk0: nothing is listening on .*nobody\.sock; nothing was started/,
  );
  assert.ok(!started(marker), "a process was started");
});

Deno.test("orchestrate refuses to start when a program is not on PATH", async () => {
  using dir = tempDir("mpq-cli-");
  const topo = writeTopology(dir.path, { qemu: "qemu-system-nonexistent" });
  await using run = MpqRun.start(["orchestrate", topo]);
  assert.equal((await run.status()).code, 1);
  assert.match(run.stderr, /qemu: program qemu-system-nonexistent not found on PATH; nothing was started/);
});

const USAGE: Array<[string[], RegExp]> = [
  [[], /a topology file \(or --demo\) is required/],
  [["a.json", "b.json"], /one topology file expected: got a\.json b\.json/],
  [["--demo", "a.json"], /--demo takes no topology file: got a\.json/],
  [["--demo", "--json"], /--json goes with --dry-run/],
  [["--demo", "--stop-timeout", "0"], /--stop-timeout must be 1\.\.600000 ms: got 0/],
  [["--frobnicate"], /Unknown option '--frobnicate'/],
];

for (const [args, message] of USAGE) {
  Deno.test(`orchestrate ${args.join(" ") || "(no arguments)"} is a usage error`, async () => {
    await using run = MpqRun.start(["orchestrate", ...args]);
    assert.equal((await run.status()).code, 1);
    assert.match(run.stderr, message);
    assert.match(run.stderr, /Usage: mpq orchestrate TOPOLOGY\.json/);
  });
}

Deno.test("qmp usage errors and an unreachable socket", async () => {
  await using a = MpqRun.start(["qmp", "/tmp/x.sock"]);
  assert.equal((await a.status()).code, 1);
  assert.match(a.stderr, /SOCKET and COMMAND are required/);
  await using b = MpqRun.start(["qmp", "/tmp/x.sock", "query-status", "[1]"]);
  assert.equal((await b.status()).code, 1);
  assert.match(b.stderr, /JSON-ARGS must be a JSON object: got \[1\]/);
  await using c = MpqRun.start(["qmp", "/nonexistent/qmp.sock", "query-status"]);
  assert.equal((await c.status()).code, 1);
  assert.match(c.stderr, /cannot connect to QMP socket \/nonexistent\/qmp\.sock: .*ENOENT/);
});

Deno.test("qmp against a monitor that sends something other than JSON objects: exit 1 naming the line", async () => {
  const greeting = '{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, ' +
    '"capabilities": []}}\r\n';
  const cases: Array<[string, string]> = [
    ["[1,2]\r\n", "line 1: expected a JSON object, got an array: [1,2]"],
    [
      greeting + '{"return": {}, "id": 1\r\n',
      'line 2: expected a JSON object, got text that is not JSON: "{\\"return\\": {}, \\"id\\": 1"',
    ],
    [
      greeting + '{"error": "no", "id": 1}\r\n',
      'line 2: expected "error" to be {"class": STRING, "desc": STRING}, got {"error": "no", "id": 1}',
    ],
  ];
  for (const [script, what] of cases) {
    using dir = tempDir("mpq-cli-");
    const path = `${dir.path}/qmp.sock`;
    const listener = listenUnix(path);
    let conn: UnixSocket | null = null;
    try {
      await using run = MpqRun.start(["qmp", path, "query-status"]);
      // A scripted monitor: accept, say the script, keep the connection open until mpq gives up.
      const end = Date.now() + 20_000;
      while ((conn = listener.accept()) === null) {
        assert.ok(Date.now() < end, "mpq qmp did not connect");
        await new Promise((r) => setTimeout(r, 5));
      }
      conn.sendMsg(new TextEncoder().encode(script));
      assert.equal((await run.status()).code, 1, run.report());
      const prefix = script.startsWith("[") ? "" : "qmp_capabilities: ";
      assert.equal(run.stderr.trim(), `mpq qmp: ${prefix}QMP protocol error on ${path}: ${what}`);
    } finally {
      conn?.close();
      listener.close();
    }
  }
});

/**
 * A "qemu" that writes its pid to `DIR/pid`, accepts mpq's QMP connection on its fd 3 (the
 * listening socket mpq hands to QEMU), sends `lines` and waits to be stopped.
 */
function scriptedQmpQemu(dir: string, lines: string): string {
  const qemu = `${dir}/scripted-qemu.sh`;
  Deno.writeTextFileSync(`${dir}/qmp-lines`, lines);
  const perl = 'open(my $l, "+<&=", 3) or die "fd 3: $!"; accept(my $c, $l) or die "accept: $!"; ' +
    'open(my $f, "<", $ARGV[0]) or die; local $/; my $t = <$f>; syswrite($c, $t); sleep 60';
  Deno.writeTextFileSync(qemu, `#!/bin/sh\necho $$ > ${dir}/pid\nexec perl -e '${perl}' ${dir}/qmp-lines\n`);
  Deno.chmodSync(qemu, 0o755);
  return qemu;
}

function havePerl(): boolean {
  try {
    resolveExecutable("perl");
    return true;
  } catch {
    return false;
  }
}

const GREETING_LINE = '{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, ' +
  '"capabilities": []}}\r\n';

const BROKEN_QMP: Array<[string, string, string]> = [
  [
    "a first line that is not a JSON object",
    "[1,2]\r\n",
    "qemu: QMP protocol error on DIR/qmp.sock: line 1: expected a JSON object, got an array: [1,2]",
  ],
  [
    "an error reply of the wrong shape",
    GREETING_LINE + '{"error": null, "id": 1}\r\n',
    "QMP capabilities (qmp_capabilities) failed: qmp_capabilities: QMP protocol error on DIR/qmp.sock: " +
    'line 2: expected "error" to be {"class": STRING, "desc": STRING}, got {"error": null, "id": 1}',
  ],
];

for (const [what, lines, message] of BROKEN_QMP) {
  Deno.test({
    name: `orchestrate tears the VM down when QEMU's QMP sends ${what}, naming it`,
    ignore: !havePerl(),
    fn: async () => {
      using dir = tempDir("mpq-cli-");
      const qemu = scriptedQmpQemu(dir.path, lines);
      await using run = MpqRun.start(["orchestrate", writeTopology(dir.path, { name: "broken", qemu })]);
      assert.equal((await run.status()).code, 1, run.report());
      const runtime = run.stdout.match(/(\/\S+\/mpq-broken-[^/\s]+)\//)?.[1] ?? "";
      const want = `mpq orchestrate: ${message.replace("DIR", runtime)}; tearing the VM down`;
      assert.ok(run.stderr.includes(want), `expected ${want}\n${run.report()}`);
      // The scripted QEMU, alive and holding its end, was stopped (SIGTERM: QMP is gone).
      const pid = Number(Deno.readTextFileSync(`${dir.path}/pid`).trim());
      assert.deepEqual(await waitGone([pid]), [], "the scripted qemu was stopped");
      assert.match(run.stdout, /qemu\s+pid \d+ stopped \(killed by SIGTERM\)/);
      assert.match(run.stdout, /every process of the VM has exited; exit 1/);
    },
  });
}

Deno.test("orchestrate --incoming refuses a bad URI, a paused start and --demo, starting nothing", async () => {
  using dir = tempDir("mpq-cli-");
  const { qemu, marker } = markerQemu(dir.path);
  const cases: Array<[string[], RegExp]> = [
    [
      [writeTopology(dir.path, { qemu }), "--incoming", "ftp://x"],
      /--incoming: expected tcp:HOST:PORT or unix:/,
    ],
    [[writeTopology(dir.path, { qemu }), "--incoming", "tcp:h:0"], /--incoming: port 0 is not 1\.\.65535/],
    [
      [writeTopology(dir.path, { qemu, start: "paused" }, "p.json"), "--incoming", "unix:/tmp/m.sock"],
      /p\.json: start: --incoming needs "run".*got "paused"/,
    ],
    [["--demo", "--incoming", "unix:/tmp/m.sock"], /--incoming goes with a topology file, not --demo/],
  ];
  for (const [args, message] of cases) {
    await using run = MpqRun.start(["orchestrate", ...args]);
    assert.equal((await run.status()).code, 1, run.report());
    assert.match(run.stderr, message);
  }
  assert.ok(!started(marker), "a process was started");
});

Deno.test("orchestrate --incoming --dry-run shows QEMU waiting with -incoming and no cont", async () => {
  using dir = tempDir("mpq-cli-");
  const { qemu } = markerQemu(dir.path);
  await using run = MpqRun.start([
    "orchestrate",
    writeTopology(dir.path, { qemu }),
    "--incoming",
    "tcp:0.0.0.0:4444",
    "--dry-run",
    "--json",
  ]);
  assert.equal((await run.status()).code, 0, run.report());
  const plan = JSON.parse(run.stdout);
  assert.equal(plan.incoming, "tcp:0.0.0.0:4444");
  const argv: string[] = plan.processes.at(-1).argv;
  assert.equal(argv[argv.indexOf("-incoming") + 1], "tcp:0.0.0.0:4444");
});

Deno.test("mpq ctl: bad usage and an unreachable socket exit 1 naming what was wrong", async () => {
  for (
    const [args, message] of [
      [[], /SOCKET and COMMAND are required/],
      [
        ["/tmp/x.sock", "launch"],
        /unknown command "launch" \(status, events, add, remove, qmp, stop, migrate\)/,
      ],
      [["/tmp/x.sock", "migrate"], /migrate takes one URI/],
      [["/tmp/x.sock", "migrate", "fd:3"], /migrate: expected tcp:HOST:PORT/],
      [["/nonexistent/ctl.sock", "status"], /\/nonexistent\/ctl\.sock: cannot connect/],
    ] as Array<[string[], RegExp]>
  ) {
    await using run = MpqRun.start(["ctl", ...args]);
    assert.equal((await run.status()).code, 1, run.report());
    assert.match(run.stderr, message);
  }
});

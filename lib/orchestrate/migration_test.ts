import assert from "node:assert/strict";
import { incomingProblem, migrationBlockers, progressLine } from "./migration.ts";
import { planTopology } from "./plan.ts";
import { validateTopology } from "./topology.ts";

Deno.test("migration blockers name every device QEMU 7.2 cannot migrate, and only those", () => {
  const t = validateTopology({
    devices: [
      { type: "vhost-user-blk", id: "vblk0", backend: { mpq: { file: "/d.img" } } },
      { type: "remote", id: "lsi0", device: "lsi53c895a" },
      { type: "vhost-user-rng", id: "rng0", backend: { mpq: {} } },
      { type: "ivshmem", id: "ivs0", vectors: 1, server: { mpq: { size: "1M" } } },
    ],
  });
  const b = migrationBlockers(t);
  assert.equal(b.length, 3);
  assert.match(b[0], /^lsi0 \(x-pci-proxy-dev\): QEMU 7.2 cannot migrate multi-process/);
  assert.match(b[1], /^rng0 \(vhost-user-rng-pci\): QEMU 7.2 marks vhost-user-rng unmigratable$/);
  assert.match(b[2], /^ivs0 \(ivshmem-doorbell\): a peer device \(master=off/);
  assert.deepEqual(
    migrationBlockers(validateTopology({
      devices: [{ type: "vhost-user-blk", id: "d", backend: { mpq: { file: "/d.img" } } }],
    })),
    [],
  );
});

Deno.test("migration incoming URIs: tcp and unix accepted, anything else refused naming it", () => {
  for (
    const ok of ["tcp:127.0.0.1:4444", "tcp:dst.example.org:1", "tcp:[::1]:65535", "unix:/run/mpq/m.sock"]
  ) {
    assert.equal(incomingProblem(ok), null, ok);
  }
  assert.match(incomingProblem("tcp:h:0")!, /port 0 is not 1..65535/);
  assert.match(incomingProblem("tcp:h:70000")!, /port 70000 is not 1..65535/);
  for (const bad of ["unix:relative.sock", "exec:cat", "fd:3", "tcp:h", ""]) {
    assert.match(incomingProblem(bad)!, /expected tcp:HOST:PORT or unix:\/ABSOLUTE\/PATH/, bad);
  }
});

Deno.test("migration progress line from query-migrate", () => {
  assert.equal(
    progressLine({
      status: "active",
      "expected-downtime": 30,
      ram: {
        transferred: 64 << 20,
        remaining: 192 << 20,
        total: 256 << 20,
        "dirty-pages-rate": 256,
        "page-size": 4096,
      },
    }),
    "active 25%, 64.0 MiB sent, dirty 1.0 MiB/s, expected downtime 30 ms",
  );
  assert.equal(
    progressLine({ status: "setup" }),
    "setup 0%, 0.0 MiB sent, dirty 0.0 MiB/s, expected downtime 0 ms",
  );
});

Deno.test("plan with --incoming: QEMU waits with -incoming URI, no cont, the plan says so", () => {
  const t = validateTopology({
    devices: [{ type: "vhost-user-blk", id: "vblk0", backend: { mpq: { file: "/d.img" } } }],
  });
  const plan = planTopology(t, { runtimeDir: "/tmp/mpq-x", self: ["mpq"], incoming: "unix:/tmp/m.sock" });
  const qemu = plan.processes.find((p) => p.role === "qemu")!;
  const i = qemu.argv.indexOf("-incoming");
  assert.ok(i > 0);
  assert.equal(qemu.argv[i + 1], "unix:/tmp/m.sock");
  assert.equal(plan.incoming, "unix:/tmp/m.sock");
  assert.ok(!plan.qmp.startup.some((c) => c.execute === "cont"));
  assert.equal(planTopology(t, { runtimeDir: "/tmp/mpq-x", self: ["mpq"] }).incoming, undefined);
});

Deno.test("migration mpq-unix: accepted for a destination only, where QEMU waits with -incoming defer", () => {
  assert.equal(incomingProblem("mpq-unix:/run/mpq/m.sock", true), null);
  assert.match(
    incomingProblem("mpq-unix:/run/mpq/m.sock")!,
    /expected tcp:HOST:PORT or unix:\/ABSOLUTE\/PATH: got/,
  );
  assert.match(incomingProblem("mpq-unix:rel.sock", true)!, /mpq-unix: needs an absolute path/);
  const t = validateTopology({});
  const plan = planTopology(t, { runtimeDir: "/tmp/mpq-x", self: ["mpq"], incoming: "mpq-unix:/tmp/m.sock" });
  const argv = plan.processes.find((p) => p.role === "qemu")!.argv;
  assert.equal(argv[argv.indexOf("-incoming") + 1], "defer");
  assert.equal(plan.incoming, "mpq-unix:/tmp/m.sock");
});

import assert from "node:assert/strict";
import { formatCommand, formatPlan, planTopology, qemuOptValue, shellQuote } from "./plan.ts";
import { validateTopology } from "./topology.ts";
import { demoTopology } from "./demo.ts";

const CTX = { runtimeDir: "/run/mpq-t", self: ["/usr/bin/mpq"] };

Deno.test("plan of the demo: remote first, then QEMU, with exact argv and fd maps", () => {
  const plan = planTopology(demoTopology("/run/mpq-t"), CTX);
  assert.deepEqual(plan.processes.map((p) => p.name), ["remote lsi0", "qemu"]);
  assert.deepEqual(plan.resources, [
    { id: "qmp", kind: "listen", path: "/run/mpq-t/qmp.sock", purpose: "QMP monitor of mpq" },
    {
      id: "qmp-operator",
      kind: "listen",
      path: "/run/mpq-t/qmp-operator.sock",
      purpose: "QMP monitor for operators",
    },
    { id: "remote-lsi0", kind: "socketpair", purpose: "proxy <-> remote lsi0" },
  ]);
  const [remote, qemu] = plan.processes;
  assert.deepEqual(remote.argv, [
    "qemu-system-x86_64",
    "-machine",
    "x-remote",
    "-nodefaults",
    "-display",
    "none",
    "-device",
    "lsi53c895a,id=lsi0",
    "-object",
    "x-remote-object,id=robj-lsi0,devid=lsi0,fd=3",
  ]);
  assert.deepEqual(remote.fds, [{ fd: 3, resource: "remote-lsi0", end: 1 }]);
  assert.equal(remote.ready.kind, "started");
  assert.deepEqual(qemu.argv, [
    "qemu-system-x86_64",
    "-name",
    "demo",
    "-machine",
    "pc",
    "-accel",
    "tcg",
    "-smp",
    "1",
    "-m",
    "512M",
    "-object",
    "memory-backend-memfd,id=mem,size=536870912,share=on",
    "-numa",
    "node,memdev=mem",
    "-nodefaults",
    "-display",
    "none",
    "-chardev",
    "socket,id=mon,fd=3,server=on,wait=off",
    "-mon",
    "chardev=mon,mode=control",
    "-chardev",
    "socket,id=mon-op,fd=4,server=on,wait=off",
    "-mon",
    "chardev=mon-op,mode=control",
    "-debugcon",
    "file:/run/mpq-t/seabios-debugcon.log",
    "-global",
    "isa-debugcon.iobase=0x402",
    "-S",
    "-device",
    "x-pci-proxy-dev,id=lsi0,fd=5",
  ]);
  assert.deepEqual(qemu.fds, [
    { fd: 3, resource: "qmp" },
    { fd: 4, resource: "qmp-operator" },
    { fd: 5, resource: "remote-lsi0", end: 0 },
  ]);
  assert.deepEqual(qemu.ready, { kind: "qmp-greeting", resource: "qmp" });
  assert.deepEqual(plan.qmp.startup.map((c) => [c.label, c.execute]), [
    ["capabilities", "qmp_capabilities"],
    ["step 1", "query-status"],
    ["cont", "cont"],
  ]);
  assert.deepEqual(plan.qmp.afterStart, [
    { label: "after 1", execute: "query-status", expect: { status: "running" } },
  ]);
});

Deno.test("plan orders ivshmem servers, vhost daemons, remotes, QEMU and numbers QEMU's fds", () => {
  const t = validateTopology({
    name: "full",
    memory: "1G",
    cpus: 2,
    kernel: "/boot/vmlinuz",
    initrd: "/tmp/initrd",
    append: "console=ttyS0 quiet",
    console: { file: "/tmp/con,sole.log" },
    start: "preconfig-paused",
    steps: [{ execute: "query-status", expect: { status: "prelaunch" } }],
    qmpSocket: "/tmp/op.sock",
    disks: [{ file: "/tmp/root.qcow2", format: "qcow2" }],
    extraArgs: ["-rtc", "base=utc"],
    devices: [
      {
        type: "remote",
        id: "lsi0",
        device: "lsi53c895a",
        drives: [{ file: "/tmp/d0.img" }, { file: "/tmp/d1.img", readOnly: true }],
      },
      {
        type: "vhost-user-blk",
        id: "vblk0",
        backend: { mpq: { file: "/tmp/b.img", readOnly: true } },
        numQueues: 2,
      },
      { type: "ivshmem", id: "ivs0", vectors: 2, server: { mpq: { size: "8M" } } },
      { type: "remote", id: "lsi1", device: "lsi53c895a", qemu: "/opt/qemu/bin/qemu-system-x86_64" },
      { type: "vhost-user-rng", id: "rng0", backend: { socket: "/tmp/rng.sock" } },
      { type: "ivshmem", id: "ivs1", server: { socket: "/tmp/ivshmem_socket" } },
      { type: "vhost-user-rng", id: "rng1", backend: { mpq: {} } },
    ],
  });
  const plan = planTopology(t, { runtimeDir: "/run/mpq-full-abc/", self: ["deno", "run", "-A", "main.ts"] });
  assert.equal(plan.runtimeDir, "/run/mpq-full-abc");
  assert.deepEqual(plan.processes.map((p) => p.name), [
    "ivshmem ivs0",
    "vhost vblk0,rng1",
    "remote lsi0",
    "remote lsi1",
    "qemu",
  ]);
  const byName = Object.fromEntries(plan.processes.map((p) => [p.name, p]));
  assert.deepEqual(byName["ivshmem ivs0"].argv, [
    "deno",
    "run",
    "-A",
    "main.ts",
    "ivshmem",
    "-F",
    "-S",
    "/run/mpq-full-abc/ivshmem-ivs0.sock",
    "-m",
    "/dev/shm",
    "-l",
    "8M",
    "-n",
    "2",
  ]);
  assert.deepEqual(byName["ivshmem ivs0"].fds, []);
  assert.deepEqual(byName["ivshmem ivs0"].ready, {
    kind: "listening",
    path: "/run/mpq-full-abc/ivshmem-ivs0.sock",
  });
  // One `mpq vhost serve` for all the VM's mpq-served vhost devices, each on its pre-opened fd.
  assert.deepEqual(byName["vhost vblk0,rng1"].argv, [
    "deno",
    "run",
    "-A",
    "main.ts",
    "vhost",
    "serve",
    "--control",
    "/run/mpq-full-abc/vhost.ctl",
    "--device",
    "blk,id=vblk0,fd=3,file=/tmp/b.img,num-queues=2,read-only",
    "--device",
    "rng,id=rng1,fd=4",
  ]);
  assert.deepEqual(byName["vhost vblk0,rng1"].fds, [
    { fd: 3, resource: "vhost-vblk0" },
    { fd: 4, resource: "vhost-rng1" },
  ]);
  assert.deepEqual(byName["remote lsi0"].argv.slice(6), [
    "-device",
    "lsi53c895a,id=lsi0",
    "-drive",
    "id=lsi0-drive0,file=/tmp/d0.img,format=raw,if=none",
    "-device",
    "scsi-hd,id=lsi0-hd0,drive=lsi0-drive0,bus=lsi0.0,scsi-id=0",
    "-drive",
    "id=lsi0-drive1,file=/tmp/d1.img,format=raw,if=none,readonly=on",
    "-device",
    "scsi-hd,id=lsi0-hd1,drive=lsi0-drive1,bus=lsi0.0,scsi-id=1",
    "-object",
    "x-remote-object,id=robj-lsi0,devid=lsi0,fd=3",
  ]);
  assert.equal(byName["remote lsi1"].argv[0], "/opt/qemu/bin/qemu-system-x86_64");
  assert.deepEqual(byName["remote lsi1"].fds, [{ fd: 3, resource: "remote-lsi1", end: 1 }]);

  const q = byName.qemu;
  assert.deepEqual(q.fds, [
    { fd: 3, resource: "qmp" },
    { fd: 4, resource: "qmp-operator" },
    { fd: 5, resource: "remote-lsi0", end: 0 },
    { fd: 6, resource: "remote-lsi1", end: 0 },
  ]);
  const after = (opt: string) => q.argv.flatMap((a, i) => (a === opt ? [q.argv[i + 1]] : []));
  assert.deepEqual(after("-smp"), ["2"]);
  assert.deepEqual(after("-m"), ["1024M"]);
  assert.deepEqual(after("-object"), ["memory-backend-memfd,id=mem,size=1073741824,share=on"]);
  assert.deepEqual(after("-append"), ["console=ttyS0 quiet"]);
  assert.deepEqual(after("-drive"), ["file=/tmp/root.qcow2,format=qcow2,if=virtio"]);
  assert.deepEqual(after("-serial"), ["chardev:con0"]);
  assert.deepEqual(after("-chardev"), [
    "socket,id=mon,fd=3,server=on,wait=off",
    "socket,id=mon-op,fd=4,server=on,wait=off",
    "file,id=con0,path=/tmp/con,,sole.log",
    "socket,id=chr-vblk0,path=/run/mpq-full-abc/vhost-vblk0.sock",
    "socket,id=chr-ivs0,path=/run/mpq-full-abc/ivshmem-ivs0.sock",
    "socket,id=chr-rng0,path=/tmp/rng.sock",
    "socket,id=chr-ivs1,path=/tmp/ivshmem_socket",
    "socket,id=chr-rng1,path=/run/mpq-full-abc/vhost-rng1.sock",
  ]);
  assert.deepEqual(after("-device"), [
    "x-pci-proxy-dev,id=lsi0,fd=5",
    "vhost-user-blk-pci,id=vblk0,chardev=chr-vblk0,num-queues=2",
    "ivshmem-doorbell,id=ivs0,chardev=chr-ivs0,vectors=2",
    "x-pci-proxy-dev,id=lsi1,fd=6",
    "vhost-user-rng-pci,id=rng0,chardev=chr-rng0",
    "ivshmem-doorbell,id=ivs1,chardev=chr-ivs1,vectors=1",
    "vhost-user-rng-pci,id=rng1,chardev=chr-rng1",
  ]);
  assert.ok(q.argv.includes("-S") && q.argv.includes("--preconfig"));
  assert.deepEqual(q.argv.slice(-2), ["-rtc", "base=utc"]);
  assert.equal(q.ownProcessGroup, true);

  assert.deepEqual(plan.external, [
    { path: "/tmp/rng.sock", purpose: "vhost-user back-end of rng0" },
    { path: "/tmp/ivshmem_socket", purpose: "ivshmem server of ivs1" },
  ]);
  assert.deepEqual(plan.resources.map((r) => [r.id, r.kind, "path" in r ? r.path : ""]), [
    ["qmp", "listen", "/run/mpq-full-abc/qmp.sock"],
    ["qmp-operator", "listen", "/tmp/op.sock"],
    ["remote-lsi0", "socketpair", ""],
    ["vhost-vblk0", "listen", "/run/mpq-full-abc/vhost-vblk0.sock"],
    ["remote-lsi1", "socketpair", ""],
    ["vhost-rng1", "listen", "/run/mpq-full-abc/vhost-rng1.sock"],
  ]);
  assert.deepEqual(plan.qmp.startup.map((c) => c.execute), [
    "qmp_capabilities",
    "query-status",
    "x-exit-preconfig",
    "cont",
  ]);
  assert.equal(plan.qmp.operatorSocket, "/tmp/op.sock");
});

Deno.test("plan start modes: run has no -S, preconfig exits preconfig without cont", () => {
  const run = planTopology(validateTopology({ console: "stdio" }), CTX);
  const q = run.processes[0];
  assert.ok(!q.argv.includes("-S") && !q.argv.includes("--preconfig"));
  assert.deepEqual(run.qmp.startup.map((c) => c.execute), ["qmp_capabilities"]);
  assert.equal(q.ownProcessGroup, false, "QEMU with a stdio console keeps the terminal");
  assert.ok(q.argv.join(" ").includes("-chardev stdio,id=con0,signal=on -serial chardev:con0"));
  const pre = planTopology(validateTopology({ start: "preconfig", console: "none" }), CTX);
  assert.deepEqual(pre.qmp.startup.map((c) => c.execute), ["qmp_capabilities", "x-exit-preconfig"]);
  assert.ok(pre.processes[0].argv.includes("--preconfig") && !pre.processes[0].argv.includes("-S"));
  assert.ok(!pre.processes[0].argv.includes("-serial"));
});

Deno.test("plan is pure: the same input gives the same plan", () => {
  const t = demoTopology("/run/x");
  assert.deepEqual(planTopology(t, CTX), planTopology(t, CTX));
});

Deno.test("plan formatting quotes for the shell and lists fds and readiness", () => {
  assert.equal(shellQuote("-device"), "-device");
  assert.equal(shellQuote("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
  assert.equal(shellQuote("it's"), `'it'\\''s'`);
  assert.equal(qemuOptValue("/a,b"), "/a,,b");
  assert.deepEqual(formatCommand(["qemu", "-m", "512M", "-S", "-device", "x,id=y"], ""), [
    "qemu \\",
    "  -m 512M \\",
    "  -S \\",
    "  -device x,id=y",
  ]);
  const text = formatPlan(planTopology(demoTopology("/run/mpq-t"), CTX));
  assert.match(text, /1\. remote lsi0\n/);
  assert.match(text, /fd 3 <- socketpair remote-lsi0 end 1/);
  assert.match(text, /fd 5 <- socketpair remote-lsi0 end 0/);
  assert.match(text, /fd 3 <- listening socket \/run\/mpq-t\/qmp\.sock/);
  assert.match(text, /ready when: QMP greeting received/);
  assert.match(text, /step 1 +query-status {2}expect \{"status":"prelaunch"\}/);
});

Deno.test("plan restart: the vhost process is restartable only when every device it serves is; QEMU reconnects", () => {
  const dev = (id: string, restart?: string) => ({
    type: "vhost-user-blk",
    id,
    backend: { mpq: { file: `/${id}.img` } },
    ...(restart ? { restart } : {}),
  });
  const ctx = { runtimeDir: "/tmp/mpq-x", self: ["mpq"] };
  const both = planTopology(
    validateTopology({ devices: [dev("a", "on-failure"), dev("b", "on-failure")] }),
    ctx,
  );
  const vhost = both.processes.find((p) => p.role === "vhost")!;
  assert.deepEqual(vhost.restart, { limit: 3, windowMs: 60_000 });
  const qemu = both.processes.find((p) => p.role === "qemu")!.argv.join(" ");
  assert.match(qemu, /socket,id=chr-a,path=\/tmp\/mpq-x\/vhost-a\.sock,reconnect=1/);
  assert.match(formatPlan(both), /restarted when it fails, at most 3 times in 60 s/);
  const mixed = planTopology(validateTopology({ devices: [dev("a", "on-failure"), dev("b")] }), ctx);
  assert.equal(mixed.processes.find((p) => p.role === "vhost")!.restart, undefined);
  assert.doesNotMatch(mixed.processes.find((p) => p.role === "qemu")!.argv.join(" "), /chr-b,[^ ]*reconnect/);
});

Deno.test("plan vhost-user devices: the descriptor's program with --fd=3 on a pre-opened socket; qsd with an fd export", () => {
  const t = validateTopology({
    devices: [
      {
        type: "vhost-user",
        id: "fs0",
        device: "vhost-user-fs-pci",
        backend: { descriptor: "fs", args: ["-o", "source=/srv"] },
        properties: { tag: "share,1", "cache-size": 0, x: true },
      },
      { type: "vhost-user-blk", id: "q", backend: { qsd: { file: "/img.qcow2", format: "qcow2" } } },
    ],
  });
  assert.throws(() => planTopology(t, CTX), /fs0: descriptor "fs" was not resolved/);
  const plan = planTopology(t, { ...CTX, descriptors: { fs: "/usr/lib/qemu/virtiofsd" } });
  const fs = plan.processes.find((p) => p.name === "vhost-user fs0")!;
  assert.deepEqual(fs.argv, ["/usr/lib/qemu/virtiofsd", "-o", "source=/srv", "--fd=3"]);
  assert.deepEqual(fs.fds, [{ fd: 3, resource: "vhost-fs0" }]);
  const qsd = plan.processes.find((p) => p.name === "qsd q")!;
  assert.deepEqual(qsd.argv, [
    "qemu-storage-daemon",
    "--blockdev",
    "driver=file,node-name=file-q,filename=/img.qcow2",
    "--blockdev",
    "driver=qcow2,node-name=disk-q,file=file-q",
    "--export",
    "type=vhost-user-blk,id=export-q,node-name=disk-q,addr.type=fd,addr.str=3,writable=on,num-queues=1",
  ]);
  const qemu = plan.processes.find((p) => p.role === "qemu")!.argv.join(" ");
  assert.match(qemu, /-device vhost-user-fs-pci,id=fs0,chardev=chr-fs0,tag=share,,1,cache-size=0,x=on/);
  assert.match(
    qemu,
    /-chardev socket,id=chr-q,path=\/run\/mpq-t\/vhost-q\.sock -device vhost-user-blk-pci,id=q/,
  );
});

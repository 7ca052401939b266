import assert from "node:assert/strict";
import { parseSize, parseTopology, TopologyError, validateTopology } from "./topology.ts";

Deno.test("topology fills in defaults", () => {
  const t = validateTopology({});
  assert.deepEqual(t, {
    name: "vm",
    qemu: "qemu-system-x86_64",
    machine: "pc",
    accel: "tcg",
    cpus: 1,
    memory: 512 * 1024 * 1024,
    disks: [],
    console: "stdio",
    start: "run",
    steps: [],
    afterStart: [],
    extraArgs: [],
    devices: [],
  });
});

Deno.test("topology accepts every device kind with its fields", () => {
  const t = validateTopology({
    name: "full",
    memory: "1G",
    cpus: 2,
    kernel: "/boot/vmlinuz",
    initrd: "/tmp/initrd",
    append: "console=ttyS0",
    console: { file: "/tmp/console.log" },
    start: "preconfig-paused",
    steps: [{ execute: "query-status", expect: { status: "prelaunch" } }],
    afterStart: [{ execute: "query-status", arguments: {} }],
    qmpSocket: "/tmp/op.sock",
    devices: [
      { type: "remote", id: "lsi0", device: "lsi53c895a", drives: [{ file: "/tmp/d.img", readOnly: true }] },
      { type: "vhost-user-blk", id: "vblk0", backend: { mpq: { file: "/tmp/b.img" } }, numQueues: 2 },
      { type: "vhost-user-rng", id: "rng0", backend: { socket: "/tmp/rng.sock" } },
      { type: "ivshmem", id: "ivs0", vectors: 4, server: { mpq: { size: "8M" } } },
    ],
  });
  assert.equal(t.memory, 1024 ** 3);
  assert.deepEqual(t.console, { file: "/tmp/console.log" });
  assert.deepEqual(t.devices[0], {
    type: "remote",
    id: "lsi0",
    device: "lsi53c895a",
    drives: [{ file: "/tmp/d.img", format: "raw", readOnly: true }],
    qemu: undefined,
    extraArgs: [],
  });
  assert.deepEqual(t.devices[1], {
    type: "vhost-user-blk",
    id: "vblk0",
    backend: { mpq: { file: "/tmp/b.img", readOnly: false } },
    numQueues: 2,
    restart: "never",
  });
  assert.deepEqual(t.devices[3], {
    type: "ivshmem",
    id: "ivs0",
    vectors: 4,
    server: { mpq: { size: "8M" } },
  });
});

Deno.test("topology parseSize takes bytes and K/M/G/T suffixes", () => {
  assert.equal(parseSize("512M", "x"), 512 * 1024 ** 2);
  assert.equal(parseSize("2g", "x"), 2 * 1024 ** 3);
  assert.equal(parseSize("4MiB", "x"), 4 * 1024 ** 2);
  assert.equal(parseSize(4096, "x"), 4096);
  assert.throws(() => parseSize("12X", "memory"), /^TopologyError: memory: expected a size such as "512M"/);
  assert.throws(() => parseSize(-1, "memory"), /got -1/);
});

/** [input, expected message] for every validation error. */
const BAD: Array<[unknown, string]> = [
  [[], "(top level): expected an object, got an array"],
  [{ nmae: "x" }, "nmae: unknown field (expected one of: name, qemu,"],
  [{ name: "a b" }, `name: expected letters, digits, '.', '-' or '_' (at most 64), got "a b"`],
  [{ name: 7 }, "name: expected a name, got 7"],
  [{ qemu: "" }, `qemu: expected a QEMU binary, got ""`],
  [{ machine: 1 }, `machine: expected a machine type such as "pc" or "q35", got 1`],
  [{ cpus: 0 }, "cpus: expected an integer 1..255, got 0"],
  [{ cpus: 1.5 }, "cpus: expected an integer 1..255, got 1.5"],
  [{ memory: "lots" }, `memory: expected a size such as "512M" or a byte count, got "lots"`],
  [{ memory: "1000K" }, `memory: expected a whole number of MiB, at least 16M, got "1000K"`],
  [{ memory: "8M" }, `memory: expected a whole number of MiB, at least 16M, got "8M"`],
  [{ initrd: "/i" }, `initrd: needs "kernel" to be set`],
  [{ append: "quiet" }, `append: needs "kernel" to be set`],
  [{ kernel: 3 }, "kernel: expected a string path, got 3"],
  [{ console: "serial" }, `console: expected "none", "stdio" or {"file": "PATH"}, got "serial"`],
  [{ console: { path: "/x" } }, "console.path: unknown field (expected one of: file)"],
  [
    { start: "later" },
    `start: expected one of "run", "paused", "preconfig", "preconfig-paused", got "later"`,
  ],
  [{ steps: [{ execute: "cont" }] }, `steps: need "start" to be "paused", "preconfig" or "preconfig-paused"`],
  [{ start: "paused", steps: {} }, "steps: expected an array of QMP steps, got an object"],
  [{ start: "paused", steps: [{}] }, "steps[0].execute: missing (expected a QMP command name)"],
  [
    { start: "paused", steps: [{ execute: "x", arguments: [] }] },
    "steps[0].arguments: expected an object, got an array",
  ],
  [{ start: "paused", steps: [{ execute: "x", expect: 1 }] }, "steps[0].expect: expected an object, got 1"],
  [
    { afterStart: [{ execute: "x", args: {} }] },
    "afterStart[0].args: unknown field (expected one of: execute, arguments, expect)",
  ],
  [{ extraArgs: "-S" }, `extraArgs: expected an array of strings, got "-S"`],
  [{ extraArgs: ["-S", 1] }, "extraArgs[1]: expected a string, got 1"],
  [
    { disks: [{ file: "/d", format: "vmdk" }] },
    `disks[0].format: expected one of "raw", "qcow2", got "vmdk"`,
  ],
  [{ disks: [{ readOnly: true }] }, "disks[0].file: missing (expected a string path)"],
  [{ disks: [{ file: "/d", readOnly: "yes" }] }, `disks[0].readOnly: expected true or false, got "yes"`],
  [{ devices: {} }, "devices: expected an array of devices, got an object"],
  [{ devices: [1] }, "devices[0]: expected an object, got 1"],
  [{ devices: [{ id: "a" }] }, `devices[0].type: missing (expected one of "remote", "vhost-user-blk"`],
  [
    { devices: [{ type: "nvme", id: "a" }] },
    `devices[0].type: expected one of "remote", "vhost-user-blk", "vhost-user-rng", "ivshmem", "vhost-user", got "nvme"`,
  ],
  [{ devices: [{ type: "remote", device: "lsi53c895a" }] }, "devices[0].id: missing (expected an id"],
  [
    { devices: [{ type: "remote", id: "0lsi", device: "lsi53c895a" }] },
    `devices[0].id: expected an id (letter, then letters, digits, '-' or '_', at most 32), got "0lsi"`,
  ],
  [{ devices: [{ type: "remote", id: "a.b", device: "x" }] }, `devices[0].id: expected an id`],
  [{ devices: [{ type: "remote", id: "mem", device: "x" }] }, `devices[0].id: "mem" is reserved by mpq`],
  [
    {
      devices: [{ type: "remote", id: "a", device: "x" }, {
        type: "ivshmem",
        id: "a",
        server: { socket: "/s" },
      }],
    },
    `devices[1].id: "a" is already the id of devices[0]`,
  ],
  [
    { devices: [{ type: "remote", id: "a" }] },
    `devices[0].device: missing (expected a QEMU PCI device model such as "lsi53c895a")`,
  ],
  [
    { devices: [{ type: "remote", id: "a", device: "x", socket: "/s" }] },
    "devices[0].socket: unknown field (expected one of: type, id, device, drives, qemu, extraArgs)",
  ],
  [
    { devices: [{ type: "remote", id: "a", device: "x", drives: [{ file: 42 }] }] },
    "devices[0].drives[0].file: expected a string path, got 42",
  ],
  [
    { devices: [{ type: "vhost-user-blk", id: "b" }] },
    `devices[0].backend: missing (expected {"mpq": {...}} or {"socket": "PATH"})`,
  ],
  [
    { devices: [{ type: "vhost-user-blk", id: "b", backend: {} }] },
    `devices[0].backend: expected exactly one of "mpq"`,
  ],
  [
    { devices: [{ type: "vhost-user-blk", id: "b", backend: { socket: 42 } }] },
    "devices[0].backend.socket: expected a string path, got 42",
  ],
  [
    { devices: [{ type: "vhost-user-blk", id: "b", backend: { mpq: {} } }] },
    "devices[0].backend.mpq.file: missing (expected a string path)",
  ],
  [
    { devices: [{ type: "vhost-user-blk", id: "b", backend: { mpq: { file: "/f", numQueues: 0 } } }] },
    "devices[0].backend.mpq.numQueues: expected an integer 1..64, got 0",
  ],
  [
    { devices: [{ type: "vhost-user-rng", id: "r", backend: { mpq: { x: 1 } } }] },
    "devices[0].backend.mpq.x: unknown field",
  ],
  [
    { devices: [{ type: "ivshmem", id: "i", server: { socket: "/s" }, vectors: 65 }] },
    "devices[0].vectors: expected an integer 1..64, got 65",
  ],
  [
    { devices: [{ type: "ivshmem", id: "i", server: { mpq: { size: "huge" } } }] },
    `devices[0].server.mpq.size: expected a size such as "512M" or a byte count, got "huge"`,
  ],
  [{ devices: [{ type: "ivshmem", id: "i" }] }, `devices[0].server: missing`],
];

for (const [input, message] of BAD) {
  Deno.test(`topology rejects ${JSON.stringify(input).slice(0, 70)}`, () => {
    assert.throws(
      () => validateTopology(input),
      (e: unknown) => {
        assert.ok(e instanceof TopologyError, `not a TopologyError: ${e}`);
        assert.ok(
          e.message.startsWith(message),
          `message ${JSON.stringify(e.message)} does not start with ${JSON.stringify(message)}`,
        );
        return true;
      },
    );
  });
}

Deno.test("topology parse reports invalid JSON with the source name", () => {
  assert.throws(
    () => parseTopology("{ memory: 1 }", "vm.json"),
    /^TopologyError: \(json\): vm\.json is not valid JSON/,
  );
});

Deno.test("topology example in the README validates", () => {
  const readme = Deno.readTextFileSync(new URL("../../README.md", import.meta.url));
  const section = readme.slice(
    readme.indexOf("<!-- section:orchestrate -->"),
    readme.indexOf("<!-- /section:orchestrate -->"),
  );
  const json = section.match(/```json\n([\s\S]*?)```/);
  assert.ok(json, "the orchestrate section has a JSON topology example");
  const t = parseTopology(json[1], "README example");
  assert.deepEqual(t.devices.map((d) => d.type), ["remote", "vhost-user-blk", "vhost-user-rng", "ivshmem"]);
});

Deno.test("topology restart: on-failure for mpq-served vhost-user-blk; refused elsewhere, naming why", () => {
  const blk = (extra: Record<string, unknown>) =>
    validateTopology({
      devices: [{ type: "vhost-user-blk", id: "d", backend: { mpq: { file: "/d" } }, ...extra }],
    });
  assert.equal((blk({}).devices[0] as { restart: string }).restart, "never");
  assert.equal((blk({ restart: "on-failure" }).devices[0] as { restart: string }).restart, "on-failure");
  assert.throws(
    () => blk({ restart: "always" }),
    /devices\[0\]\.restart: expected one of "on-failure", "never"/,
  );
  assert.throws(
    () =>
      validateTopology({
        devices: [{ type: "vhost-user-blk", id: "d", backend: { socket: "/s" }, restart: "on-failure" }],
      }),
    /devices\[0\]\.restart: "on-failure" needs an mpq back-end/,
  );
  assert.throws(
    () =>
      validateTopology({
        devices: [{ type: "vhost-user-rng", id: "r", backend: { mpq: {} }, restart: "never" }],
      }),
    /devices\[0\]\.restart: only vhost-user-blk back-ends can be restarted/,
  );
});

Deno.test("topology vhost-user devices: descriptor, command or socket back-ends, properties; errors name the field", () => {
  const t = validateTopology({
    devices: [
      {
        type: "vhost-user",
        id: "fs0",
        device: "vhost-user-fs-pci",
        backend: { descriptor: "qemu-virtiofsd", args: ["-o", "source=/srv"] },
        properties: { tag: "share", "queue-size": 1024 },
      },
      {
        type: "vhost-user",
        id: "gpu0",
        device: "vhost-user-gpu-pci",
        backend: { command: ["/usr/lib/qemu/vhost-user-gpu"] },
      },
      { type: "vhost-user", id: "x", device: "vhost-user-vsock-pci", backend: { socket: "/run/v.sock" } },
      { type: "vhost-user-blk", id: "q", backend: { qsd: { file: "/img.qcow2", format: "qcow2" } } },
    ],
  });
  assert.deepEqual(t.devices[0], {
    type: "vhost-user",
    id: "fs0",
    device: "vhost-user-fs-pci",
    backend: { descriptor: "qemu-virtiofsd", args: ["-o", "source=/srv"] },
    properties: { tag: "share", "queue-size": 1024 },
  });
  assert.deepEqual((t.devices[3] as { backend: unknown }).backend, {
    qsd: { file: "/img.qcow2", format: "qcow2", readOnly: false, binary: "qemu-storage-daemon" },
  });
  const bad: Array<[unknown, RegExp]> = [
    [
      { type: "vhost-user", id: "a", device: "virtio-net-pci", backend: { socket: "/s" } },
      /devices\[0\]\.device: expected a vhost-user-\* device model/,
    ],
    [
      { type: "vhost-user", id: "a", device: "vhost-user-fs-pci", backend: {} },
      /devices\[0\]\.backend: expected exactly one of "descriptor", "command" or "socket", got 0/,
    ],
    [
      { type: "vhost-user", id: "a", device: "vhost-user-fs-pci", backend: { command: [] } },
      /devices\[0\]\.backend\.command: expected a program/,
    ],
    [
      { type: "vhost-user", id: "a", device: "vhost-user-fs-pci", backend: { socket: "/s", args: [] } },
      /devices\[0\]\.backend\.args: goes with "descriptor"/,
    ],
    [{
      type: "vhost-user",
      id: "a",
      device: "vhost-user-fs-pci",
      backend: { socket: "/s" },
      properties: { chardev: "x" },
    }, /devices\[0\]\.properties\.chardev: not a property mpq lets you set/],
    [
      { type: "vhost-user-blk", id: "q", backend: { qsd: { file: "/i", format: "vmdk" } } },
      /devices\[0\]\.backend\.qsd\.format: expected one of "raw", "qcow2"/,
    ],
    [
      { type: "vhost-user-blk", id: "q", backend: { qsd: { file: "/i" } }, restart: "on-failure" },
      /devices\[0\]\.restart: "on-failure" needs an mpq back-end/,
    ],
  ];
  for (const [d, re] of bad) assert.throws(() => validateTopology({ devices: [d] }), re);
});

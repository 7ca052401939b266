import assert from "node:assert/strict";
import {
  checkUnique,
  type DeviceSpec,
  deviceSpecFromJson,
  formatDeviceArg,
  parseDeviceArg,
  SpecError,
} from "./device_spec.ts";

const D = { defaultQueues: 2, index: 0 };

Deno.test("device spec parses --device text with defaults, booleans and escaped commas", () => {
  assert.deepEqual(parseDeviceArg("rng,socket=/run/r.sock", D), {
    type: "rng",
    id: "rng0",
    listen: { socket: "/run/r.sock" },
  });
  const b = parseDeviceArg("blk,id=disk0,file=/img/a,,b.raw,fd=4,read-only,num-queues=4,engine=preadv", D);
  assert.deepEqual(b, {
    type: "blk",
    id: "disk0",
    listen: { fd: 4 },
    file: "/img/a,b.raw",
    readOnly: true,
    serial: "",
    blkSize: 512,
    numQueues: 4,
    direct: false,
    writeback: false,
    engine: "preadv",
    ioThreads: 1,
  });
  assert.equal(parseDeviceArg("blk,file=/f,socket=/s,writeback=on", D).type === "blk", true);
  assert.equal(
    (parseDeviceArg("blk,file=/f,socket=/s", { defaultQueues: 3, index: 5 }) as { numQueues: number })
      .numQueues,
    3,
  );
  assert.equal(parseDeviceArg("blk,file=/f,socket=/s", { defaultQueues: 3, index: 5 }).id, "blk5");
});

Deno.test("device spec round-trips through formatDeviceArg", () => {
  for (
    const text of [
      "blk,id=d,socket=/a,,b,file=/x,,y,num-queues=3,read-only,serial=S1,blk-size=4096,direct,writeback,engine=uring,io-threads=0",
      "rng,id=r9,fd=7",
    ]
  ) {
    const s = parseDeviceArg(text, D);
    assert.deepEqual(parseDeviceArg(formatDeviceArg(s), D), s);
  }
});

Deno.test("device spec from JSON takes camelCase or flag spelling", () => {
  const s = deviceSpecFromJson({ type: "blk", id: "v", file: "/f", fd: 3, readOnly: true, numQueues: 2 }, D);
  assert.equal(s.type, "blk");
  assert.deepEqual((s as DeviceSpec & { type: "blk" }).readOnly, true);
  assert.deepEqual(deviceSpecFromJson({ type: "rng", "socket": "/s" }, D).listen, { socket: "/s" });
});

Deno.test("device spec refuses every bad input, naming the field, the value and what was expected", () => {
  const bad: Array<[string, RegExp]> = [
    ["nvme,socket=/s", /device type must be blk or rng: got "nvme"/],
    ["blk,socket=/s", /blk0: file=PATH is required/],
    ["blk,file=/f", /exactly one of socket=PATH or fd=N is required/],
    ["blk,file=/f,socket=/s,fd=3", /exactly one of socket=PATH or fd=N/],
    ["blk,file=/f,socket=/s,num-queues=0", /num-queues must be an integer in 1\.\.64: got "0"/],
    ["blk,file=/f,socket=/s,num-queues=x", /num-queues must be an integer in 1\.\.64: got "x"/],
    ["blk,file=/f,socket=/s,blk-size=1024", /blk-size must be 512 or 4096: got 1024/],
    ["blk,file=/f,socket=/s,engine=aio", /engine must be auto, uring, vmcopy, preadv: got "aio"/],
    ["blk,file=/f,socket=/s,serial=123456789012345678901", /serial must be at most 20 bytes/],
    ["blk,file=/f,socket=/s,read-only=maybe", /read-only must be on or off: got "maybe"/],
    ["blk,file=/f,socket=/s,color=red", /blk has no key "color" \(keys: id, socket, fd, file/],
    ["rng,socket=/s,file=/f", /rng has no key "file"/],
    ["rng,socket=/s,", /empty item in "rng,socket=\/s,"/],
    ["rng,socket=/s,socket=/t", /socket given twice/],
    ["rng,id=-x,socket=/s", /id must be 1-64 letters.*got "-x"/],
    ["rng,socket=", /socket: expected a non-empty string: got ""/],
    ["blk,file=/f,file=/g,socket=/s", /file given twice/],
  ];
  for (const [text, re] of bad) {
    assert.throws(
      () => parseDeviceArg(text, D),
      (e: Error) => e instanceof SpecError && re.test(e.message),
      text,
    );
  }
  const badJson: Array<[unknown, RegExp]> = [
    [[], /a device must be a JSON object: got an array/],
    [null, /got null/],
    [{ type: 3 }, /type: expected "blk" or "rng": got number 3/],
    [{ type: "blk", file: { x: 1 }, fd: 3 }, /file: expected a string, number or boolean: got an object/],
    [{ type: "blk", file: "/f", fd: -1 }, /fd must be an integer in 0\.\.1048576: got number -1/],
    [
      { type: "blk", file: "/f", fd: 3, writeback: "yes" },
      /writeback must be on or off \(true or false\): got "yes"/,
    ],
  ];
  for (const [v, re] of badJson) {
    assert.throws(
      () => deviceSpecFromJson(v, D),
      (e: Error) => e instanceof SpecError && re.test(e.message),
      JSON.stringify(v),
    );
  }
});

Deno.test("device specs served together must not share ids, sockets or fds", () => {
  const a = parseDeviceArg("rng,id=a,socket=/s1", D);
  checkUnique([a, parseDeviceArg("rng,id=b,socket=/s2", D), parseDeviceArg("rng,id=c,fd=3", D)]);
  assert.throws(
    () => checkUnique([a, parseDeviceArg("rng,id=a,socket=/s2", D)]),
    /a: id a is already used by a/,
  );
  assert.throws(
    () => checkUnique([a, parseDeviceArg("rng,id=b,socket=/s1", D)]),
    /b: socket \/s1 is already used by a/,
  );
  assert.throws(
    () => checkUnique([parseDeviceArg("rng,id=x,fd=3", D), parseDeviceArg("blk,id=y,fd=3,file=/f", D)]),
    /y: fd 3 is already used by x/,
  );
});

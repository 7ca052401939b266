import assert from "node:assert/strict";
import { UsageError } from "../cli/errors.ts";
import { DEFAULTS, parseServerArgs } from "./cli.ts";
import { hexDump, parseClientArgs, parseHex, toHex } from "./client_cli.ts";

function usageError(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof UsageError, `expected a UsageError, got ${e}`);
    assert.match(e.message, pattern);
    assert.match(e.usage, /^Usage: mpq ivshmem/);
    return true;
  });
}

Deno.test("parseServerArgs defaults are contrib ivshmem-server's", () => {
  assert.deepEqual(parseServerArgs([]), {
    verbose: false,
    foreground: false,
    pidfile: "/var/run/ivshmem-server.pid",
    socketPath: "/tmp/ivshmem_socket",
    shm: { name: "ivshmem" },
    size: 4 * 1024 * 1024,
    vectors: 1,
    mode: 0o600,
  });
  assert.equal(DEFAULTS.socketPath, "/tmp/ivshmem_socket");
});

Deno.test("parseServerArgs reads short and long flags", () => {
  const short = parseServerArgs([
    "-F",
    "-v",
    "-p",
    "/tmp/p",
    "-S",
    "/tmp/s",
    "-M",
    "x",
    "-l",
    "1G",
    "-n",
    "4",
  ]);
  const long = parseServerArgs([
    "--foreground",
    "--verbose",
    "--pidfile=/tmp/p",
    "--socket-path",
    "/tmp/s",
    "--shm-name",
    "x",
    "--size",
    "1G",
    "--vectors",
    "4",
  ]);
  assert.deepEqual(short, long);
  assert.deepEqual(short, {
    verbose: true,
    foreground: true,
    pidfile: "/tmp/p",
    socketPath: "/tmp/s",
    shm: { name: "x" },
    size: 2 ** 30,
    vectors: 4,
    mode: 0o600,
  });
});

Deno.test("parseServerArgs: the last of -M and -m wins, as in the C server", () => {
  assert.deepEqual(parseServerArgs(["-M", "a", "-m", "/dev/hugepages"])?.shm, { dir: "/dev/hugepages" });
  assert.deepEqual(parseServerArgs(["-m", "/dev/hugepages", "-M", "a"])?.shm, { name: "a" });
});

Deno.test("parseServerArgs --mode is octal", () => {
  assert.equal(parseServerArgs(["--mode", "0660"])?.mode, 0o660);
  assert.equal(parseServerArgs(["--mode=644"])?.mode, 0o644);
});

Deno.test("parseServerArgs returns null for -h", () => {
  assert.equal(parseServerArgs(["-h"]), null);
  assert.equal(parseServerArgs(["--help"]), null);
});

Deno.test("parseServerArgs errors name the flag", () => {
  usageError(() => parseServerArgs(["-n", "65"]), /-n\/--vectors must be 1..64: got 65/);
  usageError(() => parseServerArgs(["-n", "x"]), /-n\/--vectors not a number/);
  usageError(() => parseServerArgs(["-l", "4Q"]), /-l\/--size: not a size: "4Q"/);
  usageError(() => parseServerArgs(["-v"]), /-v\/--verbose: cannot use verbose in daemon mode/);
  usageError(() => parseServerArgs(["-x"]), /'-x'/);
  usageError(() => parseServerArgs(["-S"]), /-S/);
  usageError(() => parseServerArgs(["--mode", "999"]), /--mode must be an octal file mode/);
  usageError(() => parseServerArgs(["-M", "a/b"]), /-M\/--shm-name must be one name/);
  usageError(() => parseServerArgs(["-S", ""]), /-S\/--socket-path must not be empty/);
  usageError(() => parseServerArgs(["extra"]), /extra/);
});

Deno.test("parseClientArgs reads the scripted flags", () => {
  assert.deepEqual(
    parseClientArgs([
      "-S",
      "/tmp/s",
      "--json",
      "--notify",
      "1:0",
      "--notify",
      "2:all",
      "--wait",
      "3",
      "--timeout",
      "1.5",
      "--read",
      "0x10:16",
      "--write",
      "8:dead",
    ]),
    {
      verbose: false,
      socketPath: "/tmp/s",
      json: true,
      notifies: [{ peer: 1, vector: 0 }, { peer: 2, vector: "all" }],
      wait: 3,
      timeoutMs: 1500,
      reads: [{ offset: 16, length: 16 }],
      writes: [{ offset: 8, data: new Uint8Array([0xde, 0xad]) }],
    },
  );
  assert.equal(parseClientArgs([])?.socketPath, "/tmp/ivshmem_socket");
  assert.equal(parseClientArgs(["--help"]), null);
});

Deno.test("parseClientArgs errors name the flag", () => {
  usageError(() => parseClientArgs(["--notify", "1"]), /--notify: expected A:B: got "1"/);
  usageError(() => parseClientArgs(["--notify", "70000:0"]), /--notify peer must be 0..65535: got 70000/);
  usageError(() => parseClientArgs(["--notify", "1:x"]), /--notify vector: not a number: "x"/);
  usageError(() => parseClientArgs(["--wait", "0"]), /--wait must be >= 1: got 0/);
  usageError(() => parseClientArgs(["--timeout", "soon"]), /--timeout must be a number of seconds > 0/);
  usageError(() => parseClientArgs(["--write", "0:abc"]), /--write: expected an even number of hex digits/);
  usageError(() => parseClientArgs(["--read", "0:"]), /--read: expected A:B/);
  usageError(() => parseClientArgs(["--bogus"]), /--bogus/);
});

Deno.test("hex helpers round-trip and dump", () => {
  assert.equal(toHex(parseHex("0xDEADbeef")), "deadbeef");
  assert.equal(
    hexDump(new TextEncoder().encode("ivshmem!"), 16),
    "00000010  69 76 73 68 6d 65 6d 21                          |ivshmem!|",
  );
});

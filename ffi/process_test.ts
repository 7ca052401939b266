import assert from "node:assert/strict";
import { ErrnoError } from "./errno.ts";
import { getpid, getppid, getRandom, kill, raiseNoFileLimit, Signal, signalName } from "./process.ts";

function limits(): { soft: number; hard: number } {
  const line = Deno.readTextFileSync("/proc/self/limits").split("\n").find((l) =>
    l.startsWith("Max open files")
  )!;
  const [soft, hard] = line.split(/\s{2,}/).slice(1, 3).map(Number);
  return { soft, hard };
}

Deno.test("process getpid/getppid match Deno's view", () => {
  assert.equal(getpid(), Deno.pid);
  assert.equal(getppid(), Deno.ppid);
});

Deno.test("process raiseNoFileLimit raises the soft limit to the hard limit (as /proc/self/limits shows)", () => {
  const { hard } = limits();
  const got = raiseNoFileLimit();
  assert.equal(got, hard);
  assert.equal(limits().soft, hard);
  assert.equal(raiseNoFileLimit(64), hard, "never lowers the limit");
  assert.equal(limits().soft, hard);
});

Deno.test("process kill with signal 0 probes a live pid; a dead pid is false; a bad signal throws", () => {
  assert.equal(kill(getpid(), 0), true);
  const done = new Deno.Command("true").outputSync();
  assert.ok(done.success);
  assert.throws(
    () => kill(getpid(), 999),
    (e: unknown) => e instanceof ErrnoError && e.code === "EINVAL" && /signal 999/.test(e.message),
  );
  assert.equal(signalName(Signal.SIGTERM), "SIGTERM");
  assert.equal(signalName(64), "signal 64");
});

Deno.test("process getRandom fills the whole buffer", () => {
  const buf = new Uint8Array(100_000);
  getRandom(buf);
  const zeros = buf.reduce((n, b) => n + (b === 0 ? 1 : 0), 0);
  assert.ok(zeros < 1000, `about 1/256 of random bytes are zero: got ${zeros}`);
});

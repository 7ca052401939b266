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

const MOD = new URL("./mod.ts", import.meta.url).href;

async function denoEval(
  code: string,
  env: Record<string, string> = {},
): Promise<{ code: number; out: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--quiet", "--no-config", code],
    env,
    stdout: "piped",
    stderr: "inherit",
  }).output();
  return { code: out.code, out: new TextDecoder().decode(out.stdout) };
}

Deno.test("process execve replaces the process image: same pid, new program, the given environment", async () => {
  const r = await denoEval(
    `import { execve, getpid } from "${MOD}";
     console.log(getpid());
     execve("/bin/sh", ["sh", "-c", "echo $$ $GREETING"], { GREETING: "replaced" });`,
  );
  assert.equal(r.code, 0);
  const [pid, again] = r.out.trim().split("\n");
  assert.equal(again, `${pid} replaced`);
});

Deno.test("process execve of a missing program throws ENOENT naming it", async () => {
  const r = await denoEval(
    `import { execve, ErrnoError } from "${MOD}";
     try { execve("/nonexistent/prog", ["prog"], {}); } catch (e) {
       console.log(e instanceof ErrnoError ? e.syscall + " " + e.code + " " + e.message : String(e));
     }`,
  );
  assert.equal(r.code, 0);
  assert.match(r.out, /^execve ENOENT execve \/nonexistent\/prog: ENOENT/);
});

Deno.test("process setParentDeathSignal: the child is killed when its parent exits", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-pdeathsig-" });
  try {
    const pidFile = `${dir}/child.pid`;
    // The child sets PDEATHSIG=SIGKILL, records its pid, and sleeps; the parent exits once the pid is there.
    const child = `import { getpid, setParentDeathSignal, Signal } from "${MOD}";
      setParentDeathSignal(Signal.SIGKILL);
      Deno.writeTextFileSync("${pidFile}.tmp", String(getpid()));
      Deno.renameSync("${pidFile}.tmp", "${pidFile}");
      await new Promise((r) => setTimeout(r, 120000));`;
    const parent = `import { spawn } from "${MOD}";
      spawn(Deno.execPath(), [Deno.execPath(), "eval", "--quiet", "--no-config", ${JSON.stringify(child)}], {
        stdio: "null",
      });
      while (true) { try { Deno.statSync("${pidFile}"); break; } catch { await new Promise((r) => setTimeout(r, 10)); } }`;
    const r = await denoEval(parent);
    assert.equal(r.code, 0);
    const pid = Number(Deno.readTextFileSync(pidFile));
    const end = Date.now() + 30_000;
    while (true) {
      let state: string;
      try {
        state = Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1][0];
      } catch {
        break; // gone (reaped by init)
      }
      if (state === "Z") break; // killed, waiting for its new parent to reap it
      if (Date.now() > end) {
        kill(pid, Signal.SIGKILL);
        assert.fail(`pid ${pid} still runs (state ${state}) after its parent exited`);
      }
      await new Promise((res) => setTimeout(res, 20));
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

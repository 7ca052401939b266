import assert from "node:assert/strict";
import { ErrnoError } from "./errno.ts";
import { listOpenFds, OwnedFd } from "./fd.ts";
import { ftruncate, memfdCreate } from "./memory.ts";
import { Signal } from "./process.ts";
import { socketPair } from "./socket.ts";
import { resolveExecutable, spawn } from "./spawn.ts";

/** Reads everything from a nonblocking socket until the peer closes. */
async function readAll(fd: OwnedFd): Promise<string> {
  const chunks: Uint8Array[] = [];
  const buf = new Uint8Array(4096);
  while (true) {
    const n = fd.read(buf);
    if (n === 0) break;
    if (n === null) {
      await new Promise((r) => setTimeout(r, 5));
      continue;
    }
    chunks.push(buf.slice(0, n));
  }
  return new TextDecoder().decode(new Uint8Array(chunks.flatMap((c) => [...c])));
}

function statusField(pid: number, field: string): string {
  const line = Deno.readTextFileSync(`/proc/${pid}/status`).split("\n").find((l) =>
    l.startsWith(`${field}:`)
  );
  assert.ok(line, `${field} in /proc/${pid}/status`);
  return line.split(/\s+/)[1];
}

Deno.test("spawn gives the child exactly the mapped fds and nothing else", async () => {
  // The runtime opens a few fds of its own the first time a nonblocking FFI call runs: warm it up.
  await spawn("true", ["true"]).wait();
  const before = listOpenFds();
  // An fd without CLOEXEC below the highest target must not reach the child either.
  const inherited = memfdCreate("not-for-child");
  inherited.setCloseOnExec(false);
  const [out, childOut] = socketPair();
  const mem = memfdCreate("for-child");
  ftruncate(mem, 4096);
  try {
    const child = spawn("sleep", ["sleep", "30"], {
      fds: new Map([[1, childOut.fd], [70, mem], [3, mem]]),
      stdio: "null",
    });
    try {
      assert.ok(inherited.unsafeFd < 70);
      await execDone(child.pid);
      const fds = [...Deno.readDirSync(`/proc/${child.pid}/fd`)].map((e) => Number(e.name)).sort((a, b) =>
        a - b
      );
      assert.deepEqual(fds, [0, 1, 2, 3, 70]);
      assert.match(Deno.readLinkSync(`/proc/${child.pid}/fd/70`), /^\/memfd:for-child/);
      assert.match(Deno.readLinkSync(`/proc/${child.pid}/fd/3`), /^\/memfd:for-child/);
      assert.equal(Deno.readLinkSync(`/proc/${child.pid}/fd/0`), "/dev/null");
      assert.equal(Deno.readLinkSync(`/proc/${child.pid}/fd/2`), "/dev/null");
      assert.match(Deno.readLinkSync(`/proc/${child.pid}/fd/1`), /^socket:/);
      // The child's copies are not CLOEXEC; ours still are.
      const flags = /flags:\s+([0-7]+)/.exec(Deno.readTextFileSync(`/proc/${child.pid}/fdinfo/70`))![1];
      assert.equal(parseInt(flags, 8) & 0o2000000, 0);
      assert.equal(mem.closeOnExec, true);
    } finally {
      child.kill(Signal.SIGKILL);
      await child.wait();
    }
  } finally {
    inherited.close();
    mem.close();
    out.close();
    childOut.close();
  }
  assert.deepEqual(listOpenFds(), before, "the temporary dups and the pidfd were closed");
});

Deno.test("spawn a child's stdout mapped to a socket carries its output; exit codes come back", async () => {
  const [out, childOut] = socketPair();
  try {
    const child = spawn("/bin/sh", ["sh", "-c", "echo hello $GREETING; exit 3"], {
      fds: new Map([[1, childOut.fd]]),
      env: { GREETING: "from env" },
    });
    childOut.close();
    const [text, st] = await Promise.all([readAll(out.fd), child.wait()]);
    assert.equal(text, "hello from env\n");
    assert.deepEqual(st, { code: 3, signal: null, text: "exit 3" });
    assert.equal(child.status, st);
    assert.equal(child.pidfd.closed, true);
    assert.equal(child.kill(), false, "a reaped child cannot be signalled");
  } finally {
    out.close();
    childOut.close();
  }
});

/** Waits until a spawned `sleep` sits in clock_nanosleep: its exec (and close-on-exec) is complete. */
async function execDone(pid: number): Promise<void> {
  while (!Deno.readTextFileSync(`/proc/${pid}/syscall`).startsWith("230 ")) {
    await new Promise((r) => setTimeout(r, 5));
  }
}

Deno.test("spawn children start with an empty signal mask and no ignored signals", async () => {
  const child = spawn("sleep", ["sleep", "30"], { stdio: "null" });
  try {
    await execDone(child.pid);
    assert.equal(statusField(child.pid, "SigIgn"), "0000000000000000");
    assert.equal(statusField(child.pid, "SigBlk"), "0000000000000000");
    assert.notEqual(statusField(Deno.pid, "SigIgn"), "0000000000000000", "Deno itself ignores SIGPIPE");
  } finally {
    child.kill();
    assert.deepEqual(await child.wait(), { code: null, signal: 15, text: "killed by SIGTERM" });
  }
});

Deno.test("spawn pidfd: kill sends the signal, tryWait is null while running, wait reaps", async () => {
  const child = spawn("sleep", ["sleep", "30"], { stdio: "null", newSession: true });
  assert.equal(child.tryWait(), null);
  assert.equal(statusField(child.pid, "NSsid") ?? "", statusField(child.pid, "NSsid"));
  const sid = Deno.readTextFileSync(`/proc/${child.pid}/stat`).split(") ")[1].split(" ")[3];
  assert.equal(Number(sid), child.pid, "newSession: the child leads its own session");
  assert.equal(child.kill(Signal.SIGKILL), true);
  const st = await child.wait();
  assert.deepEqual(st, { code: null, signal: 9, text: "killed by SIGKILL" });
  assert.equal(child.tryWait(), st);
  assert.equal(await child.wait(), st);
});

Deno.test("spawn cwd and a missing executable", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-spawn-" });
  try {
    const child = spawn("/bin/sh", ["sh", "-c", "pwd > out"], { cwd: dir });
    assert.equal((await child.wait()).code, 0);
    assert.equal(Deno.readTextFileSync(`${dir}/out`).trim(), Deno.realPathSync(dir));
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
  const before = listOpenFds();
  assert.throws(
    () => spawn("/nonexistent/mpq-binary", ["x"]),
    (e: unknown) => e instanceof ErrnoError && e.syscall === "posix_spawn" && e.code === "ENOENT",
  );
  assert.deepEqual(listOpenFds(), before);
  assert.throws(
    () => spawn("sleep", ["sleep"], { fds: new Map([[-1, memfdCreate("x")]]) }),
    /child fd must be >= 0/,
  );
});

Deno.test("resolveExecutable finds names on PATH and names what it could not find", () => {
  assert.equal(resolveExecutable("sh", "/nonexistent:/bin"), "/bin/sh");
  assert.equal(resolveExecutable("./relative/x"), "./relative/x");
  assert.throws(
    () => resolveExecutable("mpq-no-such-tool", "/bin:/usr/bin"),
    (e: unknown) =>
      e instanceof ErrnoError && e.code === "ENOENT" &&
      e.message.includes("mpq-no-such-tool: not found on PATH"),
  );
  // A directory or a non-executable file on PATH is skipped.
  const dir = Deno.makeTempDirSync({ prefix: "mpq-path-" });
  try {
    Deno.writeTextFileSync(`${dir}/tool`, "#!/bin/sh\n");
    Deno.mkdirSync(`${dir}/sub/tool`, { recursive: true });
    assert.throws(() => resolveExecutable("tool", `${dir}:${dir}/sub`), ErrnoError);
    Deno.chmodSync(`${dir}/tool`, 0o755);
    assert.equal(resolveExecutable("tool", `${dir}/sub:${dir}`), `${dir}/tool`);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

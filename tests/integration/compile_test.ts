import assert from "node:assert/strict";
import { compile, launcherScript } from "../../tools/compile.ts";

const decoder = new TextDecoder();

/** Runs the copied mpq with a clean environment: no PATH entry for deno, no project around it. */
async function runMpq(
  dir: string,
  args: string[],
  netns = false,
): Promise<{ code: number; out: string; err: string }> {
  const env = { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", HOME: `${dir}/home`, XDG_CACHE_HOME: `${dir}/cache` };
  const cmd = netns ? "unshare" : "./mpq";
  const out = await new Deno.Command(cmd, {
    args: netns ? ["-n", "./mpq", ...args] : args,
    cwd: `${dir}/run`,
    env,
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, out: decoder.decode(out.stdout), err: decoder.decode(out.stderr) };
}

function canUnshareNet(): boolean {
  try {
    return new Deno.Command("unshare", { args: ["-n", "true"], stdout: "null", stderr: "null" }).outputSync()
      .success;
  } catch {
    return false;
  }
}

Deno.test("compile dist/mpq is one file that runs alone in an empty directory, without network", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mpq-compile-test-" });
  try {
    const built = `${dir}/build/mpq`;
    const { mode } = await compile({ output: built });
    await Deno.mkdir(`${dir}/run`);
    await Deno.copyFile(built, `${dir}/run/mpq`);
    await Deno.chmod(`${dir}/run/mpq`, 0o755);
    await Deno.remove(`${dir}/build`, { recursive: true });
    assert.deepEqual([...Deno.readDirSync(`${dir}/run`)].map((e) => e.name), ["mpq"]);

    const netns = canUnshareNet(); // root on CI: prove that starting needs no network
    const version = await runMpq(dir, ["--version"], netns);
    assert.equal(version.code, 0, version.err);
    assert.match(version.out, /^mpq \d+\.\d+\.\d+\n$/);

    const help = await runMpq(dir, ["--help"]);
    assert.equal(help.code, 0, help.err);
    assert.match(help.out, /Usage: mpq <command>/);
    assert.match(help.out, /ivshmem/);

    const iv = await runMpq(dir, ["ivshmem", "--help"]);
    assert.equal(iv.code, 0, iv.err);
    assert.match(iv.out, /Usage: mpq ivshmem/);
    assert.match(iv.out, /-S, --socket-path/);

    const bad = await runMpq(dir, ["ivshmem", "-n", "65", "-F"]);
    assert.equal(bad.code, 1);
    assert.match(bad.err, /vectors/);

    if (mode === "launcher") {
      // Extracted once, keyed by content hash, published complete.
      const entries = [...Deno.readDirSync(`${dir}/cache/mpq`)].filter((e) => !e.name.startsWith("."));
      assert.equal(entries.length, 1);
      assert.match(entries[0].name, /^[0-9a-f]{32}$/);
      assert.ok(Deno.statSync(`${dir}/cache/mpq/${entries[0].name}/.complete`).isFile);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("compile the single file re-spawns itself (MPQ_SELF): ivshmem daemonizes and serves", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mpq-compile-self-" });
  const name = `mpq-compile-test-${Deno.pid}`;
  try {
    await Deno.mkdir(`${dir}/run`);
    await compile({ output: `${dir}/run/mpq` });
    const sock = `${dir}/iv.sock`;
    const pidfile = `${dir}/iv.pid`;
    const r = await runMpq(dir, ["ivshmem", "-S", sock, "-M", name, "-p", pidfile, "-l", "64K"]);
    assert.equal(r.code, 0, r.err);
    const pid = Number(Deno.readTextFileSync(pidfile).trim());
    assert.ok(pid > 0);
    try {
      assert.ok(Deno.lstatSync(sock).isSocket, "the daemon listens once the parent has exited");
      const cmdline = Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0");
      assert.ok(cmdline.some((a) => a.endsWith("/mpq.js")) || cmdline[0].endsWith("/mpq"), cmdline.join(" "));
    } finally {
      Deno.kill(pid, "SIGTERM");
      // The daemon is not our child: wait for it to go away by polling its /proc entry.
      while (true) {
        try {
          Deno.statSync(`/proc/${pid}`);
        } catch {
          break;
        }
        await new Promise((res) => setTimeout(res, 20));
      }
    }
    assert.throws(() => Deno.lstatSync(sock), Deno.errors.NotFound, "SIGTERM removed the socket");
    assert.throws(() => Deno.statSync(`/dev/shm/${name}`), Deno.errors.NotFound, "and the shm object");
  } finally {
    try {
      Deno.removeSync(`/dev/shm/${name}`);
    } catch { /* gone */ }
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("compile launcherScript pads the payload offset so the script length does not depend on it", () => {
  const hash = "0123456789abcdef0123456789abcdef";
  const a = launcherScript(hash, 1);
  const b = launcherScript(hash, 123456789);
  assert.equal(a.length, b.length);
  assert.match(b, /tail -c \+000123456789 /);
  assert.ok(a.includes(`dir="$base/${hash}"`));
  assert.match(a, /MPQ_SELF="\$self"/);
  assert.throws(() => launcherScript("not hex!", 1), /payload hash must be hex/);
});

/**
 * `mpq` itself: --version and --help answer without loading libc (no FFI permission needed), so
 * start-up costs what the runtime costs; unknown commands exit 1 with the usage.
 */
import assert from "node:assert/strict";

const MAIN = new URL("../../main.ts", import.meta.url).pathname;

async function run(
  permissions: string[],
  args: string[],
): Promise<{ code: number; out: string; err: string }> {
  const o = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...permissions, MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const d = new TextDecoder();
  return { code: o.code, out: d.decode(o.stdout), err: d.decode(o.stderr) };
}

Deno.test("mpq --version and --help load no FFI: they run without --allow-ffi", async () => {
  // Without FFI permission, Deno.dlopen throws: any import of ffi/ at start-up would fail here.
  const v = await run(["--allow-read", "--allow-env"], ["--version"]);
  assert.equal(v.code, 0, v.err);
  assert.match(v.out, /^mpq \d+\.\d+\.\d+/);
  const h = await run(["--allow-read", "--allow-env"], ["--help"]);
  assert.equal(h.code, 0, h.err);
  assert.match(h.out, /Usage: mpq <command>/);
});

Deno.test("mpq with an unknown command exits 1 naming it, with the usage", async () => {
  const r = await run(["-A"], ["frobnicate"]);
  assert.equal(r.code, 1);
  assert.match(r.err, /unknown command 'frobnicate'/);
  assert.match(r.err, /Usage: mpq <command>/);
});

Deno.test("mpq reports a command's input error as one line and exit 1", async () => {
  const r = await run(["-A"], [
    "vhost",
    "blk",
    "--blk-file=/nonexistent/disk.img",
    "--socket-path=/tmp/x.sock",
  ]);
  assert.equal(r.code, 1);
  assert.match(r.err, /--blk-file \/nonexistent\/disk.img: open .*ENOENT/);
});

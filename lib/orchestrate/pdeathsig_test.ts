import assert from "node:assert/strict";
import { getpid, memfdCreate, spawn } from "../../ffi/mod.ts";
import { PARENT_GONE_EXIT, withParentDeathSignal } from "./pdeathsig.ts";

Deno.test("pdeathsig wrapper runs the target with its fds when the parent is the expected one", async () => {
  using dir = {
    path: Deno.makeTempDirSync(),
    [Symbol.dispose]() {
      Deno.removeSync(this.path, { recursive: true });
    },
  };
  using mem = memfdCreate("pdeathsig-test");
  const out = `${dir.path}/out`;
  // The target reports what fd 3 is and the argv it got.
  const argv = withParentDeathSignal([
    "/bin/sh",
    "-c",
    `readlink /proc/self/fd/3 > ${out}; echo "$0 $1" >> ${out}`,
    "x",
    "y",
  ], { parentPid: getpid() });
  assert.deepEqual(argv.slice(0, 5), ["/usr/bin/setpriv", "--pdeathsig", "KILL", "--", "/bin/sh"]);
  const child = spawn(argv[0], argv, { fds: new Map([[3, mem]]) });
  const st = await child.wait();
  assert.equal(st.text, "exit 0");
  const lines = Deno.readTextFileSync(out).trim().split("\n");
  assert.match(lines[0], /^\/memfd:pdeathsig-test/);
  assert.equal(lines[1], "x y");
});

Deno.test("pdeathsig wrapper refuses to start the target when its parent is not the expected one", async () => {
  using dir = {
    path: Deno.makeTempDirSync(),
    [Symbol.dispose]() {
      Deno.removeSync(this.path, { recursive: true });
    },
  };
  const marker = `${dir.path}/ran`;
  // Pretend mpq (pid 1 here, which is not our pid) already died and the child was re-parented.
  const argv = withParentDeathSignal(["/usr/bin/touch", marker], { parentPid: 1 });
  const child = spawn(argv[0], argv, { stdio: "null" });
  const st = await child.wait();
  assert.equal(st.code, PARENT_GONE_EXIT);
  assert.throws(() => Deno.statSync(marker), Deno.errors.NotFound);
});

Deno.test("pdeathsig wrapper needs an absolute program path", () => {
  assert.throws(
    () => withParentDeathSignal(["qemu"], { parentPid: 1 }),
    /needs an absolute path: got qemu/,
  );
});

Deno.test("pdeathsig wrapper leaves the target no ignored and no blocked signals", async () => {
  using dir = {
    path: Deno.makeTempDirSync(),
    [Symbol.dispose]() {
      Deno.removeSync(this.path, { recursive: true });
    },
  };
  const out = `${dir.path}/status`;
  const argv = withParentDeathSignal(["/bin/cp", "/proc/self/status", out], { parentPid: getpid() });
  const st = await spawn(argv[0], argv).wait();
  assert.equal(st.text, "exit 0");
  const status = Deno.readTextFileSync(out);
  assert.match(status, /^SigBlk:\s+0000000000000000$/m);
  assert.match(status, /^SigIgn:\s+0000000000000000$/m);
});

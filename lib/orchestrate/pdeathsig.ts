/**
 * Every child of the VM dies with mpq, even when mpq is killed with SIGKILL.
 *
 * posix_spawn cannot set the child's parent-death signal, so each child is started through
 * util-linux `setpriv --pdeathsig KILL` (always present on Debian: util-linux is essential), which
 * sets PR_SET_PDEATHSIG and execs `/bin/sh -c`, which checks that its parent is still mpq and then
 * execs the target. The check closes the race where mpq dies between posix_spawn and prctl: the
 * child would then have been re-parented already and getppid() (sh's $PPID) would differ. After the
 * check the signal is armed while mpq lives, so the kernel delivers it when mpq's spawning thread
 * (the main thread) ends. Fds without CLOEXEC pass through setpriv, sh and exec unchanged.
 *
 * Why not a hidden `mpq __exec` mode: it does the same three steps (prctl, getppid check, execve)
 * but costs one Deno start-up (~40 ms and ~40 MiB) per child, which alone would exceed the 5 %
 * overhead budget of the demo's start-up; setpriv + sh costs ~2 ms.
 * @module
 */

/** The exit code of the wrapper when mpq was already gone (so the target never ran). */
export const PARENT_GONE_EXIT = 125;

const SCRIPT =
  `if [ "$PPID" != "$1" ]; then echo "mpq: parent $1 is gone; not starting $2" >&2; exit ${PARENT_GONE_EXIT}; fi; shift; exec "$@"`;

/** Options for withParentDeathSignal. */
export interface ParentDeathOptions {
  /** The pid of the process that will spawn the wrapper (mpq itself). */
  parentPid: number;
  /** setpriv binary (default "/usr/bin/setpriv"). */
  setpriv?: string;
  /** POSIX shell (default "/bin/sh"). */
  shell?: string;
}

/**
 * The argv that runs `argv` (argv[0] an absolute path) so that it gets SIGKILL when the process
 * `options.parentPid` (which must be the one that spawns it) dies.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { getpid, spawn } from "../../ffi/mod.ts";
 *
 * const wrapped = withParentDeathSignal(["/bin/true"], { parentPid: getpid() }); // ["/usr/bin/setpriv", ...]
 * assert.equal((await spawn(wrapped[0], wrapped).wait()).code, 0); // killed (SIGKILL) if we die first
 * const late = withParentDeathSignal(["/bin/true"], { parentPid: 1 }); // as if its parent were already gone
 * assert.equal((await spawn(late[0], late, { stdio: "null" }).wait()).code, PARENT_GONE_EXIT); // never ran
 * ```
 */
export function withParentDeathSignal(argv: readonly string[], options: ParentDeathOptions): string[] {
  const exe = argv[0] ?? "";
  if (!exe.startsWith("/")) throw new TypeError(`withParentDeathSignal needs an absolute path: got ${exe}`);
  return [
    options.setpriv ?? "/usr/bin/setpriv",
    "--pdeathsig",
    "KILL",
    "--",
    options.shell ?? "/bin/sh",
    "-c",
    SCRIPT,
    "mpq-child",
    String(options.parentPid),
    ...argv,
  ];
}

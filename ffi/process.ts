/**
 * Process-wide calls: pid, signals, sessions, parent-death signal, exec, resource limits, getrandom.
 * @module
 */
import { addressOf, cstr, libc } from "./_libc.ts";
import { RLIMIT } from "./_layout.ts";
import { check, Errno, ErrnoError, lastErrno } from "./errno.ts";

/** Signal numbers (x86_64). */
export const Signal = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGKILL: 9,
  SIGUSR1: 10,
  SIGUSR2: 12,
  SIGPIPE: 13,
  SIGTERM: 15,
  SIGCHLD: 17,
  SIGCONT: 18,
  SIGSTOP: 19,
} as const;

const SIGNAL_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Signal).map(([k, v]) => [v, k]),
);

/** "SIGKILL" for 9; "signal 42" when unnamed. */
export function signalName(sig: number): string {
  return SIGNAL_NAMES[sig] ?? `signal ${sig}`;
}

/** This process's pid. */
export function getpid(): number {
  return libc.getpid();
}

/** The parent's pid. */
export function getppid(): number {
  return libc.getppid();
}

/** Starts a new session (the caller must not be a group leader). */
export function setsid(): number {
  return check("setsid", libc.setsid());
}

/** kill(2). Returns false when the process is gone (ESRCH). */
export function kill(pid: number, sig: number): boolean {
  if (libc.kill(pid, sig) === -1) {
    if (lastErrno() === Errno.ESRCH) return false;
    throw new ErrnoError("kill", lastErrno(), `pid ${pid} ${signalName(sig)}`);
  }
  return true;
}

const PR_SET_PDEATHSIG = 1;

/** prctl(PR_SET_PDEATHSIG): the kernel sends `sig` to this process when its parent thread dies. */
export function setParentDeathSignal(sig: number): void {
  check("prctl(PR_SET_PDEATHSIG)", libc.prctl(PR_SET_PDEATHSIG, BigInt(sig), 0n, 0n, 0n));
}

/** NULL-terminated array of C strings; the returned holder keeps every buffer alive. */
export function cStringArray(items: readonly string[]): { array: Uint8Array<ArrayBuffer>; keep: unknown[] } {
  const strs = items.map(cstr);
  const ptrs = new BigUint64Array(items.length + 1);
  strs.forEach((s, i) => (ptrs[i] = addressOf(s)));
  return { array: new Uint8Array(ptrs.buffer), keep: strs };
}

/**
 * execve(2): replaces this process. Returns only by throwing. fds without CLOEXEC stay open.
 */
export function execve(path: string, argv: readonly string[], env: Record<string, string>): never {
  const a = cStringArray(argv);
  const e = cStringArray(Object.entries(env).map(([k, v]) => `${k}=${v}`));
  libc.execve(cstr(path), a.array, e.array);
  throw new ErrnoError("execve", lastErrno(), path);
}

const RLIMIT_NOFILE = 7;

/** Raises the soft RLIMIT_NOFILE to the hard limit (or `want` if lower). Returns the new soft limit. */
export function raiseNoFileLimit(want?: number): number {
  const r = new Uint8Array(RLIMIT.size);
  const v = new DataView(r.buffer);
  check("getrlimit(RLIMIT_NOFILE)", libc.getrlimit(RLIMIT_NOFILE, r));
  const max = v.getBigUint64(RLIMIT.max, true);
  const target = want !== undefined && BigInt(want) < max ? BigInt(want) : max;
  if (target > v.getBigUint64(RLIMIT.cur, true)) {
    v.setBigUint64(RLIMIT.cur, target, true);
    check("setrlimit(RLIMIT_NOFILE)", libc.setrlimit(RLIMIT_NOFILE, r));
  }
  return Number(v.getBigUint64(RLIMIT.cur, true));
}

/** Fills `buf` from getrandom(2). */
export function getRandom(buf: Uint8Array<ArrayBuffer>): void {
  let done = 0;
  while (done < buf.byteLength) {
    const p = Deno.UnsafePointer.of(buf.subarray(done));
    const n = libc.getrandom(p, BigInt(buf.byteLength - done), 0);
    if (n === -1n) {
      if (lastErrno() === Errno.EINTR) continue;
      throw new ErrnoError("getrandom", lastErrno());
    }
    done += Number(n);
  }
}

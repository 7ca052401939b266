/**
 * posix_spawn with an exact fd map, default signal dispositions and an empty signal mask;
 * pidfd for waiting and signalling without pid-reuse races. Never fork().
 * @module
 */
import { cstr, libc } from "./_libc.ts";
import { OPAQUE, SIGINFO } from "./_layout.ts";
import { check, checkReturn, Errno, ErrnoError, lastErrno } from "./errno.ts";
import { listOpenFds, OpenFlags, OwnedFd } from "./fd.ts";
import { cStringArray, signalName } from "./process.ts";

const POSIX_SPAWN_SETPGROUP = 0x02;
const POSIX_SPAWN_SETSIGDEF = 0x04;
const POSIX_SPAWN_SETSIGMASK = 0x08;
const POSIX_SPAWN_SETSID = 0x80;
const SYS_pidfd_open = 434;
const SYS_pidfd_send_signal = 424;
const P_PIDFD = 3;
const WEXITED = 4;
const WNOHANG = 1;
const CLD_EXITED = 1;

/** How a child ended. */
export interface ExitStatus {
  /** Exit code, or null when killed by a signal. */
  code: number | null;
  /** Signal number that killed it, or null. */
  signal: number | null;
  /** "exit 0", "exit 3", "killed by SIGKILL". */
  text: string;
}

/** Options for spawn. */
export interface SpawnOptions {
  /** The complete environment (default: this process's). */
  env?: Record<string, string>;
  /** Child fd number -> fd to put there. Everything else above 2 is closed in the child. */
  fds?: ReadonlyMap<number, OwnedFd>;
  /** stdin/stdout/stderr not in `fds`: inherit (default) or /dev/null. */
  stdio?: "inherit" | "null";
  /** Working directory. */
  cwd?: string;
  /** Start a new session (setsid). */
  newSession?: boolean;
  /** Start a new process group (ignored with newSession). */
  newProcessGroup?: boolean;
}

/** Finds `name` on PATH (names with a slash are taken as they are). Throws ENOENT naming it. */
export function resolveExecutable(name: string, path = Deno.env.get("PATH") ?? "/usr/bin:/bin"): string {
  if (name.includes("/")) return name;
  for (const dir of path.split(":")) {
    if (!dir) continue;
    const full = `${dir}/${name}`;
    try {
      const st = Deno.statSync(full);
      if (st.isFile && ((st.mode ?? 0) & 0o111) !== 0) return full;
    } catch { /* next */ }
  }
  throw new ErrnoError("posix_spawn", Errno.ENOENT, `${name}: not found on PATH`);
}

/**
 * A spawned child. Owns its pidfd; wait() reaps it.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const child = spawn("/bin/true", ["true"]);
 * const st = await child.wait(); // reaps it and closes the pidfd
 * assert.deepEqual(st, { code: 0, signal: null, text: "exit 0" });
 * ```
 */
export class ChildProcess {
  readonly pid: number;
  /** Readable when the child has exited (register with the reactor, then tryWait()). */
  readonly pidfd: OwnedFd;
  readonly argv: readonly string[];
  #status: ExitStatus | null = null;
  #waiting: Promise<ExitStatus> | null = null;

  constructor(pid: number, pidfd: OwnedFd, argv: readonly string[]) {
    this.pid = pid;
    this.pidfd = pidfd;
    this.argv = argv;
  }

  /** The exit status once reaped, else null. */
  get status(): ExitStatus | null {
    return this.#status;
  }

  #decode(info: Uint8Array<ArrayBuffer>): ExitStatus | null {
    const v = new DataView(info.buffer);
    if (v.getInt32(SIGINFO.pid, true) === 0) return null;
    const code = v.getInt32(SIGINFO.code, true);
    const status = v.getInt32(SIGINFO.status, true);
    const st: ExitStatus = code === CLD_EXITED
      ? { code: status, signal: null, text: `exit ${status}` }
      : { code: null, signal: status, text: `killed by ${signalName(status)}` };
    this.#status = st;
    this.pidfd.close();
    return st;
  }

  /** Reaps the child if it has exited; null if it is still running. */
  tryWait(): ExitStatus | null {
    if (this.#status) return this.#status;
    const info = new Uint8Array(SIGINFO.size);
    check("waitid", libc.waitid(P_PIDFD, this.pidfd.unsafeFd, info, WEXITED | WNOHANG), `pid ${this.pid}`);
    return this.#decode(info);
  }

  /** Waits for the child to exit (on a worker thread; the event loop keeps turning). */
  wait(): Promise<ExitStatus> {
    if (this.#status) return Promise.resolve(this.#status);
    this.#waiting ??= (async () => {
      const info = new Uint8Array(SIGINFO.size);
      const fd = this.pidfd.unsafeFd;
      while (true) {
        const r = await libc.waitid_nb(P_PIDFD, fd, info, WEXITED);
        if (r === 0) {
          const st = this.#decode(info);
          if (st) return st;
        }
        // EINTR (or a spurious wake): ask again, synchronously first so errno is readable.
        const again = this.tryWait();
        if (again) return again;
      }
    })();
    return this.#waiting;
  }

  /** Sends a signal through the pidfd. Returns false when the child has already been reaped or is gone. */
  kill(sig = 15): boolean {
    if (this.#status || this.pidfd.closed) return false;
    const r = libc.syscall(
      BigInt(SYS_pidfd_send_signal),
      BigInt(this.pidfd.unsafeFd),
      BigInt(sig),
      0n,
      0n,
      0n,
      0n,
    );
    if (r === -1n) {
      if (lastErrno() === Errno.ESRCH) return false;
      throw new ErrnoError("pidfd_send_signal", lastErrno(), `pid ${this.pid} ${signalName(sig)}`);
    }
    return true;
  }
}

/**
 * Spawns `path` with `argv`. The child gets exactly the fds in `options.fds` at the given numbers
 * (CLOEXEC cleared on its copies only), stdio per `options.stdio`, all signals at their default
 * disposition and an empty signal mask (the Deno runtime ignores SIGPIPE; children must not).
 */
export function spawn(path: string, argv: readonly string[], options: SpawnOptions = {}): ChildProcess {
  const exe = resolveExecutable(path);
  const fds = options.fds ?? new Map<number, OwnedFd>();
  const maxTarget = Math.max(2, ...fds.keys());
  const fa = new Uint8Array(OPAQUE.fileActions);
  const attr = new Uint8Array(OPAQUE.spawnAttr);
  const temps: OwnedFd[] = [];
  const keep: unknown[] = [];
  checkReturn("posix_spawn_file_actions_init", libc.posix_spawn_file_actions_init(fa));
  checkReturn("posix_spawnattr_init", libc.posix_spawnattr_init(attr));
  try {
    for (const [target, src] of fds) {
      if (!Number.isInteger(target) || target < 0) {
        throw new RangeError(`child fd must be >= 0: got ${target}`);
      }
      // Copies above every target first, so one mapping cannot clobber another's source.
      const tmp = src.dup(maxTarget + 1, `${src.label} (for child fd ${target})`);
      temps.push(tmp);
      checkReturn(
        "posix_spawn_file_actions_adddup2",
        libc.posix_spawn_file_actions_adddup2(fa, tmp.unsafeFd, target),
      );
    }
    // closefrom below only reaches fds above every target; close the parent's fds between 3 and the
    // highest target that are not mapped (CLOEXEC would close most at exec, but not an inherited one).
    for (const fd of listOpenFds()) {
      if (fd < 3 || fd > maxTarget || fds.has(fd)) continue;
      checkReturn("posix_spawn_file_actions_addclose", libc.posix_spawn_file_actions_addclose(fa, fd));
    }
    if (options.stdio === "null") {
      const devnull = cstr("/dev/null");
      keep.push(devnull);
      for (const std of [0, 1, 2]) {
        if (fds.has(std)) continue;
        checkReturn(
          "posix_spawn_file_actions_addopen",
          libc.posix_spawn_file_actions_addopen(
            fa,
            std,
            devnull,
            std === 0 ? OpenFlags.O_RDONLY : OpenFlags.O_WRONLY,
            0,
          ),
        );
      }
    }
    if (options.cwd) {
      const cwd = cstr(options.cwd);
      keep.push(cwd);
      checkReturn("posix_spawn_file_actions_addchdir_np", libc.posix_spawn_file_actions_addchdir_np(fa, cwd));
    }
    checkReturn(
      "posix_spawn_file_actions_addclosefrom_np",
      libc.posix_spawn_file_actions_addclosefrom_np(fa, maxTarget + 1),
    );
    const all = new Uint8Array(OPAQUE.sigset);
    const none = new Uint8Array(OPAQUE.sigset);
    check("sigfillset", libc.sigfillset(all));
    // glibc's sigfillset leaves out its internal signals 32 and 33 (SIGCANCEL, SIGSETXID), and its
    // posix_spawn child sets those to SIG_IGN, which exec keeps: name every signal 1..64 explicitly
    // so the child starts with all of them at SIG_DFL.
    new DataView(all.buffer).setBigUint64(0, 0xffffffffffffffffn, true);
    check("sigemptyset", libc.sigemptyset(none));
    checkReturn("posix_spawnattr_setsigdefault", libc.posix_spawnattr_setsigdefault(attr, all));
    checkReturn("posix_spawnattr_setsigmask", libc.posix_spawnattr_setsigmask(attr, none));
    let flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK;
    if (options.newSession) flags |= POSIX_SPAWN_SETSID;
    else if (options.newProcessGroup) {
      flags |= POSIX_SPAWN_SETPGROUP;
      checkReturn("posix_spawnattr_setpgroup", libc.posix_spawnattr_setpgroup(attr, 0));
    }
    checkReturn("posix_spawnattr_setflags", libc.posix_spawnattr_setflags(attr, flags));

    const a = cStringArray(argv);
    const env = options.env ?? Deno.env.toObject();
    const e = cStringArray(Object.entries(env).map(([k, v]) => `${k}=${v}`));
    const pidBuf = new Int32Array(1);
    checkReturn(
      "posix_spawn",
      libc.posix_spawn(new Uint8Array(pidBuf.buffer), cstr(exe), fa, attr, a.array, e.array),
      exe,
    );
    const pid = pidBuf[0];
    const pidfdRaw = libc.syscall(BigInt(SYS_pidfd_open), BigInt(pid), 0n, 0n, 0n, 0n, 0n);
    if (pidfdRaw === -1n) throw new ErrnoError("pidfd_open", lastErrno(), `pid ${pid}`);
    // pidfd_open always sets close-on-exec.
    const pidfd = OwnedFd.unsafeAdopt(Number(pidfdRaw), `pidfd ${pid}`);
    return new ChildProcess(pid, pidfd, argv);
  } finally {
    for (const t of temps) t.close();
    libc.posix_spawn_file_actions_destroy(fa);
    libc.posix_spawnattr_destroy(attr);
    void keep;
  }
}

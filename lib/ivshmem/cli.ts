/**
 * `mpq ivshmem`: the server (flags of contrib ivshmem-server) and `mpq ivshmem client`.
 * @module
 */
import { sdNotify } from "../cli/sd_notify.ts";
import { parseArgs } from "node:util";
import {
  type ChildProcess,
  getpid,
  OwnedFd,
  raiseNoFileLimit,
  Reactor,
  socketPair,
  spawn,
} from "../../ffi/mod.ts";
import { InputError, UsageError } from "../cli/errors.ts";
import { selfCommand } from "../cli/self.ts";
import { IvshmemServer, type ShmSource } from "./server.ts";
import { DEFAULT_SHM_SIZE, MAX_VECTORS, parseSize, parseVectors } from "./protocol.ts";
import { clientMain } from "./client_cli.ts";

/** contrib ivshmem-server's defaults. */
export const DEFAULTS = {
  pidfile: "/var/run/ivshmem-server.pid",
  socketPath: "/tmp/ivshmem_socket",
  shmName: "ivshmem",
  size: DEFAULT_SHM_SIZE,
  vectors: 1,
  mode: 0o600,
} as const;

/** Set in the re-spawned daemon: the fd number of the socket that reports readiness. */
const READY_ENV = "MPQ_IVSHMEM_READY_FD";
/** How long the daemon parent waits for the child to listen. */
const DAEMON_READY_MS = 30_000;

/** Server usage (contrib ivshmem-server's, plus long options and --mode). */
export const SERVER_USAGE = `Usage: mpq ivshmem [OPTION]...
       mpq ivshmem client [OPTION]...   (see mpq ivshmem client --help)
A drop-in replacement for QEMU's contrib ivshmem-server.
  -h, --help                  show this help
  -v, --verbose               verbose mode (only with -F)
  -F, --foreground            foreground mode (default is to daemonize)
  -p, --pidfile <pid-file>    path to the PID file (used in daemon mode only)
                              default ${DEFAULTS.pidfile}
  -S, --socket-path <path>    path to the unix socket to listen to
                              default ${DEFAULTS.socketPath}
  -M, --shm-name <shm-name>   POSIX shared memory object to use: created if missing (and
                              then removed on exit); an existing one is used only if it has
                              exactly the size asked for, and is never resized or removed
                              default ${DEFAULTS.shmName}
  -m, --shm-dir <dir-name>    where to create shared memory (e.g. a hugetlbfs mount):
                              a file is created there and unlinked at once
  -l, --size <size>           size of shared memory in bytes, rounded up to a power of two
                              suffixes K, M and G can be used, e.g. 1K means 1024
                              default ${DEFAULTS.size}
  -n, --vectors <nvectors>    number of vectors (1..${MAX_VECTORS})
                              default ${DEFAULTS.vectors}
      --mode <octal>          file mode of the socket, default 0600
In the foreground the server prints "listening on <path>" once it accepts peers.
SIGTERM or SIGINT: close every connection, remove the socket and the -M shm object if this
server created it, exit 0.`;

/** Parsed server options. */
export interface ServerArgs {
  verbose: boolean;
  foreground: boolean;
  pidfile: string;
  socketPath: string;
  shm: ShmSource;
  size: number;
  vectors: number;
  mode: number;
}

/**
 * Parses server flags; throws UsageError naming the flag. Returns null for --help.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(parseServerArgs(["-F", "-S", "/tmp/iv", "-l", "1M", "-n", "2"]), {
 *   verbose: false,
 *   foreground: true,
 *   pidfile: "/var/run/ivshmem-server.pid",
 *   socketPath: "/tmp/iv",
 *   shm: { name: "ivshmem" },
 *   size: 1048576,
 *   vectors: 2,
 *   mode: 0o600,
 * });
 * assert.throws(() => parseServerArgs(["-n", "65"]), {
 *   name: "UsageError",
 *   message: "-n/--vectors must be 1..64: got 65",
 * });
 * assert.equal(parseServerArgs(["--help"]), null);
 * ```
 */
export function parseServerArgs(args: string[]): ServerArgs | null {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      tokens: true,
      options: {
        help: { type: "boolean", short: "h" },
        verbose: { type: "boolean", short: "v" },
        foreground: { type: "boolean", short: "F" },
        pidfile: { type: "string", short: "p" },
        "socket-path": { type: "string", short: "S" },
        "shm-name": { type: "string", short: "M" },
        "shm-dir": { type: "string", short: "m" },
        size: { type: "string", short: "l" },
        vectors: { type: "string", short: "n" },
        mode: { type: "string" },
      },
    });
  } catch (e) {
    throw new UsageError(e instanceof Error ? e.message : String(e), SERVER_USAGE);
  }
  const v = parsed.values;
  if (v.help) return null;
  // -M and -m: the last one given wins, as in the C server.
  let shm: ShmSource = { name: DEFAULTS.shmName };
  for (const t of parsed.tokens ?? []) {
    if (t.kind !== "option" || t.value === undefined) continue;
    if (t.name === "shm-name") shm = { name: t.value };
    if (t.name === "shm-dir") shm = { dir: t.value };
  }
  if ("name" in shm && (shm.name.replace(/^\//, "") === "" || shm.name.slice(1).includes("/"))) {
    throw new UsageError(
      `-M/--shm-name must be one name such as "ivshmem": got ${JSON.stringify(shm.name)}`,
      SERVER_USAGE,
    );
  }
  if ("dir" in shm && shm.dir === "") throw new UsageError("-m/--shm-dir must not be empty", SERVER_USAGE);
  let size: number = DEFAULTS.size;
  if (v.size !== undefined) {
    try {
      size = parseSize(v.size);
    } catch (e) {
      throw new UsageError(`-l/--size: ${(e as Error).message}`, SERVER_USAGE);
    }
  }
  let vectors: number = DEFAULTS.vectors;
  if (v.vectors !== undefined) {
    try {
      vectors = parseVectors(v.vectors);
    } catch (e) {
      throw new UsageError(`-n/--vectors ${(e as Error).message}`, SERVER_USAGE);
    }
  }
  let mode: number = DEFAULTS.mode;
  if (v.mode !== undefined) {
    if (!/^0?[0-7]{1,4}$/.test(v.mode)) {
      throw new UsageError(
        `--mode must be an octal file mode such as 0660: got ${JSON.stringify(v.mode)}`,
        SERVER_USAGE,
      );
    }
    mode = parseInt(v.mode, 8);
  }
  for (
    const [flag, value] of [["-S/--socket-path", v["socket-path"]], ["-p/--pidfile", v.pidfile]] as const
  ) {
    if (value === "") throw new UsageError(`${flag} must not be empty`, SERVER_USAGE);
  }
  if (v.verbose && !v.foreground) {
    throw new UsageError("-v/--verbose: cannot use verbose in daemon mode (add -F)", SERVER_USAGE);
  }
  return {
    verbose: v.verbose ?? false,
    foreground: v.foreground ?? false,
    pidfile: v.pidfile ?? DEFAULTS.pidfile,
    socketPath: v["socket-path"] ?? DEFAULTS.socketPath,
    shm,
    size,
    vectors,
    mode,
  };
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** `mpq ivshmem [...]` and `mpq ivshmem client [...]`. Returns the exit code. */
export async function main(args: string[]): Promise<number> {
  if (args[0] === "client") return await clientMain(args.slice(1));
  if (args[0] === "server") args = args.slice(1);
  const opts = parseServerArgs(args);
  if (opts === null) {
    console.log(SERVER_USAGE);
    return 0;
  }
  if (!opts.foreground) return await daemonize(args);
  return await serve(opts);
}

/** Writes the readiness report to the parent (daemon mode), once. */
class Readiness {
  #fd: OwnedFd | null;
  constructor() {
    const raw = Deno.env.get(READY_ENV);
    Deno.env.delete(READY_ENV);
    this.#fd = raw !== undefined && /^\d+$/.test(raw)
      ? OwnedFd.unsafeAdopt(Number(raw), "readiness socket")
      : null;
  }
  get daemon(): boolean {
    return this.#fd !== null;
  }
  report(line: string): void {
    if (!this.#fd) return;
    try {
      this.#fd.write(new TextEncoder().encode(`${line}\n`));
    } catch { /* the parent is gone */ }
    this.#fd.close();
    this.#fd = null;
  }
}

async function serve(opts: ServerArgs): Promise<number> {
  const ready = new Readiness();
  const log = opts.verbose ? (line: string) => console.log(line) : undefined;
  const limit = raiseNoFileLimit();
  log?.(`RLIMIT_NOFILE ${limit}`);
  let server: IvshmemServer | null = null;
  const reactor = new Reactor({
    onError: (e) => server ? server.handleError(e) : log?.(`error: ${describe(e)}`),
  });
  const where = "name" in opts.shm ? `shm ${opts.shm.name}` : `shm dir ${opts.shm.dir}`;
  try {
    server = IvshmemServer.open(reactor, {
      socketPath: opts.socketPath,
      shm: opts.shm,
      size: opts.size,
      vectors: opts.vectors,
      mode: opts.mode,
      log,
    });
  } catch (e) {
    reactor.close();
    const msg = `cannot start on ${opts.socketPath} (${where}): ${describe(e)}`;
    ready.report(`error ${msg}`);
    throw new InputError(msg);
  }
  let pidfile: string | null = null;
  if (ready.daemon) {
    try {
      Deno.writeTextFileSync(opts.pidfile, `${getpid()}\n`);
      pidfile = opts.pidfile;
    } catch (e) {
      server.close();
      reactor.close();
      const msg = `cannot write pid file ${opts.pidfile}: ${describe(e)}`;
      ready.report(`error ${msg}`);
      throw new InputError(msg);
    }
  }
  const s = server;
  const stop = (sig: string) => {
    log?.(`${sig}: shutting down`);
    s.close();
    reactor.stop();
  };
  reactor.onSignal("SIGTERM", () => stop("SIGTERM"));
  reactor.onSignal("SIGINT", () => stop("SIGINT"));
  log?.(`${where}: ${s.size} bytes, ${s.vectors} vector(s) per peer`);
  if (!ready.daemon) console.log(`listening on ${opts.socketPath}`);
  ready.report("ok");
  sdNotify(`READY=1\nSTATUS=listening on ${opts.socketPath}`);
  try {
    await reactor.run();
  } finally {
    sdNotify("STOPPING=1");
    s.close();
    reactor.close();
    if (pidfile !== null) {
      try {
        if (Deno.readTextFileSync(pidfile).trim() === String(getpid())) Deno.removeSync(pidfile);
      } catch { /* already gone */ }
    }
  }
  return 0;
}

/**
 * Daemon mode without fork(): re-spawns this mpq with the same flags plus -F in a new session,
 * stdio on /dev/null, and one end of a socketpair at fd 3; exits 0 once the child reports that
 * it listens (and wrote the pid file), or 1 with the child's error.
 */
async function daemonize(args: string[]): Promise<number> {
  const [mine, theirs] = socketPair();
  let child: ChildProcess;
  try {
    const [exe, ...pre] = selfCommand();
    child = spawn(exe, [exe, ...pre, "ivshmem", ...args, "-F"], {
      fds: new Map([[3, theirs.fd]]),
      env: { ...Deno.env.toObject(), [READY_ENV]: "3" },
      newSession: true,
      stdio: "null",
    });
  } catch (e) {
    mine.close();
    throw new InputError(`cannot start the daemon: ${describe(e)}`);
  } finally {
    theirs.close();
  }
  let text = "";
  const reactor = new Reactor();
  const buf = new Uint8Array(4096);
  reactor.add(mine.fd, { readable: true }, () => {
    while (true) {
      const r = mine.recvMsg(buf);
      if (r === null) return;
      for (const f of r.fds) f.close();
      if (r.bytes === 0) break;
      text += new TextDecoder().decode(buf.subarray(0, r.bytes));
      if (text.includes("\n")) break;
    }
    reactor.stop();
  });
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    reactor.stop();
  }, DAEMON_READY_MS);
  try {
    await reactor.run();
  } finally {
    clearTimeout(timer);
    reactor.close();
    mine.close();
  }
  const line = text.split("\n")[0];
  if (line === "ok") return 0;
  if (timedOut) {
    child.kill(9);
    await child.wait();
    throw new InputError(`the daemon did not report readiness within ${DAEMON_READY_MS / 1000} s; killed it`);
  }
  if (line.startsWith("error ")) {
    await child.wait();
    throw new InputError(line.slice(6));
  }
  const st = await child.wait();
  throw new InputError(`the daemon exited before it was listening (${st.text})`);
}

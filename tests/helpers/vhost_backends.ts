/**
 * Starting vhost-user back-ends for tests and benchmarks: qemu-storage-daemon (the reference) and
 * `mpq vhost blk|rng` (ours), each listening on a UNIX socket in a private temporary directory.
 * @module
 */
import {
  type ChildProcess,
  type ExitStatus,
  OpenFlags,
  openPath,
  type OwnedFd,
  Signal,
  spawn,
} from "../../ffi/mod.ts";
import { selfCommand } from "../../lib/cli/self.ts";
import { type FrontendOptions, VhostUserFrontend } from "./vhost_frontend.ts";

/** A running back-end process and where it listens. */
export interface Backend {
  readonly name: string;
  readonly child: ChildProcess;
  readonly socketPath: string;
  /** Stops the process (SIGTERM, then SIGKILL after `graceMs`) and reaps it. */
  stop(graceMs?: number): Promise<ExitStatus>;
}

/** Options for starting a back-end. */
export interface BackendOptions {
  /** Extra arguments appended to the command line. */
  args?: string[];
  /** Milliseconds to wait for the socket to appear (default 15000). */
  readyMs?: number;
  /** Let the child write to our stdout/stderr (default: only when VHOST_TEST_VERBOSE is set). */
  inheritStdio?: boolean;
  /** Append the child's stdout and stderr to this file instead (overrides inheritStdio). */
  logFile?: string;
}

async function waitForSocket(child: ChildProcess, path: string, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (true) {
    try {
      if (Deno.statSync(path).isSocket) return;
    } catch { /* not yet */ }
    const st = child.tryWait();
    if (st) throw new Error(`${what} exited (${st.text}) before listening on ${path}`);
    if (Date.now() > deadline) {
      child.kill(Signal.SIGKILL);
      await child.wait();
      throw new Error(`${what} did not listen on ${path} within ${ms} ms`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

function makeBackend(name: string, child: ChildProcess, socketPath: string): Backend {
  return {
    name,
    child,
    socketPath,
    async stop(graceMs = 5000): Promise<ExitStatus> {
      if (child.status) return child.status;
      child.kill(Signal.SIGTERM);
      let timer: ReturnType<typeof setTimeout> | undefined;
      const killed = new Promise<void>((r) => {
        timer = setTimeout(() => {
          child.kill(Signal.SIGKILL);
          r();
        }, graceMs);
      });
      const st = await Promise.race([child.wait(), killed.then(() => child.wait())]);
      clearTimeout(timer);
      return st;
    },
  };
}

function stdio(o: BackendOptions): "inherit" | "null" {
  return (o.inheritStdio ?? Deno.env.get("VHOST_TEST_VERBOSE") !== undefined) ? "inherit" : "null";
}

/** Spawns with stdio per `o`: a log file as fds 1 and 2 (our copy closed once the child has it). */
function spawnLogged(exe: string, argv: string[], o: BackendOptions): ChildProcess {
  if (o.logFile === undefined) return spawn(exe, argv, { stdio: stdio(o) });
  const log: OwnedFd = openPath(o.logFile, OpenFlags.O_WRONLY | OpenFlags.O_CREAT | OpenFlags.O_APPEND);
  try {
    return spawn(exe, argv, { stdio: "null", fds: new Map([[1, log], [2, log]]) });
  } finally {
    log.close();
  }
}

/**
 * Starts qemu-storage-daemon exporting `file` as vhost-user-blk on `socketPath`.
 * @example
 * const qsd = await startQsd("/dev/shm/disk.img", "/tmp/x/qsd.sock", { queues: 1 });
 * await qsd.stop();
 */
export async function startQsd(
  file: string,
  socketPath: string,
  options: BackendOptions & { queues?: number; writable?: boolean } = {},
): Promise<Backend> {
  const argv = [
    "qemu-storage-daemon",
    "--blockdev",
    `driver=file,node-name=disk0,filename=${file},cache.direct=off`,
    "--export",
    `type=vhost-user-blk,id=exp0,addr.type=unix,addr.path=${socketPath},node-name=disk0,` +
    `writable=${options.writable === false ? "off" : "on"},num-queues=${options.queues ?? 1}`,
    ...(options.args ?? []),
  ];
  const child = spawnLogged("qemu-storage-daemon", argv, options);
  await waitForSocket(child, socketPath, options.readyMs ?? 15000, "qemu-storage-daemon");
  return makeBackend("qemu-storage-daemon", child, socketPath);
}

/**
 * Starts `mpq vhost <device> --socket-path=P ...args` from this checkout.
 * @example
 * const be = await startMpqVhost("blk", sock, { args: ["--blk-file", file] });
 */
export async function startMpqVhost(
  device: "blk" | "rng",
  socketPath: string,
  options: BackendOptions = {},
): Promise<Backend> {
  const [exe, ...pre] = selfCommand();
  const argv = [exe, ...pre, "vhost", device, `--socket-path=${socketPath}`, ...(options.args ?? [])];
  const child = spawnLogged(exe, argv, options);
  await waitForSocket(child, socketPath, options.readyMs ?? 15000, `mpq vhost ${device}`);
  return makeBackend(`mpq vhost ${device}`, child, socketPath);
}

/** Whether an executable is on PATH (tests of optional tools skip without it). */
export function haveTool(name: string): boolean {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/${name}`).isFile) return true;
    } catch { /* next */ }
  }
  return false;
}

/** A sparse file of `size` bytes filled from `fill` (or left as zeros). */
export async function makeDiskFile(
  path: string,
  size: number,
  fill?: (offset: number) => Uint8Array,
): Promise<void> {
  const f = await Deno.open(path, { create: true, write: true, truncate: true });
  try {
    await f.truncate(size);
    if (fill) {
      for (let off = 0; off < size;) {
        const chunk = fill(off);
        await f.seek(off, Deno.SeekMode.Start);
        let done = 0;
        while (done < chunk.byteLength) done += await f.write(chunk.subarray(done));
        off += chunk.byteLength;
      }
    }
  } finally {
    f.close();
  }
}

/** Deterministic pseudo-random bytes (xorshift), so failures name reproducible data. */
export function patternBytes(len: number, seed: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

/** Reads `len` bytes of `path` at `offset`. */
export function readFileRange(path: string, offset: number, len: number): Uint8Array<ArrayBuffer> {
  const f = Deno.openSync(path, { read: true });
  try {
    f.seekSync(offset, Deno.SeekMode.Start);
    const out = new Uint8Array(len);
    let done = 0;
    while (done < len) {
      const n = f.readSync(out.subarray(done));
      if (n === null) break;
      done += n;
    }
    return out;
  } finally {
    f.close();
  }
}

/** Size of the disk withMpqBlk makes. */
export const MPQ_BLK_DISK = 16 << 20;

/**
 * Runs `fn` with a fresh 16 MiB disk file (1 MiB blocks of patternBytes(1 MiB, 77 + MiB index))
 * served by `mpq vhost blk --blk-file=F ...args`, and a connected (not yet handshaken) front-end.
 * Checks the daemon is still running afterwards; stops it and removes the files.
 */
export async function withMpqBlk(
  args: string[],
  fn: (fe: VhostUserFrontend, file: string, be: Backend) => Promise<void>,
  options: FrontendOptions = {},
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhost-blk-" });
  const file = `${dir}/disk.img`;
  await makeDiskFile(file, MPQ_BLK_DISK, (off) => patternBytes(1 << 20, 77 + (off >> 20)));
  const be = await startMpqVhost("blk", `${dir}/blk.sock`, { args: [`--blk-file=${file}`, ...args] });
  try {
    await using fe = await VhostUserFrontend.connect(be.socketPath, options);
    await fn(fe, file, be);
    if (be.child.status) throw new Error(`mpq vhost blk exited during the test: ${be.child.status.text}`);
  } finally {
    await be.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

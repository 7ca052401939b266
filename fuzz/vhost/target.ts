/**
 * The daemon under test: `mpq vhost blk|rng` started the way the tests start it
 * (tests/helpers/vhost_backends.ts startMpqVhost), its stdout/stderr appended to a log file per
 * start, and what /proc says about it: open fds (by what they point to) and mappings of shared
 * memory objects (lines of /proc/PID/maps naming "memfd:" or "/dev/shm").
 * @module
 */
import { type ExitStatus, Signal } from "../../ffi/mod.ts";
import { type Backend, startMpqVhost } from "../../tests/helpers/vhost_backends.ts";
import type { FuzzDevice } from "./layout.ts";

/** What the daemon holds at one moment. */
export interface Snapshot {
  /** readlink of every /proc/PID/fd entry, normalized ("socket", "anon_inode:[eventfd]", "/memfd:x (deleted)"). */
  fds: string[];
  /** Mappings of memfds and /dev/shm objects: "name size". */
  maps: string[];
}

/** Elements of `now` beyond those in `base` (a multiset difference). */
export function extra(base: readonly string[], now: readonly string[]): string[] {
  const left = new Map<string, number>();
  for (const x of base) left.set(x, (left.get(x) ?? 0) + 1);
  const out: string[] = [];
  for (const x of now) {
    const n = left.get(x) ?? 0;
    if (n > 0) left.set(x, n - 1);
    else out.push(x);
  }
  return out;
}

function normalizeFd(target: string): string {
  return target.replace(/^(socket|pipe|anon_inode):\[\d+\]$/, "$1");
}

/**
 * @example
 * const d = new DaemonUnderTest("blk", dir, ["--blk-file=disk.img"]);
 * await d.start();
 * const s = d.snapshot();
 * await d.stop();
 */
export class DaemonUnderTest {
  readonly device: FuzzDevice;
  readonly dir: string;
  readonly args: readonly string[];
  readonly socketPath: string;
  #backend: Backend | null = null;
  /** How many times it was started. */
  starts = 0;
  logPath = "";

  constructor(device: FuzzDevice, dir: string, args: readonly string[]) {
    this.device = device;
    this.dir = dir;
    this.args = args;
    this.socketPath = `${dir}/vhost.sock`;
  }

  /** Starts a new daemon process (the previous one must have been stopped). */
  async start(): Promise<void> {
    if (this.#backend && !this.#backend.child.status) throw new Error("the daemon is still running");
    this.starts++;
    this.logPath = `${this.dir}/daemon-${this.starts}.log`;
    try {
      Deno.removeSync(this.socketPath);
    } catch { /* not there */ }
    try {
      this.#backend = await startMpqVhost(this.device, this.socketPath, {
        args: [...this.args],
        logFile: this.logPath,
      });
    } catch (e) {
      const out = this.logSince(0, 15).map((l) => `  | ${l}`).join("\n");
      throw new Error(`${(e as Error).message}${out ? `; its output:\n${out}` : ""}`);
    }
  }

  /** The running process's pid. */
  get pid(): number {
    if (!this.#backend) throw new Error("the daemon was not started");
    return this.#backend.child.pid;
  }

  /** The exit status once it has exited (reaped here), else null. */
  exited(): ExitStatus | null {
    return this.#backend?.child.tryWait() ?? null;
  }

  /** Waits up to `ms` for it to exit; its status, or null if it is still running. */
  async waitExit(ms: number): Promise<ExitStatus | null> {
    const b = this.#backend;
    if (!b) return null;
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      const st = b.child.tryWait();
      if (st) return st;
      await new Promise((r) => setTimeout(r, 5));
    }
    return b.child.tryWait();
  }

  /** What it holds now. Throws when the process is gone. */
  snapshot(): Snapshot {
    const pid = this.pid;
    const fds: string[] = [];
    for (const e of Deno.readDirSync(`/proc/${pid}/fd`)) {
      try {
        fds.push(normalizeFd(Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`)));
      } catch { /* closed meanwhile */ }
    }
    const maps: string[] = [];
    for (const line of Deno.readTextFileSync(`/proc/${pid}/maps`).split("\n")) {
      if (!/memfd:|\/dev\/shm/.test(line)) continue;
      const parts = line.trim().split(/\s+/);
      const [lo, hi] = parts[0].split("-").map((x) => parseInt(x, 16));
      maps.push(`${parts.slice(5).join(" ")} ${hi - lo} bytes ${parts[1]}`);
    }
    fds.sort();
    maps.sort();
    return { fds, maps };
  }

  /** Bytes in the current log (a case's stderr starts here). */
  logSize(): number {
    try {
      return Deno.statSync(this.logPath).size;
    } catch {
      return 0;
    }
  }

  /** The log from byte `from`, at most `maxLines` (the last ones). */
  logSince(from: number, maxLines = 40): string[] {
    let text = "";
    try {
      const f = Deno.openSync(this.logPath, { read: true });
      try {
        f.seekSync(from, Deno.SeekMode.Start);
        const size = Deno.statSync(this.logPath).size;
        const buf = new Uint8Array(Math.max(0, Math.min(size - from, 1 << 20)));
        let got = 0;
        while (got < buf.byteLength) {
          const n = f.readSync(buf.subarray(got));
          if (n === null) break;
          got += n;
        }
        text = new TextDecoder().decode(buf.subarray(0, got));
      } finally {
        f.close();
      }
    } catch { /* no log */ }
    const lines = text.split("\n").filter((l) => l !== "");
    return lines.length > maxLines
      ? [`... (${lines.length - maxLines} earlier lines)`, ...lines.slice(-maxLines)]
      : lines;
  }

  /** SIGKILL (a hung daemon) and reap. */
  async kill(): Promise<ExitStatus | null> {
    const b = this.#backend;
    if (!b) return null;
    if (!b.child.status) b.child.kill(Signal.SIGKILL);
    return await b.child.wait();
  }

  /** SIGTERM, then SIGKILL after a grace period; reaps. */
  async stop(): Promise<ExitStatus | null> {
    const b = this.#backend;
    if (!b) return null;
    return await b.stop(3000);
  }
}

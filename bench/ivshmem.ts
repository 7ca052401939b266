/**
 * ivshmem join storm: P peers × 4 vectors connect as fast as they can (P = 1000 and 4000); we time
 * how long until every peer knows every other peer's eventfds (each peer has received all
 * 3 + 4·P messages), and report peers/s, the server's RSS (VmHWM/VmRSS from /proc/PID/status) and
 * lost messages (expected − received once nothing has arrived for a while).
 *
 * The server runs alone in its own process; the storm peers run in worker processes (this file
 * with `storm` arguments, 2 by default) speaking the raw protocol through the ffi, and close every received fd
 * right after counting it (4000 peers × 16000 fds each would be 64M fds otherwise). The server
 * needs 1 + 4 fds per peer: with a hard RLIMIT_NOFILE of 20000, the last few of 4000 peers are refused
 * (reported as "refused"; the others must still complete). QEMU's contrib ivshmem-server runs side by
 * side when `ivshmem-server` is on PATH.
 *
 * Run alone: `deno run -A bench/ivshmem.ts [--peers 1000,4000] [--vectors 4] [--workers 2]`.
 * @module
 */
import { parseArgs } from "node:util";
import { connectUnix, raiseNoFileLimit, Reactor, type UnixSocket } from "../ffi/mod.ts";
import { selfCommand } from "../lib/cli/self.ts";

/** What one storm measured (merged over its worker processes). */
export interface StormResult {
  peers: number;
  vectors: number;
  workers: number;
  /** Seconds from the first connect until the last peer had its last message (NaN if never). */
  seconds: number;
  /** Seconds the connects took. */
  connectSeconds: number;
  expected: number;
  received: number;
  /** Peers the server closed before sending anything (it could not set them up: fd limit). */
  refused: number;
  /** Peers the server disconnected after they had joined. */
  disconnected: number;
}

/** What one storm worker process reports. */
interface WorkerReport {
  /** Epoch ms of its first connect, of its last connect, and of its last message. */
  t0: number;
  tConnected: number;
  tLast: number;
  received: number;
  refused: number;
  disconnected: number;
  /** Fewest and most messages any of its served peers received. */
  min: number;
  max: number;
}

/** How long without a new message before a worker gives up waiting for more. */
const QUIET_MS = 60_000;

const epochMs = () => performance.timeOrigin + performance.now();

/**
 * One storm worker (runs in its own process): connects `mine` of the `total` peers, counts every
 * message and closes every fd at once. It ends when each of its served peers has the
 * 3 + vectors × served messages it should (served as far as it can tell), or after QUIET_MS
 * without any message.
 */
export async function stormWorker(
  path: string,
  mine: number,
  total: number,
  vectors: number,
): Promise<{ report: WorkerReport; close: () => void }> {
  raiseNoFileLimit();
  const reactor = new Reactor({ maxEvents: 1024 });
  const bytes = new Float64Array(mine);
  const buf = new Uint8Array(8);
  let received = 0;
  let complete = 0;
  let disconnected = 0;
  let refused = 0;
  let tLast = 0;
  let target = 3 + vectors * total;
  const socks: UnixSocket[] = [];
  const recount = () => {
    complete = 0;
    for (let j = 0; j < socks.length; j++) {
      if (bytes[j] >= 0 && Math.floor(bytes[j] / 8) >= target) complete++;
    }
    if (complete === mine - refused) reactor.stop();
  };
  const running = reactor.run();
  const t0 = epochMs();
  const watchdog = setInterval(() => {
    if (epochMs() - Math.max(tLast, t0) <= QUIET_MS) return;
    console.error(
      `storm worker: stopped after ${QUIET_MS / 1000} s without a message (${received} messages, ` +
        `${refused} of its ${mine} peers refused; the totals are checked over all workers)`,
    );
    reactor.stop();
  }, 500);
  for (let i = 0; i < mine; i++) {
    const s = connectUnix(path, { maxFds: 1 });
    socks.push(s);
    const watch = reactor.add(s.fd, { readable: true }, () => {
      while (true) {
        const r = s.recvMsg(buf);
        if (r === null) return;
        if (r.bytes === 0) {
          watch.remove();
          if (bytes[i] > 0) {
            disconnected++;
            return;
          }
          refused++;
          bytes[i] = -1;
          target = 3 + vectors * (total - refused);
          recount();
          return;
        }
        for (const f of r.fds) f.close();
        const before = Math.floor(bytes[i] / 8);
        bytes[i] += r.bytes;
        const now = Math.floor(bytes[i] / 8);
        received += now - before;
        tLast = epochMs();
        if (now >= target && before < target && ++complete === mine - refused) reactor.stop();
      }
    });
    if (i % 16 === 15) await new Promise((r) => setTimeout(r, 0));
  }
  const tConnected = epochMs();
  await running;
  clearInterval(watchdog);
  let min = Infinity;
  let max = 0;
  for (const b of bytes) {
    if (b < 0) continue;
    min = Math.min(min, Math.floor(b / 8));
    max = Math.max(max, Math.floor(b / 8));
  }
  const report: WorkerReport = { t0, tConnected, tLast, received, refused, disconnected, min, max };
  return {
    report,
    close: () => {
      for (const s of socks) s.close();
      reactor.close();
    },
  };
}

/** Runs a storm of `peers` split over `workers` processes against the server at `path`. */
export async function storm(
  path: string,
  peers: number,
  vectors: number,
  workers: number,
  onReported?: () => void,
): Promise<StormResult> {
  const shares = Array.from(
    { length: workers },
    (_, w) => Math.floor(peers / workers) + (w < peers % workers ? 1 : 0),
  );
  // Each worker reports once its peers are complete, but keeps them connected until every worker
  // has reported: a peer leaving early would send the others messages they would count.
  const children = shares.map((mine) =>
    new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--quiet",
        new URL(import.meta.url).pathname,
        "storm",
        path,
        String(mine),
        String(peers),
        String(vectors),
      ],
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn()
  );
  let reports: WorkerReport[];
  try {
    reports = await Promise.all(children.map(async (child) => {
      const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      let text = "";
      while (!text.includes("\n")) {
        const r = await reader.read();
        if (r.done) throw new Error(`storm worker exited early: ${text}`);
        text += r.value;
      }
      await reader.cancel();
      return JSON.parse(text.split("\n")[0]) as WorkerReport;
    }));
    onReported?.();
  } finally {
    for (const child of children) {
      await child.stdin.close().catch(() => {});
      await child.status;
    }
  }
  if (Deno.env.get("MPQ_BENCH_DEBUG")) console.error(JSON.stringify(reports));
  const refused = reports.reduce((n, r) => n + r.refused, 0);
  const served = peers - refused;
  const target = 3 + vectors * served;
  const received = reports.reduce((n, r) => n + r.received, 0);
  const complete = reports.every((r) => r.min >= target || r.refused === shares[reports.indexOf(r)]);
  const t0 = Math.min(...reports.map((r) => r.t0));
  return {
    peers,
    vectors,
    workers,
    seconds: complete ? (Math.max(...reports.map((r) => r.tLast)) - t0) / 1000 : NaN,
    connectSeconds: (Math.max(...reports.map((r) => r.tConnected)) - t0) / 1000,
    expected: served * target,
    received,
    refused,
    disconnected: reports.reduce((n, r) => n + r.disconnected, 0),
  };
}

function haveOnPath(name: string): boolean {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/${name}`).isFile) return true;
    } catch { /* next */ }
  }
  return false;
}

/** Peak and current RSS (MiB) and CPU seconds (user + system) of a process. */
function usage(pid: number): { hwm: number; rss: number; cpu: number } {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? NaN);
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // utime and stime are fields 14 and 15 of stat, in clock ticks (100 per second on Linux).
  const cpu = (Number(fields[11]) + Number(fields[12])) / 100;
  return { hwm: kb("VmHWM") / 1024, rss: kb("VmRSS") / 1024, cpu };
}

interface Row {
  server: string;
  result: StormResult;
  hwm: number;
  rss: number;
  /** Server CPU seconds for the whole run. */
  cpu: number;
}

async function waitForSocket(path: string, child: Deno.ChildProcess): Promise<void> {
  let exited = false;
  child.status.then(() => exited = true);
  const end = Date.now() + 30_000;
  while (true) {
    try {
      if (Deno.lstatSync(path).isSocket) break;
    } catch { /* not yet */ }
    if (exited) throw new Error("server exited before listening");
    if (Date.now() > end) throw new Error(`no socket at ${path} after 30 s`);
    await new Promise((r) => setTimeout(r, 20));
  }
  await new Promise((r) => setTimeout(r, 200)); // bind comes just before listen
}

async function runOne(server: string, peers: number, vectors: number, workers: number): Promise<Row> {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-bench-ivshmem-" });
  const sock = `${dir}/sock`;
  const shm = `mpq-bench-${crypto.randomUUID().slice(0, 8)}`;
  const serverArgs = ["-F", "-S", sock, "-M", shm, "-l", "4M", "-n", String(vectors)];
  const argv = server === "mpq"
    ? [...selfCommand(), "ivshmem", ...serverArgs]
    : ["ivshmem-server", ...serverArgs];
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  try {
    await waitForSocket(sock, child);
    let mem = { hwm: NaN, rss: NaN, cpu: NaN };
    // Measured once every peer is complete, before the peers leave.
    const result = await storm(sock, peers, vectors, workers, () => mem = usage(child.pid));
    return { server, result, ...mem };
  } finally {
    try {
      child.kill("SIGTERM");
    } catch { /* gone */ }
    await child.status;
    try {
      Deno.removeSync(`/dev/shm/${shm}`);
    } catch { /* removed by the server */ }
    Deno.removeSync(dir, { recursive: true });
  }
}

const HEADER = [
  "server",
  "peers",
  "vectors",
  "workers",
  "seconds",
  "peers/s",
  "messages/s",
  "lost",
  "refused",
  "dropped",
  "VmHWM MiB",
  "VmRSS MiB",
  "server CPU s",
  "µs/message",
];
const WIDTHS = [14, 5, 7, 7, 8, 7, 10, 20, 7, 7, 9, 9, 12, 10];

function line(cells: string[]): string {
  return cells.map((c, i) => (i === 0 ? c.padEnd(WIDTHS[i]) : c.padStart(WIDTHS[i]))).join("  ");
}

/** One table row, printed as soon as it is measured. */
function row({ server, result: r, hwm, rss, cpu }: Row): string {
  const never = Number.isNaN(r.seconds);
  return line([
    server,
    String(r.peers),
    String(r.vectors),
    String(r.workers),
    never ? "never" : r.seconds.toFixed(2),
    never ? "-" : (r.peers / r.seconds).toFixed(0),
    never ? "-" : (r.received / r.seconds).toFixed(0),
    `${r.expected - r.received} of ${r.expected}`,
    String(r.refused),
    String(r.disconnected),
    hwm.toFixed(1),
    rss.toFixed(1),
    cpu.toFixed(1),
    (cpu / r.received * 1e6).toFixed(2),
  ]);
}

/** The join-storm benchmark: mpq, and contrib ivshmem-server when it is on PATH. */
export async function benchIvshmem(
  options: { peers?: number[]; vectors?: number; workers?: number } = {},
): Promise<void> {
  const peerCounts = options.peers ?? [1000, 4000];
  const vectors = options.vectors ?? 4;
  const workers = options.workers ?? 2;
  const servers = ["mpq"];
  if (haveOnPath("ivshmem-server")) servers.push("ivshmem-server");
  else console.log("ivshmem-server: not on PATH, skipped");
  const hard = /^Max open files\s+\S+\s+(\S+)/m.exec(Deno.readTextFileSync("/proc/self/limits"))?.[1];
  console.log(`RLIMIT_NOFILE hard limit: ${hard} (each server needs 1 + ${vectors} fds per peer)`);
  console.log(line(HEADER));
  for (const peers of peerCounts) {
    for (const server of servers) {
      try {
        console.log(row(await runOne(server, peers, vectors, workers)));
      } catch (e) {
        console.log(`${server} ${peers} peers: failed: ${e instanceof Error ? e.message : e}`);
      }
    }
  }
  console.log(
    `(seconds: first connect until every served peer has all 3 + ${vectors}·S messages, S = served peers;\n` +
      ` lost: expected − received, counted ${
        QUIET_MS / 1000
      } s after the last message when never complete;\n` +
      ` refused: closed before any message, e.g. the server hit RLIMIT_NOFILE; dropped: closed after joining;\n` +
      ` server CPU: user + system of the server process over the run; µs/message: that per message received)`,
  );
}

if (import.meta.main) {
  if (Deno.args[0] === "storm") {
    const [, path, mine, total, vectors] = Deno.args;
    const { report, close } = await stormWorker(path, Number(mine), Number(total), Number(vectors));
    console.log(JSON.stringify(report));
    // Stay connected until the parent closes stdin (every worker has reported by then).
    for await (const _ of Deno.stdin.readable) { /* nothing is sent */ }
    close();
  } else {
    const { values } = parseArgs({
      args: Deno.args,
      options: { peers: { type: "string" }, vectors: { type: "string" }, workers: { type: "string" } },
    });
    await benchIvshmem({
      peers: values.peers?.split(",").map(Number),
      vectors: values.vectors ? Number(values.vectors) : undefined,
      workers: values.workers ? Number(values.workers) : undefined,
    });
  }
}

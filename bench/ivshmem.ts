/**
 * ivshmem join storm: P peers × 4 vectors connect as fast as they can (P = 1000 and 4000); we time
 * how long until every peer knows every other peer's eventfds (each peer has received all
 * 3 + 4·P messages), and report peers/s, the server's RSS (VmHWM/VmRSS from /proc/PID/status) and
 * lost messages (expected − received once nothing has arrived for a while).
 *
 * The server runs alone in its own process; the storm peers run in a second process (this file
 * with `storm` arguments) speaking the raw protocol through the ffi, and close every received fd
 * right after counting it (4000 peers × 16000 fds each would be 64M fds otherwise). The server
 * needs 1 + 4 fds per peer: with a hard RLIMIT_NOFILE of 20000, the last few of 4000 peers are refused
 * (reported as "refused"; the others must still complete). QEMU's contrib ivshmem-server runs side by
 * side when `ivshmem-server` is on PATH.
 *
 * Run alone: `deno run -A bench/ivshmem.ts [--peers 1000,4000] [--vectors 4]`.
 * @module
 */
import { parseArgs } from "node:util";
import { connectUnix, raiseNoFileLimit, Reactor, type UnixSocket } from "../ffi/mod.ts";
import { selfCommand } from "../lib/cli/self.ts";

/** What one storm measured. */
export interface StormResult {
  peers: number;
  vectors: number;
  /** Seconds from the first connect until every peer had every message (NaN if never). */
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

/** How long without a new message before the storm gives up on the rest. */
const QUIET_MS = 15_000;

/** The storm peers (runs in the worker process). */
export async function storm(path: string, peers: number, vectors: number): Promise<StormResult> {
  raiseNoFileLimit();
  const reactor = new Reactor({ maxEvents: 1024 });
  // Every served peer ends up with 3 + vectors × (served peers) messages; refused peers get none.
  let target = 3 + vectors * peers;
  const bytes = new Float64Array(peers);
  const buf = new Uint8Array(8);
  let received = 0;
  let complete = 0;
  let disconnected = 0;
  let refused = 0;
  let last = Date.now();
  let done = NaN;
  const socks: UnixSocket[] = [];
  const running = reactor.run();
  const t0 = performance.now();
  const watchdog = setInterval(() => {
    if (Date.now() - last > QUIET_MS) reactor.stop();
  }, 500);
  for (let i = 0; i < peers; i++) {
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
          target = 3 + vectors * (peers - refused);
          complete = 0;
          for (let j = 0; j < peers; j++) if (Math.floor(bytes[j] / 8) >= target) complete++;
          if (complete === peers - refused) {
            done = performance.now();
            reactor.stop();
          }
          return;
        }
        for (const f of r.fds) f.close();
        const before = Math.floor(bytes[i] / 8);
        bytes[i] += r.bytes;
        const now = Math.floor(bytes[i] / 8);
        received += now - before;
        last = Date.now();
        if (now >= target && before < target) {
          if (++complete === peers - refused) {
            done = performance.now();
            reactor.stop();
          }
        }
      }
    });
    if (i % 16 === 15) await new Promise((r) => setTimeout(r, 0));
  }
  const connectSeconds = (performance.now() - t0) / 1000;
  await running;
  clearInterval(watchdog);
  for (const s of socks) s.close();
  reactor.close();
  return {
    peers,
    vectors,
    seconds: (done - t0) / 1000,
    connectSeconds,
    expected: (peers - refused) * target,
    received,
    refused,
    disconnected,
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

function memory(pid: number): { hwm: number; rss: number } {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? NaN);
  return { hwm: kb("VmHWM") / 1024, rss: kb("VmRSS") / 1024 };
}

interface Row {
  server: string;
  result: StormResult;
  hwm: number;
  rss: number;
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

async function runOne(server: string, peers: number, vectors: number): Promise<Row> {
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
    const worker = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--quiet",
        new URL(import.meta.url).pathname,
        "storm",
        sock,
        String(peers),
        String(vectors),
      ],
      stdout: "piped",
      stderr: "inherit",
    }).output();
    const text = new TextDecoder().decode(worker.stdout).trim();
    if (worker.code !== 0 || !text) throw new Error(`storm worker failed (exit ${worker.code}): ${text}`);
    const result = JSON.parse(text.split("\n").at(-1)!) as StormResult;
    const mem = memory(child.pid);
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

function print(rows: Row[]): void {
  const table = [[
    "server",
    "peers",
    "vectors",
    "seconds",
    "peers/s",
    "messages/s",
    "lost",
    "refused",
    "dropped",
    "VmHWM MiB",
    "VmRSS MiB",
  ]];
  for (const { server, result: r, hwm, rss } of rows) {
    const never = Number.isNaN(r.seconds);
    table.push([
      server,
      String(r.peers),
      String(r.vectors),
      never ? "never" : r.seconds.toFixed(2),
      never ? "-" : (r.peers / r.seconds).toFixed(0),
      never ? "-" : (r.received / r.seconds).toFixed(0),
      `${r.expected - r.received} of ${r.expected}`,
      String(r.refused),
      String(r.disconnected),
      hwm.toFixed(1),
      rss.toFixed(1),
    ]);
  }
  const widths = table[0].map((_, i) => Math.max(...table.map((row) => row[i].length)));
  for (const row of table) {
    console.log(row.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  "));
  }
}

/** The join-storm benchmark: mpq, and contrib ivshmem-server when it is on PATH. */
export async function benchIvshmem(options: { peers?: number[]; vectors?: number } = {}): Promise<void> {
  const peerCounts = options.peers ?? [1000, 4000];
  const vectors = options.vectors ?? 4;
  const servers = ["mpq"];
  if (haveOnPath("ivshmem-server")) servers.push("ivshmem-server");
  else console.log("ivshmem-server: not on PATH, skipped");
  const hard = /^Max open files\s+\S+\s+(\S+)/m.exec(Deno.readTextFileSync("/proc/self/limits"))?.[1];
  console.log(`RLIMIT_NOFILE hard limit: ${hard} (each server needs 1 + ${vectors} fds per peer)`);
  const rows: Row[] = [];
  for (const peers of peerCounts) {
    for (const server of servers) {
      try {
        rows.push(await runOne(server, peers, vectors));
      } catch (e) {
        console.log(`${server} ${peers} peers: failed: ${e instanceof Error ? e.message : e}`);
      }
    }
  }
  print(rows);
  console.log(
    `(seconds: first connect until every served peer has all 3 + ${vectors}·S messages, S = served peers;\n` +
      ` lost: expected − received, counted ${
        QUIET_MS / 1000
      } s after the last message when never complete;\n` +
      ` refused: closed before any message, e.g. the server hit RLIMIT_NOFILE; dropped: closed after joining)`,
  );
}

if (import.meta.main) {
  if (Deno.args[0] === "storm") {
    const [, path, peers, vectors] = Deno.args;
    console.log(JSON.stringify(await storm(path, Number(peers), Number(vectors))));
  } else {
    const { values } = parseArgs({
      args: Deno.args,
      options: { peers: { type: "string" }, vectors: { type: "string" } },
    });
    await benchIvshmem({
      peers: values.peers?.split(",").map(Number),
      vectors: values.vectors ? Number(values.vectors) : undefined,
    });
  }
}

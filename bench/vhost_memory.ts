/**
 * `deno task bench vhost_memory`: memory of one process serving 1, 10 and 50 vhost-user-blk
 * devices (64 MiB sparse raw files in /dev/shm, one queue each): `mpq vhost serve` beside
 * qemu-storage-daemon serving the same exports in one process. For each: VmRSS (with RssAnon,
 * RssFile, RssShmem from /proc/PID/status) idle after a settle, then the peak while a TypeScript
 * front-end per device (tests/helpers/vhost_frontend.ts, all in this process) keeps 4 KiB random
 * reads in flight on every device. Also the single-device processes idle: `mpq vhost blk` and QEMU's
 * contrib vhost-user-blk (libvhost-user) when built by /work/shared/tools/c-peers/build.sh, and a bare
 * `deno run` of a one-line script as the runtime's own floor. To show where mpq's per-device cost
 * goes, `mpq vhost serve` runs once more per count with `io-threads=0` (no copy-helper Worker), idle.
 *
 * Targets (issue 9): <= 2 MiB per device beyond the first; 10 devices <= 1.3x one device; a
 * single-device process idle under 45 MiB.
 *
 * The peak under load is the larger of VmHWM (reset through /proc/PID/clear_refs just before the
 * front-ends connect) and VmRSS sampled every 50 ms. Sockets are ready when /proc/net/unix shows
 * them listening (never probed by connecting). Every child runs under `setpriv --pdeathsig KILL`
 * (it execs, so the pid is the back-end's) and is stopped, and every file removed, on any exit.
 *
 * Run alone: `deno run -A bench/vhost_memory.ts [--counts 1,10,50] [--settle S] [--seconds S]
 * [--depth N] [--depth-many N]`.
 * @module
 */
import { parseArgs } from "node:util";
import {
  type ChildProcess,
  OpenFlags,
  openPath,
  raiseNoFileLimit,
  resolveExecutable,
  Signal,
  spawn,
} from "../ffi/mod.ts";
import { selfCommand } from "../lib/cli/self.ts";
import { VhostUserFrontend } from "../tests/helpers/vhost_frontend.ts";
import { contribVhostUserBlk, type LoadResult, processCpuSeconds, runLoad } from "./vhost.ts";

/** Memory figures of one process, KiB (from /proc/PID/status). */
export interface MemStatus {
  rss: number;
  hwm: number;
  anon: number;
  file: number;
  shmem: number;
  threads: number;
}

/** Reads VmRSS, VmHWM, RssAnon, RssFile, RssShmem and Threads of `pid`. */
export function readMemStatus(pid: number): MemStatus {
  const s = Deno.readTextFileSync(`/proc/${pid}/status`);
  const get = (k: string) => Number(s.match(new RegExp(`^${k}:\\s+(\\d+)`, "m"))?.[1] ?? NaN);
  return {
    rss: get("VmRSS"),
    hwm: get("VmHWM"),
    anon: get("RssAnon"),
    file: get("RssFile"),
    shmem: get("RssShmem"),
    threads: get("Threads"),
  };
}

/** Resets VmHWM to the current RSS (clear_refs 5); false when the kernel refuses. */
function resetPeak(pid: number): boolean {
  try {
    Deno.writeTextFileSync(`/proc/${pid}/clear_refs`, "5");
    return true;
  } catch {
    return false;
  }
}

/** Paths of every listening UNIX socket (flag __SO_ACCEPTCON in /proc/net/unix). */
function listeningPaths(): Set<string> {
  const out = new Set<string>();
  for (const line of Deno.readTextFileSync("/proc/net/unix").split("\n")) {
    const cols = line.trim().split(/\s+/);
    // Num RefCount Protocol Flags Type St Inode Path
    if (cols.length >= 8 && (parseInt(cols[3], 16) & 0x10000) !== 0) out.add(cols.slice(7).join(" "));
  }
  return out;
}

/** A back-end process this benchmark started. */
interface Proc {
  name: string;
  child: ChildProcess;
  sockets: string[];
  log: string;
  /** Seconds from spawn to every socket listening. */
  readySeconds: number;
}

/** Every process still to be stopped, whatever happens. */
const live = new Set<Proc>();

function logTail(path: string): string {
  try {
    const t = Deno.readTextFileSync(path).trim().split("\n").slice(-5).join("\n");
    return t ? `\n${t}` : "";
  } catch {
    return "";
  }
}

/** Spawns `argv` (stdout/stderr to `log`) and waits until every socket in `sockets` listens. */
async function startProc(name: string, argv: string[], sockets: string[], log: string): Promise<Proc> {
  const wrapped = haveSetpriv() ? ["setpriv", "--pdeathsig", "KILL", "--", ...argv] : argv;
  const logFd = openPath(log, OpenFlags.O_WRONLY | OpenFlags.O_CREAT | OpenFlags.O_APPEND);
  const t0 = performance.now();
  let child: ChildProcess;
  try {
    child = spawn(wrapped[0], wrapped, { stdio: "null", fds: new Map([[1, logFd], [2, logFd]]) });
  } finally {
    logFd.close();
  }
  const p: Proc = { name, child, sockets, log, readySeconds: NaN };
  live.add(p);
  const deadline = Date.now() + 30_000;
  while (true) {
    const listening = listeningPaths();
    const missing = sockets.filter((s) => !listening.has(s));
    if (missing.length === 0) break;
    const st = child.tryWait();
    if (st) {
      live.delete(p);
      throw new Error(`exited (${st.text}) before listening on ${missing[0]}${logTail(log)}`);
    }
    if (Date.now() > deadline) {
      await stopProc(p);
      throw new Error(`${missing.length} of ${sockets.length} sockets not listening after 30 s`);
    }
    await sleep(20);
  }
  p.readySeconds = (performance.now() - t0) / 1000;
  return p;
}

/** SIGTERM, SIGKILL after 5 s; reaps. */
async function stopProc(p: Proc): Promise<void> {
  live.delete(p);
  if (p.child.tryWait()) return;
  p.child.kill(Signal.SIGTERM);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const killed = new Promise<void>((r) => {
    timer = setTimeout(() => {
      if (!p.child.status) p.child.kill(Signal.SIGKILL);
      r();
    }, 5000);
  });
  await Promise.race([p.child.wait(), killed.then(() => p.child.wait())]);
  clearTimeout(timer);
}

let setprivKnown: boolean | undefined;
function haveSetpriv(): boolean {
  if (setprivKnown === undefined) {
    try {
      resolveExecutable("setpriv");
      setprivKnown = true;
    } catch {
      setprivKnown = false;
    }
  }
  return setprivKnown;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** What one back-end looked like idle and under load. */
interface Measured {
  idle: MemStatus;
  /** The sample with the highest VmRSS during the load; its rss is max(VmHWM, samples). */
  loaded: MemStatus;
  readySeconds: number;
  iops: number;
  errors: number;
  /** Back-end and driver CPU, percent of one core, over the load. */
  backendCpu: number;
  driverCpu: number;
}

/** Idle RSS after `settleMs`, then `devices` front-ends with `depth` reads each for `seconds`. */
async function measure(
  p: Proc,
  options: { settleMs: number; seconds: number; depth: number },
): Promise<Measured> {
  const pid = p.child.pid;
  await sleep(options.settleMs);
  const idle = readMemStatus(pid);
  const fes: VhostUserFrontend[] = [];
  let peak = idle;
  const hwmReset = resetPeak(pid);
  const sample = () => {
    if (p.child.status) return;
    const m = readMemStatus(pid);
    if (m.rss > peak.rss) peak = m;
  };
  peak = readMemStatus(pid);
  const sampler = setInterval(sample, 50);
  try {
    for (const s of p.sockets) {
      const fe = await VhostUserFrontend.connect(s, {
        queueSize: 64,
        eventIdx: true,
        memSize: 8 << 20,
        depth: 1,
        maxRequestBytes: 4096,
      });
      fes.push(fe);
      await fe.handshake();
      await fe.start();
    }
    const cpu0 = processCpuSeconds(pid);
    const drv0 = processCpuSeconds(Deno.pid);
    const t0 = performance.now();
    const results: LoadResult[] = await Promise.all(fes.map((fe, i) =>
      runLoad(fe, {
        rw: "randread",
        depth: options.depth,
        seconds: options.seconds,
        warmup: 0.2,
        wait: "call",
        spinUs: 0, // 50 reactors spinning in one driver would take the back-end's core
        seed: i + 1,
      })
    ));
    const wall = (performance.now() - t0) / 1000;
    const cpu1 = processCpuSeconds(pid);
    const drv1 = processCpuSeconds(Deno.pid);
    sample();
    const hwm = hwmReset ? readMemStatus(pid).hwm : NaN;
    const loaded = { ...peak, rss: Math.max(peak.rss, Number.isFinite(hwm) ? hwm : 0) };
    if (p.child.tryWait()) throw new Error(`exited under load: ${p.child.status!.text}`);
    return {
      idle,
      loaded,
      readySeconds: p.readySeconds,
      iops: results.reduce((n, r) => n + r.iops, 0),
      errors: results.reduce((n, r) => n + r.errors, 0),
      backendCpu: ((cpu1 - cpu0) / wall) * 100,
      driverCpu: ((drv1 - drv0) / wall) * 100,
    };
  } finally {
    clearInterval(sampler);
    for (const fe of fes) {
      try {
        if (fe.started) await fe.stop();
      } catch { /* the back-end may be gone; close anyway */ }
      await fe.close();
    }
  }
}

/** Options of benchVhostMemory. */
export interface BenchVhostMemoryOptions {
  /** Device counts (default 1, 10, 50; the first is the baseline for the per-device figure). */
  counts?: number[];
  /** Idle settle before the idle reading, seconds (default 2). */
  settle?: number;
  /** Load seconds per back-end and count (default 3). */
  seconds?: number;
  /** Reads in flight per device (default 4). */
  depth?: number;
  /** Reads in flight per device from 50 devices up, so the one driver is not the limit (default 2). */
  depthMany?: number;
}

const MiB = (kib: number) => kib / 1024;
const f1 = (kib: number, w: number) => (Number.isFinite(kib) ? MiB(kib).toFixed(1) : "-").padStart(w);

/** Runs the memory benchmark and prints its tables. */
export async function benchVhostMemory(options: BenchVhostMemoryOptions = {}): Promise<void> {
  const counts = options.counts ?? [1, 10, 50];
  const settleMs = (options.settle ?? 2) * 1000;
  const seconds = options.seconds ?? 3;
  const depthFor = (n: number) => (n >= 50 ? options.depthMany ?? 2 : options.depth ?? 4);
  const haveQsd = (() => {
    try {
      resolveExecutable("qemu-storage-daemon");
      return true;
    } catch {
      return false;
    }
  })();
  const contrib = contribVhostUserBlk();
  raiseNoFileLimit(4096);
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "mpq-bench-vmem-" });
  const self = selfCommand();
  // Interrupted: the children would die with us (pdeathsig), but the files would stay.
  const onSignal = () => {
    for (const p of live) p.child.kill(Signal.SIGKILL);
    Deno.removeSync(dir, { recursive: true });
    Deno.exit(130);
  };
  const signals = ["SIGINT", "SIGTERM"] as const;
  for (const sig of signals) Deno.addSignalListener(sig, onSignal);
  const errors: string[] = [];
  const mpq = new Map<number, Measured>();
  const qsd = new Map<number, Measured>();
  const mpqNoHelper = new Map<number, MemStatus>();
  const singles: Array<{ name: string; mem: MemStatus | null; note: string }> = [];
  try {
    const max = Math.max(...counts);
    const files: string[] = [];
    for (let i = 0; i < max; i++) {
      files.push(`${dir}/disk${i}.img`);
      await Deno.writeFile(files[i], new Uint8Array(0));
      await Deno.truncate(files[i], 64 << 20);
    }
    console.log(
      `vhost-user-blk memory: one process serving N devices (64 MiB sparse raw files in /dev/shm, one queue ` +
        `each); idle = VmRSS ${
          settleMs / 1000
        } s after every socket listens; loaded = peak VmRSS (VmHWM after ` +
        `clear_refs, and 50 ms samples) while one front-end per device keeps 4 KiB random reads in flight ` +
        `for ${seconds} s (${depthFor(1)} per device, ${depthFor(50)} from 50 devices). ` +
        `mpq runs ${self.length > 1 ? "from source (deno run main.ts)" : `as ${self[0]}`}, in its defaults.` +
        (haveQsd ? "" : " qemu-storage-daemon is not installed: its columns are empty.") +
        (contrib
          ? ""
          : " contrib vhost-user-blk is not built (bash /work/shared/tools/c-peers/build.sh): skipped."),
    );
    for (const n of counts) {
      const socks = (tag: string) => Array.from({ length: n }, (_, i) => `${dir}/${tag}${n}-${i}.sock`);
      const mpqSocks = socks("mpq");
      const serveArgv = (sockets: string[], extra = "") => [
        ...self,
        "vhost",
        "serve",
        ...sockets.flatMap((s, i) => [
          "--device",
          `blk,id=d${i},file=${files[i]},socket=${s},num-queues=1${extra}`,
        ]),
      ];
      const mpqArgv = serveArgv(mpqSocks);
      const runs: Array<[string, Map<number, Measured>, string[], string[] | null]> = [
        [`mpq vhost serve (${n})`, mpq, mpqArgv, mpqSocks],
      ];
      const qsdSocks = socks("qsd");
      runs.push([
        `qemu-storage-daemon (${n})`,
        qsd,
        [
          "qemu-storage-daemon",
          ...qsdSocks.flatMap((s, i) => [
            "--blockdev",
            `driver=file,node-name=disk${i},filename=${files[i]},cache.direct=off`,
            "--export",
            `type=vhost-user-blk,id=exp${i},addr.type=unix,addr.path=${s},node-name=disk${i},writable=on,` +
            `num-queues=1`,
          ]),
        ],
        haveQsd ? qsdSocks : null,
      ]);
      for (const [name, into, argv, sockets] of runs) {
        if (!sockets) continue;
        let p: Proc | null = null;
        try {
          p = await startProc(name, argv, sockets, `${dir}/${name.split(" ")[0]}-${n}.log`);
          into.set(n, await measure(p, { settleMs, seconds, depth: depthFor(n) }));
        } catch (e) {
          errors.push(`${name}: ${e instanceof Error ? e.message : e}`);
        } finally {
          if (p) await stopProc(p);
        }
      }
      // Where the per-device cost goes: the same devices without their copy-helper Worker, idle only.
      let p: Proc | null = null;
      const name = `mpq vhost serve io-threads=0 (${n})`;
      try {
        const nhSocks = socks("mpq-nh");
        p = await startProc(name, serveArgv(nhSocks, ",io-threads=0"), nhSocks, `${dir}/mpq-nh-${n}.log`);
        await sleep(settleMs);
        mpqNoHelper.set(n, readMemStatus(p.child.pid));
      } catch (e) {
        errors.push(`${name}: ${e instanceof Error ? e.message : e}`);
      } finally {
        if (p) await stopProc(p);
      }
    }
    // Single-device processes, idle.
    const single = async (name: string, argv: string[] | null, socket: string, note: string) => {
      if (!argv) {
        singles.push({ name, mem: null, note });
        return;
      }
      let p: Proc | null = null;
      try {
        p = await startProc(name, argv, [socket], `${dir}/single.log`);
        await sleep(settleMs);
        singles.push({ name, mem: readMemStatus(p.child.pid), note });
      } catch (e) {
        errors.push(`${name}: ${e instanceof Error ? e.message : e}`);
        singles.push({ name, mem: null, note: "failed" });
      } finally {
        if (p) await stopProc(p);
      }
    };
    await single(
      "mpq vhost blk",
      [...self, "vhost", "blk", `--blk-file=${files[0]}`, `--socket-path=${dir}/single-mpq.sock`],
      `${dir}/single-mpq.sock`,
      "",
    );
    await single(
      "contrib vhost-user-blk",
      contrib ? [contrib, "-s", `${dir}/single-contrib.sock`, "-b", files[0]] : null,
      `${dir}/single-contrib.sock`,
      contrib ? "libvhost-user, one device per process" : "not built: skipped",
    );
    // What the runtime alone costs: a one-line script listening on a UNIX socket.
    const bare = `${dir}/bare.ts`;
    await Deno.writeTextFile(
      bare,
      `Deno.listen({ transport: "unix", path: Deno.args[0] });\nsetInterval(() => {}, 1 << 30);\n`,
    );
    await single(
      "bare deno run (reference)",
      [Deno.execPath(), "run", "-A", "--quiet", bare, `${dir}/single-bare.sock`],
      `${dir}/single-bare.sock`,
      "a one-line script that listens on a socket",
    );
  } finally {
    for (const p of [...live]) await stopProc(p);
    await Deno.remove(dir, { recursive: true });
    for (const sig of signals) Deno.removeSignalListener(sig, onSignal);
  }

  // The table.
  const base = mpq.get(counts[0]);
  const qbase = qsd.get(counts[0]);
  const perDev = (m: Measured | undefined, b: Measured | undefined, n: number, k: "idle" | "loaded") =>
    m && b && n > counts[0] ? (m[k].rss - b[k].rss) / (n - counts[0]) : NaN;
  const ratio = (a: number, b: number) => (Number.isFinite(a / b) ? `x${(a / b).toFixed(2)}` : "-");
  console.log(
    `\n${"devices".padStart(7)} ${"mpq idle".padStart(9)} ${"mpq loaded".padStart(10)} ${
      "mpq +/dev idle/loaded".padStart(21)
    } ${"qsd idle".padStart(9)} ${"qsd loaded".padStart(10)} ${"qsd +/dev idle/loaded".padStart(21)} ${
      "mpq/qsd idle".padStart(12)
    } ${"mpq/qsd loaded".padStart(14)}   (MiB)`,
  );
  for (const n of counts) {
    const m = mpq.get(n);
    const q = qsd.get(n);
    const pd = (x: Measured | undefined, b: Measured | undefined) =>
      n > counts[0] ? `${f1(perDev(x, b, n, "idle"), 5)} / ${f1(perDev(x, b, n, "loaded"), 5)}` : "-";
    console.log(
      `${String(n).padStart(7)} ${f1(m?.idle.rss ?? NaN, 9)} ${f1(m?.loaded.rss ?? NaN, 10)} ${
        pd(m, base).padStart(21)
      } ${f1(q?.idle.rss ?? NaN, 9)} ${f1(q?.loaded.rss ?? NaN, 10)} ${pd(q, qbase).padStart(21)} ${
        ratio(m?.idle.rss ?? NaN, q?.idle.rss ?? NaN).padStart(12)
      } ${ratio(m?.loaded.rss ?? NaN, q?.loaded.rss ?? NaN).padStart(14)}`,
    );
  }
  console.log(
    `\n${"process".padEnd(26)} ${"state".padEnd(6)} ${"VmRSS".padStart(7)} ${"Anon".padStart(7)} ${
      "File".padStart(7)
    } ${"Shmem".padStart(7)} ${"thr".padStart(4)} ${"ready s".padStart(7)} ${"IOPS".padStart(8)} ${
      "be CPU%".padStart(7)
    } ${"drv CPU%".padStart(8)} errors   (MiB)`,
  );
  const detail = (name: string, m: Measured) => {
    for (const [state, s] of [["idle", m.idle], ["loaded", m.loaded]] as const) {
      const load = state === "loaded";
      console.log(
        `${name.padEnd(26)} ${state.padEnd(6)} ${f1(s.rss, 7)} ${f1(s.anon, 7)} ${f1(s.file, 7)} ${
          f1(s.shmem, 7)
        } ${String(s.threads).padStart(4)} ${(load ? "" : m.readySeconds.toFixed(2)).padStart(7)} ${
          (load ? m.iops.toFixed(0) : "").padStart(8)
        } ${(load ? m.backendCpu.toFixed(0) : "").padStart(7)} ${
          (load ? m.driverCpu.toFixed(0) : "").padStart(8)
        } ${load ? m.errors : ""}`,
      );
    }
  };
  for (const n of counts) {
    const m = mpq.get(n);
    if (m) detail(`mpq vhost serve, ${n} dev`, m);
    const q = qsd.get(n);
    if (q) detail(`qsd, ${n} exports`, q);
  }
  for (const s of singles) {
    if (!s.mem) {
      console.log(`${s.name.padEnd(26)} ${"idle".padEnd(6)} ${s.note}`);
      continue;
    }
    console.log(
      `${s.name.padEnd(26)} ${"idle".padEnd(6)} ${f1(s.mem.rss, 7)} ${f1(s.mem.anon, 7)} ${
        f1(s.mem.file, 7)
      } ${f1(s.mem.shmem, 7)} ${String(s.mem.threads).padStart(4)}${s.note ? `   ${s.note}` : ""}`,
    );
  }
  for (const n of counts) {
    const m = mpqNoHelper.get(n);
    if (!m) continue;
    console.log(
      `${`mpq serve io-threads=0, ${n}`.padEnd(26)} ${"idle".padEnd(6)} ${f1(m.rss, 7)} ${f1(m.anon, 7)} ${
        f1(m.file, 7)
      } ${f1(m.shmem, 7)} ${String(m.threads).padStart(4)}   no copy-helper Worker per device`,
    );
  }
  const contribMem = singles.find((s) => s.name === "contrib vhost-user-blk")?.mem;
  if (contribMem) {
    console.log(
      `(contrib vhost-user-blk serves one device per process: ${
        counts.filter((n) => n > 1).map((n) =>
          `${n} devices = ${n} processes = ${f1(n * contribMem.rss, 0)} MiB`
        )
          .join(", ")
      } by its idle figure)`,
    );
  }

  const nh0 = mpqNoHelper.get(counts[0]);
  if (nh0) {
    console.log(
      `(mpq with io-threads=0, idle: ${
        counts.filter((n) => mpqNoHelper.has(n)).map((n) =>
          `${n} dev ${f1(mpqNoHelper.get(n)!.rss, 0)} MiB` +
          (n > counts[0]
            ? ` (+${MiB((mpqNoHelper.get(n)!.rss - nh0.rss) / (n - counts[0])).toFixed(2)}/dev, x${
              (mpqNoHelper.get(n)!.rss / nh0.rss).toFixed(2)
            })`
            : "")
        ).join(", ")
      }: the defaults' per-device cost is mostly the copy helper; the targets below are judged on the defaults)`,
    );
  }
  // The targets.
  const targetLine = (
    what: string,
    figures: Array<[string, number]>,
    ok: (x: number) => boolean,
    unit = "",
  ) => {
    const known = figures.filter(([, x]) => Number.isFinite(x));
    if (known.length === 0) return console.log(`target ${what}: no figures`);
    const met = known.every(([, x]) => ok(x));
    console.log(
      `target ${what}: ${met ? "met" : "missed"} (${
        known.map(([k, x]) => `${k} ${unit === "x" ? `x${x.toFixed(2)}` : `${x.toFixed(2)} MiB`}`).join(", ")
      })`,
    );
  };
  const many = counts.filter((n) => n > counts[0]);
  targetLine(
    `per device beyond the first <= 2 MiB`,
    many.flatMap((n) =>
      (["idle", "loaded"] as const).map((k) =>
        [`${n} dev ${k}`, MiB(perDev(mpq.get(n), base, n, k))] as [string, number]
      )
    ),
    (x) => x <= 2,
  );
  if (counts.includes(10) && counts[0] === 1) {
    const m10 = mpq.get(10);
    targetLine(
      `10 devices <= 1.3x one device`,
      (["idle", "loaded"] as const).map((k) => [k, (m10?.[k].rss ?? NaN) / (base?.[k].rss ?? NaN)]),
      (x) => x <= 1.3,
      "x",
    );
  }
  const blk = singles.find((s) => s.name === "mpq vhost blk")?.mem;
  targetLine(
    `single-device process idle < 45 MiB`,
    [
      ["mpq vhost blk", MiB(blk?.rss ?? NaN)],
      ...(counts[0] === 1 ? [["mpq vhost serve 1 dev", MiB(base?.idle.rss ?? NaN)] as [string, number]] : []),
    ],
    (x) => x < 45,
  );
  if (errors.length) throw new Error(`vhost memory benchmark: ${errors.join("; ")}`);
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      counts: { type: "string", default: "1,10,50" },
      settle: { type: "string", default: "2" },
      seconds: { type: "string", default: "3" },
      depth: { type: "string", default: "4" },
      "depth-many": { type: "string", default: "2" },
    },
  });
  const counts = values.counts.split(",").map(Number);
  if (counts.some((n) => !Number.isInteger(n) || n < 1)) {
    console.error(`--counts must be positive integers separated by commas: got ${values.counts}`);
    Deno.exit(2);
  }
  for (const k of ["settle", "seconds", "depth", "depth-many"] as const) {
    if (!(Number(values[k]) > 0)) {
      console.error(`--${k} must be a positive number: got ${values[k]}`);
      Deno.exit(2);
    }
  }
  await benchVhostMemory({
    counts,
    settle: Number(values.settle),
    seconds: Number(values.seconds),
    depth: Number(values.depth),
    depthMany: Number(values["depth-many"]),
  });
}

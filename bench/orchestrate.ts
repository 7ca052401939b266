/**
 * Benchmark of `mpq orchestrate` on the demo topology (one remote lsi53c895a + QEMU on memfd RAM,
 * started paused): time from start to QMP ready and to guest running, against the same plan's
 * command lines started by a plain shell script in the same run (the benchmark opens the same
 * sockets, connects to QMP and sends `cont` itself), and mpq's RSS while it supervises.
 * Run: deno run -A bench/orchestrate.ts [--runs N]
 * @module
 */
import { listenUnix, Reactor, socketPair, spawn } from "../ffi/mod.ts";
import { selfCommand } from "../lib/cli/self.ts";
import { demoTopology } from "../lib/orchestrate/demo.ts";
import { planTopology, shellQuote } from "../lib/orchestrate/plan.ts";
import { QmpClient } from "../lib/orchestrate/qmp.ts";
import { validateTopology } from "../lib/orchestrate/topology.ts";

interface Sample {
  qmpReadyMs: number;
  runningMs: number;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** The demo topology without the firmware watch: it stays up until SIGTERM. */
function benchTopology(dir: string): unknown {
  const demo = demoTopology(dir);
  return {
    name: "bench",
    memory: `${demo.memory / 1024 / 1024}M`,
    console: "none",
    start: "paused",
    devices: [{ type: "remote", id: "lsi0", device: "lsi53c895a" }],
  };
}

function rssKiB(pid: number): { rss: number; hwm: number } {
  const s = Deno.readTextFileSync(`/proc/${pid}/status`);
  const get = (k: string) => Number(s.match(new RegExp(`^${k}:\\s+(\\d+) kB`, "m"))?.[1] ?? NaN);
  return { rss: get("VmRSS"), hwm: get("VmHWM") };
}

/** One run of `mpq orchestrate`: times measured by this process from spawn to each status line. */
async function runMpq(
  topoPath: string,
): Promise<Sample & { rss: number; hwm: number; internalReadyMs: number }> {
  const [exe, ...pre] = selfCommand();
  const t0 = performance.now();
  const child = new Deno.Command(exe, {
    args: [...pre, "orchestrate", topoPath],
    stdout: "piped",
    stderr: "inherit",
    stdin: "null",
  }).spawn();
  const dec = new TextDecoder();
  let text = "";
  let qmpReadyMs = NaN;
  let runningMs = NaN;
  let internalReadyMs = NaN;
  let mem = { rss: NaN, hwm: NaN };
  const reader = child.stdout.getReader();
  while (true) {
    const { value, done } = await reader.read();
    if (done) break;
    text += dec.decode(value, { stream: true });
    const now = performance.now() - t0;
    if (isNaN(qmpReadyMs) && /QMP ready/.test(text)) {
      qmpReadyMs = now;
      internalReadyMs = Number(text.match(/\[\s*([\d.]+)s\] qemu +pid \d+ QMP ready/)?.[1]) * 1000;
    }
    if (isNaN(runningMs) && /cont -> guest running/.test(text)) runningMs = now;
    if (/\] running +\d+ processes/.test(text) && isNaN(mem.rss)) {
      await new Promise((r) => setTimeout(r, 300)); // supervising, idle
      mem = rssKiB(child.pid);
      child.kill("SIGTERM");
    }
  }
  const st = await child.status;
  if (st.code !== 0) throw new Error(`mpq orchestrate exited ${st.code}:\n${text}`);
  return { qmpReadyMs, runningMs, internalReadyMs, ...mem };
}

/** One run of the same plan's command lines from a plain sh script; QMP driven from here. */
async function runShell(): Promise<Sample> {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-bench-sh-" });
  const plan = planTopology(validateTopology(benchTopology(dir)), { runtimeDir: dir, self: selfCommand() });
  const reactor = new Reactor();
  const loop = reactor.run();
  // Shell fds 6..9 carry the plan's resources; each command gets them at its planned numbers.
  const qmpL = listenUnix(`${dir}/qmp.sock`, { nonBlocking: false });
  const opL = listenUnix(`${dir}/qmp-operator.sock`, { nonBlocking: false });
  const [a, b] = socketPair({ nonBlocking: false });
  const shellFd: Record<string, number> = {
    "qmp:0": 6,
    "qmp-operator:0": 7,
    "remote-lsi0:0": 8,
    "remote-lsi0:1": 9,
  };
  const lines = plan.processes.map((p, i) => {
    const redirs = p.fds.map((f) => `${f.fd}<&${shellFd[`${f.resource}:${f.end ?? 0}`]}`);
    const closes = [6, 7, 8, 9].map((fd) => `${fd}<&-`);
    const last = i === plan.processes.length - 1;
    return `${last ? "exec " : ""}${p.argv.map(shellQuote).join(" ")} ${redirs.join(" ")} ${
      closes.join(" ")
    }${last ? "" : " &"}`;
  });
  const script = lines.join("\n");
  const t0 = performance.now();
  const sh = spawn("/bin/sh", ["sh", "-c", script], {
    fds: new Map([[6, qmpL.fd], [7, opL.fd], [8, a.fd], [9, b.fd]]),
  });
  qmpL.fd.close();
  opL.fd.close();
  a.close();
  b.close();
  const qmp = QmpClient.connect(`${dir}/qmp.sock`, reactor);
  await qmp.greeting;
  const qmpReadyMs = performance.now() - t0;
  await qmp.execute("qmp_capabilities");
  await qmp.execute("cont");
  const runningMs = performance.now() - t0;
  await qmp.execute("quit").catch(() => {});
  qmp.close();
  await sh.wait();
  reactor.stop();
  await loop;
  reactor.close();
  // The remote process exits by itself once QEMU has gone (auto-shutdown).
  await new Promise((r) => setTimeout(r, 200));
  Deno.removeSync(dir, { recursive: true });
  return { qmpReadyMs, runningMs };
}

/** Prints the orchestrate benchmark (called by bench/main.ts). */
export async function benchOrchestrate(runs = 5): Promise<void> {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-bench-" });
  try {
    const topoPath = `${dir}/bench.json`;
    Deno.writeTextFileSync(topoPath, JSON.stringify(benchTopology(dir)));
    const mpq: Array<Awaited<ReturnType<typeof runMpq>>> = [];
    const sh: Sample[] = [];
    await runShell(); // warm the page cache for QEMU and its firmware
    await runMpq(topoPath);
    for (let i = 0; i < runs; i++) {
      mpq.push(await runMpq(topoPath));
      sh.push(await runShell());
    }
    const f = (x: number) => `${x.toFixed(0).padStart(5)} ms`;
    const pct = (m: number, s: number) => `${(((m - s) / s) * 100).toFixed(1).padStart(6)} %`;
    const mReady = median(mpq.map((x) => x.qmpReadyMs));
    const sReady = median(sh.map((x) => x.qmpReadyMs));
    const mRun = median(mpq.map((x) => x.runningMs));
    const sRun = median(sh.map((x) => x.runningMs));
    const iReady = median(mpq.map((x) => x.internalReadyMs));
    console.log(
      `orchestrate: demo topology (remote lsi53c895a + QEMU, memfd RAM, paused, TCG), median of ${runs} runs`,
    );
    console.log(`                              mpq orchestrate   plain sh script   overhead`);
    console.log(`  start -> QMP ready          ${f(mReady)}          ${f(sReady)}   ${pct(mReady, sReady)}`);
    console.log(`  start -> guest running      ${f(mRun)}          ${f(sRun)}   ${pct(mRun, sRun)}`);
    console.log(
      `  mpq's own start-up (Deno runtime + module load) is ${
        f(mReady - iReady).trim()
      } of that; from mpq's first line ` +
        `to QMP ready: ${f(iReady).trim()} (${pct(iReady, sReady).trim()} vs sh)`,
    );
    console.log(
      `  mpq RSS while supervising: ${median(mpq.map((x) => x.rss)).toFixed(0)} KiB (peak ${
        median(mpq.map((x) => x.hwm)).toFixed(0)
      } KiB)`,
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

if (import.meta.main) {
  const i = Deno.args.indexOf("--runs");
  await benchOrchestrate(i >= 0 ? Number(Deno.args[i + 1]) : 5);
}

/**
 * The C load generator vub-bench (/work/shared/tools/vub-bench) as a driver for bench/vhost.ts: it
 * plays QEMU plus a guest driver against a vhost-user-blk back-end's socket and prints one JSON line.
 * Finding it, its command line for one measurement, and reading its answer.
 * @module
 */

/** One vub-bench measurement, as bench/vhost.ts tabulates it. */
export interface DriverResult {
  iops: number;
  p50us: number;
  p99us: number;
  /** Back-end CPU (user+system, all threads) microseconds per I/O; NaN when unknown. */
  cpuUsPerIo: number;
  /** Back-end CPU, percent of one core, over the measured window; NaN when unknown. */
  cpuPct: number;
  /** The driver's busy fraction per queue thread (near 1: the driver limits the figure). */
  driverBusy: number;
  /** Completions whose used.len exceeded the device-writable bytes (tolerated only when asked). */
  longUsedLen: number;
}

/** What one run asks of vub-bench. */
export interface VubRun {
  socket: string;
  rw: "randread" | "randwrite";
  depth: number;
  queues: number;
  wait: "call" | "poll";
  seconds: number;
  warmup: number;
  backendPid: number;
  seed: number;
}

/**
 * Where vub-bench is: `$VUB_BENCH`, `vub-bench` on PATH, or the shared tools tree next to this
 * checkout (`../shared/tools/vub-bench/vub-bench`); null when none is an executable file.
 * @example
 * const vub = findVubBench(); // "/work/shared/tools/vub-bench/vub-bench" or null
 */
export function findVubBench(): string | null {
  const candidates: string[] = [];
  const env = Deno.env.get("VUB_BENCH");
  if (env) candidates.push(env);
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) if (dir) candidates.push(`${dir}/vub-bench`);
  candidates.push(new URL("../../shared/tools/vub-bench/vub-bench", import.meta.url).pathname);
  for (const c of candidates) {
    try {
      const st = Deno.statSync(c);
      if (st.isFile && ((st.mode ?? 0) & 0o111) !== 0) return c;
    } catch { /* next */ }
  }
  return null;
}

/**
 * The argument list of one run: 4 KiB requests, EVENT_IDX and indirect descriptors (as Linux
 * guests use them), the back-end's CPU over the same window.
 * @example
 * vubArgs({ socket: "/tmp/s", rw: "randread", depth: 1, queues: 1, wait: "call", seconds: 3,
 *   warmup: 1, backendPid: 42, seed: 1 }); // ["--socket", "/tmp/s", "--rw", "randread", ...]
 */
export function vubArgs(run: VubRun): string[] {
  return [
    "--socket",
    run.socket,
    "--rw",
    run.rw,
    "--bs",
    "4096",
    "--iodepth",
    String(run.depth),
    "--queues",
    String(run.queues),
    "--wait",
    run.wait,
    "--event-idx",
    "--indirect",
    "--runtime",
    String(run.seconds),
    "--ramp",
    String(run.warmup),
    "--seed",
    String(run.seed),
    "--backend-pid",
    String(run.backendPid),
    "--json-only",
  ];
}

/** A vub-bench run that did not give usable figures. */
export class VubError extends Error {
  override name = "VubError";
}

/**
 * Turns vub-bench's exit code, stdout and stderr into figures. Any I/O error fails the run,
 * except completions with a too-long used.len when `tolerateLongUsedLen` is set and nothing else
 * went wrong (contrib vhost-user-blk answers every OUT request with used.len = data + 1): vub-bench
 * counts those in `len_errors` and exits 1, its figures are otherwise sound.
 * @example
 * const r = parseVubOutput(0, '{"iops":1000,"ios":3000,"runtime_s":3,"lat_us":{"p50":9,"p99":20},' +
 *   '"errors":0,"len_errors":0,"cpu_util":0.3,"backend_cpu_user_s":0.1,"backend_cpu_sys_s":0.2,' +
 *   '"backend_window_s":3}', "", false); // r.cpuUsPerIo === 100
 */
export function parseVubOutput(
  code: number,
  stdout: string,
  stderr: string,
  tolerateLongUsedLen: boolean,
): DriverResult {
  const line = stdout.split("\n").find((l) => l.startsWith("{"));
  const firstErr = stderr.split("\n").find((l) => l.trim() !== "")?.trim() ?? "";
  if (!line) {
    throw new VubError(`vub-bench exit ${code} without a result${firstErr ? `: ${firstErr}` : ""}`);
  }
  // deno-lint-ignore no-explicit-any
  let j: any;
  try {
    j = JSON.parse(line);
  } catch (e) {
    throw new VubError(`vub-bench printed a result that is not JSON (${(e as Error).message}): ${line}`);
  }
  const errors = Number(j.errors ?? 0);
  const lenErrors = Number(j.len_errors ?? 0);
  const onlyLongLen = errors === lenErrors && Number(j.status_errors ?? 0) === 0 &&
    Number(j.mismatches ?? 0) === 0;
  if (errors > 0 && !(tolerateLongUsedLen && onlyLongLen)) {
    throw new VubError(
      `vub-bench exit ${code}: ${errors} errors (status ${j.status_errors}, used.len ${lenErrors}, ` +
        `missed calls ${j.missed_calls}, vring base ${j.vring_base_errors})${
          firstErr ? `: ${firstErr}` : ""
        }`,
    );
  }
  if (code !== 0 && errors === 0) {
    throw new VubError(`vub-bench exit ${code}${firstErr ? `: ${firstErr}` : ""}`);
  }
  const ios = Number(j.ios);
  if (!(ios > 0)) {
    throw new VubError(`vub-bench completed no request in the window${firstErr ? `: ${firstErr}` : ""}`);
  }
  const cpu = Number(j.backend_cpu_user_s) + Number(j.backend_cpu_sys_s);
  const window = Number(j.backend_window_s);
  const iops = Number(j.iops);
  return {
    iops,
    p50us: Number(j.lat_us?.p50),
    p99us: Number(j.lat_us?.p99),
    cpuUsPerIo: window > 0 ? (cpu / window / iops) * 1e6 : NaN,
    cpuPct: window > 0 ? (cpu / window) * 100 : NaN,
    driverBusy: Number(j.cpu_util),
    longUsedLen: lenErrors,
  };
}

/** Runs vub-bench once; `onChild` sees the process while it runs (so a signal handler can kill it). */
export async function runVub(
  exe: string,
  run: VubRun,
  options: { tolerateLongUsedLen?: boolean; onChild?: (c: Deno.ChildProcess | null) => void } = {},
): Promise<DriverResult> {
  const child = new Deno.Command(exe, {
    args: vubArgs(run),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  options.onChild?.(child);
  try {
    const out = await child.output();
    const dec = new TextDecoder();
    return parseVubOutput(
      out.code,
      dec.decode(out.stdout),
      dec.decode(out.stderr),
      options.tolerateLongUsedLen ?? false,
    );
  } finally {
    options.onChild?.(null);
  }
}

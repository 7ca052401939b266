/**
 * vhost-user-blk benchmark (issue 9, §3): 4 KiB random I/O on a 1 GiB file in /dev/shm filled with
 * random data, `mpq vhost blk` beside QEMU's contrib vhost-user-blk (libvhost-user, the fastest C
 * back-end; when /work/shared/tools/c-peers/build.sh has built it) and qemu-storage-daemon, all up at
 * once, runs interleaved, repeated N times: medians, each run's ratio, the back-end's CPU per I/O.
 *
 * Workloads: QD1 randread and randwrite with a sleeping driver (mpq with `--poll-us=0` and with its
 * default polling), QD32 randread with a sleeping and with a polling driver, and 16 requests per
 * queue on one queue and on two (a driver thread each). Each prints a table, mpq / libvhost-user and
 * mpq / qsd, and the issue's targets met or missed.
 *
 * The driver is the C load generator vub-bench (EVENT_IDX and indirect descriptors, as Linux guests
 * use them) when it is built; otherwise the TypeScript front-end below (`runLoad`, one queue, no
 * indirect descriptors), whose own CPU per request limits the figures at QD32. The output says which.
 * That driver is kept cheap: one reserved 3-descriptor chain per slot, rewritten in place; every call
 * drains the used ring, refills all free slots, publishes avail->idx once and kicks at most once
 * (EVENT_IDX decides). Latency runs from just before publish to when the driver sees the used entry.
 *
 * Run alone: `deno run -A bench/vhost.ts [--seconds S] [--warmup S] [--size-mib N] [--wait call|poll|both]
 * [--repeat N] [--driver auto|vub|ts] [--dry-run]`.
 * @module
 */
import { parseArgs } from "node:util";
import { EventFd, type ExitStatus, OpenFlags, openPath, Signal, spawn } from "../ffi/mod.ts";
import { selfCommand } from "../lib/cli/self.ts";
import { Blk, Feature, type FrontendQueue, VhostUserFrontend } from "../tests/helpers/vhost_frontend.ts";
import { DescFlags } from "../tests/helpers/virtio_ring.ts";
import { type Backend, haveTool, startMpqVhost, startQsd } from "../tests/helpers/vhost_backends.ts";
import { type DriverResult, findVubBench, runVub, VubError } from "./vhost_vub.ts";

/** One measured point. */
export interface LoadResult {
  rw: "randread" | "randwrite";
  depth: number;
  ios: number;
  seconds: number;
  iops: number;
  p50us: number;
  p99us: number;
  errors: number;
  /** Back-end CPU microseconds per I/O (user+system), NaN when unknown. */
  cpuUsPerIo: number;
  /** This driver's own CPU microseconds per I/O (near the wall time per I/O: the driver limits). */
  driverCpuUsPerIo: number;
  /** Front-end kicks and calls per I/O. */
  kicksPerIo: number;
  callsPerIo: number;
}

/** Options for runLoad. */
export interface LoadOptions {
  rw: "randread" | "randwrite";
  depth: number;
  /** Measured seconds. */
  seconds: number;
  /** Warm-up seconds (not counted). */
  warmup: number;
  /** Back-end pid for CPU accounting. */
  backendPid?: number;
  /** Request size (default 4096). */
  bs?: number;
  /** PRNG seed for offsets. */
  seed?: number;
  /**
   * How the driver waits for completions: "call" (default) sleeps on the call eventfd through the
   * reactor, as a guest with interrupts does; "poll" spins on used->idx with calls suppressed
   * (lower latency when the driver has a core of its own; it takes that core from the back-end
   * on a small machine).
   */
  wait?: "poll" | "call";
  /**
   * Call mode: keep the reactor looking (non-blocking epoll_wait) for this many microseconds after
   * a submission before it sleeps on a worker thread (default 50), which saves the thread hand-off
   * when the back-end answers quickly.
   */
  spinUs?: number;
}

const CLK_TCK = 100;

/** utime+stime of a process in seconds, from /proc/PID/stat (NaN if unreadable). */
export function processCpuSeconds(pid: number): number {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return NaN;
  }
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

interface Slot {
  head: number;
  dataDesc: number;
  hdr: number; // memfd offset of the request header
  status: number; // memfd offset of the status byte
  submitted: number; // performance.now() at publish
}

/**
 * Closed-loop load on queue 0 of a started front-end: keeps `depth` requests in flight for
 * warmup+seconds and returns the figures of the measured window.
 */
export async function runLoad(fe: VhostUserFrontend, options: LoadOptions): Promise<LoadResult> {
  const q: FrontendQueue = fe.queues[0];
  const ring = q.ring;
  const ram = fe.ram;
  const bs = options.bs ?? 4096;
  const capacity = Number(fe.blkConfig.capacity);
  const blocks = Math.floor((capacity * 512) / bs);
  if (blocks < 1) throw new Error(`device of ${capacity} sectors is smaller than one ${bs}-byte block`);
  if (options.depth * 3 > ring.size) {
    throw new Error(`depth ${options.depth} needs ${options.depth * 3} descriptors, ring has ${ring.size}`);
  }
  const read = options.rw === "randread";
  const slots: Slot[] = [];
  for (let i = 0; i < options.depth; i++) {
    const ctl = ram.alloc(64, 64, 0);
    const data = ram.alloc(bs, 4096);
    ram.bytes(data, bs).set(crypto.getRandomValues(new Uint8Array(Math.min(bs, 65536))).subarray(0, bs));
    const head = ring.reserveChain([
      { gpa: ctl, len: 16, write: false },
      { gpa: data, len: bs, write: read },
      { gpa: ctl + 16, len: 1, write: true },
    ]);
    if (head === null) throw new Error("no free descriptors for the load slots");
    const ids = ring.chainOf(head);
    slots.push({
      head,
      dataDesc: ids[1],
      hdr: ram.offset(ctl, 17),
      status: ram.offset(ctl + 16, 1),
      submitted: 0,
    });
  }
  const byHead: (Slot | undefined)[] = [];
  for (const s of slots) byHead[s.head] = s;
  const view = ram.view;
  const mem = ram.mem;
  const sectorsPerBlock = bs / 512;
  const type = read ? Blk.T_IN : Blk.T_OUT;
  const dataFlags = DescFlags.NEXT | (read ? DescFlags.WRITE : 0);
  for (const s of slots) {
    view.setUint32(s.hdr, type, true);
    view.setUint32(s.hdr + 4, 0, true);
    ring.setDescFlags(s.dataDesc, dataFlags);
  }
  let rng = (options.seed ?? 0x9e3779b9) >>> 0 || 1;
  const lat = new Float64Array(4 << 20);
  let nlat = 0;
  let ios = 0;
  let errors = 0;
  let measuring = false;
  let stopping = false;
  let inFlight = 0;
  const kick0 = { kicks: 0, calls: 0n };
  let finish: () => void = () => {};
  const done = new Promise<void>((r) => (finish = r));

  const free: Slot[] = [];
  let lastSubmit = 0;
  const submitFree = () => {
    if (stopping || free.length === 0) return;
    const t = performance.now();
    for (const s of free) {
      rng ^= rng << 13;
      rng >>>= 0;
      rng ^= rng >>> 17;
      rng ^= rng << 5;
      rng >>>= 0;
      const sector = Math.floor((rng / 4294967296) * blocks) * sectorsPerBlock;
      view.setUint32(s.hdr + 8, sector % 4294967296, true);
      view.setUint32(s.hdr + 12, Math.floor(sector / 4294967296), true);
      mem[s.status] = 0xff;
      s.submitted = t;
      ring.submitHead(s.head);
    }
    inFlight += free.length;
    free.length = 0;
    lastSubmit = t;
    if (ring.publish()) fe.kickQueue(q);
  };
  q.onComplete = (id) => {
    const s = byHead[id];
    if (!s) return;
    inFlight--;
    if (mem[s.status] !== Blk.S_OK) errors++;
    if (measuring) {
      ios++;
      if (nlat < lat.length) lat[nlat++] = performance.now() - s.submitted;
    }
    free.push(s);
  };
  // Refill after every drain of the used ring (the call handler runs poll(), then this poller).
  const poll = options.wait === "poll";
  const spinMs = (options.spinUs ?? 50) / 1000;
  if (poll) ring.suppressCalls();
  const complete = q.onComplete;
  // Call mode: the call handler drains the used ring, then this poller refills. Poll mode: this
  // poller also drains the used ring and keeps the reactor spinning while requests are in flight.
  // What the ring looked like when requests stopped completing (lost call or lost kick?).
  const stuck = () =>
    `${options.rw} QD${options.depth}: ${inFlight} requests never completed (avail ${ring.availIdx}, ` +
    `device used ${ring.usedIdx()}, driver consumed ${ring.lastUsed}, avail_event ${ring.availEvent()}, ` +
    `used flags ${ring.usedFlags()}; ${q.kicks} kicks, ${q.calls} calls; ` +
    `${
      ring.usedIdx() !== ring.lastUsed
        ? "the device completed them but no call came"
        : "the device did not complete them"
    })`;
  const removePoller = fe.reactor.addPoller(() => {
    if (poll && ring.collect(complete!) > 0) ring.suppressCalls();
    if (free.length) submitFree();
    if (stopping && inFlight === 0) finish();
    return inFlight > 0 && (poll || performance.now() - lastSubmit < spinMs);
  });
  // The reactor may be asleep in epoll_wait with calls suppressed: wake it once so the poller runs.
  const wake = new EventFd({ label: "bench wake" });
  const wakeWatch = fe.reactor.add(wake.fd, { readable: true }, () => wake.drain());
  free.push(...slots);
  submitFree();
  wake.signal();
  await new Promise((r) => setTimeout(r, options.warmup * 1000));
  const cpu0 = options.backendPid ? processCpuSeconds(options.backendPid) : NaN;
  const drv0 = processCpuSeconds(Deno.pid);
  kick0.kicks = q.kicks;
  kick0.calls = q.calls;
  const t0 = performance.now();
  measuring = true;
  await new Promise((r) => setTimeout(r, options.seconds * 1000));
  measuring = false;
  const t1 = performance.now();
  const cpu1 = options.backendPid ? processCpuSeconds(options.backendPid) : NaN;
  const drv1 = processCpuSeconds(Deno.pid);
  const kicks = q.kicks - kick0.kicks;
  const calls = Number(q.calls - kick0.calls);
  stopping = true;
  if (inFlight === 0) finish();
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    done,
    new Promise((_, rej) => (timer = setTimeout(() => rej(new Error(stuck())), 10_000))),
  ]).finally(() => clearTimeout(timer));
  removePoller();
  wakeWatch.remove();
  wake.close();
  q.onComplete = null;
  if (poll) ring.armCall();
  for (const s of slots) ring.releaseChain(s.head);
  const sorted = lat.slice(0, nlat).sort();
  const seconds = (t1 - t0) / 1000;
  return {
    rw: options.rw,
    depth: options.depth,
    ios,
    seconds,
    iops: ios / seconds,
    p50us: percentile(sorted, 0.5) * 1000,
    p99us: percentile(sorted, 0.99) * 1000,
    errors,
    cpuUsPerIo: ((cpu1 - cpu0) * 1e6) / ios,
    driverCpuUsPerIo: ((drv1 - drv0) * 1e6) / ios,
    kicksPerIo: kicks / ios,
    callsPerIo: calls / ios,
  };
}

/** The repetition with the median IOPS (its other figures come with it). */
export function medianRun(runs: LoadResult[]): LoadResult {
  const sorted = [...runs].sort((a, b) => a.iops - b.iops);
  return sorted[Math.floor((sorted.length - 1) / 2)];
}

type Wait = "call" | "poll";
type Rw = "randread" | "randwrite";

/** A back-end process the benchmark starts. */
export interface BackendSpec {
  /** Key in the plan: mpq, mpq-poll0, mpq-2q, lvu, qsd, qsd-2q. */
  id: string;
  /** Its name in the tables. */
  label: string;
  family: "mpq" | "lvu" | "qsd";
  /** num-queues it is started with (mpq, qsd; contrib offers its own). */
  queues: number;
  /** Extra `mpq vhost blk` flags. */
  mpqArgs: string[];
}

const BACKENDS: Record<string, BackendSpec> = {
  "mpq-poll0": {
    id: "mpq-poll0",
    label: "mpq --poll-us=0",
    family: "mpq",
    queues: 1,
    mpqArgs: ["--poll-us=0"],
  },
  "mpq": { id: "mpq", label: "mpq", family: "mpq", queues: 1, mpqArgs: [] },
  "mpq-2q": { id: "mpq-2q", label: "mpq", family: "mpq", queues: 2, mpqArgs: [] },
  "mpq-2q-1t": {
    id: "mpq-2q-1t",
    label: "mpq --queue-threads=1",
    family: "mpq",
    queues: 2,
    mpqArgs: ["--queue-threads=1"],
  },
  "lvu": { id: "lvu", label: "libvhost-user", family: "lvu", queues: 1, mpqArgs: [] },
  "qsd": { id: "qsd", label: "qsd", family: "qsd", queues: 1, mpqArgs: [] },
  "qsd-2q": { id: "qsd-2q", label: "qsd", family: "qsd", queues: 2, mpqArgs: [] },
};

/** One row of a workload: a back-end driven through `queues` queues. */
export interface Cell {
  backend: string;
  queues: number;
}

/** The issue's target: IOPS of back-end `mpq` / back-end `peer` at least `min`. */
export interface Target {
  mpq: string;
  peer: string;
  min: number;
}

/** One workload: every cell runs it once per repetition. */
export interface Workload {
  title: string;
  rw: Rw;
  /** Requests in flight per queue. */
  depth: number;
  wait: Wait;
  cells: Cell[];
  targets: Target[];
  /** Two queues against one: each back-end's 2-queue cell against its 1-queue cell. */
  scaling: boolean;
}

/** One measurement, in execution order. */
export interface Step {
  rep: number;
  workload: number;
  cell: number;
}

/** What benchVhost does: printable (`--dry-run`) and checkable without running anything. */
export interface VhostPlan {
  driver: "vub" | "ts";
  backends: BackendSpec[];
  workloads: Workload[];
  steps: Step[];
  /** Workloads and back-ends left out, and why. */
  skipped: string[];
  seconds: number;
  warmup: number;
  repeat: number;
}

/** Options of planVhostBench. */
export interface PlanOptions {
  driver: "vub" | "ts";
  haveContrib: boolean;
  haveQsd: boolean;
  wait?: Wait | "both";
  repeat: number;
  seconds: number;
  warmup: number;
}

const one = (...ids: string[]): Cell[] => ids.map((backend) => ({ backend, queues: 1 }));

/** The workloads of issue 9, §3, before leaving out what this machine or driver cannot run. */
function allWorkloads(): Workload[] {
  const qd1Targets = [{ mpq: "mpq-poll0", peer: "lvu", min: 1.0 }, { mpq: "mpq", peer: "lvu", min: 1.3 }];
  const qd32Targets = [{ mpq: "mpq", peer: "lvu", min: 2.5 }];
  return [
    {
      title: "QD1 randread, driver sleeps",
      rw: "randread",
      depth: 1,
      wait: "call",
      cells: one("mpq-poll0", "mpq", "lvu", "qsd"),
      targets: qd1Targets,
      scaling: false,
    },
    {
      title: "QD1 randwrite, driver sleeps",
      rw: "randwrite",
      depth: 1,
      wait: "call",
      cells: one("mpq-poll0", "mpq", "lvu", "qsd"),
      targets: qd1Targets,
      scaling: false,
    },
    {
      title: "QD32 randread, driver sleeps",
      rw: "randread",
      depth: 32,
      wait: "call",
      cells: one("mpq", "lvu", "qsd"),
      targets: qd32Targets,
      scaling: false,
    },
    {
      title: "QD32 randread, driver polls",
      rw: "randread",
      depth: 32,
      wait: "poll",
      cells: one("mpq", "lvu", "qsd"),
      targets: qd32Targets,
      scaling: false,
    },
    {
      title: "randread, 16 in flight per queue, one queue and two (a driver thread each), driver sleeps",
      rw: "randread",
      depth: 16,
      wait: "call",
      cells: ["mpq-2q", "mpq-2q-1t", "lvu", "qsd-2q"].flatMap((
        backend,
      ) => [{ backend, queues: 1 }, { backend, queues: 2 }]),
      targets: [],
      scaling: true,
    },
  ];
}

/**
 * Plans the benchmark: the workloads this driver and machine can run, the back-ends they need, and
 * the order of the runs. Each repetition runs every workload once on every back-end; the back-ends'
 * order rotates by repetition and workload, so drifting load on a shared machine favours none.
 * @example
 * const plan = planVhostBench({ driver: "vub", haveContrib: true, haveQsd: true, repeat: 3, seconds: 3,
 *   warmup: 1 });
 * plan.steps.length; // 60: 3 repetitions x 20 runs
 */
export function planVhostBench(o: PlanOptions): VhostPlan {
  const skipped: string[] = [];
  if (!o.haveContrib) {
    skipped.push(
      "libvhost-user: contrib vhost-user-blk is not built (bash /work/shared/tools/c-peers/build.sh, or " +
        "MPQ_C_PEERS=DIR): no libvhost-user anchor",
    );
  }
  if (!o.haveQsd) skipped.push("qsd: qemu-storage-daemon is not on PATH");
  const workloads: Workload[] = [];
  for (const w of allWorkloads()) {
    if (o.wait && o.wait !== "both" && w.wait !== o.wait) continue;
    if (w.scaling && o.driver === "ts") {
      skipped.push(`${w.title}: needs vub-bench (the TypeScript driver drives one queue)`);
      continue;
    }
    const cells = w.cells.filter((c) =>
      (o.haveContrib || BACKENDS[c.backend].family !== "lvu") &&
      (o.haveQsd || BACKENDS[c.backend].family !== "qsd")
    );
    workloads.push({ ...w, cells });
  }
  const ids = new Set(workloads.flatMap((w) => w.cells.map((c) => c.backend)));
  const backends = Object.values(BACKENDS).filter((b) => ids.has(b.id));
  const steps: Step[] = [];
  for (let rep = 0; rep < o.repeat; rep++) {
    workloads.forEach((w, wi) => {
      const n = w.cells.length;
      for (let k = 0; k < n; k++) steps.push({ rep, workload: wi, cell: (k + rep + wi) % n });
    });
  }
  return {
    driver: o.driver,
    backends,
    workloads,
    steps,
    skipped,
    seconds: o.seconds,
    warmup: o.warmup,
    repeat: o.repeat,
  };
}

/** A cell's name in the tables. */
function cellLabel(w: Workload, c: Cell): string {
  const b = BACKENDS[c.backend].label;
  return w.scaling ? `${b}, ${c.queues} queue${c.queues > 1 ? "s" : ""}` : b;
}

/** Every run of one cell: figures (null where the run failed) and the failures. */
export interface CellRuns {
  runs: (DriverResult | null)[];
  errors: string[];
}

/** The median (the mean of the two middle values for an even count); NaN for none. */
export function median(xs: number[]): number {
  const s = xs.filter(Number.isFinite).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function fmt(n: number, width: number, digits = 0): string {
  return (Number.isFinite(n) ? n.toFixed(digits) : "-").padStart(width);
}

/** IOPS as 21.3K / 729K. */
function kilo(n: number): string {
  if (!Number.isFinite(n)) return "-";
  return n >= 99_950 ? `${(n / 1000).toFixed(0)}K` : `${(n / 1000).toFixed(1)}K`;
}

const ok = (r: DriverResult | null): r is DriverResult => r !== null;

/** Ratio of the median IOPS of two cells, and each repetition's ratio. */
function ratio(a: CellRuns, b: CellRuns): { x: number; each: string } {
  const x = median(a.runs.filter(ok).map((r) => r.iops)) / median(b.runs.filter(ok).map((r) => r.iops));
  const each = a.runs.map((r, k) => {
    const s = b.runs[k];
    return r && s ? (r.iops / s.iops).toFixed(2) : "-";
  });
  return { x, each: each.join(", ") };
}

const CONTRIB_WRITE_NA = "n/a: contrib returns used.len=4097 for OUT requests (libvhost-user contrib bug), " +
  "vub-bench refuses it";

/**
 * The report: a table per workload with medians, each run's IOPS, the back-end's CPU per I/O, the
 * mpq / libvhost-user and mpq / qsd ratios (medians and each run's), then the targets.
 */
export function reportVhost(plan: VhostPlan, results: CellRuns[][]): string[] {
  const out: string[] = [];
  const targetLines: string[] = [];
  plan.workloads.forEach((w, wi) => {
    const cells = results[wi];
    out.push(
      "",
      `${w.title} (${w.rw}, ${w.depth} in flight per queue, --wait ${w.wait}):`,
      `  ${"back-end".padEnd(26)} ${"IOPS".padStart(7)} ${"p50 µs".padStart(8)} ${"p99 µs".padStart(8)} ` +
        `${"CPU µs/IO".padStart(10)} ${"CPU %".padStart(6)} ${"drv busy".padStart(8)}  IOPS of each run`,
    );
    const notes: string[] = [];
    w.cells.forEach((c, ci) => {
      const rs = cells[ci].runs.filter(ok);
      const m = (f: (r: DriverResult) => number) => median(rs.map(f));
      out.push(
        `  ${cellLabel(w, c).padEnd(26)} ${kilo(m((r) => r.iops)).padStart(7)} ${
          fmt(m((r) => r.p50us), 8, 1)
        } ` +
          `${fmt(m((r) => r.p99us), 8, 1)} ${fmt(m((r) => r.cpuUsPerIo), 10, 2)} ${
            fmt(m((r) => r.cpuPct), 6)
          } ` +
          `${fmt(m((r) => r.driverBusy), 8, 2)}  ${
            cells[ci].runs.map((r) => (r ? kilo(r.iops) : "failed")).join(", ")
          }`,
      );
      const longLen = rs.reduce((n, r) => n + r.longUsedLen, 0);
      if (longLen > 0) {
        notes.push(
          `  note: ${cellLabel(w, c)} answered ${longLen} OUT requests over ${rs.length} runs with ` +
            `used.len=4097 (data + status; the spec allows the 1 device-writable byte): a libvhost-user ` +
            `contrib bug. vub-bench counts these (len_errors) and exits 1; every status byte was OK, so the ` +
            `figures are kept.`,
        );
      }
      for (const e of new Set(cells[ci].errors)) notes.push(`  FAILED ${cellLabel(w, c)}: ${e}`);
    });
    out.push(...notes);
    const find = (backend: string, queues = 1) =>
      w.cells.findIndex((c) => c.backend === backend && c.queues === queues);
    const ratioLine = (label: string, a: number, b: number) => {
      const r = ratio(cells[a], cells[b]);
      return `  ${label.padEnd(40)} x${fmt(r.x, 0, 2)} (runs ${r.each})`;
    };
    if (w.scaling) {
      for (const id of ["mpq-2q", "lvu", "qsd-2q"]) {
        const a = find(id, 2), b = find(id, 1);
        if (a >= 0 && b >= 0) out.push(ratioLine(`${BACKENDS[id].label}: 2 queues / 1 queue`, a, b));
      }
      for (const peer of ["lvu", "qsd-2q"]) {
        for (const q of [1, 2]) {
          const a = find("mpq-2q", q), b = find(peer, q);
          if (a >= 0 && b >= 0) {
            out.push(ratioLine(`mpq / ${BACKENDS[peer].label}, ${q} queue${q > 1 ? "s" : ""}`, a, b));
          }
        }
      }
      out.push(...explainQueues(w, cells));
    } else {
      for (const c of w.cells) {
        if (BACKENDS[c.backend].family !== "mpq") continue;
        for (const peer of w.cells) {
          if (BACKENDS[peer.backend].family === "mpq") continue;
          out.push(
            ratioLine(`${cellLabel(w, c)} / ${cellLabel(w, peer)}`, find(c.backend), find(peer.backend)),
          );
        }
      }
    }
    for (const t of w.targets) {
      const what = `${w.title}: ${BACKENDS[t.mpq].label} >= ${t.min.toFixed(1)}x ${BACKENDS[t.peer].label}`;
      const a = find(t.mpq), b = find(t.peer);
      if (a < 0 || b < 0) {
        targetLines.push(`  ${what}: not measured (${b < 0 ? "libvhost-user not built" : "mpq not run"})`);
        continue;
      }
      if (
        w.rw === "randwrite" && BACKENDS[t.peer].family === "lvu" && cells[b].runs.every((r) => r === null)
      ) {
        targetLines.push(`  ${what}: ${CONTRIB_WRITE_NA}`);
        continue;
      }
      const r = ratio(cells[a], cells[b]);
      const verdict = !Number.isFinite(r.x) ? "not measured (runs failed)" : r.x >= t.min ? "met" : "MISSED";
      targetLines.push(`  ${what}: ${verdict} (x${fmt(r.x, 0, 2)}; runs ${r.each})`);
    }
  });
  if (targetLines.length) out.push("", "Targets (issue 9, §3), on the median IOPS:", ...targetLines);
  return out;
}

/** Why two queues do not double IOPS here, in the measured figures. */
function explainQueues(w: Workload, cells: CellRuns[]): string[] {
  const cores = navigator.hardwareConcurrency;
  const parts: string[] = [];
  w.cells.forEach((c, ci) => {
    if (c.queues !== 2) return;
    const rs = cells[ci].runs.filter(ok);
    const be = median(rs.map((r) => r.cpuPct));
    const drv = median(rs.map((r) => r.driverBusy)) * 100 * c.queues;
    if (!Number.isFinite(be)) return;
    parts.push(`${BACKENDS[c.backend].label} ${be.toFixed(0)}% + drivers ${drv.toFixed(0)}%`);
  });
  return [
    `  what limits it: ${cores} cores for the back-end and both driver threads. mpq serves the second queue ` +
    `on a queue thread (--queue-threads, default the CPU count; "--queue-threads=1" serves both from one ` +
    `thread, as libvhost-user's loop and qsd's main loop with its preadv thread pool do), so a second queue ` +
    `adds a back-end core only where one is free; a sleeping driver's wake-ups cost CPU on the same ` +
    `${cores} cores.`,
    ...(parts.length
      ? [`  CPU at 2 queues (percent of one core; ${cores * 100}% in all): ${parts.join("; ")}.`]
      : []),
  ];
}

/** Where /work/shared/tools/c-peers/build.sh keeps contrib vhost-user-blk, if it has built it. */
export function contribVhostUserBlk(): string | null {
  const home = Deno.env.get("HOME") ?? "/root";
  const dir = Deno.env.get("MPQ_C_PEERS") ??
    `${Deno.env.get("XDG_CACHE_HOME") ?? `${home}/.cache`}/mpq-c-peers`;
  try {
    const st = Deno.statSync(`${dir}/vhost-user-blk`);
    return st.isFile && ((st.mode ?? 0) & 0o111) !== 0 ? `${dir}/vhost-user-blk` : null;
  } catch {
    return null;
  }
}

function tail(path: string, lines = 3): string {
  try {
    const t = Deno.readTextFileSync(path).trimEnd().split("\n").slice(-lines).join(" | ");
    return t ? `; its log: ${t}` : "";
  } catch {
    return "";
  }
}

/** Starts contrib vhost-user-blk (`-s SOCKET -b FILE`), output to `log`, and waits for its socket. */
async function startContrib(exe: string, socketPath: string, file: string, log: string): Promise<Backend> {
  const fd = openPath(log, OpenFlags.O_WRONLY | OpenFlags.O_CREAT | OpenFlags.O_APPEND);
  let child;
  try {
    child = spawn(exe, [exe, "-s", socketPath, "-b", file], {
      stdio: "null",
      fds: new Map([[1, fd], [2, fd]]),
    });
  } finally {
    fd.close();
  }
  const deadline = Date.now() + 10_000;
  while (true) {
    try {
      if (Deno.statSync(socketPath).isSocket) break;
    } catch { /* not yet */ }
    const st = child.tryWait();
    if (st) throw new Error(`contrib vhost-user-blk exited (${st.text}) before listening${tail(log)}`);
    if (Date.now() > deadline) {
      child.kill(Signal.SIGKILL);
      await child.wait();
      throw new Error(`contrib vhost-user-blk did not listen on ${socketPath} within 10 s`);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  return {
    name: "contrib vhost-user-blk",
    child,
    socketPath,
    async stop(graceMs = 2000): Promise<ExitStatus> {
      if (child.tryWait()) return child.status!;
      child.kill(Signal.SIGTERM);
      const timer = setTimeout(() => child.kill(Signal.SIGKILL), graceMs);
      try {
        return await child.wait();
      } finally {
        clearTimeout(timer);
      }
    },
  };
}

/** One run with the TypeScript front-end: a fresh connection, runLoad on queue 0, disconnect. */
async function runTs(
  socket: string,
  w: Workload,
  pid: number,
  o: { seconds: number; warmup: number; seed: number },
) {
  const fe = await VhostUserFrontend.connect(socket, {
    queueSize: 256,
    eventIdx: true,
    memSize: 64 << 20,
    depth: 1,
    maxRequestBytes: 4096,
  });
  try {
    const info = await fe.handshake();
    if (!(info.features & Feature.RING_EVENT_IDX)) throw new Error("the back-end does not offer EVENT_IDX");
    await fe.start();
    const r = await runLoad(fe, { rw: w.rw, depth: w.depth, wait: w.wait, backendPid: pid, ...o });
    if (r.errors > 0) throw new Error(`${r.errors} requests completed with a bad status`);
    return {
      iops: r.iops,
      p50us: r.p50us,
      p99us: r.p99us,
      cpuUsPerIo: r.cpuUsPerIo,
      cpuPct: (r.cpuUsPerIo * r.iops) / 1e4,
      driverBusy: (r.driverCpuUsPerIo * r.iops) / 1e6,
      longUsedLen: 0,
    };
  } finally {
    try {
      if (fe.started) await fe.stop();
    } catch { /* the back-end may be gone; close anyway */ }
    await fe.close();
  }
}

/** Options of benchVhost. */
export interface BenchVhostOptions {
  /** Measured seconds per run (default 3). */
  seconds?: number;
  /** Warm-up seconds before each, not counted (default 1). */
  warmup?: number;
  /** File size in MiB (default 1024). */
  sizeMiB?: number;
  /** Only the workloads with this driver wait mode (default both). */
  wait?: Wait | "both";
  /** Repetitions of every run (default 3). */
  repeat?: number;
  /** vub: vub-bench (fails without it); ts: the TypeScript driver; auto (default): vub-bench when built. */
  driver?: "auto" | "vub" | "ts";
  /** Print the plan and do nothing. */
  dryRun?: boolean;
}

function loadAverage(): string {
  try {
    return Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
  } catch {
    return "-";
  }
}

/** Runs the vhost-user-blk benchmark and prints its tables. */
export async function benchVhost(options: BenchVhostOptions = {}): Promise<void> {
  const seconds = options.seconds ?? 3;
  const warmup = options.warmup ?? 1;
  const repeat = Math.max(1, Math.floor(options.repeat ?? 3));
  const size = (options.sizeMiB ?? 1024) * 1024 * 1024;
  const vub = options.driver === "ts" ? null : findVubBench();
  if (options.driver === "vub" && !vub) {
    throw new Error(
      "--driver vub: vub-bench not found (VUB_BENCH, PATH, /work/shared/tools/vub-bench: make)",
    );
  }
  const contrib = contribVhostUserBlk();
  const plan = planVhostBench({
    driver: vub ? "vub" : "ts",
    haveContrib: contrib !== null,
    haveQsd: haveTool("qemu-storage-daemon"),
    wait: options.wait,
    repeat,
    seconds,
    warmup,
  });
  const [self, ...selfArgs] = selfCommand();
  const mpqCmd = [self.split("/").pop(), ...selfArgs.map((a) => a.replace(/^.*\/main\.ts$/, "main.ts"))].join(
    " ",
  );
  const perRun = seconds + warmup + (vub ? 0.2 : 0.4);
  console.log(
    `vhost-user-blk: 4 KiB random I/O on a ${size >> 20} MiB file in /dev/shm (random data, so reads hit ` +
      `real pages), one queue unless said; ${seconds} s per run (+${warmup} s warm-up), ${repeat} ` +
      `interleaved repetitions, medians (IOPS, latency, CPU: each the median over the runs) and each run's ratio.`,
  );
  console.log(
    vub
      ? `Driver: vub-bench (${vub}), the C load generator playing QEMU + guest: EVENT_IDX and indirect ` +
        `descriptors, as Linux guests use them; "drv busy" is its queue thread's busy fraction (a polling driver is always busy).`
      : `Driver: the TypeScript front-end of tests/helpers (EVENT_IDX, no indirect descriptors, one queue)` +
        `${
          options.driver === "ts"
            ? " (--driver ts)"
            : ": vub-bench is not built (make in /work/shared/tools/vub-bench)"
        }. ` +
        `It costs more CPU per request than vub-bench and limits the figures (QD32 above all); ` +
        `"driver sleeps" means after a 50 µs spin; "drv busy" is this process's CPU, fraction of a core.`,
  );
  console.log(
    `Back-ends: mpq = ${mpqCmd} vhost blk --blk-file=F --socket-path=S --num-queues=N [--poll-us=0] ` +
      `(defaults: engine auto = vmcopy with its helper thread, adaptive polling <= 128 µs, writethrough); ` +
      `libvhost-user = QEMU contrib vhost-user-blk -s S -b F (${
        contrib ?? "not built"
      }; one preadv/pwritev per request, no fdatasync: writeback; a fresh process per run, it serves one ` +
      `front-end); qsd = qemu-storage-daemon (file driver, aio=threads, cache.direct=off, writeback).`,
  );
  console.log(
    `"driver sleeps" = it sleeps on the call eventfd, as a guest with interrupts; "driver polls" = it spins on ` +
      `the used ring. CPU µs/IO and CPU % are the back-end's (all its threads, /proc).`,
  );
  for (const s of plan.skipped) console.log(`Left out: ${s}`);
  console.log(
    `${plan.steps.length} runs (${plan.workloads.length} workload${
      plan.workloads.length === 1 ? "" : "s"
    } x ${repeat}), about ` +
      `${Math.ceil((plan.steps.length * perRun) / 60 * 10) / 10} min; load average before: ${loadAverage()}`,
  );
  if (options.dryRun) {
    for (const s of plan.steps) {
      const w = plan.workloads[s.workload];
      console.log(`  rep ${s.rep + 1}: ${w.title}: ${cellLabel(w, w.cells[s.cell])}`);
    }
    return;
  }

  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "mpq-bench-vhost-" });
  const file = `${dir}/disk.img`;
  const live = new Set<Backend>();
  let vubChild: Deno.ChildProcess | null = null;
  const onSignal = (sig: "SIGINT" | "SIGTERM") => () => {
    for (const b of live) b.child.kill(Signal.SIGKILL);
    try {
      vubChild?.kill("SIGKILL");
    } catch { /* gone */ }
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch { /* gone */ }
    console.error(`vhost bench: ${sig}: back-ends killed, ${dir} removed`);
    Deno.exit(sig === "SIGINT" ? 130 : 143);
  };
  const handlers = { SIGINT: onSignal("SIGINT"), SIGTERM: onSignal("SIGTERM") };
  for (const [sig, h] of Object.entries(handlers)) Deno.addSignalListener(sig as Deno.Signal, h);
  const results: CellRuns[][] = plan.workloads.map((w) => w.cells.map(() => ({ runs: [], errors: [] })));
  try {
    // Fill the file so reads hit real pages (tmpfs holes read as shared zero pages).
    const f = await Deno.open(file, { create: true, write: true, truncate: true });
    try {
      const chunk = crypto.getRandomValues(new Uint8Array(65536));
      const mib = new Uint8Array(1 << 20);
      for (let off = 0; off < size; off += mib.length) {
        for (let i = 0; i < mib.length; i += chunk.length) mib.set(crypto.getRandomValues(chunk), i);
        let done = 0;
        while (done < mib.length) done += await f.write(mib.subarray(done));
      }
    } finally {
      f.close();
    }
    // The long-lived back-ends, all up at once (contrib starts per run).
    const started = new Map<string, Backend>();
    const startErrors = new Map<string, string>();
    for (const b of plan.backends) {
      if (b.family === "lvu") continue;
      const sock = `${dir}/${b.id}.sock`;
      const logFile = `${dir}/${b.id}.log`;
      try {
        const be = b.family === "mpq"
          ? await startMpqVhost("blk", sock, {
            args: [`--blk-file=${file}`, `--num-queues=${b.queues}`, ...b.mpqArgs],
            logFile,
          })
          : await startQsd(file, sock, { queues: b.queues, logFile });
        started.set(b.id, be);
        live.add(be);
      } catch (e) {
        startErrors.set(b.id, `${(e as Error).message}${tail(logFile)}`);
      }
    }
    const t0 = performance.now();
    let lastRep = 0;
    for (const step of plan.steps) {
      if (step.rep !== lastRep) {
        console.log(
          `repetition ${lastRep + 1}/${repeat} done (${((performance.now() - t0) / 1000).toFixed(0)} s)`,
        );
        lastRep = step.rep;
      }
      const w = plan.workloads[step.workload];
      const cell = w.cells[step.cell];
      const spec = BACKENDS[cell.backend];
      const into = results[step.workload][step.cell];
      const seed = 1000 + step.rep * 16 + step.workload;
      let be: Backend | undefined;
      const logFile = `${dir}/${spec.id}.log`;
      try {
        if (spec.family === "lvu") {
          be = await startContrib(contrib!, `${dir}/lvu.sock`, file, logFile);
          live.add(be);
        } else {
          be = started.get(spec.id);
          if (!be) throw new Error(`did not start: ${startErrors.get(spec.id)}`);
          const st = be.child.tryWait();
          if (st) throw new Error(`exited (${st.text}) before this run${tail(logFile)}`);
        }
        const run = { seconds, warmup, seed };
        into.runs[step.rep] = vub
          ? await runVub(vub, {
            socket: be.socketPath,
            rw: w.rw,
            depth: w.depth,
            queues: cell.queues,
            wait: w.wait,
            backendPid: be.child.pid,
            ...run,
          }, { tolerateLongUsedLen: spec.family === "lvu", onChild: (c) => (vubChild = c) })
          : await runTs(be.socketPath, w, be.child.pid, run);
      } catch (e) {
        into.runs[step.rep] = null;
        const exited = be?.child.tryWait();
        into.errors.push(
          `${e instanceof VubError ? "" : "run: "}${(e as Error).message}` +
            (exited && spec.family !== "lvu" ? `; the back-end exited (${exited.text})${tail(logFile)}` : ""),
        );
      } finally {
        if (spec.family === "lvu" && be) {
          await be.stop();
          live.delete(be);
          await Deno.remove(be.socketPath).catch(() => {});
        }
      }
    }
    console.log(
      `repetition ${lastRep + 1}/${repeat} done (${((performance.now() - t0) / 1000).toFixed(0)} s)`,
    );
    for (const line of reportVhost(plan, results)) console.log(line);
    console.log(`\nload average after: ${loadAverage()}`);
  } finally {
    for (const be of live) await be.stop();
    for (const [sig, h] of Object.entries(handlers)) Deno.removeSignalListener(sig as Deno.Signal, h);
    await Deno.remove(dir, { recursive: true });
  }
  // Runs that failed fail the benchmark, except contrib's writes refused for its used.len bug.
  const failed = plan.workloads.flatMap((w, wi) =>
    w.cells.flatMap((c, ci) =>
      results[wi][ci].errors.length && !(w.rw === "randwrite" && BACKENDS[c.backend].family === "lvu")
        ? [`${w.title}: ${cellLabel(w, c)}: ${results[wi][ci].errors[0]}`]
        : []
    )
  );
  if (failed.length) {
    throw new Error(`vhost benchmark: ${failed.length} back-end(s) failed runs: ${failed.join("; ")}`);
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      seconds: { type: "string", default: "3" },
      warmup: { type: "string", default: "1" },
      "size-mib": { type: "string", default: "1024" },
      wait: { type: "string", default: "both" },
      repeat: { type: "string", default: "3" },
      driver: { type: "string", default: "auto" },
      "dry-run": { type: "boolean", default: false },
    },
  });
  if (values.wait !== "poll" && values.wait !== "call" && values.wait !== "both") {
    console.error(`--wait must be call, poll or both: got ${values.wait}`);
    Deno.exit(2);
  }
  if (values.driver !== "auto" && values.driver !== "vub" && values.driver !== "ts") {
    console.error(`--driver must be auto, vub or ts: got ${values.driver}`);
    Deno.exit(2);
  }
  for (const k of ["seconds", "warmup", "size-mib", "repeat"] as const) {
    if (!(Number(values[k]) > 0)) {
      console.error(`--${k} must be a positive number: got ${values[k]}`);
      Deno.exit(2);
    }
  }
  await benchVhost({
    seconds: Number(values.seconds),
    warmup: Number(values.warmup),
    sizeMiB: Number(values["size-mib"]),
    wait: values.wait,
    repeat: Number(values.repeat),
    driver: values.driver,
    dryRun: values["dry-run"],
  });
}
